"""The translation experiment's reports: results.json, results.md (beside the paper's Table 2)
and results.png (training curves and chrF bars)."""

from __future__ import annotations

import os
from typing import Any, Mapping

from calm_jax.experiments import pipeline as pl
from calm_jax.experiments import translation_data as td

ORDER = ("mA", "vanilla_mA", "mB", "CALM", "finetune", "lora", "calm_vanilla_mA",
         "calm_random_mA", "calm_encoder", "calm_english", "skyline")
LABELS = {"mA": "mA", "vanilla_mA": "vanilla mA", "mB": "mB (anchor)", "CALM": "CALM (mB+mA)",
          "finetune": "mB full fine-tune on D_C", "lora": "LoRA on mB (CALM's parameter count)",
          "calm_vanilla_mA": "CALM with vanilla mA", "calm_random_mA": "CALM with random mA",
          "calm_encoder": "CALM, mA as encoder",
          "calm_english": "CALM, D_C + anchor-language text", "skyline": "mB+NTL (skyline)"}
PAPER = {"mB": 41.7, "CALM": 46.1, "skyline": 48.2}
CURVES = ("mA", "calm", "finetune", "lora", "calm_vanilla_mA", "calm_random_mA",
          "calm_encoder", "calm_english", "skyline")


def _f(x: Any, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(results: Mapping[str, Any]) -> str:
    cfg = results["config"]
    lang = td.LANGUAGES[cfg["corpus"]]
    names = {"low_high": f"{lang.low} -> {lang.high}", "high_low": f"{lang.high} -> {lang.low}"}
    directions = cfg["directions"]
    models = [m for m in ORDER if m in results["scores"]]
    lines = [f"# Low-resource translation ({cfg['corpus']})", "",
             f"Anchor: {cfg['anchor']}; mA: the anchor's first {cfg['augment_layers']} layers "
             f"trained further. Held-out books: {', '.join(cfg['eval_books'])} "
             f"({results['data']['split']['eval']['pairs']} pairs; {cfg['eval_examples']} "
             f"scored per direction, {cfg['num_shots']}-shot, greedy).", ""]
    head = "| model | " + " | ".join(f"{names[d]} chrF | chrF++" for d in directions)
    if "low_high" in directions:
        head += " | paper (XX->En chrF)"
    lines += [head + " | D_C loss | English ppl |",
              "|" + "---|" * (2 + 2 * len(directions) + ("low_high" in directions) + 1)]
    for m in models:
        row = [LABELS[m]]
        for d in directions:
            s = results["scores"][m].get(d, {})
            row += [_f(s.get("chrf")), _f(s.get("chrf++"))]
        if "low_high" in directions:
            row.append(_f(PAPER.get(m)))
        row += [_f(results["dc_loss"].get(m), 3),
                _f(results["english"].get(m, {}).get("perplexity"), 2)]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Capability preservation (English outside the Bible)", "",
              "| model | perplexity change vs mB | greedy outputs equal to mB's |", "|---|---|---|"]
    for m, p in results["preservation"].items():
        lines.append(f"| {LABELS[m]} | {p['perplexity_change_%']:+.2f}% | "
                     f"{p['same_greedy_outputs']}/{p['prompts']} |")
    for d in directions:
        books = sorted({b for m in models for b in results["groups"][m].get(d, {})})
        lines += ["", f"## chrF per held-out book, {names[d]}", "",
                  "| model | " + " | ".join(books) + " |", "|---|" + "---|" * len(books)]
        for m in models:
            g = results["groups"][m].get(d, {})
            lines.append(f"| {LABELS[m]} | " + " | ".join(
                _f(g.get(b, {}).get("chrf")) for b in books) + " |")
    lines += ["", "## Samples", ""]
    for d in directions:
        for m in ("mB", "mA", "CALM"):
            for s in results["samples"].get(m, {}).get(d, [])[:2]:
                lines.append(f"- {names[d]}, {LABELS[m]}, {s['id']}: `{s['input'][:120]}` -> "
                             f"`{s['output'][:160]}` (reference `{s['reference'][:160]}`, "
                             f"chrF {s['chrf']:.1f})")
    data = results["data"]
    lines += ["", "## Data", "",
              f"- aligned pairs: {data['counts'].get('pairs')} "
              f"({ {k: v for k, v in data['counts'].items() if k not in ('books', 'pairs')} })",
              f"- split (pairs): train {data['split']['train']['pairs']}, dev "
              f"{data['split']['dev']['pairs']} ({', '.join(data['dev_books'])}), eval "
              f"{data['split']['eval']['pairs']} ({data['split']['eval']['books']})",
              f"- mA rows {data['ma_rows']} (dropped as too long: {data['ma_dropped']}), D_C rows "
              f"{data['dc_rows']} (dropped: {data['dc_dropped']}), training pairs used "
              f"{data['train_pairs_used']}", "", "## Stages", "",
              "| stage | seconds | steps | tokens | tokens/s |", "|---|---|---|---|---|"]
    for name, s in results["stages"].items():
        lines.append(f"| {name} | {s['seconds']:.0f} | {s.get('steps', '-')} | "
                     f"{s.get('tokens', '-')} | {s.get('tokens_per_second', '-')} |")
    return "\n".join(lines) + "\n"


def write_reports(run_dir: str, results: Mapping[str, Any]) -> None:
    pl.write_json(os.path.join(run_dir, "results.json"), results)
    with open(os.path.join(run_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown(results))
    cfg = results["config"]
    lang = td.LANGUAGES[cfg["corpus"]]
    bars = {f"{lang.low}->{lang.high}" if d == "low_high" else f"{lang.high}->{lang.low}":
            {m: results["scores"][m][d]["chrf"] for m in ORDER if m in results["scores"]}
            for d in cfg["directions"]}
    curves = {c: os.path.join(run_dir, c, "metrics.jsonl") for c in CURVES
              if os.path.exists(os.path.join(run_dir, c, "metrics.jsonl"))}
    pl.plot_summary(os.path.join(run_dir, "results.png"), curves=curves, bars=bars,
                    score_label="chrF", title=f"CALM translation ({cfg['corpus']})")
