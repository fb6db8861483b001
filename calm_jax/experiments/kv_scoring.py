"""How the key-value experiment scores its models: greedy decoding of the KV tasks' prompts,
exact match of each Table-1 row, where wrong scratchpad answers went wrong, and a linear probe of
the augmenting model's states for the key values CALM must carry into the anchor.

`calm_jax.experiments.kv_arithmetic` trains the models and calls these; `kv_report` writes what
they measured.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from calm_jax import decoding
from calm_jax import evaluation
from calm_jax.models import Decoder, TransformerConfig
from tasks import kv_arithmetic as kv

# Each pretrained model's own skill: CALM can only compose what the two models learnt.
OWN_SKILL = {"mA": "kv_substitution", "mB": "numeric_arithmetic"}
# Training prompts greedy-decoded to check a pretrained model's own skill (`Stage.min_skill`).
SKILL_CHECK_EXAMPLES = 256


def own_skill(name: str, model: TransformerConfig, params, kv_config: str, length: int) -> float:
    """Exact match (%) of pretrained model `name` ("mA" or "mB") on its own skill (`OWN_SKILL`),
    over the first `SKILL_CHECK_EXAMPLES` prompts of that skill's training split."""
    cfg = kv.CONFIGS[kv_config]
    skill = OWN_SKILL[name]
    examples = kv.get_examples(skill, "train", cfg)[:SKILL_CHECK_EXAMPLES]
    return _check_score(Decoder(model), params, examples, skill, cfg, length)


def composition_skill(model, params, kv_config: str, length: int) -> float:
    """Exact match (%) of a composed model on KV-Arithmetic over the development keys
    (`kv.dev_keys`: in neither its training data nor the evaluation), the first
    `SKILL_CHECK_EXAMPLES` prompts of `kv_arithmetic_dev`. A composition that fits its held-in
    keys without learning to read mA scores low here."""
    cfg = kv.CONFIGS[kv_config]
    examples = kv.get_examples("kv_arithmetic_dev", "validation", cfg)[:SKILL_CHECK_EXAMPLES]
    if not examples:
        raise ValueError(f"kv_config: expected a config with development keys (held-out keys "
                         f"that no evaluation expression uses), got {kv_config!r}, which has "
                         f"none")
    return _check_score(model, params, examples, "kv_arithmetic", cfg, length)


def _check_score(model, params, examples, eval_set: str, config: kv.KVConfig,
                 length: int) -> float:
    """Exact match (%) of greedy decoding on `examples`, one batch, scored as `eval_set`."""
    max_new = 1 + max(len(kv.encode_text(e["targets"])) for e in examples)
    predictions = greedy_decode(model, params, examples, length=length, max_new=max_new,
                                batch_size=len(examples))
    return score(eval_set, predictions, examples, config)


def greedy_decode(model, params, examples: Sequence[Mapping[str, str]], *, length: int,
                  max_new: int, batch_size: int = 256) -> list[str]:
    """Greedy continuations of the examples' inputs, as text up to EOS.

    `max_new` (new tokens, EOS included) is the same for every call of a run, so each model
    compiles its decoding loop once.
    """
    prompt_len = length - max_new
    prompts = [[kv.PAD_ID] + kv.encode_text(e["inputs"]) for e in examples]
    if max(map(len, prompts)) > prompt_len:
        raise ValueError(f"length: expected room for prompts of {max(map(len, prompts))} tokens "
                         f"plus {max_new} new ones, got {length}")
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n)  # static shapes: one compile
        tokens = np.zeros((batch_size, prompt_len), np.int32)
        for i, p in enumerate(chunk):
            tokens[i, :len(p)] = p
        result = decoding.generate(model, params, tokens, lengths=np.array(list(map(len, chunk))),
                                   max_new_tokens=max_new, eos_id=kv.EOS_ID, pad_id=kv.PAD_ID)
        out = np.asarray(result.tokens)
        for i in range(n):
            row = list(out[i])
            texts.append(kv.decode_ids(row[:row.index(kv.EOS_ID)] if kv.EOS_ID in row
                                       else row))
    return texts


def score(eval_set: str, predictions: Sequence[str], examples: Sequence[Mapping[str, str]],
          config: kv.KVConfig) -> float:
    """Exact match (%) of one Table-1 row.

    Without a scratchpad (`KVConfig.scratchpad`) the generated text must equal the target.
    With one, a model may write the substitution, `=`, then the answer (what the composition is
    trained to do), so each row scores its own part: KV-Substitution the text before the first
    `=`, the arithmetic rows the answer after it (`kv.split_target`; a text without `=` is all
    answer, as mB writes it). The answer must match exactly, digit for digit
    (`evaluation.exact_match` without stripping whitespace).
    """
    if config.scratchpad:
        if eval_set == "kv_substitution":
            predictions = [p.partition(kv.PROMPT_SUFFIX)[0] for p in predictions]
        else:
            predictions = [kv.split_target(p, config)[1] for p in predictions]
            examples = [{"targets": kv.split_target(e["targets"], config)[1]} for e in examples]
    return evaluation.exact_match(predictions, [e["targets"] for e in examples], strip=False)


