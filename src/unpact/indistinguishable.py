"""The indistinguishability metrics (SPEC 9), registered like every metric: each a function
of per-item records that carry each membership-inference attack's score under the model and
under the retrained reference, the truth ratios, memorisation and fluency
(`unpact.run.membership` fills them; `unpact.membership` defines them).

Read them together: a model is indistinguishable from one that never learned the forget
set when its membership AUCs are near the retrained reference's (PrivLeak's interval holds
0) and its truth ratios are distributed like the reference's (forget quality, a KS p-value,
above 0.05). A large negative PrivLeak is over-unlearning: the forget set then looks *less*
familiar than text never seen, which tells it apart too.

TOFU's model utility, the figure TOFU reads beside forget quality, is here too: it is
computed from the same teacher-forced scores, on the retain items.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from unpact.membership import DOCUMENT_ATTACKS, MIA_ATTACKS, auc, forget_quality, privleak
from unpact.metrics import ItemRecord, MetricContext, defined_mean, metric, share


def _auc(records: list[ItemRecord], attack: str, retrained: bool = False, of: str = "") -> float:
    """AUC of telling forget (members) from holdout (non-members) by `attack`'s score: the
    items' answers, or with `of="_document"` the documents."""

    def score(r: ItemRecord) -> float | None:
        found = r.membership_retrained if retrained else r.membership
        return None if found is None else found.get(attack)

    members = [s for r in records if r.split == f"forget{of}" and (s := score(r)) is not None]
    others = [s for r in records if r.split == f"holdout{of}" and (s := score(r)) is not None]
    return auc(members, others)


@metric(
    "mia_auc",
    title="MIA AUC",
    fmt="float",
    needs=("membership",),
    variants=MIA_ATTACKS,
)
def _mia_auc(records: list[ItemRecord], ctx: MetricContext, attack: str) -> float:
    """AUC of each membership-inference attack telling forget texts (members) from holdout
    texts (never taught): 1 the forget set is recognised, 0.5 indistinguishable."""
    return _auc(records, attack)


@metric(
    "privleak",
    title="PrivLeak",
    fmt="percent",
    needs=("membership",),
    column="PrivLeak",
)
def _privleak(records: list[ItemRecord], ctx: MetricContext) -> float:
    """MUSE's PrivLeak: (AUC - AUC of the retrained reference) / AUC of the retrained
    reference, with the configured attack (Min-K% by default); near 0 indistinguishable,
    positive the forget set still looks familiar, negative over-unlearned."""
    return _privleak_of(records, ctx.privleak_attack)


def _privleak_of(records: list[ItemRecord], attack: str, of: str = "") -> float:
    return privleak(_auc(records, attack, of=of), _auc(records, attack, retrained=True, of=of))


@metric(
    "mia_auc_documents",
    title="MIA AUC (documents)",
    fmt="float",
    needs=("membership",),
    variants=DOCUMENT_ATTACKS,
)
def _mia_auc_documents(records: list[ItemRecord], ctx: MetricContext, attack: str) -> float:
    """AUC of each membership-inference attack (GradNorm aside) telling the forget documents
    from the holdout documents, each scored as raw text as MUSE scores its texts: 1 the
    forget documents are recognised, 0.5 indistinguishable."""
    return _auc(records, attack, of="_document")


@metric("privleak_documents", title="PrivLeak (documents)", fmt="percent", needs=("membership",))
def _privleak_documents(records: list[ItemRecord], ctx: MetricContext) -> float:
    """MUSE's PrivLeak on the documents, MUSE's own setting (its forget and holdout texts),
    with the configured attack: near 0 indistinguishable from the retrained reference."""
    return _privleak_of(records, ctx.privleak_attack, of="_document")


@metric("truth_ratio", title="truth ratio", fmt="float", needs=("membership",))
def _truth_ratio(records: list[ItemRecord], ctx: MetricContext) -> float:
    """Mean over forget items of TOFU's truth ratio (wrong answers' normalised probability
    over the paraphrased answer's): below 1 the truth is preferred."""
    return defined_mean([r.truth_ratio for r in records if r.split == "forget"])


def truth_ratio_near_one(ratios: list[float]) -> float:
    """TOFU's truth ratio on a set to forget as open-unlearning reports it (aggregator
    `closer_to_1_better`): the mean of min(ratio, 1 / ratio), 1 when the wrong answers are
    as likely as the paraphrased true one (no preference left), near 0 when either is far
    likelier. NaN without ratios."""
    kept = [min(r, 1 / r) if r > 0 else 0.0 for r in ratios if math.isfinite(r)]
    return sum(kept) / len(kept) if kept else math.nan


