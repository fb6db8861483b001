"""seqio -> numpy bridge (the only trainer module that imports seqio / TensorFlow).

Reads a registered seqio task or mixture (importing `tasks` registers ours), runs t5x's feature
converter (prefix-LM: loss on targets only, `decoder_causal_attention` marks the prompt; or plain
decoder LM) and materialises the examples as numpy arrays for `calm_jax.data.NumpySource`, which
makes batches deterministic and resumable. Meant for the task sizes of the reproductions; cap
large datasets with `DatasetConfig.max_examples`.
"""

from __future__ import annotations

import numpy as np

from calm_jax.data import DatasetConfig


def seqio_arrays(config: DatasetConfig) -> dict[str, np.ndarray]:
    try:
        import seqio
        import tasks  # noqa: F401  (registers the project's tasks)
    except ImportError as e:
        raise ImportError("dataset.source='seqio' needs seqio and TensorFlow: "
                          "pip install 'calm-jax[data]'") from e
    try:
        provider = seqio.get_mixture_or_task(config.name)
    except ValueError as e:
        raise ValueError(f"dataset.name: expected a registered seqio task or mixture, "
                         f"got {config.name!r}") from e
    if config.prefix_lm:
        targets = config.target_length or config.length // 2
        lengths = {"inputs": config.length - targets, "targets": targets}
        converter = seqio.PrefixLMFeatureConverter(pack=config.pack)
    else:
        lengths = {"targets": config.length}
        converter = seqio.DecoderFeatureConverter(pack=config.pack)
    ds = provider.get_dataset(lengths, split=config.split, shuffle=False, seed=config.seed,
                              use_cached=False)
    ds = converter(ds, lengths)
    if config.max_examples:
        ds = ds.take(config.max_examples)
    rows = list(ds.as_numpy_iterator())
    if not rows:
        raise ValueError(f"dataset.name: {config.name!r} split {config.split!r} has no examples")
    arrays = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    if "decoder_causal_attention" in arrays:
        arrays["prompt_mask"] = arrays.pop("decoder_causal_attention").astype(bool)
    return arrays
