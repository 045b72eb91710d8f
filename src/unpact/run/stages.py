"""The work of each stage of a run, as functions of a model, items and settings: the data
subset, evaluation (answer and verdict per item), unPact attribution, the attribution
checks. Caching and order are the pipeline's (`unpact.run`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from unpact.attacks import PARAPHRASES
from unpact.attribution import Attribution, attribute_many
from unpact.data.items import Benchmark, QAItem
from unpact.data.sources import materialise
from unpact.errors import UnpactError, items_named
from unpact.gradient import check_unpact
from unpact.judge import JudgeSettings, answer_items
from unpact.run.config import AttributionSettings, DataSettings, MethodSpec, _copy_at
from unpact.types import AnyModel, short_repr

if TYPE_CHECKING:
    from unpact.models import LanguageModel


def subset(bench: Benchmark, data: DataSettings, cache: Path) -> Benchmark:
    """The first N items of each limited split, as a benchmark folder in the cache."""
    limits = {
        "forget": data.forget_items,
        "retain": data.retain_items,
        "holdout": data.holdout_items or data.forget_items,
    }
    if not any(limits.values()):
        return materialise(bench, cache / "subsets")  # a real benchmark: as files, once
    kept: list[QAItem] = []
    for split in ("forget", "retain", "general", "holdout"):
        items = bench.split(split)
        kept += items[: limits.get(split) or len(items)]
    named = {i.document for i in kept}
    # a split whose items name no document (MUSE's files; a split of documents alone) keeps
    # all its documents: the texts membership inference and VerbMem read there
    naming = {i.split for i in bench.items if i.document is not None}
    documents = [d for d in bench.documents if d.id in named or d.split not in naming]
    return materialise(
        Benchmark(bench.name, kept, documents, verbatim=bench.verbatim), cache / "subsets"
    )


def evaluate(
    lm: AnyModel, items: list[QAItem], judge: JudgeSettings, label: str
) -> list[dict[str, Any]]:
    """Per item: the model's answer and whether the judge accepts it."""
    return [
        {"id": i.id, "output": output, "correct": ok}
        for i, (output, ok) in zip(items, answer_items(lm, items, judge, label))
    ]


def attribute(
    lm: AnyModel,
    items: list[QAItem],
    settings: AttributionSettings,
    baseline_token_id: int | None = None,
) -> list[dict[str, Any]]:
    with items_named(lambda n: items[n].label):
        records = attribute_many(
            lm,
            [i.question for i in items],
            [i.answer for i in items],
            unit=settings.unit,
            baseline=settings.baseline,
            baseline_token_id=baseline_token_id,
            alpha=settings.alpha,
            beta=settings.beta,
            progress=True,
            max_work=settings.max_work,
        )
    return [{"id": i.id, **r.to_dict()} for i, r in zip(items, records)]


def attribution_checks(
    lm: AnyModel,
    items: list[QAItem],
    unpact: dict[str, dict[str, Any]],
    settings: AttributionSettings,
    baseline_token_id: int | None = None,
) -> list[dict[str, Any]]:
    """Per forget item: each gradient attribution's agreement with unPact (Spearman, top-k
    overlap) and the KeyTokens' stability across paraphrases (Jaccard of their texts)."""
    rows: list[dict[str, Any]] = [{"id": i.id} for i in items]
    records = [Attribution.from_dict(unpact[i.id]) for i in items]
    for method in settings.gradient:
        if not lm.has_weights:
            raise UnpactError(f"{method} needs the model's weights; {lm.spec} is served")
        found = check_unpact(
            cast("LanguageModel", lm),  # has_weights: the local backend
            records,
            method,
            steps=settings.ig_steps,
            ig_baseline=settings.ig_baseline,
            top_k=settings.top_k,
            progress=True,
        )
        for row, check in zip(rows, found, strict=True):
            row[method] = {k: check[k] for k in ("scores", "spearman", "top_k_overlap")}
    if settings.stability:
        variants = [
            t.format(question=i.question, keywords=", ".join(i.keywords) or i.question)
            for i in items
            for t in PARAPHRASES
        ]
        k = len(PARAPHRASES)
        with items_named(
            lambda n: f"{items[n // k].label}: its paraphrase {short_repr(variants[n])}"
        ):
            records = attribute_many(
                lm,
                variants,
                [i.answer for i in items for _ in PARAPHRASES],
                unit=settings.unit,
                baseline=settings.baseline,
                baseline_token_id=baseline_token_id,
                alpha=settings.alpha,
                beta=settings.beta,
                max_work=settings.max_work,
            )
        for n, row in enumerate(rows):
            base = _key_set(Attribution.from_dict(unpact[row["id"]]).key_token_texts)
            mine = records[n * len(PARAPHRASES) : (n + 1) * len(PARAPHRASES)]
            row["stability"] = [_jaccard(base, _key_set(r.key_token_texts)) for r in mine]
            row["paraphrase_key_tokens"] = [r.key_token_texts for r in mine]
    return rows


def _at_default(spec: MethodSpec) -> bool:
    """Whether a swept run's value is what its method would use without the sweep."""
    from unpact.unlearn.config import resolve_config

    assert spec.method is not None and spec.swept is not None
    without, node, leaf = _copy_at(spec.config, spec.swept["key"])
    node.pop(leaf, None)
    swept = resolve_config(spec.method, values=spec.config).model_dump(mode="json")
    return swept == resolve_config(spec.method, values=without).model_dump(mode="json")


def _key_set(texts: list[str]) -> set[str]:
    return {t.strip().lower() for t in texts if t.strip()}


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else math.nan


def checks_summary(rows: list[dict[str, Any]], gradient: list[str]) -> dict[str, Any]:
    """Means over forget items of a model's attribution checks (NaNs left out)."""

    def mean(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None and math.isfinite(v)]
        return sum(kept) / len(kept) if kept else None

    out: dict[str, Any] = {}
    for method in gradient:
        out[f"spearman.{method}"] = mean([r[method]["spearman"] for r in rows])
        out[f"top_k_overlap.{method}"] = mean([r[method]["top_k_overlap"] for r in rows])
    if rows and "stability" in rows[0]:
        per_item = [mean(r["stability"]) for r in rows]
        out["keytoken_stability"] = mean([v for v in per_item if v is not None])
    return out