@metric("forget_truth_ratio", title="forget truth ratio", fmt="float", needs=("membership",))
def _forget_truth_ratio(records: list[ItemRecord], ctx: MetricContext) -> float:
    """TOFU's forget truth ratio as open-unlearning reports it (`forget_truth_ratio`,
    aggregator `closer_to_1_better`): mean over forget items of min(ratio, 1 / ratio);
    higher: the model prefers the true answer less (1: no preference)."""
    return truth_ratio_near_one(
        [r.truth_ratio for r in records if r.split == "forget" and r.truth_ratio is not None]
    )


@metric("forget_prob", title="forget probability", fmt="float", needs=("membership",))
def _forget_prob(records: list[ItemRecord], ctx: MetricContext) -> float:
    """TOFU's Prob on the forget set (open-unlearning's `forget_Q_A_Prob`, `probability`
    in `src/evals/metrics/memorization.py`): mean over forget items of exp(-mean token NLL)
    of the true answer given its question, the LOSS attack's score exponentiated."""
    return defined_mean(
        [
            math.exp(r.membership["loss"])
            for r in records
            if r.split == "forget" and r.membership and "loss" in r.membership
        ]
    )


@metric("retain_prob", title="retain probability", fmt="float", needs=("membership",))
def _retain_prob(records: list[ItemRecord], ctx: MetricContext) -> float:
    """TOFU's Prob on the retain set (open-unlearning's `retain_Q_A_Prob`): mean over
    retain items (those with paraphrased and perturbed answers, TOFU's `retain_perturbed`)
    of exp(-mean token NLL) of the true answer given its question."""
    return defined_mean([r.answer_prob for r in records if r.split == "retain"])


def truth_ratio_kept(ratios: list[float]) -> float:
    """TOFU's truth ratio on a set the model should still know (open-unlearning's
    `true_better` aggregator): the mean of max(0, 1 - ratio), 1 when every wrong answer is
    far less likely than the paraphrased true one, 0 when none is less likely. NaN
    without ratios."""
    kept = [max(0.0, 1.0 - r) for r in ratios if math.isfinite(r)]
    return sum(kept) / len(kept) if kept else math.nan


@metric("retain_truth_ratio", title="retain truth ratio", fmt="float", needs=("membership",))
def _retain_truth_ratio(records: list[ItemRecord], ctx: MetricContext) -> float:
    """TOFU's truth ratio on the retain set as TOFU scores a set to keep (open-unlearning's
    `retain_Truth_Ratio`, aggregator `true_better`): mean of max(0, 1 - truth ratio)."""
    return truth_ratio_kept(
        [r.truth_ratio for r in records if r.split == "retain" and r.truth_ratio is not None]
    )


def harmonic_mean(values: list[float]) -> float:
    """The harmonic mean (scipy's `hmean`, as open-unlearning's `hm_aggregate`): 0 when a
    value is 0, NaN when one is undefined or there are none."""
    if not values or any(not math.isfinite(v) for v in values):
        return math.nan
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


# TOFU's general-knowledge sets, as the TOFU reader names their items (`unpact.data.real`):
# each its own part of the model utility, as TOFU and open-unlearning average them
TOFU_GENERAL_SETS = ("tofu-real_authors", "tofu-world_facts")


def utility_set(split: str, item_id: str) -> str:
    """The set of TOFU's model utility a retain or general item belongs to: "retain", one
    of TOFU's real-authors and world-facts sets (by the TOFU reader's ids), or "general"
    for any other benchmark's general items."""
    if split == "retain":
        return "retain"
    return next((s for s in TOFU_GENERAL_SETS if item_id.startswith(f"{s}-")), "general")


class _Placed(Protocol):
    @property
    def split(self) -> str: ...
    @property
    def id(self) -> str: ...


P = TypeVar("P", bound=_Placed)


def utility_sets(rows: Iterable[P]) -> dict[str, list[P]]:
    """Retain and general items or records by their set of TOFU's model utility
    (`utility_set`), in the order the sets first come."""
    sets: dict[str, list[P]] = {}
    for r in rows:
        sets.setdefault(utility_set(r.split, r.id), []).append(r)
    return sets


# Each set's three parts of the model utility by open-unlearning's names for them (the keys
# of its TOFU evaluation's output), so a figure here reads against one of theirs; "general"
# is any other benchmark's general items, read as TOFU reads its general sets
UTILITY_PARTS = {
    "retain": ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio"),
    "tofu-real_authors": ("ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio"),
    "tofu-world_facts": ("wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio"),
    "general": ("general_Q_A_Prob_normalised", "general_Q_A_ROUGE", "general_Truth_Ratio"),
}
_PART_OF = {key: (name, k) for name, keys in UTILITY_PARTS.items() for k, key in enumerate(keys)}


def _utility_scored(records: list[ItemRecord]) -> list[ItemRecord]:
    return [r for r in records if r.split in ("retain", "general") and r.answer_prob is not None]


