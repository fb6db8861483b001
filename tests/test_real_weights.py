"""The real SmolLM2-135M and Gemma-3-270m GGUF files (from packages, no network): our import
must match transformers' own GGUF loading, continue "The capital of France is" sensibly, and
tokenize like llama.cpp. Tests skip, with the reason, where the packages are not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.models import Decoder
from convert_support import forward, gemma3_path, needs, smollm2_path, torch_logits


@pytest.fixture(scope="module")
def smollm2():
    needs("gguf", "dequantises the real GGUF files")
    needs("tokenizers", "builds SmolLM2's BPE tokenizer")
    from calm_jax.convert import from_gguf
    from calm_jax.tokenizers import Tokenizer

    path = smollm2_path()
    cfg, params = from_gguf(path)
    return path, cfg, jax.tree.map(jnp.asarray, params), Tokenizer.from_gguf(path)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    needs("gguf", "dequantises the real GGUF files")
    needs("sentencepiece", "backs Gemma's tokenizer")
    from calm_jax.convert import from_gguf
    from calm_jax.tokenizers import Tokenizer

    path = gemma3_path(tmp_path_factory)
    cfg, params = from_gguf(path)
    return path, cfg, jax.tree.map(jnp.asarray, params), Tokenizer.from_gguf(path)


TEXT = ("The capital of France is Paris. It is known for the Eiffel Tower, and its museums "
        "hold many paintings.")


def _transformers_gguf_logits(path, ids):
    """Transformers' own GGUF loader (its own dequantisation and tensor mapping)."""
    needs("torch", "reference model")
    needs("transformers", "reference GGUF loader")
    needs("accelerate", "transformers needs it to load GGUF files")
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    return torch_logits(model, [ids])[0]


def _compare_with_transformers(model):
    path, cfg, params, tok = model
    ids = tok.encode(TEXT)
    ours = forward(cfg, params, [ids])[0]
    ref = _transformers_gguf_logits(path, ids)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"{os.path.basename(path)}: max |diff| / max |logit| = {rel:.3g}")
    assert rel < 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def greedy(model, prompt: str, steps: int, length: int = 32) -> tuple[str, np.ndarray]:
    """Greedy continuation by re-running the full forward on a fixed-length padded buffer
    (causal, so the padding after the prompt changes nothing; one compilation)."""
    _, cfg, params, tok = model
    forward = jax.jit(lambda p, x: Decoder(cfg).apply({"params": p}, x)[0])
    seq = tok.encode(prompt)
    start = len(seq)
    first = None
    for _ in range(steps):
        buf = np.zeros((1, length), np.int32)
        buf[0, :len(seq)] = seq
        logits = np.asarray(forward(params, jnp.asarray(buf)))[0, len(seq) - 1]
        first = logits if first is None else first
        seq.append(int(logits.argmax()))
    return tok.decode(seq[start:]), first


def test_smollm2_gguf_matches_transformers(smollm2):
    _compare_with_transformers(smollm2)


def test_smollm2_says_paris(smollm2):
    text, _ = greedy(smollm2, "The capital of France is", steps=3)
    print(f"SmolLM2: 'The capital of France is' -> {text!r}")
    assert text.startswith(" Paris")


def test_gemma3_gguf_matches_transformers(gemma3):
    _compare_with_transformers(gemma3)


def test_gemma3_knows_paris(gemma3):
    # Gemma-3-270m (the base model, 4-bit) continues this prompt with " the capital of the
    # country of France" (transformers' GGUF loading gives the same logits); " Paris" is in its
    # top 3, and it answers with Paris as soon as the prompt asks for a name.
    tok = gemma3[3]
    _, logits = greedy(gemma3, "The capital of France is", steps=1)
    assert tok.piece_to_id("▁Paris") in np.argsort(-logits)[:3]
    text, _ = greedy(gemma3, "The capital of France is the city of", steps=2)
    print(f"Gemma 3: 'The capital of France is the city of' -> {text!r}")
    assert text.startswith(" Paris")


def _llama_cpp_tokens(path: str, texts: list[str]):
    """llama.cpp's own tokenisation, in a subprocess (a crash there must not end pytest)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python not installed: no llama.cpp reference tokenizer")
    code = ("import json, sys, llama_cpp\n"
            "m = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)\n"
            "print(json.dumps([m.tokenize(t.encode(), add_bos=False, special=True)"
            " for t in json.loads(sys.argv[2])]))\n")
    run = subprocess.run([sys.executable, "-c", code, path, json.dumps(texts)],
                         capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        pytest.skip(f"llama.cpp reference tokenizer failed: {run.stderr[-300:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


TOKENIZER_TEXTS = [
    TEXT, "Hello world! 12345 numbers,  double  spaces\n\nnew lines\ttabs  ",
    "Ünïcödé ✓ 漢字 emoji 🙂", " leading space", "<|im_start|>user\nHi<|im_end|>",
    "<start_of_turn>user\nhi<end_of_turn>\n", "def f(x):\n    return x**2  # comment",
]


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_gguf_tokenizers_match_llama_cpp(which, request):
    path, _, _, tok = request.getfixturevalue(which)
    want = _llama_cpp_tokens(path, TOKENIZER_TEXTS)
    for text, ids in zip(TOKENIZER_TEXTS, want):
        assert tok.encode(text, add_bos=False) == ids, text
        assert tok.decode(ids) == tok.decode(tok.encode(text))
