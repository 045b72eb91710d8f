"""Recovery that touches the weights or reads the hidden states (issue 22): is the
"forgotten" knowledge still in the weights?

- `quantize`: weight-only quantization (Zhang et al. 2024, arXiv:2410.16454).
- `relearn_unrelated`: a few fine-tuning steps on text unrelated to the forget facts
  (Łucki et al. 2024, "An Adversarial Perspective on Machine Unlearning for AI Safety",
  arXiv:2409.18025: ten unrelated examples recover most of RMU's hidden capability).
- `ablate_direction`: the difference-of-means direction between the unlearned and the
  original model's activations on the forget prompts, projected out of the residual stream
  at inference (same paper, section on directional ablation).
- `logit_lens` and `probe`: is the answer readable from an intermediate layer (Lynch et al.
  2024, "Eight Methods to Evaluate Robust Unlearning in LLMs", arXiv:2402.16835)?

A weight attack makes the attacked model (`attacked(ctx)`, a context: a fresh copy, or hooks
removed on exit), then judges the forgotten items again exactly as the evaluation did.
Recovered answers are attributed under the attacked model (unPact on the question and the
benchmark's answer) so the run can say whether the original model's focus came back
(`keytoken_similarity` in the row). The runner runs the same attack on the never-taught
reference as the control, and (`has_baseline`) on the original model over every split.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, model_validator

from unpact.attacks.base import Attack, AttackContext
from unpact.attacks.hidden import (
    ablated,
    continuation_states,
    last_states,
    lens_logits,
    mean_difference,
    probe_accuracy,
    residual_size,
    token_ranks,
)
from unpact.attacks.quantize import LLM_INT8_THRESHOLD
from unpact.attacks.relearn import FinetuneSettings
from unpact.data.items import QAItem
from unpact.errors import UnpactError
from unpact.judge import answer_items
from unpact.types import SettingsModel, follow

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from unpact.models import LanguageModel
    from unpact.types import AnyModel


def local(lm: AnyModel, what: str) -> LanguageModel:
    """The local model behind `lm` (a served one has no weights or hidden states)."""
    if getattr(lm, "is_remote", False):
        raise UnpactError(f"{what} needs the model's weights; {lm.spec} is served")
    return lm  # type: ignore[return-value]


class WeightAttack(Attack):
    """An attack on (a copy of) the weights or on the hidden states. Subclasses give
    `attacked(ctx)`; the default `run` judges the forgotten items under it."""

    changes_weights = True
    control = True  # the runner runs it on the never-taught reference too
    explains = True  # recovered answers are attributed under the attacked model

    @contextmanager
    def attacked(self, ctx: AttackContext) -> Iterator[LanguageModel]:
        raise NotImplementedError
        yield  # pragma: no cover

    def run(self, ctx: AttackContext) -> list[dict[str, Any]]:
        if not ctx.items:
            return []
        with self.attacked(ctx) as lm:
            answered = answer_items(lm, ctx.items, ctx.judge, f"Judging {ctx.label} ({self.name})")
            rows = [
                {
                    "id": item.id,
                    "prompt": item.question,
                    "prompts": [item.question],
                    "outputs": [output],
                    "recovered": ok,
                }
                for item, (output, ok) in zip(ctx.items, answered)
            ]
            if self.explains:
                explain(lm, ctx, rows)
        return rows

    def baseline(self, ctx: AttackContext, splits: dict[str, list[QAItem]]) -> list[dict[str, Any]]:
        """What the attack does to a model that knew the facts (the original): every item's
        answer and verdict under the attacked copy, per split."""
        with self.attacked(ctx) as lm:
            rows = []
            for split, items in splits.items():
                if not items:
                    continue
                answered = answer_items(lm, items, ctx.judge, f"Judging {ctx.label} ({self.name})")
                rows += [
                    {"id": i.id, "split": split, "output": o, "correct": ok}
                    for i, (o, ok) in zip(items, answered)
                ]
        return rows


def explain(lm: LanguageModel, ctx: AttackContext, rows: list[dict[str, Any]]) -> None:
    """For each recovered item: unPact under the attacked model, and the KeyToken similarity
    of that attribution to the original model's (SPEC 3). Does recovery restore the focus?"""
    from unpact.attribution import Attribution, attribute_many, keytoken_similarity

    if ctx.attribution is None:
        return
    by_id = {i.id: i for i in ctx.items}
    todo = [
        r for r in rows if r["recovered"] and (ctx.original.get(r["id"]) or {}).get("attribution")
    ]
    if not todo:
        return
    found = attribute_many(
        lm,
        [by_id[r["id"]].question for r in todo],
        [by_id[r["id"]].answer for r in todo],
        progress=True,
        **ctx.attribution,
    )
    for row, attr in zip(todo, found):
        before = Attribution.from_dict(ctx.original[row["id"]]["attribution"])
        row["key_tokens"] = attr.key_token_texts
        row["keytoken_similarity"] = keytoken_similarity(before, attr)


