"""python -m calm_jax.convert --source PATH --format {hf,gguf} --out DIR [--overwrite]

Converts a Hugging Face checkpoint directory or a GGUF file into an orbax checkpoint of
calm_jax `Decoder` params plus `config.json` and the model's tokenizer, and prints a JSON
summary. Load the result with `calm_jax.convert.load_converted(DIR)`.
"""

from __future__ import annotations

import argparse
import json
import sys

from calm_jax import convert as conv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calm_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True,
                        help="Hugging Face model directory or .gguf file")
    parser.add_argument("--format", required=True, choices=conv.FORMATS, dest="fmt")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing converted model in --out")
    args = parser.parse_args(argv)
    try:
        out = conv.convert(args.source, args.fmt, args.out, overwrite=args.overwrite)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(f"{out}/{conv.checkpoint.INFO_FILE}") as fh:
        info = json.load(fh)
    cfg = conv.load_config(out)
    print(json.dumps({"out": out, "num_layers": cfg.num_layers, "embed_dim": cfg.embed_dim,
                      "vocab_size": cfg.vocab_size, **info}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
