"""The key-value experiment's reports: `results.json`, `results.md` (our numbers beside the
paper's Table 1, the pretraining checks, the ablations, scratchpad errors and the value probe)
and `results.png` (training curves and accuracy bars), written into the run directory."""

from __future__ import annotations

import json
import os

import numpy as np

from calm_jax.experiments.kv_scoring import ERROR_KINDS, SKILL_CHECK_EXAMPLES, pretraining_warnings

# Table 1 of the paper (accuracy %): dataset -> (mA, mB, CALM).
PAPER_TABLE1 = {
    "kv_substitution": (98.1, 0.0, 92.9),
    "numeric_arithmetic": (4.2, 73.7, 72.0),
    "kv_arithmetic": (0.7, 0.0, 84.3),
}


def write_reports(run_dir: str, results: dict) -> None:
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    acc = results["accuracy"]
    lines = ["# Key-value arithmetic: ours (paper)", "",
             "Exact-match accuracy (%) of greedy decoding; KV-Arithmetic over held-out keys.", "",
             "| Dataset | mA | mB | CALM |", "|---|---|---|---|"]
    for key, paper in PAPER_TABLE1.items():
        ours = [acc[m][key] for m in ("mA", "mB", "CALM")]
        lines.append(f"| {key} | " + " | ".join(f"{o:.1f} ({p})" for o, p in zip(ours, paper))
                     + " |")
    rows = results.get("config", {}).get("compose_rows", {})
    if rows.get("numeric_arithmetic"):
        lines += ["", f"Composition data: {rows['kv_arithmetic_heldin']} KV-Arithmetic examples "
                  f"over held-in keys and {rows['numeric_arithmetic']} Numeric-Arithmetic ones "
                  f"(`compose_numeric` = {results['config']['compose_numeric']}; the paper's "
                  f"data has none)."]
    warnings = pretraining_warnings(acc)
    if warnings:
        lines += [""] + [f"**Warning**: {w}" for w in warnings]
    checked = {name: p for name, p in results.get("pretraining", {}).items()
               if any(a["skill"] is not None for a in p["attempts"])}
    if checked:
        lines += ["", f"Pretraining checks (`Stage.min_skill`): exact match (%) on each model's "
                  f"own skill over the first {SKILL_CHECK_EXAMPLES} training prompts, per "
                  f"training attempt.", "",
                  "| model | stage | seed | own skill | used |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {a['stage']} | {a['seed']} | {a['skill']:.1f} | "
                  f"{'yes' if a['stage'] == p['chosen'] else 'no'} |"
                  for name, p in checked.items() for a in p["attempts"]]
    if len(results["ablations"]) > 1:
        lines += ["", "Ablations on KV-Arithmetic (held-out keys):", "",
                  "| Variant | accuracy |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in results["ablations"].items()]
    if results.get("errors"):
        lines += ["", "Arithmetic answers by kind (% of the examples; `scratchpad_errors`): "
                  "`substitution` = wrong numbers written, right sum of them; `arithmetic` = "
                  "right numbers, wrong sum; `other` = both or unparseable.", "",
                  "| model | dataset | " + " | ".join(ERROR_KINDS) + " |",
                  "|---|---" + "|---" * len(ERROR_KINDS) + "|"]
        lines += [f"| {name} | {key} | " + " | ".join(f"{row[k]:.1f}" for k in ERROR_KINDS)
                  + " |" for name, rows in results["errors"].items() for key, row in rows.items()]
    if "value_probe" in results:
        probe = results["value_probe"]
        lines += ["", "Linear probe of mA's states at a key's last letter for the last digit of "
                  "its value, fitted on held-in keys (chance 10%; see `value_probe`):", "",
                  "| mA layer | " + " | ".join(map(str, range(len(probe["heldout"])))) + " |",
                  "|---" * (len(probe["heldout"]) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{v:.1f}" for v in probe[name]) + " |"
                  for name in ("heldin", "heldout")]
    lines += ["", f"Total time: {results['seconds']} s."]
    with open(os.path.join(run_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(run_dir, results)


def _plot(run_dir: str, results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.5))
    for stage in results["stages"]:
        path = os.path.join(run_dir, stage, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rows = [json.loads(line) for line in f if '"loss"' in line]
        curves.plot([r["step"] for r in rows],  # null: a non-finite loss (skipped update)
                    [np.nan if r["loss"] is None else r["loss"] for r in rows], label=stage)
    curves.set(xlabel="step", ylabel="training loss (target tokens)", yscale="log",
               title="Training curves")
    if curves.lines:  # no stage logs (a report rewritten from results alone): no legend
        curves.legend()
    acc = results["accuracy"]
    names = list(PAPER_TABLE1)
    width = 0.25
    for i, model in enumerate(("mA", "mB", "CALM")):
        xs = np.arange(len(names)) + (i - 1) * width
        bars.bar(xs, [acc[model][n] for n in names], width, label=model)
    bars.set_xticks(np.arange(len(names)), names)
    bars.set(ylabel="exact match (%)", ylim=(0, 100), title="Accuracy (greedy decoding)")
    bars.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "results.png"), dpi=110)
    plt.close(fig)