ERROR_KINDS = ("correct", "substitution", "arithmetic", "other")


def scratchpad_errors(predictions: Sequence[str], examples: Sequence[Mapping[str, str]],
                      config: kv.KVConfig) -> dict[str, float] | None:
    """Where wrong answers on an arithmetic row went wrong (% of the examples, by kind).

    With a scratchpad a model writes the numbers, `=`, then their sum, so a wrong answer is
    `substitution` (the numbers written are not the expression's, but the answer is right for
    the numbers written: the arithmetic was sound), `arithmetic` (the right numbers, a wrong
    sum) or `other` (both wrong, or nothing parseable). The expression's numbers are the target's
    substitution, or the prompt itself on Numeric-Arithmetic (whose target is the bare answer).
    None without a scratchpad.
    """
    if not config.scratchpad:
        return None
    counts = dict.fromkeys(ERROR_KINDS, 0)
    for p, e in zip(predictions, examples, strict=True):
        expected, answer = kv.split_target(e["targets"], config)
        if expected is None:
            expected = e["inputs"].removesuffix(kv.PROMPT_SUFFIX)
        written, written_answer = kv.split_target(p, config)
        if written_answer == answer:
            kind = "correct"
        elif written == expected:
            kind = "arithmetic"
        else:
            kind = "substitution" if _sum_of(written, config) == written_answer else "other"
        counts[kind] += 1
    return {k: 100.0 * v / len(examples) for k, v in counts.items()}


def _sum_of(expression: str | None, config: kv.KVConfig) -> str | None:
    """The answer text for a written numeric expression; None if it is not one."""
    try:
        operands, ops = kv.split_expression(expression or "")
        if not all(o.isdigit() for o in operands):
            return None
        return kv.format_answer(kv.evaluate([int(o) for o in operands], ops), config)
    except ValueError:
        return None


def value_probe(model: TransformerConfig, params, config: str, *, num_examples: int = 2000,
                ridge: float = 0.1) -> dict[str, list[float]]:
    """Does mA hold key values where the anchor can read them? Accuracy (%) per mA layer.

    CALM can only carry a held-out key's value into the anchor if some mA state on the
    KV-Arithmetic prompt encodes it in the same way for every key: the composition is trained
    on held-in keys only. This fits a ridge-regression probe (one-hot targets) from mA's
    residual stream at the first key's last letter to the last digit of that key's value, on
    held-in-key prompts, and reports its accuracy on held-out-key prompts (chance is 10%).
    `"heldin"` is the fit's own accuracy; a high "heldin" with a chance-level "heldout" means
    the states identify the key but do not encode its value.
    """
    cfg = kv.CONFIGS[config]
    table = kv.make_key_table(cfg)
    heldin = set(table.heldin)
    rows = (kv.get_examples("kv_arithmetic_heldin", "train", cfg)[:num_examples]
            + kv.get_examples("kv_arithmetic_heldout", "validation", cfg)[:num_examples])
    first = [kv.split_expression(r["inputs"])[0][0] for r in rows]
    arrays = kv.to_numpy_arrays(rows, model.max_len)
    layers = range(model.num_layers + 1)
    _, states = Decoder(model).apply({"params": params}, arrays["decoder_input_tokens"],
                                     return_states=layers)
    # Input position of the key's last letter: index len(key) (position 0 holds the BOS pad).
    index = np.array([len(k) for k in first])
    digit = np.array([table.mapping[k] % 10 for k in first])
    fit = np.array([k in heldin for k in first])
    out: dict[str, list[float]] = {"heldin": [], "heldout": []}
    for layer in layers:
        x = np.asarray(states[layer], np.float64)[np.arange(len(rows)), index]
        x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
        a = x[fit]
        w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ np.eye(10)[digit[fit]])
        for name, sel in (("heldin", fit), ("heldout", ~fit)):
            out[name].append(round(100.0 * float(np.mean((x[sel] @ w).argmax(1) == digit[sel])),
                                   1))
    return out


def pretraining_warnings(accuracy: Mapping[str, Mapping[str, float]], *,
                         threshold: float = 90.0) -> list[str]:
    """One line per pretrained model whose exact match on its own skill is below `threshold`.

    Trained on the next-token loss alone, mB learnt its arithmetic in a late, abrupt drop of
    its loss whose step varied with the seed (README, "The key-value experiment"); a run whose
    mB missed it has nothing for CALM to compose, and its CALM row says more about mB than
    about the composition. `Stage.min_skill` retrains such a model; this reports what is left.
    """
    return [f"{model} reached {accuracy[model][skill]:.1f}% on {skill}, its own skill (below "
            f"{threshold:g}%): CALM's rows are bounded by it. Train {model} longer "
            f"(its Stage.steps) or with other seeds (Stage.min_skill and Stage.attempts)."
            for model, skill in OWN_SKILL.items() if accuracy[model][skill] < threshold]
