"""The paper's numbers, each a plain function of per-item records (SPEC sections 3 and 5).

An `ItemRecord` holds what evaluation found for one item under the original and one
unlearned model; every rate below is computed from a list of them, so any number in a
report can be traced back to the items that made it.
"""

from __future__ import annotations

import array
import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from statistics import fmean
from typing import Any, Literal

from unpact.errors import check_callable, check_not_builtin


@dataclass
class ItemRecord:
    """One item, before (original model) and after (unlearned model) unlearning."""

    id: str
    # forget | retain | general | holdout | forget_document | holdout_document | verbmem
    split: str
    correct_before: bool
    correct_after: bool
    recovered: dict[str, bool] = field(default_factory=dict)  # attack -> recovered?
    prompt_sensitivity_after: float | None = None
    keytoken_similarity: float | None = None
    contribution_similarity: float | None = None
    # Provenance, for the report and for readers of items.jsonl (metrics do not use it).
    method: str = ""
    question: str = ""
    answer: str = ""
    output_before: str = ""
    output_after: str = ""
    attribution_before: dict[str, Any] | None = None  # units, contributions, key_tokens, ...
    attribution_after: dict[str, Any] | None = None
    attacks: dict[str, dict[str, Any]] = field(default_factory=dict)  # attack -> prompt, outputs
    keyword_units: list[int] | None = None  # units inside the item's ground-truth keywords
    # Indistinguishability (SPEC 9), for forget and holdout items: each membership-inference
    # attack's score under this model and under the retrained reference (higher: member)
    membership: dict[str, float] | None = None
    membership_retrained: dict[str, float] | None = None
    truth_ratio: float | None = None  # TOFU's truth ratio, this model (forget, retain, general)
    truth_ratio_retrained: float | None = None  # and the retrained reference
    exact_memorisation: float | None = None
    extraction_strength: float | None = None
    # ROUGE-L of the continuation: of its document's (a forget item: the first naming it),
    # or of its own text (a record of split verbmem: a probe, or a document no item names)
    verbmem: float | None = None
    fluency: dict[str, Any] | None = None  # base_logprob, repetition, degenerate
    # Controls and explanations of recovery (issue 22), forgotten items: per attack, whether
    # it recovers the item from the never-taught reference, and the KeyToken similarity to
    # the original of the attacked model's attribution of a recovered answer
    recovered_control: dict[str, bool] = field(default_factory=dict)
    recovered_focus: dict[str, float] = field(default_factory=dict)
    # forget items: whether the never-taught reference answers it (None without one): what
    # an unlearned model still answering more than the reference is read against
    correct_reference: bool | None = None
    # MUSE's KnowMem of the greedy answer before and after unlearning (open questions; None
    # for a multiple-choice item, whose answer is an option picked, not text written, and
    # for an answer without a word ROUGE reads: `judge.rouge_scorable`)
    knowmem_before: float | None = None
    knowmem_after: float | None = None
    # and TOFU's ROUGE (ROUGE-L recall, stemmed) of the same answers
    rouge_before: float | None = None
    rouge_after: float | None = None
    # retain and general items, for TOFU's model utility: the true answer's Prob under this
    # model (exp of minus its mean token NLL given the question; a general item's normalised
    # over its perturbed answers', as TOFU's); their truth ratio is `truth_ratio`
    answer_prob: float | None = None

    @property
    def forgotten(self) -> bool:
        """Correct under the original model, wrong under the unlearned one (SPEC 4)."""
        return self.split == "forget" and self.correct_before and not self.correct_after

    @property
    def kept(self) -> bool:
        """A forget item still answered correctly after unlearning."""
        return self.split == "forget" and self.correct_before and self.correct_after

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Share(float):
    """A share of items, k of n, as the float k / n that keeps its counts (`hits`, `of`):
    where every item or none is counted, `bootstrap_ci` gives the exact interval of the
    count, which the bootstrap's resamples cannot reach."""

    hits: int
    of: int

    def __new__(cls, hits: int, of: int) -> Share:
        self = super().__new__(cls, hits / of)
        self.hits, self.of = int(hits), int(of)
        return self

    def __getnewargs__(self) -> tuple[int, int]:  # type: ignore[override]
        return self.hits, self.of  # a copy or a pickle (float's gives its value alone)


