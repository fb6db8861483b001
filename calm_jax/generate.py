"""Text from a trained model: `python -m calm_jax.generate --model DIR --prompt TEXT`.

DIR is a composition export (`composition.json`, the `export/` of a compose run, see
`calm_jax.exports`) or a model export (`config.json`: pretrain, finetune or LoRA runs, and
`python -m calm_jax.convert`). Prompts are decoded together with the KV cache
(`calm_jax.decoding.generate`); every generated token is appended to the input of the anchor and
of every augmenting model. Prints one JSON object per prompt:
`{"prompt", "completion", "tokens"}`.

Tokenizer (`--tokenizer`): "auto" (default) takes the one saved beside the model by
`calm_jax.convert` (for a composition: beside its anchor); "bytes" is the byte-level vocabulary
of the key-value experiment's models (seqio's ByteVocabulary ids); any other value is the
directory of a converted model whose tokenizer to use.

Across tokenizers (a composition export whose `composition.json` says
`shared_vocabulary: false`): every augmenting model reads the text through its own tokenizer,
by default the one saved beside its own model export (`exports.frozen_source`);
`--augment_tokenizer NAME=CHOICE` (repeatable; CHOICE as for `--tokenizer`) picks another.
The prompts are decoded together by `calm_jax.cross_decoding.generate_texts` (cached; each
row re-runs its augments' re-segmented tails, exactly as on its own), prompt i with the key
`fold_in(key(seed), i)`; "tokens" are the anchor's ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax

from calm_jax import checkpoints as ckpt
from calm_jax import cross_decoding
from calm_jax import decoding
from calm_jax import exports
from calm_jax.composition import ComposedLM
from calm_jax.models import Decoder
from calm_jax.tokenizers import ByteTokenizer


def load_model(directory: str, dtype: str | None = None) -> tuple[Any, Any, str]:
    """(model, params, the directory a converted tokenizer would be beside)."""
    runtime = {"dtype": dtype} if dtype else {}
    if os.path.exists(os.path.join(directory, exports.COMPOSITION_FILE)):
        model, params = exports.load_composition(directory, **runtime)
        spec = exports.read_spec(directory)
        return model, params, exports.frozen_source(directory, "anchor", spec["anchor"])
    if not os.path.exists(os.path.join(directory, ckpt.CONFIG_FILE)):
        raise ValueError(f"--model: expected a composition export ({exports.COMPOSITION_FILE}) "
                         f"or a model export ({ckpt.CONFIG_FILE}), got {directory!r}, which "
                         f"holds neither")
    cfg, params = ckpt.load_model(directory)
    return Decoder(cfg.replace(**runtime) if runtime else cfg), params, directory


def load_tokenizer(choice: str, beside: str, flag: str = "--tokenizer"):
    """`choice` ("auto": the tokenizer saved beside the model export `beside`; "bytes"; or a
    converted model's directory); `flag` names the option in errors."""
    if choice == "bytes":
        return ByteTokenizer()
    from calm_jax.convert.checkpoint import TOKENIZER_DIR, load_tokenizer as load_converted

    where = beside if choice == "auto" else choice
    if not os.path.isdir(os.path.join(where, TOKENIZER_DIR)):
        raise ValueError(f"{flag}: expected 'bytes' (the key-value experiment's models) or "
                         f"a converted model's directory; got {choice!r}, and {where} has no "
                         f"{TOKENIZER_DIR}/")
    return load_converted(where)


def crosses_tokenizers(model: Any) -> bool:
    """Whether `model` is a composition whose augmenting models read their own tokens."""
    return isinstance(model, ComposedLM) and not model.config.shared_vocabulary


def load_augment_tokenizers(directory: str, choices: Mapping[str, str] | None = None, *,
                            flag: str = "--augment_tokenizer") -> dict[str, Any]:
    """{name: tokenizer} of every augmenting model of the composition export `directory`:
    by default the tokenizer saved beside that model's own export; `choices` {name: CHOICE}
    picks others (CHOICE as for `load_tokenizer`; `flag` names the option in errors)."""
    spec = exports.read_spec(directory)
    return pick_augment_tokenizers(
        spec["augments"], choices,
        lambda name: exports.frozen_source(directory, f"augments[{name!r}]",
                                           spec["augments"][name]), flag=flag)


def pick_augment_tokenizers(names: Iterable[str], choices: Mapping[str, str] | None,
                            beside: Callable[[str], str | None], *,
                            flag: str = "--augment_tokenizer") -> dict[str, Any]:
    """{name: tokenizer} of the augmenting models `names`: `choices` {name: CHOICE} (CHOICE as
    for `load_tokenizer`), the others "auto", the tokenizer saved beside `beside(name)` (the
    model's export; None: it has none). `flag` names the option in errors."""
    names = sorted(names)
    choices = dict(choices or {})
    for name, choice in choices.items():
        if name not in names or not isinstance(choice, str) or not choice:
            raise ValueError(f"{flag}: expected NAME=CHOICE with NAME one of {names} and CHOICE "
                             f"'auto', 'bytes' or a converted model's directory, got "
                             f"{f'{name}={choice}'!r}")
    out = {}
    for name in names:
        choice = choices.get(name, "auto")
        where = beside(name) if choice == "auto" else choice
        if where is None:
            raise ValueError(f"{flag} {name}: expected 'bytes' or a converted model's directory "
                             f"(the model was not loaded from an export, so there is no "
                             f"tokenizer beside it), got 'auto'")
        out[name] = load_tokenizer(choice, where, f"{flag} {name}")
    return out


def parse_choices(items: Sequence[str], flag: str = "--augment_tokenizer") -> dict[str, str]:
    """["NAME=CHOICE", ...] -> {NAME: CHOICE}."""
    out = {}
    for item in items:
        name, sep, choice = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{flag}: expected NAME=CHOICE, got {item!r}")
        out[name] = choice
    return out


def generate_cross(model: ComposedLM, params: Any, tokenizer: Any,
                   augment_tokenizers: dict[str, Any], prompts: Sequence[str], *,
                   max_new_tokens: int, sampling: decoding.SamplingConfig, seed: int = 0
                   ) -> list[dict[str, Any]]:
    """`generate_text`'s rows for a composition across tokenizers: the prompts decoded together
    by `cross_decoding.generate_texts` (prompt i with the key fold_in(key(seed), i))."""
    results = cross_decoding.generate_texts(
        model, params, prompts, anchor_tokenizer=tokenizer,
        augment_tokenizers=augment_tokenizers, max_new_tokens=max_new_tokens,
        sampling=sampling, eos_id=tokenizer.eos_id,
        rngs=[jax.random.fold_in(jax.random.key(seed), i) for i in range(len(prompts))])
    return [{"prompt": prompt, "completion": result.text,
             "tokens": [t for t in result.tokens if t != tokenizer.eos_id]}
            for prompt, result in zip(prompts, results)]


def generate_text(model, params, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                  sampling: decoding.SamplingConfig, seed: int = 0) -> list[dict[str, Any]]:
    ids = [tokenizer.encode(p) for p in prompts]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise ValueError(f"--prompt: expected text that encodes to at least one token, got "
                         f"{prompts[empty[0]]!r}")
    result = decoding.generate(model, params, ids, max_new_tokens=max_new_tokens,
                               sampling=sampling, eos_id=tokenizer.eos_id,
                               rng=jax.random.key(seed))
    out = []
    for prompt, row, n in zip(prompts, jax.device_get(result.tokens),
                              jax.device_get(result.lengths)):
        tokens = [int(t) for t in row[:n] if int(t) != tokenizer.eos_id]
        out.append({"prompt": prompt, "completion": tokenizer.decode(tokens), "tokens": tokens})
    return out


def run(argv: Sequence[str]) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m calm_jax.generate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="composition or model export directory")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text (repeat for a batch)")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--tokenizer", default="auto", help="auto, bytes, or a converted model")
    parser.add_argument("--augment_tokenizer", action="append", default=[],
                        help="NAME=auto|bytes|converted model: an augmenting model's own "
                             "tokenizer (a composition across tokenizers; repeatable)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None,
                        help="compute dtype of every model, e.g. float32 on a CPU")
    args = parser.parse_args(argv)
    sampling = decoding.SamplingConfig(temperature=args.temperature, top_k=args.top_k,
                                       top_p=args.top_p)
    directory = os.path.abspath(args.model)
    model, params, beside = load_model(directory, args.dtype)
    tokenizer = load_tokenizer(args.tokenizer, beside)
    if crosses_tokenizers(model):
        augment_tokenizers = load_augment_tokenizers(directory,
                                                     parse_choices(args.augment_tokenizer))
        empty = [p for p in args.prompt if not tokenizer.encode(p)]
        if empty:
            raise ValueError(f"--prompt: expected text that encodes to at least one token, "
                             f"got {empty[0]!r}")
        rows = generate_cross(model, params, tokenizer, augment_tokenizers, args.prompt,
                              max_new_tokens=args.max_new_tokens, sampling=sampling,
                              seed=args.seed)
    else:
        if args.augment_tokenizer:
            raise ValueError(f"--augment_tokenizer: expected none for {directory}, whose "
                             f"models share one vocabulary, got {args.augment_tokenizer}")
        rows = generate_text(model, params, tokenizer, args.prompt,
                             max_new_tokens=args.max_new_tokens, sampling=sampling,
                             seed=args.seed)
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    sys.stdout.flush()
    return rows


if __name__ == "__main__":
    from calm_jax.train import run_cli

    run_cli(run)
