"""Is a model like one that never learned the forget set? (SPEC section 9.) The
definitions, as functions of per-text statistics; `unpact.membership_scores` computes those
with a model.

Per text (an answer given its question), one batched teacher-forced pass of the scoring
kernel gives every token's log-prob, whether it is the model's argmax, and the mean and
standard deviation of log p(z) under the model's own next-token distribution; every
membership-inference score, exact memorisation and extraction strength are functions of
those (`TextStats`). GradNorm needs a backward pass (batched, `membership_scores`).
Definitions, each oriented so that a higher score means "member" (seen in training):

- `loss`: minus the mean token NLL (Yeom et al. 2018; open-unlearning's LOSS attack);
- `zlib`: minus the mean token NLL divided by the zlib-compressed length of the text in
  bytes (Carlini et al. 2021; open-unlearning's ZLib attack);
- `min_k`: the mean of the k% lowest token log-probs, k = 40% as in MUSE (Shi et al. 2024;
  MUSE's `metrics/privleak.py`);
- `min_k_plus_plus`: each token's log-prob standardised by the mean and standard deviation
  of log p(z), z from the model's next-token distribution at that position, then the mean
  of the k% lowest (Zhang et al. 2024; open-unlearning's `mia/min_k_plus_plus.py`, whose
  variance floor 1e-6 is kept);
- `reference`: the reference model's mean NLL minus this model's (Carlini et al. 2022;
  open-unlearning's Reference attack), the reference being the untaught base model;
- `gradnorm`: minus the mean over the model's weight tensors of the L2 norm of each one's
  gradient of the mean NLL (Maini et al. 2024; open-unlearning's GradNorm attack with
  p = 2, as its code and MIMIR's compute it: `torch.stack(norms).mean()`). Until
  2026-12-06 unpact took the norm of the whole gradient instead, which ranks texts
  otherwise (`membership_scores.mean_weight_norm`).

Each attack's AUC (forget = members against holdout = non-members) is the Mann-Whitney
statistic from scipy's ranks, equal to scikit-learn's `roc_auc_score` (tested); PrivLeak is MUSE's `(AUC_model - AUC_retrained) / AUC_retrained`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus", "reference", "gradnorm")
# documents (MUSE's texts) are scored by every attack but GradNorm, a backward pass each
DOCUMENT_ATTACKS = tuple(a for a in MIA_ATTACKS if a != "gradnorm")
DEFAULT_K = 0.4  # MUSE's Min-40%


@dataclass
class TextStats:
    """One text under one model, per answer token: log-prob, whether it is the argmax,
    and the mean and standard deviation of log p(z) at that position. A served model
    (`membership_scores.served_stats`) gives the log-probs alone, and the argmax where its
    server gives ranks: what it lacks is None, and the figures read from it are left out."""

    logprobs: list[float]
    argmax: list[bool] | None
    mu: list[float] | None
    sigma: list[float] | None
    zlib_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def min_k(values: Sequence[float], k: float = DEFAULT_K) -> float:
    """Mean of the `k` share of lowest values (at least one)."""
    n = max(1, int(len(values) * k))
    return sum(sorted(values)[:n]) / n


def mia_scores(
    stats: TextStats,
    *,
    reference_nll: float | None = None,
    gradnorm: float | None = None,
    k: float = DEFAULT_K,
) -> dict[str, float]:
    """Every attack's score of one text (higher: more likely a member); `min_k_plus_plus`
    only with the next-token distributions' moments, `reference` and `gradnorm` only when
    their inputs are given."""
    nll = mean_nll(stats)
    scores = {"loss": -nll, "zlib": -nll / stats.zlib_bytes, "min_k": min_k(stats.logprobs, k)}
    if stats.mu is not None and stats.sigma is not None:
        standard = [(x - m) / s for x, m, s in zip(stats.logprobs, stats.mu, stats.sigma)]
        scores["min_k_plus_plus"] = min_k(standard, k)
    if reference_nll is not None:
        scores["reference"] = reference_nll - nll
    if gradnorm is not None:
        scores["gradnorm"] = -gradnorm
    return scores


def mean_nll(stats: TextStats) -> float:
    return -sum(stats.logprobs) / len(stats.logprobs)


def exact_memorisation(stats: TextStats) -> float | None:
    """Share of answer tokens that are the model's argmax under teacher forcing
    (open-unlearning's `exact_memorization`); None without the argmax."""
    if stats.argmax is None:
        return None
    return sum(stats.argmax) / len(stats.argmax)


def extraction_strength(stats: TextStats) -> float | None:
    """`1 - k/|y|` for the smallest k such that, given the true first k answer tokens, the
    model's argmax reproduces every later one (teacher forced, as open-unlearning's
    `extraction_strength`); 0 when not even the last token is reproduced (open-unlearning
    then gives 1/|y|, an artefact of its loop); None without the argmax."""
    if stats.argmax is None:
        return None
    n = len(stats.argmax)
    for k in range(n):
        if all(stats.argmax[k:]):
            return 1 - k / n
    return 0.0


def auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """Area under the ROC curve of telling members (label 1) from non-members by score; NaN
    without both kinds or with a NaN score. Computed as the Mann-Whitney U statistic over
    n1 n2 from scipy's mid-ranks (ties count a half), which equals scikit-learn's
    `roc_auc_score` (a test checks it) and is ~30x faster: a run's bootstrap intervals call
    it tens of thousands of times."""
    from scipy.stats import rankdata

    values = [*members, *nonmembers]
    if not members or not nonmembers or any(not math.isfinite(v) for v in values):
        return math.nan
    n1, n2 = len(members), len(nonmembers)
    ranks = rankdata(values)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n2))