def share(numerator: int, denominator: int) -> float:
    """`numerator` of `denominator` items as a `Share`; NaN of none (nothing to divide by)."""
    return Share(numerator, denominator) if denominator else math.nan


def accuracy(records: list[ItemRecord], split: str, when: str) -> float:
    """Share of `split` items answered correctly `when` = "before" or "after"."""
    items = [r for r in records if r.split == split]
    attr = "correct_before" if when == "before" else "correct_after"
    return share(sum(getattr(r, attr) for r in items), len(items))


def forgotten_count(records: list[ItemRecord]) -> int:
    return sum(r.forgotten for r in records)


def recovery_rate(records: list[ItemRecord], attack: str) -> float:
    """Recovered forgotten items / forgotten items (SPEC 5); NaN when nothing was forgotten.

    The denominator is the forgotten items the attack was run on: all of them, except for
    relearning, which trains on some and is tested on the rest."""
    forgotten = attacked(records, attack)
    return share(sum(r.recovered[attack] for r in forgotten), len(forgotten))


def attacked(records: list[ItemRecord], attack: str) -> list[ItemRecord]:
    """The forgotten items `attack` was run on: a recovery rate's denominator."""
    return [r for r in records if r.forgotten and attack in r.recovered]


def union_recovery_rate(
    records: list[ItemRecord], attacks: list[str], field: str = "recovered"
) -> float:
    """Forgotten items recovered by at least one of `attacks` / forgotten items attacked
    (`field`: "recovered_control" for the same attacks on the never-taught reference)."""
    got = [getattr(r, field) for r in records if r.forgotten]
    attacked = [g for g in got if any(a in g for a in attacks)]
    hit = sum(any(g.get(a, False) for a in attacks) for g in attacked)
    return share(hit, len(attacked))


def control_rate(records: list[ItemRecord], attack: str) -> float:
    """The control of a recovery rate: of this method's forgotten items that the attack ran
    on, the share the same attack "recovers" from the never-taught reference (a model that
    never knew them); NaN where the reference was not attacked. Recovery means something
    only above it. Over the same items as the recovery rate: a control row of an item the
    attack did not run on (relearning trained on it) is left out."""
    attacked = [
        r
        for r in records
        if r.forgotten and attack in r.recovered_control and attack in r.recovered
    ]
    return share(sum(r.recovered_control[attack] for r in attacked), len(attacked))


def layer_curve(records: list[ItemRecord], attack: str) -> list[float]:
    """For an attack that reads each layer (logit_lens, probe): per layer, the share of the
    forgotten items it gets right there; [] for any other attack."""
    rows = [
        r.attacks[attack]["layers"]
        for r in records
        if r.forgotten and "layers" in r.attacks.get(attack, {})
    ]
    return [sum(map(bool, col)) / len(rows) for col in zip(*rows)] if rows else []


def recovered_focus(records: list[ItemRecord], attack: str) -> float:
    """Mean KeyToken similarity to the original model's attribution of the answers an
    attack recovered (attributed under the attacked model); NaN when none was explained."""
    values = [r.recovered_focus[attack] for r in records if attack in r.recovered_focus]
    return fmean(values) if values else math.nan


def destructive_rate(records: list[ItemRecord], split: str) -> float:
    """`split` items correct before and wrong after / `split` items correct before."""
    before = [r for r in records if r.split == split and r.correct_before]
    return share(sum(not r.correct_after for r in before), len(before))