# --- quantize ---------------------------------------------------------------------------


class QuantizeSettings(SettingsModel):
    bits: int = Field(4, ge=2, le=8, description="integer bits per weight (8 and 4 published)")
    group_size: int | None = Field(
        64,
        gt=0,
        description="input columns sharing one scale (null: one per output row); fp4, nf4: "
        "the block size",
    )
    algorithm: Literal["rtn", "hqq", "fp4", "nf4", "llm_int8"] = Field(
        "rtn",
        description="rtn: round to nearest; hqq: HQQ's optimised scales (torchao); fp4, nf4: "
        "bitsandbytes' 4-bit types (the paper's code: load_in_4bit, fp4); llm_int8: LLM.int8's "
        "8-bit weights, one scale per row (the paper's load_in_8bit; bits 8 unless given)",
    )
    symmetric: bool = Field(False, description="rtn without a zero point")
    threshold: float | None = Field(
        None,
        ge=0,
        description="llm_int8: LLM.int8's outlier threshold (llm_int8_threshold, 6.0 unless "
        "given): each token's layer inputs at or above it stay in full precision, the rest "
        "are rounded to 8 bits as its inference does; 0: none kept; null: the weights alone",
    )

    @model_validator(mode="after")
    def _bits_of_the_format(self) -> QuantizeSettings:
        from unpact.attacks.quantize import format_problem

        if problem := format_problem(self.algorithm, self.bits):
            raise ValueError(problem)
        if self.threshold is not None and self.algorithm != "llm_int8":
            raise ValueError(
                "threshold is LLM.int8's outlier threshold: give it with algorithm: llm_int8"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _int8_rows(cls, data: Any) -> Any:
        """LLM.int8 is 8 bits with one scale per row and activations rounded with outliers
        at 6.0 kept (bitsandbytes' defaults): its bits and threshold default so, and a group
        size is refused rather than left unread."""
        if isinstance(data, dict) and data.get("algorithm") == "llm_int8":
            if "group_size" in data:
                raise ValueError("llm_int8 keeps one scale per row: leave group_size out")
            return {"bits": 8, "threshold": LLM_INT8_THRESHOLD, **data}
        return data


class Quantize(WeightAttack):
    """Weight-only quantization of every linear layer but the LM head (torchao; or
    bitsandbytes' FP4/NF4 grids and LLM.int8's rows and activations, as the paper's code),
    then the forgotten questions again (Zhang et al. 2024)."""

    name = "quantize"
    title = "quantize"
    Settings = QuantizeSettings
    has_baseline = True
    # unset (every algorithm but llm_int8, and llm_int8's weights alone) it is out of the
    # key: the rows cached before it stay valid; llm_int8's rounded activations are new rows
    added_later = ("threshold",)

    @contextmanager
    def attacked(self, ctx: AttackContext) -> Iterator[LanguageModel]:
        from unpact.attacks.quantize import quantize_activations, quantize_weights
        from unpact.models import load_model

        s = self.settings
        lm = load_model(ctx.spec, dtype=ctx.dtype, device=ctx.device or "cpu")
        quantize_weights(lm.model, s.bits, s.group_size, s.algorithm, s.symmetric)
        if s.threshold is not None:
            quantize_activations(lm.model, s.threshold)
        yield lm


# --- relearn_unrelated -------------------------------------------------------------------


class RelearnUnrelatedSettings(FinetuneSettings):
    data: Literal["general", "retain"] = Field(
        "general",
        description="general: general-knowledge QA (the run's general items); retain: the "
        "benchmark's retain facts (other subjects than the forget facts)",
    )
    items: int = Field(10, gt=0, description="how many examples (Łucki et al. used 10)")


class RelearnUnrelated(WeightAttack):
    """Fine-tune a copy (answer-only NLL, AdamW, the one training step of `unpact.train`)
    on a few examples that say nothing of the forget facts, then ask every forgotten
    question (Łucki et al. 2024)."""

    name = "relearn_unrelated"
    title = "relearn (unrelated)"
    Settings = RelearnUnrelatedSettings
    has_baseline = True
    added_later = ("lora",)

    @property
    def needs_splits(self) -> frozenset[str]:
        return frozenset({self.settings.data})

    def chosen(self, ctx: AttackContext) -> list[QAItem]:
        s = self.settings
        pool = sorted(ctx.general if s.data == "general" else ctx.retain, key=lambda i: i.id)
        if not pool:
            raise UnpactError(
                f"relearn_unrelated: data: {s.data} but the run has no {s.data} items"
            )
        return random.Random(s.seed).sample(pool, min(s.items, len(pool)))

    def key_parts(self, ctx: AttackContext) -> list[Any]:
        return [[i.to_dict() for i in self.chosen(ctx)]]

    @contextmanager
    def attacked(self, ctx: AttackContext) -> Iterator[LanguageModel]:
        from unpact.attacks.relearn import finetune

        s = self.settings
        yield finetune(ctx, self.chosen(ctx), s.steps, s.lr, s.batch_size, s.seed, s.lora)


# --- ablate_direction --------------------------------------------------------------------


class AblateSettings(SettingsModel):
    layer: int = Field(
        -1,
        description="the residual index whose activations give the direction: 0 the "
        "embeddings, l + 1 after layer l; negative counts from the end; -1: the middle layer",
    )
    at: Literal["all", "layer"] = Field(
        "all", description="project the direction out after every layer, or only at `layer`"
    )
    prompts: Literal["forget", "retain"] = Field(
        "forget", description="the prompts whose activations find the direction"
    )


class AblateDirection(WeightAttack):
    """Directional ablation (Łucki et al. 2024): the unit difference of the mean residual
    states of the model under attack and the original model at the last prompt token of
    the forget questions, at one layer, projected out of the residual stream (after the
    embeddings and every decoder layer, or at that layer only) while it answers."""

    name = "ablate_direction"
    title = "ablate direction"
    Settings = AblateSettings
    reads_original_states = True

    def index(self, lm: LanguageModel) -> int:
        return self._index(residual_size(lm.model))

    @property
    def needs_splits(self) -> frozenset[str]:
        return frozenset({"retain"}) if self.settings.prompts == "retain" else frozenset()

    def _index(self, n: int) -> int:
        """The residual point the `layer` setting names among `n` (layers + 1)."""
        k = self.settings.layer
        if k == -1:
            return n // 2
        k = k + n if k < 0 else k
        if not 0 <= k < n:
            raise UnpactError(
                f"ablate_direction: layer {self.settings.layer} is not in 0..{n - 1} (the "
                f"model's {n - 1} decoder layers, 0 the embeddings; -1 the middle)"
            )
        return k

    def check_depth(self, layers: int) -> None:
        self._index(layers + 1)

    def direction(self, ctx: AttackContext, lm: LanguageModel) -> torch.Tensor:
        from unpact.models import load_model

        if not ctx.original_spec:
            raise UnpactError("ablate_direction needs the original model (ctx.original_spec)")
        items = ctx.items if self.settings.prompts == "forget" else ctx.retain
        seqs = [lm.encode_prompt(i.question).input_ids for i in items]
        k = self.index(lm)
        mine = last_states(lm.model, seqs)
        original = load_model(ctx.original_spec, dtype=ctx.dtype, device=ctx.device or "cpu")
        theirs = last_states(original.model, seqs)
        if mine.shape != theirs.shape:  # a traceback from the subtraction, once
            raise UnpactError(
                f"ablate_direction: {different_streams(_stream(mine), _stream(theirs))}"
            )
        return mean_difference(mine[:, k], theirs[:, k])

    def key_parts(self, ctx: AttackContext) -> list[Any]:
        # the original by its content: a checkpoint retrained into the same folder gives
        # another direction (its spec, the folder, was the key)
        return [ctx.original_key or ctx.original_spec, [i.to_dict() for i in ctx.retain]]

    @contextmanager
    def attacked(self, ctx: AttackContext) -> Iterator[LanguageModel]:
        lm = local(ctx.model(), "ablate_direction")
        d = self.direction(ctx, lm)
        if float(d.norm()) == 0.0:
            # Unlearning that left this point of the stream alone (it changed later layers
            # only): removing nothing recovers nothing. It ended the run, after every other
            # stage; the original given as its own reference is noted before the run.
            log.warning(
                "ablate_direction on %s: its residual states at point %d are the original "
                "model's on these prompts, so there is nothing to ablate and it recovers "
                "nothing there (another `layer` may differ)",
                ctx.label,
                self.index(lm),
            )
            yield lm
            return
        at = None if self.settings.at == "all" else [self.index(lm)]
        with ablated(lm.model, d, at):
            yield lm


def _stream(states: torch.Tensor) -> str:
    """(items, layers + 1, features) as words."""
    return stream_words(states.shape[1] - 1, states.shape[2])


def stream_words(layers: int, features: int) -> str:
    return f"{layers} layers of {features} features"


def different_streams(mine: str, original: str, what: str = "the attacked model") -> str:
    """Why a model and the original have no direction between them (`stream_words`)."""
    return (
        f"{what}'s residual stream ({mine}) is not the original's ({original}), so there is "
        "no direction between them: is it a fine-tune of the original? (leave "
        "ablate_direction out of the attacks for this pair)"
    )


# --- logit_lens and probe -----------------------------------------------------------------


def options(item: QAItem) -> tuple[list[str], int] | None:
    """An item's options and the index of the right one: its choices (multiple choice),
    or, for a QA item, its paraphrased answer among its perturbed (wrong) answers (TOFU's
    pairing: the same sentence form, so a probe cannot pick the right one by its shape; the
    short answer when there is no paraphrase); None if it has neither."""
    if item.is_mcq and item.choices:
        return list(item.choices), list(item.choices).index(item.answer)
    if item.perturbed_answers:
        return [item.paraphrased_answer or item.answer, *item.perturbed_answers], 0
    return None


class LayerSettings(SettingsModel):
    last_layer: bool = Field(
        False, description="count the last layer (the model's own output) among the layers read"
    )


class LayerAttack(WeightAttack):
    """A reading of the hidden states per layer: rows carry each layer's verdict
    (`layers`), and an item is recovered when the best layer over the attacked items (the
    one with the most right answers; ties: the earliest) gets it right. Intermediate layers
    only, by default: the last one is the model's own answer, judged already."""

    explains = False
    Settings = LayerSettings

    def per_layer(self, ctx: AttackContext, lm: LanguageModel) -> list[dict[str, Any]]:
        raise NotImplementedError

    @contextmanager
    def attacked(self, ctx: AttackContext) -> Iterator[LanguageModel]:
        yield local(ctx.model(), self.name)

    def run(self, ctx: AttackContext) -> list[dict[str, Any]]:
        if not ctx.items:
            return []
        with self.attacked(ctx) as lm:
            rows = self.per_layer(ctx, lm)
        if not rows:
            return []
        width = len(rows[0]["layers"]) - (0 if self.settings.last_layer else 1)
        hits = [sum(bool(r["layers"][k]) for r in rows) for k in range(width)]
        best = max(range(width), key=lambda k: (hits[k], -k))
        for r in rows:
            r["layer"] = best
            r["recovered"] = bool(r["layers"][best])
        return rows


def _lone_lead(lm: Any, prompt: Any, answer: str, ids: Sequence[int]) -> bool:
    """Whether an answer's first token is the lone space its prompt's lead gave it (a year
    after DeepSeek's `Assistant:`, on a tokenizer that splits digits: `Ġ`, then `1`, ...):
    every answer opens with it, so it tells nothing of what the model knows."""
    if not prompt.answer_lead or len(ids) < 2:
        return False
    return tuple(ids[1:]) == tuple(lm.encode_answer(answer.lstrip(" ")))


class LogitLens(LayerAttack):
    """Logit lens (nostalgebraist 2020; Lynch et al. 2024): the residual stream at the last
    prompt token after each layer, read through the final norm and LM head. Per layer, the
    rank and probability of the answer's first token; right when it is the top token. A
    multiple-choice item is read where its options part (after the tokens they all open
    with): right when the right option's token there outranks every other option's; where
    other options open with the same token as the right one, the lens reads on after that
    token, where those part, and so on (`_decisions`): right when the right option wins at
    each of those readings, as a greedy reading of the options token by token would pick
    it. An option that ends where another goes on is read there: its end of answer
    (`answer_end`) against the other's next token. Two options the same are never right."""

    name = "logit_lens"
    title = "logit lens"
    # 1: options sharing the right option's first token: not right; 2: options that all
    # open alike (a lone space after `Answer: `, a shared first word) read after it; 3:
    # options sharing the right option's token read on where they part; 4: an option that
    # ends where another goes on read there, its end of answer against the next token
    # (an open answer's lone space after a generation prompt short of it, `_lone_lead`, is
    # read past without a revision: the models it applies to are keyed by
    # `models.ANSWER_GAP_RULE`, which came with it)
    revision = 4

    def per_layer(self, ctx: AttackContext, lm: LanguageModel) -> list[dict[str, Any]]:
        # per item, the sequences the lens reads at their last token, each with the right
        # token there and the other options' (none for an open answer), and whether the
        # right option can be told apart at all. An open answer is read where it is scored
        # (`follow`: after a lone space token, a year's first digit, not the space)
        items: list[tuple[list[Reading], bool]] = []
        end = answer_end(lm)
        for item in ctx.items:
            e = lm.encode_prompt(item.question)
            found = options(item) if item.is_mcq else None
            if found is None:
                prompt, ids = follow(lm, e, item.answer)
                seq = list(prompt.input_ids)
                if _lone_lead(lm, prompt, item.answer, ids):  # read at the year's digit
                    seq, ids = seq + list(ids[:1]), ids[1:]
                items.append(([(seq, ids[0], [])], True))
                continue
            opts, right = found
            ended = [[*lm.encode_answer(o, e), *end] for o in opts]
            path, decidable = _decisions(ended, right)
            items.append(
                ([([*e.input_ids, *pre], t, rivals) for pre, t, rivals in path], decidable)
            )
        seqs = [seq for readings, _ in items for seq, _, _ in readings]
        logits = lens_logits(lm.model, last_states(lm.model, seqs)[:, 1:])  # after each layer
        rows, at = [], 0
        for item, (readings, decidable) in zip(ctx.items, items):
            mine = logits[at : at + len(readings)]
            at += len(readings)
            rank, prob = token_ranks(mine[0], readings[0][1])
            if not item.is_mcq:
                ok = [int(r) == 0 for r in rank]
            else:  # the right option wins at every reading on its way
                ok = [
                    decidable
                    and all(
                        bool((mine[n, k, t] > mine[n, k, rivals]).all())
                        for n, (_, t, rivals) in enumerate(readings)
                    )
                    for k in range(len(rank))
                ]
            top = mine[0].argmax(-1).tolist()
            rows.append(
                {
                    "id": item.id,
                    "prompt": item.question,
                    "prompts": [item.question],
                    "outputs": lm.token_texts(top),  # the top token after each layer
                    "layers": [bool(x) for x in ok],
                    "ranks": [int(r) for r in rank],
                    "probs": [round(float(p), 6) for p in prob],
                }
            )
        return rows

    def run(self, ctx: AttackContext) -> list[dict[str, Any]]:
        rows = super().run(ctx)
        for r in rows:  # the answer read at the chosen layer
            r["outputs"] = [r["outputs"][r["layer"]]]
        return rows


Reading = tuple[list[int], int, list[int]]  # tokens read after, right token, rivals' tokens


def answer_end(lm: LanguageModel) -> list[int]:
    """The token that ends an answer, as one more token of each option (`LanguageModel.
    answer_end`: the end of the assistant's turn in a chat template, else the tokenizer's
    end-of-sequence token, else the generation config's first), or none: an option that
    ends where another goes on ("Paris" against "Paris Texas") is read where one ends,
    its end against the other's next token, as greedy decoding that stops there would
    tell them apart."""
    end = lm.answer_end
    return [end] if end is not None else []


def _decisions(options: list[list[int]], right: int) -> tuple[list[Reading], bool]:
    """Where the logit lens reads a multiple-choice item's options: first where they part
    (after the tokens they all open with: a lone space after `Answer: `, a shared first
    word; each option keeps at least one token of its own), the right option's token there
    against the others'; where other options open with the same token as the right one,
    again after that token (and the tokens those options still share), against theirs; and
    so on until the right option's token is its own. Returns those readings (the tokens
    after the prompt, the right token, the rivals' tokens) and whether the right option can
    be told apart at all: not when an option ends where one it shares every token with goes
    on (the lens gives each option its end-of-answer token first, `answer_end`, so that only
    two options the same are left so)."""
    group, pos = list(range(len(options))), 0
    path: list[Reading] = []
    while True:
        shortest = min(len(options[i]) for i in group)
        while pos < shortest - 1 and len({options[i][pos] for i in group}) == 1:
            pos += 1
        token = options[right][pos]
        rivals = sorted({options[i][pos] for i in group} - {token})
        path.append((options[right][:pos], token, rivals))
        group = [i for i in group if options[i][pos] == token]
        pos += 1
        if len(group) == 1:
            return path, True
        if any(len(options[i]) <= pos for i in group):
            return path, False


class Probe(LayerAttack):
    """A linear probe per layer (Lynch et al. 2024): logistic regression on the residual
    state at the last token of question + option, trained on the retain items to tell the
    right option from the wrong ones, tested on the forgotten items: right when the probe
    scores the right option highest. Options: a multiple-choice item's choices, or a QA
    item's paraphrased answer among its perturbed answers (`options`); items with neither
    are left out."""

    name = "probe"
    title = "linear probe"
    applies_to = (
        "items with options (multiple-choice choices, or perturbed answers), trained on the "
        "retain items that have them"
    )
    revision = 2  # 1: QA options paraphrased among perturbed (same form); 2: prompt shared

    def key_parts(self, ctx: AttackContext) -> list[Any]:
        # trained on the retain items: a run of other retain items (none: no probe) read
        # the probe trained on another's
        return [[i.to_dict() for i in ctx.retain]]

    def _states(
        self, lm: LanguageModel, items: list[QAItem]
    ) -> tuple[torch.Tensor | None, list[tuple[QAItem, list[int], int]]]:
        """The residual states at the last token of question + option, every option of
        every item that has options (rows), and per item its rows and right option."""
        blocks: list[torch.Tensor] = []
        meta: list[tuple[QAItem, list[int], int]] = []
        start = 0
        for item in items:
            found = options(item)
            if found is None:
                continue
            opts, right = found
            prompt = lm.encode_prompt(item.question)
            conts = [lm.encode_answer(o, prompt) for o in opts]
            blocks.append(continuation_states(lm.model, prompt.input_ids, conts))
            meta.append((item, list(range(start, start + len(opts))), right))
            start += len(opts)
        return (torch.cat(blocks) if blocks else None), meta

    def per_layer(self, ctx: AttackContext, lm: LanguageModel) -> list[dict[str, Any]]:
        train_all, train_meta = self._states(lm, ctx.retain)
        test_all, test_meta = self._states(lm, ctx.items)
        if train_all is None or test_all is None:
            return []
        train, test = train_all[:, 1:], test_all[:, 1:]  # after each layer
        labels = [0] * train.shape[0]
        for _, rows, right in train_meta:
            labels[rows[right]] = 1
        verdicts = []
        for k in range(train.shape[1]):
            got, _ = probe_accuracy(
                train[:, k].numpy(),
                labels,
                test[:, k].numpy(),
                [rows for _, rows, _ in test_meta],
                [right for _, _, right in test_meta],
            )
            verdicts.append(got)
        return [
            {
                "id": item.id,
                "prompt": item.question,
                "prompts": [item.question],
                "outputs": [],
                "layers": [v[n] for v in verdicts],
            }
            for n, (item, _, _) in enumerate(test_meta)
        ]


__all__ = [
    "AblateDirection",
    "LogitLens",
    "Probe",
    "Quantize",
    "RelearnUnrelated",
    "WeightAttack",
    "explain",
    "options",
]
