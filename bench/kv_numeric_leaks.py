"""Where CALM's wrong Numeric-Arithmetic restatements come from (key-value experiment).

CALM writes a numeric prompt's expression again before its sum (`463-229=` -> `463-229=4320`),
while mB answers at once (`463-229=` -> `4320`). For a finished run directory of
`calm_jax.experiments.kv_arithmetic` this decodes the Numeric-Arithmetic evaluation prompts with
mB and with CALM (greedy), and counts, among CALM's restated digits that differ from the
prompt's, how many equal the digit mB writes at the same offset after `=` (about 1 in 10 by
chance). Prints one JSON line.

    python bench/kv_numeric_leaks.py runs/kv/s0
"""

from __future__ import annotations

import argparse
import json
import os

from calm_jax import checkpoints as ckpt
from calm_jax.experiments import kv_scoring
from calm_jax.exports import load_composition
from calm_jax.models import Decoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a kv_arithmetic run directory (with pipeline.json)")
    parser.add_argument("--kv_config", default="laptop_scratchpad")
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--examples", type=int, default=500)
    args = parser.parse_args()
    import tasks.kv_arithmetic as kv

    with open(os.path.join(args.run_dir, "pipeline.json")) as f:
        stages = json.load(f)["stages"]
    examples = kv.get_examples("numeric_arithmetic", "validation",
                               kv.CONFIGS[args.kv_config])[:args.examples]
    max_new = 1 + max(len(kv.encode_text(e["targets"])) for e in examples) * 3
    mb_cfg, mb_params = ckpt.load_model(stages["mB"]["result"]["export"])
    mb = kv_scoring.greedy_decode(Decoder(mb_cfg), mb_params, examples, length=args.length,
                                  max_new=max_new)
    model, params = load_composition(stages["calm"]["result"]["export"])
    calm = kv_scoring.greedy_decode(model, params, examples, length=args.length,
                                    max_new=max_new)
    rows = wrong = leaked = 0
    for example, answer, written in zip(examples, mb, calm):
        prompt, restated = example["inputs"][:-1], written.split("=")[0]
        if restated == prompt:
            continue
        rows += 1
        for i, (want, got) in enumerate(zip(prompt, restated)):
            if want != got:
                wrong += 1
                leaked += i < len(answer) and answer[i] == got
    print(json.dumps({"bench": "kv_numeric_leaks", "run_dir": args.run_dir,
                      "examples": len(examples), "rows_restated_wrong": rows,
                      "wrong_digits": wrong, "equal_to_mB_answer_digit": leaked}))


if __name__ == "__main__":
    main()