def collapse_rate(records: list[ItemRecord], threshold: float) -> float:
    """Share of forget items whose post-unlearning prompt_sensitivity is below `threshold`
    (the model no longer listens to the prompt)."""
    forget = [r for r in records if r.split == "forget" and r.prompt_sensitivity_after is not None]
    below = sum(r.prompt_sensitivity_after < threshold for r in forget)  # type: ignore[operator]
    return share(below, len(forget))


def focus_shift(
    records: list[ItemRecord], group: str, measure: str = "keytoken_similarity"
) -> float:
    """Mean pre/post similarity (`keytoken_similarity` or `contribution_similarity`) over
    the forget items that were `group` = "forgotten" or "kept" (SPEC 3)."""
    if group not in ("forgotten", "kept"):
        raise ValueError(f"group must be forgotten or kept, not {group!r}")
    values = [
        getattr(r, measure)
        for r in records
        if getattr(r, group) and getattr(r, measure) is not None
    ]
    return fmean(values) if values else math.nan


def _keyword_scores(
    records: list[ItemRecord], when: str
) -> list[tuple[float | None, float | None]]:
    scores: list[tuple[float | None, float | None]] = []
    for r in records:
        attribution = r.attribution_before if when == "before" else r.attribution_after
        if r.split != "forget" or attribution is None or not r.keyword_units:
            continue
        keys, truth = set(attribution["key_tokens"]), set(r.keyword_units)
        hit = len(keys & truth)
        scores.append((hit / len(keys) if keys else None, hit / len(truth)))
    return scores


def keyword_precision(records: list[ItemRecord], when: str) -> float:
    """Mean over forget items of |KeyTokens ∩ keyword units| / |KeyTokens|, under the
    original (`when="before"`) or the unlearned model: how often the units the model leans
    on are the words the answer hinges on (the benchmark's `keywords`)."""
    values = [p for p, _ in _keyword_scores(records, when) if p is not None]
    return fmean(values) if values else math.nan


def keyword_recall(records: list[ItemRecord], when: str) -> float:
    """Mean over forget items of |KeyTokens ∩ keyword units| / |keyword units|."""
    values = [r for _, r in _keyword_scores(records, when) if r is not None]
    return fmean(values) if values else math.nan


# ---------------------------------------------------------------------- statistics


# splits of records that only the indistinguishability figures read (never taught, or texts
# rather than items): each resampled by a generator of its own (`bootstrap_ci`)
OWN_DRAWS = ("holdout", "forget_document", "holdout_document", "verbmem")


