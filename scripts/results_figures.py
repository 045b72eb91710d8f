"""Figures and claim tables of a finished grid run, for RESULTS.md.

Run:  .venv/bin/python scripts/results_figures.py runs/paper docs/results
      .venv/bin/python scripts/results_figures.py runs/beyond_books docs/results
      .venv/bin/python scripts/results_figures.py runs/beyond docs/results

Writes one `<benchmark>-dilemma.svg` per run folder holding a results.json, and prints per
benchmark the tables RESULTS.md quotes: FocusOnKey against PROBAB (rates, 95% bootstrap
intervals, exact McNemar test on the same items) and the focus-shift and damage figures.
For a run of the suite beyond the paper (attacks beyond the paper's three: one
benchmark's folder, or a grid such as runs/beyond, whose plots are named
`<run>-<benchmark>-dilemma.svg`) it plots recovery by any attack and adds every attack's
recovery and the checks of the attribution (keyword precision / recall, gradient
agreement, stability).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unpact.metrics import display
from unpact.report import dilemma_svg, short_label
from unpact.results import columns

PAPER_ATTACKS = {"focus_on_key", "probab", "focus_on_key_probab"}


def pct(v: float | None) -> str:
    return display("percent", v)


def num(v: float | None) -> str:
    return display("float", v)


def ci(m: dict, key: str, kind: str = "pct") -> str:
    lo_hi = (m.get("ci") or {}).get(key)
    if not lo_hi or lo_hi[0] is None:
        return ""
    fmt = "percent" if kind == "pct" else "float"
    return f" [{display(fmt, lo_hi[0])}–{display(fmt, lo_hi[1])}]"


def every_metric(results: dict) -> str:
    """Every registered metric (plugins' included) per method, from the metric registry."""
    cols = columns(results["attacks"], every=True)
    lines = [
        "| method | " + " | ".join(c.title.replace("\n", ": ") for c in cols) + " |",
        "| --- " * (len(cols) + 1) + "|",
    ]
    for name, m in results["methods"].items():
        lines.append(f"| {short_label(name)} | " + " | ".join(c.cell(m) for c in cols) + " |")
    return "\n".join(lines)


def claims(results: dict) -> str:
    lines = [
        "| method | forgotten | FocusOnKey | PROBAB | FocusOnKey+PROBAB | FocusOnKey vs PROBAB "
        "(only one / only other, p) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in results["methods"].items():
        r = m["recovery"]
        test = (m.get("vs_probab") or {}).get("focus_on_key")
        t = (
            f"{test['only_attack']} / {test['only_baseline']}, p = {test['p_value']:.3f}"
            if test
            else "–"
        )
        lines.append(
            f"| {short_label(name)} | {m['forgotten']} | {pct(r.get('focus_on_key'))}"
            f"{ci(m, 'recovery.focus_on_key')} | {pct(r.get('probab'))}{ci(m, 'recovery.probab')} "
            f"| {pct(r.get('focus_on_key_probab'))} | {t} |"
        )
    lines += [
        "",
        "| method | KeyToken sim. forgotten | kept | contribution sim. forgotten | kept "
        "| collapse | destructive retain | destructive general | retain acc. after | general acc. after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in results["methods"].items():
        lines.append(
            f"| {short_label(name)} | {num(m['keytoken_similarity_forgotten'])}"
            f"{ci(m, 'keytoken_similarity_forgotten', 'num')} | {num(m['keytoken_similarity_kept'])}"
            f"{ci(m, 'keytoken_similarity_kept', 'num')} | {num(m.get('contribution_similarity_forgotten'))} "
            f"| {num(m.get('contribution_similarity_kept'))} | {pct(m['collapse_rate'])} "
            f"| {pct(m['destructive_retain'])} | {pct(m['destructive_general'])} "
            f"| {pct(m.get('retain_acc_after'))} | {pct(m.get('general_acc_after'))} |"
        )
    return "\n".join(lines)


ATTACKS = ("focus_on_key", "probab", "paraphrase", "in_context", "keyword_only", "relearn", "any")


def beyond(results: dict) -> str:
    """Every attack's recovery, the damage, and the checks of the attribution, per method."""
    attacks = [a for a in ATTACKS if any(a in m["recovery"] for m in results["methods"].values())]
    lines = [
        "| method | forget acc. after | forgotten | "
        + " | ".join(attacks)
        + " | destructive retain | destructive general | collapse |",
        "| --- " * (len(attacks) + 6) + "|",
    ]
    for name, m in results["methods"].items():
        r = m["recovery"]
        lines.append(
            f"| {short_label(name)} | {pct(m['forget_acc_after'])} | {m['forgotten']} | "
            + " | ".join(pct(r.get(a)) for a in attacks)
            + f" | {pct(m['destructive_retain'])} | {pct(m['destructive_general'])} "
            f"| {pct(m['collapse_rate'])} |"
        )
    checks = results.get("attribution_checks") or {}
    gradient = sorted({k.split(".", 1)[1] for c in checks.values() for k in c if "." in k})
    lines += [
        "",
        "| model | KeyToken precision (keywords) | recall | "
        + " | ".join(f"Spearman {g} | top-3 {g}" for g in gradient)
        + " | KeyToken stability |",
        "| --- " * (4 + 2 * len(gradient)) + "|",
    ]
    rows = [("original", None), *results["methods"].items()]
    for name, m in rows:
        c = checks.get(name) or {}
        if m is None:
            m0 = next(iter(results["methods"].values()))
            prec, rec = m0.get("keyword_precision_before"), m0.get("keyword_recall_before")
        else:
            prec, rec = m.get("keyword_precision_after"), m.get("keyword_recall_after")
        lines.append(
            f"| {short_label(name)} | {num(prec)} | {num(rec)} | "
            + " | ".join(
                f"{num(c.get(f'spearman.{g}'))} | {num(c.get(f'top_k_overlap.{g}'))}"
                for g in gradient
            )
            + f" | {num(c.get('keytoken_stability'))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="a run or grid folder (holding results.json)")
    parser.add_argument("out", type=Path, help="where the dilemma plots go")
    args = parser.parse_args()
    runs, out = args.runs, args.out
    if not runs.is_dir():
        parser.error(f"{runs} is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    top = runs / "results.json"
    if len(list(runs.glob("*/results.json"))) == 1:  # one benchmark: the suite beyond the paper
        top = next(runs.glob("*/results.json"))
    if top.is_file() and "methods" in (results := json.loads(top.read_text())):
        bench = results["benchmark"]  # named once: beyond_books-, beyond-news-dilemma.svg
        target = out / f"{runs.name if bench in runs.name else f'{runs.name}-{bench}'}-dilemma.svg"
        target.write_text(dilemma_svg(results, attack="any"))  # FocusOnKey is ~0 for all
        print(f"## {results['benchmark']} ({target})\n")
        print(claims(results) + "\n")
        print(beyond(results) + "\n")
        print(every_metric(results) + "\n")
        return
    for results_file in sorted(runs.glob("*/results.json")):
        results = json.loads(results_file.read_text())
        m0 = next(iter(results["methods"].values()))
        suite = bool(set(results["attacks"]) - PAPER_ATTACKS)  # a grid beyond the paper
        name = results_file.parent.name
        target = out / (f"{runs.name}-{name}-dilemma.svg" if suite else f"{name}-dilemma.svg")
        first = results["attacks"][0]  # the paper grid's plots: FocusOnKey, as first drawn
        target.write_text(dilemma_svg(results, attack="any" if suite else first))
        print(f"## {results['benchmark']} ({target})")
        print(
            f"retain acc. before {pct(m0.get('retain_acc_before'))}, "
            f"general acc. before {pct(m0.get('general_acc_before'))}\n"
        )
        print(claims(results) + "\n")
        if suite:
            print(beyond(results) + "\n")
        print(every_metric(results) + "\n")


if __name__ == "__main__":
    main()