def smallest_auc_pvalue(members: int, nonmembers: int) -> float:
    """The smallest two-sided p-value any AUC of `members` against `nonmembers` texts can
    have under the exact Mann-Whitney U test (the AUC is U / (n1 n2)): a perfect
    separation, one ordering of the C(n1 + n2, n1) equally likely under the null, in either
    direction, so 2 / C(n1 + n2, n1) (capped at 1); scipy's `mannwhitneyu(method="exact")`
    gives the same (a test checks it). Above alpha, no ordering of so few texts is rare
    enough to tell members from non-members, and a bootstrap interval of their AUC (which
    cannot leave the sample: 2 forget answers below 2 holdout ones give AUC 0 in every
    resample) says nothing. NaN without both kinds."""
    if members < 1 or nonmembers < 1:
        return math.nan
    return min(1.0, 2 / math.comb(members + nonmembers, members))


def roc_points(
    members: Sequence[float], nonmembers: Sequence[float]
) -> tuple[list[float], list[float]]:
    """(false positive rates, true positive rates) of the ROC curve (scikit-learn)."""
    from sklearn.metrics import roc_curve

    if not members or not nonmembers:
        return [], []
    fpr, tpr, _ = roc_curve([1] * len(members) + [0] * len(nonmembers), [*members, *nonmembers])
    return [float(x) for x in fpr], [float(x) for x in tpr]


def privleak(auc_model: float, auc_retrained: float) -> float:
    """MUSE's PrivLeak, `(AUC_model - AUC_retrained) / AUC_retrained` (`eval.py`; MUSE
    reports it times 100). Near 0: indistinguishable from the retrained model. Large
    positive: the forget set still looks familiar. Large negative: over-unlearning, the
    forget set looks *less* familiar than text never seen, which also tells it apart."""
    if not (math.isfinite(auc_model) and math.isfinite(auc_retrained)) or auc_retrained == 0:
        return math.nan
    return (auc_model - auc_retrained) / auc_retrained


def truth_ratio(paraphrased: Sequence[float], perturbed: Sequence[Sequence[float]]) -> float:
    """TOFU's truth ratio of one item from answer token log-probs: the mean over perturbed
    answers of `P(a_pert | q)^(1/|a_pert|)` divided by `P(a_para | q)^(1/|a_para|)` (Maini
    et al. 2024, as SPEC 9 fixes it; open-unlearning averages the perturbed answers'
    log-probs before exponentiating, a geometric mean). Below 1: the true answer is
    preferred.

    A model driven far from an answer (gradient ascent's logits grow without bound) can
    give it a mean token log-prob below -745, whose exponential is 0 in a float: the ratio
    is then taken in logs, and one past the largest float is that float (`capped_exp`),
    where the plain division failed ("float division by zero") after every model of a run
    was scored."""
    para = sum(paraphrased) / len(paraphrased)
    perts = [sum(p) / len(p) for p in perturbed]
    if para > _EXP_FLOOR:  # the plain ratio, the numbers cached stages hold
        return sum(math.exp(m) for m in perts) / len(perts) / math.exp(para)
    return capped_exp(log_mean_exp(perts) - para)


# exp(x) is a normal float for x above this, and 1 / exp(x) stays finite
_EXP_FLOOR = -700.0


def log_mean_exp(values: Sequence[float]) -> float:
    """log(mean(exp(v))) without underflow: shifted by the largest value."""
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values) / len(values))


def capped_exp(x: float) -> float:
    """exp(x), or the largest float where exp(x) is past it."""
    return math.exp(x) if x < _LOG_MAX else sys.float_info.max


_LOG_MAX = math.log(sys.float_info.max)


def first_share(means: Sequence[float]) -> float:
    """exp(means[0]) / sum(exp(m) for m in means): the first answer's share of the answers'
    probabilities (each exp of its mean token log-prob), as TOFU's `probability_w_options`
    normalises it; shifted by the largest mean where every probability underflows to 0
    (the plain division failed there)."""
    probs = [math.exp(m) for m in means]
    if sum(probs) > 0:
        return probs[0] / sum(probs)
    top = max(means)
    shifted = [math.exp(m - top) for m in means]
    return shifted[0] / sum(shifted)


def forget_quality(model: Sequence[float], retrained: Sequence[float]) -> float:
    """TOFU's forget quality: the p-value of a two-sample Kolmogorov-Smirnov test between
    the model's and the retrained model's truth ratios on the forget items (scipy's
    `ks_2samp`); high: indistinguishable. NaN without values on either side."""
    from scipy.stats import ks_2samp

    a = [v for v in model if math.isfinite(v)]
    b = [v for v in retrained if math.isfinite(v)]
    if not a or not b:
        return math.nan
    return float(ks_2samp(a, b).pvalue)
