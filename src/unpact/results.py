"""The results of a run, computed and shown from the metric registry (`unpact.metrics.METRICS`).

`method_metrics` turns one method's per-item records into its entry of results.json (every
registered metric, its bootstrap interval, each attack's McNemar test against the baseline);
`table` gives the rows every table shows (the CLI, results.md, the report), and `csv_text`
results.csv. Nothing here names a metric: a registered one (also from a plugin) appears in
all of them.
"""

from __future__ import annotations

import csv
import html
import io
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unpact.attacks import attack_title
from unpact.errors import UnpactError
from unpact.metrics import (
    METRICS,
    ItemRecord,
    Metric,
    MetricContext,
    Share,
    attack_columns,
    bootstrap_ci,
    mcnemar_exact,
)
from unpact.types import plain_scalar

if TYPE_CHECKING:
    from unpact.run import StatisticsSettings

recovery_columns = attack_columns  # the name the runner and the report have always used


def _statistics(
    ctx: MetricContext, only: Callable[[Metric], bool] | None = None
) -> dict[str, Callable[[list[ItemRecord]], float]]:
    """Each figure with an interval, by its key in `ci` (`recovery.<attack>` per attack);
    of the metrics `only` accepts, where given."""
    stats: dict[str, Callable[[list[ItemRecord]], float]] = {}
    for m in METRICS.values():
        if not m.interval or (only is not None and not only(m)):
            continue
        keys = m.keys(ctx.attacks)
        if keys is not None:
            for a in keys:
                stats[f"{m.name}.{a}"] = lambda r, m=m, a=a: _float(m, m.fn(r, ctx, a))  # type: ignore[misc]
        else:
            stats[m.name] = lambda r, m=m: _float(m, m.fn(r, ctx))  # type: ignore[misc]
    return stats


