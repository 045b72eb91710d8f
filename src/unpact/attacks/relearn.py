"""Relearning: the attack that touches (a copy of) the weights."""

from __future__ import annotations

import random
from functools import partial
from typing import Any, Literal

import torch
from pydantic import Field

from unpact.attacks.base import Attack, AttackContext
from unpact.data.items import QAItem
from unpact.determinism import keeps_rng
from unpact.errors import UnpactError
from unpact.judge import answer_items
from unpact.models import DTYPES, LanguageModel, load_model
from unpact.train import Trainer
from unpact.types import Seed, SettingsModel
from unpact.unlearn.config import LoraSettings
from unpact.unlearn.loop import _batch, add_lora, batch_indices, encode_items
from unpact.unlearn.methods import nll


class FinetuneSettings(SettingsModel):
    """The fine-tuning of a relearning attack (`finetune`)."""

    steps: int = Field(10, gt=0, description="optimiser steps")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate (the injection's)")
    batch_size: int = Field(4, gt=0, description="items per step")
    seed: Seed = Field(0, description="which items are trained on, and their order")
    lora: LoraSettings | None = Field(
        None,
        description="train LoRA adapters (peft) on the model in the run's dtype, merged "
        "before judging, instead of every weight of a float32 copy: for a model whose full "
        "fine-tuning does not fit in memory (the field's relearning attacks use either)",
    )


class RelearnSettings(FinetuneSettings):
    data: Literal["forget", "retain"] = Field(
        "forget", description="train on some forgotten items, or on retain items"
    )
    items: int = Field(4, gt=0, description="how many items to train on")


class Relearn(Attack):
    """Relearning: fine-tune a copy of the unlearned model (answer-only NLL, AdamW) for
    `steps` steps on `items` seeded forgotten items (`data: forget`) or retain items
    (`data: retain`), then judge its greedy answers to the forgotten items it did not
    train on. Those items are its denominator."""

    name = "relearn"
    title = "relearning"
    Settings = RelearnSettings
    changes_weights = True
    added_later = ("lora",)
    applies_to = "the forgotten items it does not train on (data: forget needs two or more)"

    @property
    def needs_splits(self) -> frozenset[str]:
        return frozenset({"retain"}) if self.settings.data == "retain" else frozenset()

    def split(self, forgotten_ids: list[str], retain_ids: list[str]) -> list[str]:
        """The ids of the items trained on (seeded; at most all but one forgotten item
        when training on forgotten items, so something is left to test)."""
        s = self.settings
        rng = random.Random(s.seed)
        if s.data == "retain":
            pool = sorted(retain_ids)
            return rng.sample(pool, min(s.items, len(pool)))
        pool = sorted(forgotten_ids)
        return rng.sample(pool, min(s.items, max(len(pool) - 1, 0)))

    @property
    def rows_depend_on_the_items(self) -> bool:
        """Trained on some of the forgotten items it is given: the others are its rows."""
        return bool(self.settings.data == "forget")

    def key_parts(self, ctx: AttackContext) -> list[Any]:
        return [[i.to_dict() for i in ctx.retain]]  # it may train on them

    def run(self, ctx: AttackContext) -> list[dict[str, Any]]:
        """Fine-tune a fresh copy of the model under attack on a few items, then judge its
        answers to the forgotten items it did not see. Rows only for those."""
        if not ctx.items:
            return []
        s = self.settings
        forgotten = ctx.items
        train_ids = set(self.split([i.id for i in forgotten], [i.id for i in ctx.retain]))
        pool = forgotten if s.data == "forget" else ctx.retain
        train = [i for i in pool if i.id in train_ids]
        test = [i for i in forgotten if i.id not in train_ids]
        if not train or not test:  # one forgotten item: none to train on and test another
            return []
        lm = finetune(ctx, train, s.steps, s.lr, s.batch_size, s.seed, s.lora)
        answered = answer_items(lm, test, ctx.judge, f"Judging {ctx.label} after relearning")
        trained_on = sorted(train_ids)
        return [
            {
                "id": item.id,
                "prompt": item.question,
                "prompts": [item.question],
                "outputs": [output],
                "recovered": ok,
                "trained_on": trained_on,
            }
            for item, (output, ok) in zip(test, answered)
        ]


@keeps_rng
def finetune(
    ctx: AttackContext,
    train: list[QAItem],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    lora: LoraSettings | None = None,
) -> LanguageModel:
    """A fresh copy of the model under attack (the cached model is never changed),
    fine-tuned on `train` for `steps` AdamW steps on the answer-only NLL, in float32 (an
    AdamW step at lr 3e-4 is about bfloat16's rounding of a typical weight), then cast to the run's
    dtype to be judged as the other models are. With `lora`: the model loaded in the run's
    dtype, float32 low-rank adapters trained on it (peft), merged into its weights unless
    `lora.merge` is false."""
    if not train:
        raise UnpactError("relearning needs at least one item to train on")
    if lora is not None:
        lm = load_model(ctx.spec, dtype=ctx.dtype, device=ctx.device or "cpu")
        adapted = add_lora(lm.model, lora)
    else:
        lm = load_model(ctx.spec, device=ctx.device or "cpu")
    encoded = encode_items(lm, train)
    # AdamW without the fused kernel, as relearning results were first measured
    trainer = Trainer(
        [p for p in lm.model.parameters() if p.requires_grad], lr=lr, fused=False,
        what="relearning",
        lighter="train LoRA adapters (the attack's `lora` setting)",
    )  # fmt: skip
    torch.manual_seed(seed)
    lm.model.train()
    for step in range(steps):
        idx = batch_indices(len(train), min(batch_size, len(train)), step, seed)
        trainer.step(partial(_nll, lm.model, _batch(encoded, idx)), step)
    lm.model.eval()
    if lora is not None:
        if lora.merge:  # an ordinary model again (else judged through the adapters)
            lm.model = adapted.merge_and_unload()
    elif ctx.dtype != "float32":
        lm.model.to(DTYPES[ctx.dtype])
    return lm


def _nll(model: Any, batch: Any) -> dict[str, torch.Tensor]:
    return {"nll": nll(model, batch)}