# one set's Prob, ROUGE and truth ratio (`true_better`), in UTILITY_PARTS' order
_PART_FNS: tuple[Callable[[list[ItemRecord]], float], ...] = (
    lambda rows: defined_mean([r.answer_prob for r in rows]),
    lambda rows: defined_mean([r.rouge_after for r in rows]),
    lambda rows: truth_ratio_kept([r.truth_ratio for r in rows if r.truth_ratio is not None]),
)


_UTILITY: dict[str, Any] = {"fmt": "float", "higher_is_better": True, "needs": ("membership",)}


@metric("model_utility", title="model utility", **_UTILITY)
def _model_utility(records: list[ItemRecord], ctx: MetricContext) -> float:
    """TOFU's model utility (open-unlearning's `model_utility`, `hm_aggregate` in
    `src/evals/metrics/memorization.py`): the harmonic mean, over each set the items give,
    of its Prob, ROUGE and truth ratio (`true_better`): the retain items with paraphrased and
    perturbed answers (TOFU's `retain_perturbed`: Prob of the answer, truth ratio against
    the paraphrase) and the general items with perturbed answers, each of TOFU's
    real-authors and world-facts sets apart (Prob normalised over the answer and the
    perturbed ones, truth ratio against the answer itself). NaN when a part is undefined."""
    sets = utility_sets(_utility_scored(records)).values()
    return harmonic_mean([part(rows) for rows in sets for part in _PART_FNS])


@metric("model_utility_parts", title="model utility part", variants=tuple(_PART_OF), **_UTILITY)
def _model_utility_parts(records: list[ItemRecord], ctx: MetricContext, part: str) -> float:
    """The parts of TOFU's model utility, each set's Prob, ROUGE and truth ratio
    (`true_better`), by open-unlearning's names (`retain_Q_A_Prob`, `ra_Q_A_ROUGE`,
    `wf_Truth_Ratio`, ...; `general_*` for another benchmark's general items): the model
    utility is their harmonic mean over the sets the run has. NaN for a set it lacks."""
    name, k = _PART_OF[part]
    rows = [r for r in _utility_scored(records) if utility_set(r.split, r.id) == name]
    return _PART_FNS[k](rows) if rows else math.nan


@metric(
    "forget_quality",
    title="forget quality",
    fmt="pvalue",
    interval=False,
    higher_is_better=True,
    needs=("membership",),
    column="forget quality",
)
def _forget_quality(records: list[ItemRecord], ctx: MetricContext) -> float:
    """TOFU's forget quality: the KS test's p-value between this model's and the retrained
    reference's truth ratios on the forget items (above 0.05: indistinguishable)."""
    forget = [r for r in records if r.split == "forget"]
    return forget_quality(
        [r.truth_ratio for r in forget if r.truth_ratio is not None],
        [r.truth_ratio_retrained for r in forget if r.truth_ratio_retrained is not None],
    )


@metric("verbmem", title="VerbMem", fmt="float", needs=("membership",))
def _verbmem(records: list[ItemRecord], ctx: MetricContext) -> float:
    """MUSE's VerbMem: mean ROUGE-L F1 (over rouge_score's words, as MUSE scores it) of the
    greedy continuation of each forget document's first tokens (or of each of the
    benchmark's own probes, MUSE's verbmem set) against its true continuation."""
    return defined_mean([r.verbmem for r in records if r.split in ("forget", "verbmem")])


@metric("exact_memorisation", title="exact memorisation", needs=("membership",))
def _exact(records: list[ItemRecord], ctx: MetricContext) -> float:
    """Mean over forget items of the share of answer tokens that are the model's argmax
    under teacher forcing (open-unlearning)."""
    return defined_mean([r.exact_memorisation for r in records if r.split == "forget"])


@metric("extraction_strength", title="extraction strength", needs=("membership",))
def _extraction(records: list[ItemRecord], ctx: MetricContext) -> float:
    """Mean over forget items of 1 - k/|answer|, k the shortest true prefix after which
    the model's argmax reproduces the rest (open-unlearning)."""
    return defined_mean([r.extraction_strength for r in records if r.split == "forget"])


@metric("fluency", title="fluency", fmt="float", needs=("membership", "fluency"))
def _fluency(records: list[ItemRecord], ctx: MetricContext) -> float:
    """Mean over forget answers of their mean token log-prob under the untaught base model
    minus the true answer's (nats; about 0: as well-formed as the true answer, far below:
    not text the base model would write)."""
    return defined_mean([r.fluency.get("relative") for r in records if r.fluency])


@metric(
    "degenerate",
    title="degenerate",
    higher_is_better=False,
    needs=("membership", "fluency"),
    column="degenerate",
)
def _degenerate(records: list[ItemRecord], ctx: MetricContext) -> float:
    """Share of forget answers that are degenerate text (empty, far less likely under the
    untaught base model than the true answer, or mostly one repeated character run or word)
    rather than a well-formed answer, wrong or right."""
    flags = [r.fluency["degenerate"] for r in records if r.fluency]
    return share(sum(flags), len(flags))
