"""Recovery attacks (SPEC section 5): try to bring "forgotten" knowledge back without
touching the weights.

An attack is a prompt transform and a sampler: `prompt(question, key_tokens)` (or, for an
attack that needs more of the item, `prompts(target)`, one or several prompts) says what the
attacker asks, `samples` how many answers they draw per prompt (0: the greedy answer). The
runner generates, judges each answer, and an item counts as recovered if any answer is
correct. Adding an attack is one subclass with a `name` (it registers itself) and, if it
has knobs, a pydantic `Settings`.

- `focus_on_key`: the question plus an emphasis phrase naming its KeyTokens (by default
  the original model's; `keys_from: unlearned` is the attacker who never had it).
- `probab`: N seeded samples at temperature 1 of the plain question.
- `focus_on_key_probab`: both.
- `paraphrase`: the question reworded by templates that keep its keywords.
- `in_context`: a few retain-set QA pairs as demonstrations before the question.
- `keyword_only`: a prompt made of the KeyTokens alone.
- `relearn`: fine-tune (a copy of) the unlearned model for a few steps on a few forgotten
  items (or on retain items) and ask the other forgotten questions again (the classic
  relearning attack). Its recovery rate is over the forgotten items it did not train on.

Attacks on the weights and the hidden states (`attacks/weights.py`; each also run on the
never-taught reference as a control): `quantize` (8/4-bit weight-only, torchao),
`relearn_unrelated` (a few steps on unrelated text), `ablate_direction` (a difference-of-
means direction projected out of the residual stream), `logit_lens` and `probe` (the answer
read from an intermediate layer).
"""

from unpact.attacks.base import (
    ATTACKS,
    FOCUS_TEMPLATE,
    Attack,
    AttackContext,
    NoSettings,
    Target,
    attack_title,
    get_attack,
)
from unpact.attacks.prompts import (
    PARAPHRASES,
    FocusOnKey,
    FocusOnKeyProbab,
    FocusSampleSettings,
    FocusSettings,
    InContext,
    InContextSettings,
    KeywordOnly,
    Paraphrase,
    ParaphraseSettings,
    Probab,
    SampleSettings,
    emphasis,
)
from unpact.attacks.relearn import Relearn, RelearnSettings
from unpact.attacks.weights import (
    AblateDirection,
    LogitLens,
    Probe,
    Quantize,
    RelearnUnrelated,
    WeightAttack,
)
from unpact.types import SettingsModel

__all__ = [
    "ATTACKS",
    "FOCUS_TEMPLATE",
    "PARAPHRASES",
    "AblateDirection",
    "Attack",
    "AttackContext",
    "FocusOnKey",
    "FocusOnKeyProbab",
    "FocusSampleSettings",
    "FocusSettings",
    "InContext",
    "InContextSettings",
    "KeywordOnly",
    "LogitLens",
    "NoSettings",
    "Paraphrase",
    "ParaphraseSettings",
    "Probab",
    "Probe",
    "Quantize",
    "Relearn",
    "RelearnSettings",
    "RelearnUnrelated",
    "SampleSettings",
    "SettingsModel",
    "Target",
    "WeightAttack",
    "attack_title",
    "emphasis",
    "get_attack",
]
