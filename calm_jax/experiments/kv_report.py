"""The key-value experiment's reports: `results.json`, `results.md` (our numbers beside the
paper's Table 1, the pretraining and composition checks, the ablations, scratchpad errors and the value probe)
and `results.png` (training curves and accuracy bars), written into the run directory."""

from __future__ import annotations

import json
import os

from calm_jax.experiments.pipeline import plot_summary
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
    numeric = rows.get("numeric_arithmetic") or rows.get("numeric_arithmetic_written")
    if numeric:
        written = ("written as KV-Arithmetic is" if rows.get("numeric_arithmetic_written")
                   else "with bare answers")
        lines += ["", f"Composition data: {rows['kv_arithmetic_heldin']} KV-Arithmetic examples "
                  f"over held-in keys and {numeric} Numeric-Arithmetic ones, {written} "
                  f"(`compose_numeric` = {results['config']['compose_numeric']}; the paper's "
                  f"data has none)."]
    warnings = pretraining_warnings(acc)
    if warnings:
        lines += [""] + [f"**Warning**: {w}" for w in warnings]
    lines += _checks_table(
        results.get("pretraining", {}), "own skill",
        f"Pretraining checks (`Stage.min_skill`): exact match (%) on each model's own skill "
        f"over the first {SKILL_CHECK_EXAMPLES} training prompts, per training attempt.")
    lines += _checks_table(
        results.get("composition", {}), "dev KV-Arithmetic",
        f"Composition checks (`Stage.min_skill` of `compose`): exact match (%) on KV-Arithmetic "
        f"over the development keys (held-out keys in no evaluation expression), first "
        f"{SKILL_CHECK_EXAMPLES} prompts, per training attempt.")
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


def _checks_table(stages: dict, score: str, caption: str) -> list[str]:
    """Markdown lines: every checked stage's attempts ({name: {'chosen', 'attempts'}}) with
    their seeds and scores, and which one was used; none when no stage was checked."""
    checked = {name: p for name, p in stages.items()
               if any(a["skill"] is not None for a in p["attempts"])}
    if not checked:
        return []
    return (["", caption, "", f"| model | stage | seed | {score} | used |", "|---|---|---|---|---|"]
            + [f"| {name} | {a['stage']} | {a['seed']} | {a['skill']:.1f} | "
               f"{'yes' if a['stage'] == p['chosen'] else 'no'} |"
               for name, p in checked.items() for a in p["attempts"]])


def _plot(run_dir: str, results: dict) -> None:
    """results.png: every stage's training curve, and every model's and ablation's accuracy
    as a labelled bar (`pipeline.plot_summary`)."""
    bars = {name: {model: results["accuracy"][model][name] for model in ("mA", "mB", "CALM")}
            for name in PAPER_TABLE1}
    ablations = {k: v for k, v in results.get("ablations", {}).items() if k != "CALM"}
    if ablations:
        bars["kv_arithmetic ablations"] = ablations
    plot_summary(os.path.join(run_dir, "results.png"),
                 curves={stage: os.path.join(run_dir, stage, "metrics.jsonl")
                         for stage in results["stages"]},
                 bars=bars, score_label="exact match (%), greedy decoding",
                 title="Key-value arithmetic (held-out keys for KV-Arithmetic)")
