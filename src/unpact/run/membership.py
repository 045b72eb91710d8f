"""The runner's indistinguishability stages (SPEC 9): the never-taught reference model
(`retrained`), and per model the membership-inference statistics of every forget and
holdout text, the truth-ratio answers' log-probs, VerbMem's continuations and the fluency
of its forget answers; then each item record gets the figures the metrics read.

The stages keep raw numbers (token log-probs and their distribution's moments, gradient
norms, continuations), so changing k or PrivLeak's attack re-derives the figures without
touching a model.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, cast

from unpact.backends import open_model
from unpact.data.items import QAItem, VerbatimPrompt
from unpact.errors import UnpactError, items_named
from unpact.indistinguishable import UTILITY_PARTS, utility_sets
from unpact.judge import muse_rouge_l_f1, rouge_scorable, split_unspaced
from unpact.membership import (
    DOCUMENT_ATTACKS,
    TextStats,
    exact_memorisation,
    extraction_strength,
    first_share,
    mean_nll,
    mia_scores,
    truth_ratio,
)
from unpact.membership_scores import document_stats, gradient_norms_batched, token_stats
from unpact.metrics import ItemRecord
from unpact.types import is_remote_spec, pair_ids, short_repr

if TYPE_CHECKING:
    from unpact.data.items import Document
    from unpact.models import LanguageModel
    from unpact.run import Data, Model, ModelStages, Pipeline
    from unpact.run.config import MembershipSettings
    from unpact.types import AnyModel


@dataclass
class Membership:
    """Per model label ("original", "retrained", each method; "base": the untaught model),
    per item id: the derived figures. `skipped` says why there are none."""

    figures: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    skipped: str | None = None
    holdout: list[QAItem] = field(default_factory=list)
    verbmem: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> item -> ROUGE-L
    # label -> VerbMem's rows where they are records of their own (split "verbmem"): MUSE's
    # probes, or the forget documents when the forget items name none
    verbatim: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    fluency: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    reference: Model | None = None  # the retrained reference
    # what served models' scores leave out (Min-K%++, GradNorm...), and why
    served: dict[str, str] = field(default_factory=dict)
    documents: list[Document] = field(default_factory=list)  # forget and holdout, scored
    # per model label, per document id: each attack's score (no GradNorm) of the document
    document_scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # per model label, per retain or general item id: TOFU's model utility inputs
    # (`utility_rows`)
    utility: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def records(self, label: str, records: list[ItemRecord]) -> list[ItemRecord]:
        """`records` of the model `label` with its figures and the retrained reference's,
        the holdout items' records after them, then one record per scored document (split
        `forget_document` or `holdout_document`), then VerbMem's own records (split
        `verbmem`)."""
        every = records + holdout_records(self.holdout, label)
        fill_records(
            every,
            self.figures.get(label, {}),
            self.figures.get("retrained", {}),
            self.verbmem.get(label, {}),
            self.fluency.get(label, {}),
        )
        kept = self.utility.get(label, {})
        for r in every:
            if r.split in ("retain", "general") and r.id in kept:
                r.answer_prob = kept[r.id]["prob"]
                r.truth_ratio = kept[r.id]["truth_ratio"]
        return every + self._document_records(label) + self._verbatim_records(label)

    def _document_records(self, label: str) -> list[ItemRecord]:
        mine = self.document_scores.get(label, {})
        ref = self.document_scores.get("retrained", {})
        return [
            ItemRecord(
                id=d.id,
                split=f"{d.split}_document",
                correct_before=False,
                correct_after=False,
                method=label,
                answer=d.text,
                membership=mine.get(d.id),
                membership_retrained=ref.get(d.id),
            )
            for d in self.documents
            if d.id in mine
        ]

    def _verbatim_records(self, label: str) -> list[ItemRecord]:
        return [
            ItemRecord(
                id=row["id"],
                split="verbmem",
                correct_before=False,
                correct_after=False,
                method=label,
                question=row.get("prompt", ""),
                answer=row["truth"],
                output_after=row["output"],
                verbmem=row["rouge_l"],
            )
            for row in self.verbatim.get(label, [])
        ]


GRADNORM_OFF = "membership.gradnorm is false"
GRADNORM_KEY = "gradnorm: mean of the weight tensors' norms"  # a stage key's mark of it
NO_REFERENCE = (
    "no never-taught reference: the run did not inject the facts (inject.enabled is false), "
    "so it cannot build one; name one with membership.reference"
)


def skip_reason(p: Pipeline, data: Data) -> str | None:
    """Why this run cannot compute the indistinguishability figures, or None."""
    settings = p.cfg.membership
    if not settings.enabled:
        return "membership: enabled is false"
    # a benchmark without holdout items or documents leaves out what compares the forget
    # set with them (`missing_inputs`), not what the reference alone gives: forget quality,
    # the attacks' controls (TOFU's files before its holdout sets had no non-members)
    if not p.cfg.inject.enabled and settings.reference is None:
        return NO_REFERENCE
    return None


def missing_inputs(data: Data, settings: MembershipSettings) -> dict[str, str]:
    """Figures this run's data cannot give, each with the reason (for results.json's
    `skipped`), so a missing figure is never a silent null."""
    forget = data.splits["forget"]
    out: dict[str, str] = {}
    if not any(i.paraphrased_answer and i.perturbed_answers for i in forget):
        why = "no forget item has paraphrased_answer and perturbed_answers (docs/data.md)"
        out["truth_ratio"] = out["forget_quality"] = why
    kept = utility_items(data)
    if not any(i.split == "retain" for i in kept):
        out["retain_prob"] = out["retain_truth_ratio"] = (
            "no retain item has paraphrased_answer and perturbed_answers (TOFU's "
            "retain_perturbed; docs/data.md)"
        )
    if not kept:
        out["model_utility"] = (
            "no retain item has paraphrased_answer and perturbed_answers, and no general item "
            "perturbed_answers (TOFU's retain_perturbed, real_authors_perturbed, "
            "world_facts_perturbed; docs/data.md)"
        )
    else:
        unread = [
            name
            for name, items in utility_sets(kept).items()
            if not any(not i.is_mcq and rouge_scorable(i.answer) for i in items)
        ]
        if unread:
            out["model_utility"] = (
                f"no item of its {', '.join(unread)} set is an open question whose answer "
                "ROUGE reads (a-z, 0-9): TOFU's utility takes the ROUGE of each set's answers"
            )
    lacking = _utility_sets_lacking(kept)
    if lacking:
        out["model_utility_parts"] = lacking
    texts = verbatim_texts(data, settings)[1]
    if not texts:
        out["verbmem"] = (
            "no text to continue: the benchmark has no forget documents and no VerbMem probes "
            "(verbmem.jsonl; MUSE's verbmem/forget.json)"
        )
    elif not any(
        rouge_scorable(t.continuation if isinstance(t, VerbatimPrompt) else t.text) for t in texts
    ):
        out["verbmem"] = (
            "no text to continue has a word ROUGE reads as MUSE scores it (a-z, 0-9): text in "
            "another script is left out, not scored 0"
        )
    if not settings.gradnorm and data.holdout:
        out["mia_auc.gradnorm"] = GRADNORM_OFF
    if not data.holdout:
        name = data.bench.name
        # TOFU's own file of them, which its first release did not have
        tofu = f"; TOFU's are {name.removeprefix('tofu-').replace('forget', 'holdout')}.json"
        out["mia_auc"] = out["privleak"] = (
            f"benchmark {name} has no holdout items (split: holdout), the non-members "
            "membership inference compares the forget items with (facts of the same kind the "
            "model was never taught; docs/data.md)"
            + (tofu if name.startswith("tofu-forget") else "")
            + (
                "; the documents' figures are mia_auc_documents and privleak_documents"
                if scored_documents(data, settings)
                else ""
            )
        )
    if not scored_documents(data, settings):
        out["mia_auc_documents"] = out["privleak_documents"] = (
            "no forget and holdout documents to compare"
        )
    elif settings.privleak_attack not in DOCUMENT_ATTACKS:
        out["privleak_documents"] = (
            f"documents are not scored by {settings.privleak_attack} (a backward pass each)"
        )
    return out


# what each set of TOFU's model utility is read on, for the reason a set's parts are missing
_UTILITY_SET_ITEMS = {
    "retain": "retain item with paraphrased_answer and perturbed_answers",
    "tofu-real_authors": "item of TOFU's real-authors set (real_authors_perturbed)",
    "tofu-world_facts": "item of TOFU's world-facts set (world_facts_perturbed)",
    "general": "other general item with perturbed_answers",
}


def _utility_sets_lacking(kept: list[QAItem]) -> str | None:
    """Why some parts of the model utility (`model_utility_parts`) are missing: the sets the
    run has no items of, in one line (None when it has every set)."""
    have = list(utility_sets(kept))
    lacking = [name for name in UTILITY_PARTS if name not in have]
    if not lacking:
        return None
    parts = ", ".join(f"{UTILITY_PARTS[name][0].split('_')[0]}_*" for name in lacking)
    why = f"{parts}: no {' and no '.join(_UTILITY_SET_ITEMS[n] for n in lacking)}"
    sets = f"{', '.join(have)} set{'s' * (len(have) > 1)}"
    return why + (f"; the model utility is over its {sets}" if have else "")


def utility_items(data: Data) -> list[QAItem]:
    """The items TOFU's model utility is read on, as open-unlearning reads its Prob, ROUGE
    and truth ratio on these sets alone: the retain items with a paraphrased and perturbed
    answers (TOFU's `retain_perturbed`) and the general items with perturbed answers (its
    `real_authors_perturbed` and `world_facts_perturbed`)."""
    retain = [i for i in data.splits["retain"] if i.paraphrased_answer and i.perturbed_answers]
    return retain + [i for i in data.splits["general"] if i.perturbed_answers]


def undefined_privleak(retrained: dict[str, Any], attack: str) -> dict[str, str]:
    """Why PrivLeak has no value although its inputs are there: it divides by the retrained
    reference's AUC, which is 0 when the reference scores every holdout text as more
    familiar than every forget text (few items, or holdout text closer to the retain facts
    than the forget text is)."""
    out: dict[str, str] = {}
    for key, aucs in (("privleak", "mia_auc"), ("privleak_documents", "mia_auc_documents")):
        if (retrained.get(aucs) or {}).get(attack) == 0:
            out[key] = (
                f"the retrained reference's {attack} AUC is 0 (it finds every holdout text "
                "more familiar than every forget text) and PrivLeak divides by it"
            )
    return out


def scored_documents(data: Data, settings: MembershipSettings) -> list[Document]:
    """The documents whose membership is inferred: the forget and holdout documents of the
    run's items (all of the split where its items name none), at most `settings.documents`
    of each, a one-word document (nothing to score after its first token) left out; none
    unless both splits have some. Each character of a script written without spaces is a
    word (`split_unspaced`): a Chinese or Japanese document was one word, and left out."""
    found: list[Document] = []
    for split, items in (("forget", data.splits["forget"]), ("holdout", data.holdout)):
        docs = [d for d in data.bench.documents_of(split) if _words(d.text) > 1]
        named = {i.document for i in items if i.document is not None}
        if named:
            docs = [d for d in docs if d.id in named]
        if not docs:
            return []
        found += docs[: settings.documents]
    return found


def _words(text: str) -> int:
    return len(split_unspaced(text).split())


VerbatimKind = Literal["items", "documents", "probes"]


def verbatim_texts(
    data: Data, settings: MembershipSettings
) -> tuple[VerbatimKind, list[Document] | list[VerbatimPrompt]]:
    """What VerbMem continues, and where its values go.

    - "probes": the benchmark's own probes (`verbmem.jsonl`, MUSE's `verbmem/forget.json`),
      at most `settings.documents`: MUSE's protocol exactly, each a record of its own;
    - "items": else the forget documents the run's forget items name, each value in the
      record of the first forget item naming it (the built-in benchmarks);
    - "documents": else, where the forget items name no document, the forget documents
      (at most `settings.documents`), each a record of its own."""
    if data.bench.verbatim:
        return "probes", data.bench.verbatim[: settings.documents]
    firsts = first_items(data.splits["forget"])
    named = [d for d in data.bench.documents_of("forget") if d.id in firsts]
    if named or firsts:
        return "items", named
    return "documents", data.bench.documents_of("forget")[: settings.documents]


def retrained(p: Pipeline, data: Data) -> Model:
    """The never-taught reference: the injection of the retain facts alone (same recipe,
    seed and stopping rule as the original; cached like it), the base model itself where
    there are none (the run stopped on "no retain items to teach"), or the configured
    model."""
    from unpact.inject import InjectConfig, inject
    from unpact.inject import cache_key as inject_key
    from unpact.run import Model

    cfg = p.cfg
    if cfg.membership.reference is not None:
        spec = cfg.membership.reference
        return p.given_model("retrained", spec)
    if not data.splits["retain"]:  # nothing to teach: the injection would be the base model
        p.say(f"retrained reference: {cfg.model} itself (the benchmark has no retain facts)")
        return p.given_model("retrained", cfg.model)
    inject_cfg = InjectConfig(**({"device": cfg.device} | cfg.inject.settings))
    p.say(f"retrained reference: {cfg.model} taught only the retain facts (reused if cached)")
    where = data.bench.path or data.bench.name
    done = inject(cfg.model, where, inject_cfg, progress=p.progress, teach="retain")
    key = "inject:" + inject_key(cfg.model, data.bench, inject_cfg, "retain")
    from unpact.run import injection_line

    p.say(injection_line(done))
    p.took("inject:retrained", done.seconds, done.cached, done.made)
    p.resumed("inject:retrained", done.made_before, "epochs")
    p.read_inputs("inject:retrained", done.inputs_made)
    return Model("retrained", str(done.path), key, {"injection": done.summary()})


def same_tokenizer(
    original: str,
    compared: dict[str, str | None],
    say: Callable[[str], None] | None = None,
    called: str = "model",
) -> None:
    """Refuse a model compared with the original (an unlearned model given as it is, the
    never-taught reference, the base; `compared` maps the setting or option naming each
    to its spec, None: not given) whose tokenizer differs from the original's: its
    per-token scores and attributions would not be comparable text by text. A model
    folder holding the original's tokenizer and template files byte for byte is the same
    without loading either; otherwise the tokenizers are loaded (no weights), the
    original's once. A tokenizer that only adds special tokens to the original's (a
    `[PAD]` a fine-tuning script added, the embeddings resized for it), every other token
    keeping its id, tokenises text as the original's does: it passes, and `say` notes it.
    `called`: the setting or option naming the original, for its own load's message."""
    from unpact.models import load_tokenizer, tokenizer_digest

    named = {what: spec for what, spec in compared.items() if spec is not None}
    if is_remote_spec(original) or all(is_remote_spec(s) for s in named.values()):
        return  # a served model's vocabulary is not at hand; the user vouches for it
    files = tokenizer_digest(original)
    loaded: Any = None
    for what, spec in named.items():
        if is_remote_spec(spec):
            continue  # served: the user vouches for it
        try:
            if files is not None and tokenizer_digest(spec) == files:
                continue  # the original's tokenizer files, byte for byte
            tb = load_tokenizer(spec)
        except UnpactError as exc:
            raise UnpactError(f"{what}: {exc}") from None
        if loaded is None:
            try:
                ta = load_tokenizer(original)
            except UnpactError as exc:
                raise UnpactError(f"{called}: {exc}") from None
            loaded = (ta.get_vocab(), _template(ta), _probed(ta))
        va, template, probed = loaded
        vb = tb.get_vocab()
        added = _added_specials(va, vb, tb)
        if template is not None and any(t in template for t in added):
            added = []  # the template spells one: its prompts tokenise otherwise there
        if added and say is not None:  # named by its spec: an audit's run says it alike
            say(
                f"note: {spec} adds special token(s) {', '.join(map(repr, added))} "
                f"to the original's {len(va)}, every other id the same: text tokenises as "
                "the original's does, so its scores compare"
            )
        if va != vb and not added:
            raise UnpactError(
                f"{what} {spec} has another tokenizer than the original model {original} "
                f"({len(vb)} against {len(va)} tokens, or the same size with other ids): "
                "its token log-probs and attributions cannot be compared with the "
                "original's; give a model trained from the same base model"
            )
        if (va == vb or added) and (text := _first_other(probed, _probed(tb))) is not None:
            raise UnpactError(
                f"{what} {spec} has the vocabulary of the original model {original} but "
                f"tokenises text otherwise (its normaliser, pre-tokeniser or BOS setting: "
                f"{text!r} becomes other ids): its token log-probs and attributions cannot "
                "be compared with the original's; save it with the original's tokenizer "
                "(tokenizer.save_pretrained(folder))"
            )
        theirs = _template(tb)
        if theirs != template:
            if theirs is None:
                has = f"no chat template, where the original model {original} has one"
            elif template is None:
                has = f"a chat template, where the original model {original} has none"
            else:
                has = f"another chat template than the original model {original}"
            raise UnpactError(
                f"{what} {spec} has {has}: each "
                "model would be asked the questions in its own format, so their answers and "
                "attributions would not be compared on the same prompts; save it with the "
                "original's tokenizer (tokenizer.save_pretrained(folder))"
            )


