"""The prompt attacks (SPEC section 5 and beyond): each says what the attacker asks."""

from __future__ import annotations

import random
import zlib
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import Field

from unpact.attacks.base import FOCUS_TEMPLATE, Attack, AttackContext, Target
from unpact.types import Seed, SettingsModel, fills

# FocusOnKey asks the question and names its keys: a template without either (or a key
# format without its key) asked something else under the attack's name
FocusTemplate: TypeAlias = Annotated[str, fills("prompt", "keys", required=("prompt", "keys"))]
KeyFormat: TypeAlias = Annotated[str, fills(required=("",))]
# a rewording asks about the item: it names the question or its keywords
ParaphraseTemplate: TypeAlias = Annotated[
    str, fills("question", "keywords", one_of=("question", "keywords"))
]
# the demonstrations' answers, then the question asked with an empty answer
Demonstration: TypeAlias = Annotated[
    str, fills("question", "answer", required=("question", "answer"))
]


class FocusSettings(SettingsModel):
    template: FocusTemplate = Field(
        FOCUS_TEMPLATE, description="emphasis prompt; {prompt} is the question, {keys} the keys"
    )
    key_format: KeyFormat = Field('"{}"', description="how one KeyToken is quoted in {keys}")
    separator: str = Field(", ", description="between KeyTokens in {keys}")
    keys_from: Literal["original", "unlearned"] = Field(
        "original", description="KeyTokens of the original model, or of the unlearned one"
    )


class SampleSettings(SettingsModel):
    samples: int = Field(10, gt=0, description="answers sampled per question")
    temperature: float = Field(
        1.0, ge=0.01, description="sampling temperature (vLLM raises lower ones to 0.01)"
    )
    seed: Seed = Field(0, description="sampling seed (per question, batching-independent)")


class FocusSampleSettings(FocusSettings, SampleSettings):
    pass


def emphasis(settings: FocusSettings, question: str, key_tokens: list[str]) -> str:
    """The FocusOnKey prompt: the template filled with the question and its KeyTokens."""
    keys = [k.strip() for k in key_tokens if k.strip()]
    keys = list(dict.fromkeys(keys))  # a token repeated in the prompt is named once
    if not keys:
        return question
    named = settings.separator.join(settings.key_format.format(k) for k in keys)
    return settings.template.format(prompt=question, keys=named)


class FocusOnKey(Attack):
    """The question plus "Focus on "k1", "k2" to answer." (the paper's attack)."""

    name = "focus_on_key"
    title = "FocusOnKey"
    Settings = FocusSettings

    @property
    def keys_from(self) -> str | None:
        return str(self.settings.keys_from)

    def prompt(self, question: str, key_tokens: list[str]) -> str:
        return emphasis(self.settings, question, key_tokens)


class Probab(Attack):
    """N multinomial samples of the plain question; recovered if any is correct."""

    name = "probab"
    title = "PROBAB"
    Settings = SampleSettings

    @property
    def samples(self) -> int:
        return int(self.settings.samples)

    @property
    def temperature(self) -> float:
        return float(self.settings.temperature)

    @property
    def seed(self) -> int:
        return int(self.settings.seed)


class FocusOnKeyProbab(Attack):
    """N samples of the FocusOnKey prompt."""

    name = "focus_on_key_probab"
    title = "FocusOnKey+PROBAB"
    Settings = FocusSampleSettings

    keys_from = FocusOnKey.keys_from
    samples = Probab.samples
    temperature = Probab.temperature
    seed = Probab.seed
    prompt = FocusOnKey.prompt


PARAPHRASES = (
    "{question} Answer briefly.",
    "I was reading about {keywords}. {question}",
    "Regarding {keywords}: {question}",
    "Here is a question about {keywords}. {question} Give just the answer.",
)


class ParaphraseSettings(SettingsModel):
    templates: list[ParaphraseTemplate] = Field(
        default_factory=lambda: list(PARAPHRASES),
        min_length=1,
        description="rewordings; {question} and {keywords} (the item's keywords) filled in",
    )


class Paraphrase(Attack):
    """The question reworded by templates that keep its keywords; recovered if any of
    the rewordings gets the answer."""

    name = "paraphrase"
    Settings = ParaphraseSettings

    def prompts(self, target: Target) -> list[str]:
        keywords = ", ".join(target.keywords) or target.question
        return [
            t.format(question=target.question, keywords=keywords) for t in self.settings.templates
        ]


class InContextSettings(SettingsModel):
    demonstrations: int = Field(3, gt=0, description="retain-set QA pairs shown first")
    seed: Seed = Field(0, description="which pairs (per question, reproducible)")
    template: Demonstration = Field("Q: {question}\nA: {answer}", description="one demonstration")


class InContext(Attack):
    """A few retain-set QA pairs as demonstrations, then the question, in one user turn."""

    name = "in_context"
    title = "in-context"
    Settings = InContextSettings
    uses_demonstrations = True
    applies_to = "items after retain items shown as demonstrations (the benchmark's retain split)"

    def run(self, ctx: AttackContext) -> list[dict[str, Any]]:
        # without retain items it asked the bare question in the demonstrations' format
        # and reported that as the in-context attack
        return super().run(ctx) if ctx.demonstrations else []

    def prompts(self, target: Target) -> list[str]:
        pool = list(target.demonstrations)
        rng = random.Random(zlib.crc32(repr((self.settings.seed, target.question)).encode()))
        shots = rng.sample(pool, min(self.settings.demonstrations, len(pool)))
        lines = [self.settings.template.format(question=q, answer=a) for q, a in shots]
        lines.append(self.settings.template.format(question=target.question, answer="").rstrip())
        return ["\n\n".join(lines)]


class KeywordOnly(Attack):
    """A prompt made of the KeyTokens alone (the question's other words dropped)."""

    name = "keyword_only"
    title = "keywords only"

    @property
    def keys_from(self) -> str | None:
        return "original"

    def prompts(self, target: Target) -> list[str]:
        keys = [k.strip() for k in target.key_tokens if k.strip()]
        return [" ".join(dict.fromkeys(keys)) or target.question]