def method_metrics(
    records: list[ItemRecord],
    attacks: list[str],
    collapse_threshold: float,
    statistics: StatisticsSettings | None = None,
    *,
    privleak_attack: str = "min_k",
    only: Callable[[Metric], bool] | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """One method's figures for results.json: every registered metric as a function of the
    records (a per-key one as {key: value}); with `statistics`, a bootstrap interval
    for each (`ci`) and each attack's McNemar test against the baseline attack on the same
    forgotten items (`vs_<baseline>`). `only` keeps the metrics it accepts (and no tests);
    `advance(1)` is called after each interval (`interval_count` of them)."""
    ctx = MetricContext(tuple(attacks), collapse_threshold, privleak_attack)
    out: dict[str, Any] = {}
    for m in METRICS.values():
        if only is not None and not only(m):
            continue
        keys = m.keys(attacks)
        if keys is not None:
            out[m.name] = {a: _number(m, m.fn(records, ctx, a)) for a in keys}
        else:
            out[m.name] = _number(m, m.fn(records, ctx))
    if statistics is not None and statistics.resamples:
        out["ci"] = {}
        for name, fn in _statistics(ctx, only).items():
            out["ci"][name] = list(
                bootstrap_ci(
                    records,
                    fn,
                    resamples=statistics.resamples,
                    seed=statistics.seed,
                    level=statistics.level,
                )
            )
            if advance is not None:
                advance(1)
    if only is None and statistics is not None and statistics.baseline_attack in attacks:
        base = statistics.baseline_attack
        out[f"vs_{base}"] = {
            a: {
                "only_attack": t.only_a,
                "only_baseline": t.only_b,
                "p_value": t.p_value,
                "significant": t.p_value < statistics.alpha,
            }
            for a in attacks
            if a != base
            for t in [mcnemar_exact(records, a, base)]
        }
    return out


def interval_count(attacks: list[str], only: Callable[[Metric], bool] | None = None) -> int:
    """How many bootstrap intervals `method_metrics` computes for a method (its progress)."""
    return len(_statistics(MetricContext(tuple(attacks), 0.0), only))


def _number(m: Metric, value: Any) -> Any:
    """A metric's value as results.json holds it: a number or None (a plugin's metric that
    returns anything else is named here, not in a table or a JSON encoder later)."""
    if value is None:
        return None
    value = plain_scalar(value)  # a 0-d tensor or array
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        # numpy's and torch's scalars as Python numbers: JSON and the tables read those
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    raise UnpactError(f"metric {m.name}: returned {value!r}, not a number or None")


def _float(m: Metric, value: Any) -> float:
    """A metric's value on a bootstrap resample: a float, NaN where it is undefined (None);
    a `Share` as itself (its counts make its interval exact at 0 and at 1)."""
    if isinstance(value, Share):
        return value
    number = _number(m, value)
    return math.nan if number is None else float(number)


@dataclass(frozen=True)
class Column:
    """One column of a results table: the metrics it shows (joined), or one attack's value
    of a per-attack metric."""

    title: str
    metrics: tuple[Metric, ...]
    attack: str | None = None

    def cell(self, m: dict[str, Any], precise: bool = False) -> str:
        if self.attack is not None:
            (metric,) = self.metrics
            return metric.display((m.get(metric.name) or {}).get(self.attack), precise)
        return self.metrics[0].join.join(x.display(m.get(x.name), precise) for x in self.metrics)

    def interval_key(self) -> str | None:
        """The `ci` key of a one-metric column that has an interval."""
        if len(self.metrics) != 1 or not self.metrics[0].interval:
            return None
        name = self.metrics[0].name
        return f"{name}.{self.attack}" if self.attack is not None else name


def columns(attacks: list[str], every: bool = False, split: bool = False) -> list[Column]:
    """The table's columns in registration order: metrics sharing a `column` are joined in
    one (`split`: one column each, so each shows its interval); a per-attack metric gets a
    column per attack (and "any"). `every`: one column per metric, also those that have no
    table column (`other_columns` is just those)."""
    out: list[Column] = []
    shared: dict[str, int] = {}
    for m in METRICS.values():
        if m.per_attack and (every or m.column is not None):
            out += [
                Column(f"{m.title}\n{attack_title(a)}", (m,), a) for a in attack_columns(attacks)
            ]
        elif m.variants is not None:
            if every or m.column is not None:
                out += [Column(f"{m.title}\n{a}", (m,), a) for a in m.variants]
        elif every or (split and m.column is not None):
            out.append(Column(m.title, (m,)))
        elif m.column is not None:
            if m.column in shared:
                n = shared[m.column]
                out[n] = Column(out[n].title, (*out[n].metrics, m))
            else:
                shared[m.column] = len(out)
                out.append(Column(m.column, (m,)))
    return out


def other_columns(attacks: list[str]) -> list[Column]:
    """One column per metric that the table leaves out (no `column`, not per attack)."""
    out: list[Column] = []
    for m in METRICS.values():
        if m.column is not None:
            continue
        if m.per_attack:
            out += [
                Column(f"{m.title} {attack_title(a)}", (m,), a) for a in attack_columns(attacks)
            ]
            continue
        if m.variants is not None:
            out += [Column(f"{m.title} {a}", (m,), a) for a in m.variants]
        else:
            out.append(Column(m.title, (m,)))
    return out


def table(results: dict[str, Any], precise: bool = False) -> tuple[list[str], list[list[str]]]:
    """The per-method table of one run (the paper's Table 2 shape): headers and rows of
    text, the method's name first."""
    cols = columns(results["attacks"])
    rows = [[name, *(c.cell(m, precise) for c in cols)] for name, m in results["methods"].items()]
    return ["method", *(c.title for c in cols)], rows


def markdown_table(results: dict[str, Any]) -> str:
    """The per-method table of one run as Markdown (a label's own `|` or markup shown as
    text: an attack's label is free text)."""
    head, rows = table(results)
    lines = ["| " + " | ".join(map(markdown_cell, head)) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(map(markdown_cell, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_cell(text: str) -> str:
    """Text as one Markdown table cell: on one line, its pipes and HTML shown, not read."""
    return html.escape(" ".join(text.split()), quote=False).replace("|", "\\|")


def csv_columns(attacks: list[str]) -> list[tuple[str, str, str | None]]:
    """(CSV header, metric name, attack) of every registered figure, flat."""
    out: list[tuple[str, str, str | None]] = []
    for m in METRICS.values():
        keys = m.keys(attacks)
        if keys is not None:
            out += [(f"{m.name}_{a}", m.name, a) for a in keys]
        else:
            out.append((m.name, m.name, None))
    return out


def csv_text(results: dict[str, Any]) -> str:
    """results.csv: one row per method, then one per reference model (`original`,
    `retrained`: the figures results.json gives them under `references`, the rest empty),
    one column per registered figure (raw numbers)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    cols = csv_columns(results["attacks"])
    writer.writerow(["method", *(h for h, _, _ in cols)])
    models = {**results["methods"], **results.get("references", {})}
    for name, m in models.items():
        row = [m.get(key) if a is None else (m.get(key) or {}).get(a) for _, key, a in cols]
        writer.writerow([name, *("" if v is None else v for v in row)])
    return buf.getvalue()


def results_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method: every figure by its CSV name (for programs)."""
    cols = csv_columns(results["attacks"])
    return [
        {
            "method": name,
            **{h: m.get(key) if a is None else (m.get(key) or {}).get(a) for h, key, a in cols},
        }
        for name, m in results["methods"].items()
    ]


def finite(value: Any) -> Any:
    """JSON has no NaN: undefined rates (nothing to divide by) are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value