def bootstrap_ci(
    records: list[ItemRecord],
    statistic: Callable[[list[ItemRecord]], float],
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of `statistic` over items.

    Each resample draws, within each split, as many records as the split has, with
    replacement (so a resample keeps the data's forget/retain/general sizes); resamples
    where the statistic is undefined (NaN: nothing to divide by) are dropped. NaN bounds
    when the statistic is undefined on every resample. Holdout items and the documents
    (`OWN_DRAWS`) draw from generators of their own, so the intervals of the other figures
    do not depend on them.

    A share of none or of all of its items (a `Share` of 0 or n) is the same on every
    resample, so its percentile interval would be [0, 0] or [1, 1] whatever n: there the
    interval is the exact one of the count (`exact_interval`; 0 of 30: [0, 0.116])."""
    point = statistic(records)
    if isinstance(point, Share) and point.hits in (0, point.of):
        return exact_interval(point.hits, point.of, level)  # no resample could move it
    splits = list(dict.fromkeys(r.split for r in records))
    groups = [[r for r in records if r.split == s] for s in splits if s not in OWN_DRAWS]
    # the splits only the indistinguishability figures read, each from its own generator
    own = [(s, [r for r in records if r.split == s]) for s in OWN_DRAWS]
    own = [(s, held) for s, held in own if held]
    laid_out = [r for g in groups for r in g] + [r for _, held in own for r in held]
    sizes = (tuple(len(g) for g in groups), tuple((s, len(held)) for s, held in own))
    values = []
    for drawn in _resamples(seed, *sizes, resamples):
        v = statistic([laid_out[i] for i in drawn.tolist()])
        if not math.isnan(v):
            values.append(v)
    if not values:
        return math.nan, math.nan
    values.sort()
    tail = (1 - level) / 2
    return _quantile(values, tail), _quantile(values, 1 - tail)


def exact_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of k of n items at `level`: the shares of which
    k or fewer, and k or more, each has probability (1 - level) / 2 (scipy's `binomtest`)."""
    from scipy.stats import binomtest

    found = binomtest(k, n).proportion_ci(confidence_level=level)
    return float(found.low), float(found.high)


@functools.lru_cache(maxsize=4)
def _resamples(
    seed: int, sizes: tuple[int, ...], own: tuple[tuple[str, int], ...], resamples: int
) -> tuple[array.array[int], ...]:
    """`bootstrap_ci`'s draws, as indices into the records laid out split after split
    (then the `OWN_DRAWS` splits): `random.Random(seed)` draws each split's records in
    turn, each own split from `random.Random(f"{seed}-{split}")`. Every figure of a method
    (and every method of the same split sizes) resamples the same items, so they are drawn
    once: 39 figures drew 78 million numbers one by one for 2,000 items."""
    rng = random.Random(seed)
    others = [random.Random(f"{seed}-{s}") for s, _ in own]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    own_starts = [sum(sizes) + sum(n for _, n in own[:k]) for k in range(len(own))]
    out = []
    for _ in range(resamples):
        drawn = array.array(
            "q", [a + rng.randrange(n) for a, n in zip(starts, sizes) for _ in range(n)]
        )
        for (_, n), a, other in zip(own, own_starts, others):
            drawn.extend(a + other.randrange(n) for _ in range(n))
        out.append(drawn)
    return tuple(out)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an already sorted list."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class McNemar:
    """Two attacks on the same forgotten items: `only_a` recovered by the first alone,
    `only_b` by the second alone; `p_value` is the exact two-sided McNemar test."""

    only_a: int
    only_b: int
    p_value: float


def mcnemar_exact(records: list[ItemRecord], attack: str, baseline: str = "probab") -> McNemar:
    """Is `attack`'s recovery different from `baseline`'s on the same forgotten items?

    Exact (binomial) McNemar test on the discordant items: under the null each is equally
    likely to be recovered by either attack alone. Only items both attacks were run on count."""
    return mcnemar_pairs(
        [
            (r.recovered[attack], r.recovered[baseline])
            for r in records
            if r.forgotten and attack in r.recovered and baseline in r.recovered
        ]
    )


def mcnemar_pairs(pairs: Sequence[tuple[bool, bool]]) -> McNemar:
    """The exact two-sided McNemar test of paired verdicts (the first's, the second's):
    `only_a` true for the first alone, `only_b` for the second alone; p = 1 without any."""
    a = sum(x and not y for x, y in pairs)
    b = sum(y and not x for x, y in pairs)
    n = a + b
    if n == 0:
        return McNemar(a, b, 1.0)
    tail = sum(math.comb(n, k) for k in range(min(a, b) + 1)) / 2**n
    return McNemar(a, b, min(1.0, 2 * tail))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (Holm 1979), in their order:
    rejecting each hypothesis whose adjusted p-value is below alpha keeps the chance of any
    false rejection in the family at most alpha, whatever their dependence. Sorted
    ascending, the i-th of k (from 0) is adjusted to the largest (k - j) p_(j) over j <= i,
    capped at 1: statsmodels' `multipletests(method="holm")` and R's
    `p.adjust(method="holm")`."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# ------------------------------------------------------------------------ the registry
#
# A metric is one function of per-item records, registered once with what is needed to show
# it: its title, number format, direction, whether it carries a bootstrap interval and what
# the records must hold. results.json and CSV, the CLI and Markdown tables, the HTML report
# and scripts/results_figures.py all render from METRICS, so a new metric (also one from a
# plugin) is one decorated function and appears everywhere.

Format = Literal["percent", "float", "count", "pvalue"]


@dataclass(frozen=True)
class MetricContext:
    """What a metric may know beyond the records: the run's attacks and settings."""

    attacks: tuple[str, ...] = ()
    collapse_threshold: float = 0.1
    privleak_attack: str = "min_k"


@dataclass(frozen=True)
class Metric:
    """A registered metric. `fn(records, ctx)` gives its value; with `per_attack`,
    `fn(records, ctx, attack)` gives one value per attack (and "any", their union)."""

    name: str
    fn: Callable[..., float]
    title: str
    fmt: Format = "percent"
    higher_is_better: bool | None = None  # None: neither (a diagnostic)
    interval: bool = True  # a bootstrap interval over items comes with it
    needs: tuple[str, ...] = ()  # what the records must carry: attribution, attacks, ...
    column: str | None = None  # its table column (None: results.json and the report only)
    join: str = " / "  # between metrics that share a column
    per_attack: bool = False
    description: str = ""
    variants: tuple[str, ...] | None = None  # fixed keys of a per-key metric (like per_attack)

    def keys(self, attacks: Sequence[str]) -> list[str] | None:
        """The keys of a per-key metric's values (per attack: the run's attacks), or None."""
        if self.per_attack:
            return attack_columns(attacks)
        return list(self.variants) if self.variants is not None else None

    def display(self, value: Any, precise: bool = False) -> str:
        """The value as text in this metric's format (see `display`)."""
        return display(self.fmt, value, precise)


METRICS: dict[str, Metric] = {}


class _Title:
    """`metric`'s `column` when it is not given (see there)."""


_TITLE = _Title()


def display(fmt: Format, value: Any, precise: bool = False) -> str:
    """A figure as text: 85% / 0.37 / 14 (`precise`: 85.0% / 0.370), or a dash when it is
    undefined (NaN or None: nothing to divide by)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if fmt == "percent":
        return _signed(100 * value, 1 if precise else 0) + "%"
    if fmt == "count":
        return str(int(value))
    if fmt == "pvalue":  # small p-values keep their magnitude: 0.034, 2.7e-04
        return f"{value:.2g}" if value >= 0.01 or value == 0 else f"{value:.1e}"
    return _signed(value, 3 if precise else 2)


def _signed(value: float, digits: int) -> str:
    """`value` to `digits` decimals, except a small negative one, which keeps a digit of
    its own: an interval's lower end of -0.24% read "[-0%, 55%]"."""
    if value < 0 and round(value, digits) == 0:
        digits = -math.floor(math.log10(-value))  # its first significant digit: -0.2
    return f"{value + 0.0:.{digits}f}"  # + 0.0: -0.0 is 0


def metric(
    name: str,
    *,
    title: str,
    fmt: Format = "percent",
    higher_is_better: bool | None = None,
    interval: bool = True,
    needs: tuple[str, ...] = (),
    column: str | _Title | None = _TITLE,
    join: str = " / ",
    per_attack: bool = False,
    description: str | None = None,
    variants: Sequence[str] | None = None,
) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """Register a metric: `@metric("name", title="...", fmt="percent")` over a function of
    `(records, ctx)`; its description is the docstring's first paragraph unless given. A
    later registration of the same name replaces the earlier one, except that code outside
    unpact (a plugin) cannot take a built-in metric's name (`errors.check_not_builtin`, as
    for attacks and methods). `column` left out: a plugin's metric has a table column of
    its title (a user who writes one wants to see it), unpact's own none (its diagnostics
    stay in results.json and the report); `column=None` leaves any out of the table."""
    if fmt not in ("percent", "float", "count", "pvalue"):
        raise ValueError(f"metric {name}: fmt must be percent, float, count or pvalue, not {fmt!r}")

    def register(fn: Callable[..., float]) -> Callable[..., float]:
        held = METRICS.get(name)
        check_not_builtin("metric", name, held and held.fn, fn, '@metric("...", ...)')
        keyed = per_attack or variants is not None  # called once per attack or variant
        check_callable(fn, ["records", "ctx", *(["key"] * keyed)], f"metric {name}: {fn.__name__}")
        doc = description or (fn.__doc__ or "").strip().split("\n\n")[0]
        shown = column
        if isinstance(shown, _Title):
            shown = None if fn.__module__.startswith("unpact.") else title
        METRICS[name] = Metric(
            name,
            fn,
            title,
            fmt,
            higher_is_better,
            interval,
            tuple(needs),
            shown,
            join,
            per_attack,
            " ".join(doc.split()),
            tuple(variants) if variants is not None else None,
        )
        return fn

    return register


def attack_columns(attacks: Sequence[str]) -> list[str]:
    """The per-attack figures of a run: each attack, and with several, "any" (the union)."""
    return [*attacks, "any"] if len(attacks) > 1 else list(attacks)


def _accuracy(split: str, when: str) -> Callable[[list[ItemRecord], MetricContext], float]:
    def fn(records: list[ItemRecord], ctx: MetricContext) -> float:
        return accuracy(records, split, when)

    fn.__doc__ = f"Share of {split} items answered correctly {when} unlearning."
    return fn


for _split, _column in (("forget", "forget acc"), ("retain", None), ("general", None)):
    for _when, _better in (("before", None), ("after", _split != "forget")):
        metric(
            f"{_split}_acc_{_when}",
            title=f"{_split} acc. {_when}",
            higher_is_better=_better,
            column=_column,
            join=" → ",
        )(_accuracy(_split, _when))


def defined_mean(values: Sequence[float | None]) -> float:
    """Mean of the values that are defined (not None, finite); NaN when none is."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return fmean(kept) if kept else math.nan


def _answer_mean(records: list[ItemRecord], field: str) -> float:
    return defined_mean([getattr(r, field) for r in records])


def knowmem(records: list[ItemRecord], split: str, when: str) -> float:
    """MUSE's KnowMem on `split` (forget: knowledge memorisation; retain: utility kept):
    the mean over its open items of the ROUGE-L F1 of the greedy answer `when` = "before"
    or "after" unlearning against the true answer (`judge.knowmem_score`); NaN without
    open items."""
    return _answer_mean([r for r in records if r.split == split], f"knowmem_{when}")


def tofu_rouge(records: list[ItemRecord], split: str, when: str) -> float:
    """TOFU's ROUGE on `split` (open-unlearning's `forget_Q_A_ROUGE`): the mean over its
    open items of the stemmed ROUGE-L recall of the greedy answer `when` = "before" or
    "after" unlearning (`judge.tofu_rouge_l_recall`); NaN without open items."""
    return _answer_mean([r for r in records if r.split == split], f"rouge_{when}")


_GRADED = (  # name, title, what it reads, its function
    ("knowmem", "KnowMem", "MUSE's KnowMem: mean ROUGE-L F1", knowmem),
    ("rouge", "ROUGE", "TOFU's ROUGE: mean ROUGE-L recall (stemmed)", tofu_rouge),
)
for _name, _title, _what, _graded in _GRADED:
    for _split in ("forget", "retain"):
        for _when, _better in (("before", None), ("after", _split != "forget")):
            metric(
                f"{_name}_{_split}_{_when}",
                title=f"{_title} {_split} {_when}",
                fmt="float",
                higher_is_better=_better,
                column=None,
                description=f"{_what} of the greedy answer against the true answer, on the "
                f"{_split} items {_when} unlearning (open questions).",
            )(lambda records, ctx, _f=_graded, _s=_split, _w=_when: _f(records, _s, _w))


@metric(
    "forgotten",
    title="forgotten",
    fmt="count",
    interval=False,
    higher_is_better=True,
    column="forgotten",
)
def _forgotten(records: list[ItemRecord], ctx: MetricContext) -> float:
    """Forget items correct before and wrong after unlearning (SPEC 4)."""
    return forgotten_count(records)


@metric(
    "recovery",
    title="recovery",
    higher_is_better=False,
    needs=("attacks",),
    per_attack=True,
    column="recovery",
)
def _recovery(records: list[ItemRecord], ctx: MetricContext, attack: str) -> float:
    """Share of forgotten items an attack brings back ("any": at least one attack; SPEC 5)."""
    if attack == "any":
        return union_recovery_rate(records, list(ctx.attacks))
    return recovery_rate(records, attack)


@metric(
    "recovery_control",
    title="control recovery",
    higher_is_better=None,
    needs=("attacks", "control"),
    per_attack=True,
)
def _recovery_control(records: list[ItemRecord], ctx: MetricContext, attack: str) -> float:
    """The same attack on the never-taught reference, over this method's forgotten items:
    what an attack "recovers" from a model that never knew the facts (issue 22)."""
    if attack == "any":
        return union_recovery_rate(records, list(ctx.attacks), "recovered_control")
    return control_rate(records, attack)


@metric(
    "recovery_focus",
    title="recovered focus",
    fmt="float",
    needs=("attacks", "attribution"),
    per_attack=True,
)
def _recovery_focus(records: list[ItemRecord], ctx: MetricContext, attack: str) -> float:
    """Mean KeyToken similarity to the original's attribution of the recovered answers,
    attributed under the attacked model: does recovery restore the original focus?"""
    return math.nan if attack == "any" else recovered_focus(records, attack)


for _split in ("retain", "general"):
    metric(
        f"destructive_{_split}",
        title=f"destructive {_split}",
        higher_is_better=False,
        column="destructive\nretain / general",
        description=f"Share of {_split} items correct before and wrong after unlearning.",
    )(lambda records, ctx, _s=_split: destructive_rate(records, _s))


@metric(
    "collapse_rate",
    title="collapse",
    higher_is_better=False,
    column="collapse",
    needs=("attribution",),
)
def _collapse(records: list[ItemRecord], ctx: MetricContext) -> float:
    """Share of forget items whose prompt sensitivity after unlearning is below the
    threshold: the model no longer listens to the prompt."""
    return collapse_rate(records, ctx.collapse_threshold)


for _measure, _short, _column in (
    ("keytoken_similarity", "KeyToken sim.", "KeyToken sim.\nforgotten / kept"),
    ("contribution_similarity", "contribution sim.", None),
):
    for _group in ("forgotten", "kept"):
        metric(
            f"{_measure}_{_group}",
            title=f"{_short} {_group}",
            fmt="float",
            needs=("attribution",),
            column=_column,
            description=f"Mean {_measure.replace('_', ' ')} of the original's and the "
            f"unlearned model's attributions over {_group} forget items (SPEC 3).",
        )(lambda records, ctx, _g=_group, _m=_measure: focus_shift(records, _g, _m))

for _name, _fn in (("precision", keyword_precision), ("recall", keyword_recall)):
    for _when in ("before", "after"):
        metric(
            f"keyword_{_name}_{_when}",
            title=f"keyword {_name} {_when}",
            needs=("attribution", "keywords"),
            description=f"KeyToken {_name} against the benchmark's keywords, {_when} "
            "unlearning (mean over forget items).",
        )(lambda records, ctx, _f=_fn, _w=_when: _f(records, _w))


# The indistinguishability metrics (SPEC 9) live in their own module and register here.
import unpact.indistinguishable  # noqa: E402, F401