def _added_specials(va: dict[str, int], vb: dict[str, int], tb: Any) -> list[str]:
    """The tokens `vb` adds to `va` when every one is a special token of `tb` (added
    tokens that never come out of tokenising ordinary text) with an id `va` does not use,
    and every token of `va` keeps its id; else none."""
    from unpact.models import special_ids

    extra = {t: i for t, i in vb.items() if t not in va}
    if not extra or any(vb.get(t) != i for t, i in va.items()):
        return []
    special = special_ids(tb)
    used = set(va.values())
    if all(i in special and i not in used for i in extra.values()):
        return sorted(extra, key=extra.__getitem__)
    return []


# Texts two tokenizers with one vocabulary must split alike to tokenise a benchmark alike:
# a word at the start and after a space, capitals, digits, punctuation, a line break,
# doubled spaces, accents, other scripts, an emoji
_PROBES = (
    "Who wrote The Quiet Harbor in 1987?",
    " the answer is Nadia Okafor.",
    "Line one\nLine two:  3.14, 1,000; don't",
    "naïve café Ærø — Straße",
    "東京 서울 Москва القاهرة 😀",
)


def _probed(tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """Each probe text's ids, without and with the tokenizer's special tokens (its BOS)."""
    return [
        (tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer(t)["input_ids"])
        for t in _PROBES
    ]


def _first_other(
    a: list[tuple[list[int], list[int]]], b: list[tuple[list[int], list[int]]]
) -> str | None:
    """The first probe text the two tokenizations split otherwise, or None."""
    return next((text for text, x, y in zip(_PROBES, a, b, strict=True) if x != y), None)


def _template(tokenizer: Any) -> str | None:
    """A user message as the tokenizer's chat template renders it (None: no template)."""
    from unpact.models import template_text

    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return template_text(tokenizer)
    except Exception as exc:  # a broken template: the model's first prompt says how
        return f"unrenderable: {type(exc).__name__}"


def _texts(items: list[QAItem]) -> tuple[list[str], list[str]]:
    return [i.question for i in items], [i.answer for i in items]


def _local(lm: AnyModel) -> LanguageModel:
    if not lm.has_weights:
        raise UnpactError(f"GradNorm needs a model's weights; {lm.spec} is served")
    return cast("LanguageModel", lm)


def served_notes(
    spec: str, label: str, settings: MembershipSettings, documents: bool, items: bool = True
) -> dict[str, str]:
    """What a served model's scores leave out, for results.json's `skipped`: its server's
    prompt log-probs give LOSS, ZLib, Min-K%, the Reference attack, the truth ratio and
    (with ranks) exact memorisation, but not Min-K%++ (each position's whole next-token
    distribution) nor GradNorm (the weights). `documents`: the run scores documents;
    `items`: its items' membership is inferred (there are holdout items: without them
    `skipped.mia_auc` says why for every model)."""
    why = {
        "min_k_plus_plus": f"{spec} is served: Min-K%++ needs each position's whole "
        "next-token distribution, which a server does not return",
        "gradnorm": f"{spec} is served: GradNorm needs its weights",
    }
    out = {f"mia_auc.min_k_plus_plus.{label}": why["min_k_plus_plus"]} if items else {}
    if documents:
        out[f"mia_auc_documents.min_k_plus_plus.{label}"] = why["min_k_plus_plus"]
    if settings.gradnorm and items:
        out[f"mia_auc.gradnorm.{label}"] = why["gradnorm"]
    attack = settings.privleak_attack
    if attack in why:  # PrivLeak with GradNorm is left out whether or not it is on
        if items:
            out[f"privleak.{label}"] = why[attack]
        if documents and attack == "min_k_plus_plus":
            out[f"privleak_documents.{label}"] = why[attack]
    return out


NO_RANKS = (
    "is served and its server gives no token ranks (vLLM's prompt_logprobs do; "
    "an echo's log-probs do not): no argmax to read"
)


def _answer_of(items: list[QAItem], answers: list[tuple[int, str]], m: int) -> str:
    """How an error names the `m`th of `answers` ((item place, answer text) pairs)."""
    return f"{items[answers[m][0]].label}: its answer {short_repr(answers[m][1])}"


def score_model(lm: AnyModel, items: list[QAItem], gradnorm: bool) -> list[dict[str, Any]]:
    """Per item: its answer's teacher-forced statistics, its gradient norm, and for a forget
    item the token log-probs of its paraphrased and perturbed answers (when it has them:
    the truth ratio, which forget quality compares on the forget items only). A served
    model's statistics are its server's (`membership_scores.served_stats`), with no
    GradNorm."""
    questions, answers = _texts(items)
    with items_named(lambda n: items[n].label):
        stats = token_stats(lm, questions, answers, progress=f"Membership: {len(items)} texts")
        norms = (
            gradient_norms_batched(_local(lm), questions, answers, progress="GradNorm")
            if gradnorm
            else None
        )
    rows: list[dict[str, Any]] = []
    pairs: list[tuple[int, str]] = []  # (row, text) of every truth-ratio answer
    for n, (item, s) in enumerate(zip(items, stats)):
        rows.append({"id": item.id, "stats": s.to_dict(), "gradnorm": norms[n] if norms else None})
        if item.split == "forget" and item.paraphrased_answer and item.perturbed_answers:
            pairs += [(n, item.paraphrased_answer)] + [(n, t) for t in item.perturbed_answers]
    encoded = [pair_ids(lm, items[n].question, t) for n, t in pairs]
    with items_named(partial(_answer_of, items, pairs)):
        lps = lm.answer_logprobs(
            [p for p, _ in encoded],
            [a for _, a in encoded],
            progress="Truth-ratio answers" if pairs else False,
        )
    for (n, _), lp in zip(pairs, lps):
        rows[n].setdefault("truth_answers", []).append(lp.tolist())
    return rows


def utility_rows(lm: AnyModel, items: list[QAItem]) -> list[dict[str, Any]]:
    """Per item with truth answers, what TOFU's model utility reads beside the greedy
    answer's ROUGE (open-unlearning's TOFU metrics), from one batch of teacher-forced
    log-probs: a retain item's Prob of its true answer (exp of the mean token log-prob given
    the question) and its truth ratio against the paraphrased answer; a general item's Prob
    normalised over the true and perturbed answers (`probability_w_options`: p / (p + the
    perturbed answers' sum)) and its truth ratio against the true answer itself."""

    def answers(i: QAItem) -> tuple[str, ...]:
        para = (i.paraphrased_answer or "",) if i.split == "retain" else ()
        return (i.answer, *para, *(i.perturbed_answers or ()))

    texts = [(n, t) for n, i in enumerate(items) for t in answers(i)]
    encoded = [pair_ids(lm, items[n].question, t) for n, t in texts]
    with items_named(partial(_answer_of, items, texts)):
        lps = lm.answer_logprobs(
            [q for q, _ in encoded],
            [a for _, a in encoded],
            progress=f"Model utility: {len(items)} items",
        )
    grouped: dict[int, list[list[float]]] = {}
    for (n, _), lp in zip(texts, lps):
        grouped.setdefault(n, []).append(lp.tolist())
    rows = []
    for n, g in sorted(grouped.items()):
        means = [sum(lp) / len(lp) for lp in g]
        if items[n].split == "retain":
            prob, ratio = math.exp(means[0]), truth_ratio(g[1], g[2:])
        else:
            prob, ratio = first_share(means), truth_ratio(g[0], g[1:])
        rows.append({"id": items[n].id, "prob": prob, "truth_ratio": ratio})
    return rows


def verbmem_rows(lm: AnyModel, docs: list[Any], prefix: int, new: int) -> list[dict[str, Any]]:
    """MUSE's VerbMem protocol per forget document: the greedy continuation of its first
    `prefix` tokens (raw text, no chat template), against the true continuation."""
    prompts, truths, ids = [], [], []
    for d in docs:
        tokens = lm.tokenize(d.text)
        if len(tokens) <= prefix:
            continue  # no continuation to compare with
        prompts.append(lm.detokenize(tokens[:prefix]))
        truths.append(lm.detokenize(tokens[prefix : prefix + new]))
        ids.append(d.id)
    return _continued(lm, ids, prompts, truths, new)


def probe_rows(lm: AnyModel, probes: list[VerbatimPrompt], new: int) -> list[dict[str, Any]]:
    """MUSE's VerbMem on its own probes (`metrics/verbmem.py` in the MUSE repository): the
    greedy continuation of each prompt, as given, against the true continuation cut to its
    first `new` tokens (MUSE: 128 of each)."""
    truths = [
        muse_cut(cast("LanguageModel", lm).tokenizer, v.continuation, new)
        if lm.has_weights
        else served_muse_cut(lm, v.continuation, new)
        for v in probes
    ]
    rows = _continued(lm, [v.id for v in probes], [v.prompt for v in probes], truths, new)
    for row, v in zip(rows, probes):
        row["prompt"] = v.prompt
    return rows


def muse_cut(tokenizer: Any, text: str, new: int) -> str:
    """A probe's true continuation as MUSE cuts it (`metrics/verbmem.py`): the first `new`
    ids of the text encoded alone with the tokenizer's special tokens (a Llama BOS takes one
    of the `new`), decoded without them and with transformers' clean-up of spaces
    (`clean_up_tokenization_spaces=True`, which transformers 4 applied to every tokenizer
    and transformers 5 skips, with a warning, for BPE ones: written out here, so the text is
    MUSE's whatever the version. ROUGE-L's own tokenizer drops punctuation, so the scores do
    not depend on it)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:new]
    decoded = str(
        tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    )
    return clean_up_spaces(decoded)


def served_muse_cut(lm: AnyModel, text: str, new: int) -> str:
    """`muse_cut` through a server's /tokenize and /detokenize: the first `new` ids with the
    special tokens, decoded without the ones the tokenizer put before the text (the
    special tokens `skip_special_tokens` drops there)."""
    ids = lm.tokenize(text, add_special_tokens=True)[:new]
    prefix = lm.special_prefix()
    if ids[: len(prefix)] == prefix:
        ids = ids[len(prefix) :]
    return clean_up_spaces(lm.detokenize(ids) if ids else "")


def clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization` (PreTrainedTokenizerBase): no space before
    `.`, `?`, `!`, `,` or an English contraction."""
    for spaced, joined in _CLEAN_UP:
        text = text.replace(spaced, joined)
    return text


_CLEAN_UP = [
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
]


def _continued(
    lm: AnyModel, ids: list[str], prompts: list[str], truths: list[str], new: int
) -> list[dict[str, Any]]:
    """`new` greedy tokens after each raw prompt, beside its truth (the ROUGE-L F1 of the
    two is `rouge_l`, added when the rows are read)."""
    from unpact.scoring import generate

    outs = generate(
        lm, prompts, chat_template=False, max_new_tokens=new, progress="VerbMem continuations"
    )
    return [{"id": i, "output": o[0].text, "truth": t} for i, o, t in zip(ids, outs, truths)]


def base_logprobs(lm: AnyModel, questions: list[str], outputs: list[str]) -> list[float | None]:
    """Mean token log-prob of each output as the answer to its question under `lm` (None
    for an empty output)."""
    kept = [n for n, o in enumerate(outputs) if o.strip()]
    encoded = [pair_ids(lm, questions[n], outputs[n]) for n in kept]
    lps = lm.answer_logprobs([p for p, _ in encoded], [a for _, a in encoded])
    out: list[float | None] = [None] * len(outputs)
    for n, lp in zip(kept, lps):
        out[n] = float(lp.mean())
    return out


def repetition(text: str) -> float:
    """Share of a text (in characters, spaces left out) covered by its most repeated unit:
    the longest run of one character, or all occurrences of its most frequent word. 1,1,1,
    222222 scores high, a short well-formed answer low. In a script written without
    spaces each character is a word (as the judge reads it): 東京東京東京東京 was one word."""
    compact = re.sub(r"\s+", "", text)
    if len(compact) < 8:
        return 0.0  # too short to call repetitive
    run = max(len(m.group(0)) for m in re.finditer(r"(.)\1*", compact))
    words = re.findall(r"\w+", split_unspaced(text.lower()))
    top = Counter(words).most_common(1)
    word_cover = top[0][1] * len(top[0][0]) if top and top[0][1] > 1 else 0
    return max(run, word_cover) / len(compact)


def fluency(
    output: str,
    base_logprob: float | None,
    answer_logprob: float | None,
    settings: MembershipSettings,
) -> dict[str, Any]:
    """A forget answer's fluency: its mean token log-prob under the untaught base model
    against the true answer's (`relative`: an invented name is as unlikely to the base model
    as the true invented name, so only a much lower value says "not text"), its repetition,
    and whether that makes it degenerate: empty, `relative` below `degenerate_logprob`, or
    `repetition` above `degenerate_repetition`."""
    rep = repetition(output)
    relative = (
        base_logprob - answer_logprob
        if base_logprob is not None and answer_logprob is not None
        else None
    )
    degenerate = (
        not output.strip()
        or (relative is not None and relative < settings.degenerate_logprob)
        or rep > settings.degenerate_repetition
    )
    return {
        "base_logprob": base_logprob,
        "relative": relative,
        "repetition": rep,
        "degenerate": degenerate,
    }


def derive(
    rows: dict[str, dict[str, Any]],
    base: dict[str, dict[str, Any]],
    settings: MembershipSettings,
) -> dict[str, dict[str, Any]]:
    """Per item: every attack's score, the truth ratio, exact memorisation and extraction
    strength, from a model's raw rows and the base model's (for `reference`)."""
    out: dict[str, dict[str, Any]] = {}
    for item_id, row in rows.items():
        stats = TextStats(**row["stats"])
        ref = base.get(item_id)
        scores = mia_scores(
            stats,
            reference_nll=mean_nll(TextStats(**ref["stats"])) if ref else None,
            gradnorm=row.get("gradnorm"),
            k=settings.k,
        )
        found: dict[str, Any] = {
            "membership": scores,
            "exact_memorisation": exact_memorisation(stats),
            "extraction_strength": extraction_strength(stats),
        }
        answers = row.get("truth_answers")
        if answers:
            found["truth_ratio"] = truth_ratio(answers[0], answers[1:])
        out[item_id] = found
    return out


def fill_records(
    records: list[ItemRecord],
    mine: dict[str, dict[str, Any]],
    reference: dict[str, dict[str, Any]],
    verbmem: dict[str, float],
    fluent: dict[str, dict[str, Any]],
) -> None:
    """Each record gets its model's figures and the retrained reference's; a document's
    VerbMem goes to its first forget item's record."""
    for r in records:
        found, ref = mine.get(r.id, {}), reference.get(r.id, {})
        r.membership = found.get("membership")
        r.membership_retrained = ref.get("membership")
        if r.split == "forget":
            r.truth_ratio = found.get("truth_ratio")
            r.truth_ratio_retrained = ref.get("truth_ratio")
            r.exact_memorisation = found.get("exact_memorisation")
            r.extraction_strength = found.get("extraction_strength")
            r.verbmem = verbmem.get(r.id)
            r.fluency = fluent.get(r.id)


def holdout_records(items: list[QAItem], label: str) -> list[ItemRecord]:
    """Records of the holdout items (never taught, never evaluated): membership only."""
    return [
        ItemRecord(
            id=i.id,
            split="holdout",
            correct_before=False,
            correct_after=False,
            method=label,
            question=i.question,
            answer=i.answer,
        )
        for i in items
    ]


def first_items(items: list[QAItem]) -> dict[str, str]:
    """document id -> the id of its first item."""
    out: dict[str, str] = {}
    for i in items:
        if i.document is not None:
            out.setdefault(i.document, i.id)
    return out


Opener = Callable[[], "AnyModel"]


def opener(p: Pipeline, spec: str) -> Opener:
    """Open `spec` once, on first use."""
    held: list[AnyModel] = []

    def get() -> AnyModel:
        if not held:
            cfg = p.cfg
            held.append(open_model(spec, dtype=cfg.dtype, device=cfg.device, remote=cfg.remote))
        return held[0]

    return get


def compute(
    p: Pipeline, data: Data, original: Model, unlearned: list[Model], stages: dict[str, ModelStages]
) -> Membership:
    """The indistinguishability stages of a run: per model (the untaught base for the
    Reference attack, the original, the retrained reference, each unlearned model) the
    statistics of the forget and holdout texts, VerbMem's continuations and the fluency
    of its forget answers; cached like every stage."""
    from unpact.run.store import digest

    reason = skip_reason(p, data)
    if reason is not None:
        return Membership(skipped=reason)
    settings = p.cfg.membership
    reference = retrained(p, data)  # a named one's tokenizer: checked when the run began
    items = data.splits["forget"] + data.holdout
    item_key = digest([i.to_dict() for i in items])  # the truth-ratio answers included
    # the model before it learned the benchmark: the run's own where it injects; else (the
    # run's model is the taught original) the never-taught reference, as open-unlearning's
    # Reference attack reads the retain model and as an audit does
    base_spec = settings.base or (p.cfg.model if p.cfg.inject.enabled else reference.spec)
    base = p.given_model("base", base_spec)
    firsts = first_items(data.splits["forget"])
    kind, texts = verbatim_texts(data, settings)
    scored = scored_documents(data, settings)
    raw: dict[str, dict[str, dict[str, Any]]] = {}
    raw_docs: dict[str, dict[str, dict[str, Any]]] = {}  # the documents' rows, by label
    verbmem: dict[str, dict[str, float]] = {}
    verbatim: dict[str, list[dict[str, Any]]] = {}
    utility: dict[str, dict[str, dict[str, Any]]] = {}
    kept = utility_items(data)
    served: dict[str, str] = {}
    graded = {m.key for m in [original, reference, *unlearned]}
    gradnorm = settings.gradnorm and bool(data.holdout)  # read by membership inference alone
    for m in [base, original, reference, *unlearned]:
        remote = is_remote_spec(m.spec)  # its server's log-probs: what they give, said
        said = remote and m is not base  # the base's own figures are not reported
        if said:
            served |= served_notes(m.spec, m.label, settings, bool(scored), bool(data.holdout))
        get = opener(p, m.spec)
        # the base's own GradNorm is not read, but where it is a model scored with it (the
        # reference, in an audit) its stage is that model's: computed once, read back
        grad = gradnorm and not remote and (m is not base or base.key in graded)
        raw[m.label] = _item_rows(p, m, get, (items, item_key), grad, served if said else None)
        if scored:  # with the same opened model: it is loaded once for all its stages
            raw_docs[m.label] = _document_rows(p, m, get, scored)
        if m is base:
            continue
        if kept:
            utility[m.label] = _utility(p, m, get, kept)
        if not texts:
            continue
        rows = _verbmem(p, m, get, kind, texts)
        if kind == "items":
            verbmem[m.label] = {firsts[r["id"]]: r["rouge_l"] for r in rows}
        else:
            verbatim[m.label] = rows
    base_rows = raw.pop("base", {})
    found = Membership(holdout=data.holdout, reference=reference, served=served)
    found.figures = {label: derive(rows, base_rows, settings) for label, rows in raw.items()}
    found.documents = scored
    base_docs = raw_docs.pop("base", {})
    found.document_scores = {  # the same derivation as the items' (no GradNorm to read)
        label: {d: f["membership"] for d, f in derive(rows, base_docs, settings).items()}
        for label, rows in raw_docs.items()
    }
    fluent = _fluency(p, data, base, [original, *unlearned], stages)
    found.verbmem, found.verbatim, found.fluency = verbmem, verbatim, fluent
    found.utility = utility
    return found


def _item_rows(
    p: Pipeline,
    m: Model,
    get: Opener,
    scored: tuple[list[QAItem], str],
    grad: bool,
    served: dict[str, str] | None,
) -> dict[str, dict[str, Any]]:
    """Per item of `scored` (the items and their content key): its statistics under the
    model `m`, with GradNorm if `grad` (a cached stage). `served`: a served model's notes,
    told when its server gave no ranks."""
    items, item_key = scored
    rows = _stage(
        p,
        "membership",
        m,
        # GradNorm's stages since it became open-unlearning's mean of the weight tensors'
        # norms (before: the whole gradient's norm) are computed again; the others are kept.
        # Truth-ratio answers: the forget items' (the holdout's: none)
        [m.key, item_key, GRADNORM_KEY if grad else grad, "truth answers: forget items"],
        partial(lambda g, gr: score_model(g(), items, gr), get, grad),
        ranks=True,
    )
    if served is not None and any(r["stats"]["argmax"] is None for r in rows):
        served[f"exact_memorisation.{m.label}"] = served[f"extraction_strength.{m.label}"] = (
            f"{m.spec} {NO_RANKS}"
        )
    return {r["id"]: r for r in rows}


def _stage(
    p: Pipeline,
    kind: str,
    m: Model,
    key: list[Any],
    compute: Callable[[], list[dict[str, Any]]],
    *,
    folder: str | None = None,
    reads: Model | None = None,
    ranks: bool = False,
) -> list[dict[str, Any]]:
    """`p.stage` for the model `m` (named by its label) whose stage reads the one model
    `reads` (`m` itself unless given). A served one's stage is keyed without the run's
    dtype (its server's is its own) and, where it reads token ranks (`ranks`: the argmax
    of exact memorisation), with `remote.logprobs_mode`: an echo gives none, and its rows
    must not be read back for prompt_logprobs, which do."""
    served = is_remote_spec((reads or m).spec)
    if served and ranks:
        key = [*key, {"logprobs_mode": p.cfg.remote.logprobs_mode}]
    return p.stage(kind, folder or kind, m.label, key, compute, served)


def _utility(p: Pipeline, m: Model, get: Opener, items: list[QAItem]) -> dict[str, dict[str, Any]]:
    """TOFU's model utility inputs of one model (`utility_rows`), one stage, by item id."""
    from unpact.run.store import digest

    rows = _stage(
        p,
        "model utility",
        m,
        [m.key, digest([i.to_dict() for i in items])],
        lambda: utility_rows(get(), items),
        folder="utility",
    )
    return {r["id"]: r for r in rows}


def _verbmem(
    p: Pipeline,
    m: Model,
    get: Opener,
    kind: VerbatimKind,
    texts: list[Document] | list[VerbatimPrompt],
) -> list[dict[str, Any]]:
    """VerbMem's continuations of the forget documents (or the benchmark's own probes,
    `kind` "probes") under the model `m` (a cached stage)."""
    prefix, new = p.cfg.membership.verbmem_prefix, p.cfg.membership.verbmem_new_tokens
    key: list[Any] = [m.key, [t.to_dict() for t in texts]]
    if kind == "probes":
        probes = cast("list[VerbatimPrompt]", texts)
        key += [new, "probes"]

        def compute() -> list[dict[str, Any]]:
            return probe_rows(get(), probes, new)
    else:
        key += [prefix, new]

        def compute() -> list[dict[str, Any]]:
            return verbmem_rows(get(), texts, prefix, new)

    rows = _stage(p, "verbmem", m, key, compute)
    # scored here, not in the stage: the cached continuations are read with today's ROUGE
    return [
        {
            **r,
            "rouge_l": muse_rouge_l_f1(r["output"], r["truth"])
            if rouge_scorable(r["truth"])
            else None,
        }
        for r in rows
    ]


def _document_rows(
    p: Pipeline, m: Model, get: Opener, docs: list[Document]
) -> dict[str, dict[str, Any]]:
    """Per document: its statistics as raw text under the model `m` (a cached stage)."""
    from unpact.run.store import digest

    tokens = p.cfg.membership.document_tokens
    texts = [d.text for d in docs]

    def compute() -> list[dict[str, Any]]:
        with items_named(lambda n: f"document {docs[n].id} ({docs[n].split})", "document"):
            found = document_stats(get(), texts, max_tokens=tokens, progress="Documents")
        return [{"id": d.id, "stats": s.to_dict()} for d, s in zip(docs, found)]

    key = [m.key, digest([d.to_dict() for d in docs], tokens)]
    rows = _stage(p, "membership-documents", m, key, compute, ranks=True)
    return {r["id"]: r for r in rows}


def _base_rows(get: Opener, items: list[QAItem], outputs: list[str]) -> list[dict[str, Any]]:
    """Per item: the base model's mean token log-prob of the output and of the true answer."""
    lm = get()
    questions = [i.question for i in items]
    said = base_logprobs(lm, questions, outputs)
    truth = base_logprobs(lm, questions, [i.answer for i in items])
    return [
        {"id": i.id, "base_logprob": a, "answer_logprob": b} for i, a, b in zip(items, said, truth)
    ]


def _fluency(
    p: Pipeline, data: Data, base: Model, models: list[Model], stages: dict[str, ModelStages]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per evaluated model and forget item: its answer's fluency under the base model."""
    forget = data.splits["forget"]
    get = opener(p, base.spec)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for m in models:
        outputs = [stages[m.label].evals[i.id]["output"] for i in forget]
        rows = _stage(
            p,
            "fluency",
            m,
            [base.key, [(i.question, i.answer) for i in forget], outputs],
            partial(_base_rows, get, forget, outputs),
            reads=base,
        )
        out[m.label] = {
            i.id: fluency(o, r["base_logprob"], r["answer_logprob"], p.cfg.membership)
            for i, o, r in zip(forget, outputs, rows)
        }
    return out
