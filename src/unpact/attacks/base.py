"""The attack interface: what an attack is given (`AttackContext`), what it returns (one row
per attacked item), the registry, and the default run shared by every prompt attack.

An attack owns its execution: `run(ctx)` gets the model under attack (or its spec, to load
a fresh copy), the forgotten items, their KeyTokens, the retain items, the judge and the
device, and returns per-item rows `{"id", "prompt", "prompts", "outputs", "recovered", ...}`.
A prompt attack only says what it asks (`prompt` or `prompts`) and how many answers it
draws (`samples`); the default `run` generates, judges and fills the rows. A weight-touching
attack (relearning) overrides `run`. `key_parts(ctx)` names what else its cached rows depend
on beyond the model, the items, their KeyTokens, its settings and the judge.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from unpact.data.items import QAItem
from unpact.errors import UnpactError, items_named
from unpact.judge import JudgeSettings, Verdict, choose_options, encode_questions, judge_many
from unpact.plugins import check_name as _check_name
from unpact.plugins import check_overrides as _check_overrides
from unpact.scoring import generate
from unpact.types import SettingsModel, plain_scalar, unknown_keys

if TYPE_CHECKING:
    from unpact.types import AnyModel

ATTACKS: dict[str, type[Attack]] = {}

FOCUS_TEMPLATE = "{prompt}\nFocus on {keys} to answer."


@dataclass(frozen=True)
class Target:
    """What an attacker may use about one forgotten item."""

    question: str
    key_tokens: tuple[str, ...] = ()  # KeyTokens (whose: the attack's `keys_from`)
    keywords: tuple[str, ...] = ()  # the benchmark's ground-truth keywords of the question
    demonstrations: tuple[tuple[str, str], ...] = ()  # retain-set (question, answer) pairs


class NoSettings(SettingsModel):
    """An attack without settings: any key given is an error."""


class Attack:
    """A way to ask a forgotten question again. Subclasses set `name` and override
    `prompt` and/or `samples`."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # as tables and plots name it (default: the name)
    Settings: ClassVar[type[BaseModel]] = NoSettings
    uses_demonstrations: ClassVar[bool] = False  # needs retain-set QA pairs
    changes_weights: ClassVar[bool] = False  # needs the weights (relearn, quantize, ...)
    # compares its model's hidden states with the original's (ablate_direction): the two
    # must have one shape of residual stream
    reads_original_states: ClassVar[bool] = False
    control: ClassVar[bool] = False  # run on the never-taught reference too, as a control
    has_baseline: ClassVar[bool] = False  # also run on the original model over every split
    explains: ClassVar[bool] = False  # attributes its recovered answers (ctx.attribution)
    revision: ClassVar[int] = 0  # bumped when its rows change for the same inputs (cache key)
    # settings added after rows were cached: out of the cache key while unset (None), so
    # those rows stay valid
    added_later: ClassVar[tuple[str, ...]] = ()
    applies_to: ClassVar[str] = ""  # which items it can attack, when not every one

    def __init__(self, settings: BaseModel | None = None) -> None:
        self.settings: Any = settings if settings is not None else self.Settings()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_overrides(cls, Attack, "attack")
        if cls.name:
            _check_name(ATTACKS, cls, "attack")
            ATTACKS[cls.name] = cls

    @property
    def keys_from(self) -> str | None:
        """Whose KeyTokens the prompt names ("original" | "unlearned"), or None."""
        return None

    @property
    def samples(self) -> int:
        """Answers to draw: 0 means the single greedy answer."""
        return 0

    @property
    def temperature(self) -> float:
        return 1.0

    @property
    def seed(self) -> int:
        return 0

    def prompt(self, question: str, key_tokens: list[str]) -> str:
        return question

    def prompts(self, target: Target) -> list[str]:
        """Every prompt the attacker tries on this item (default: the one `prompt`)."""
        return [self.prompt(target.question, list(target.key_tokens))]

    @property
    def needs_splits(self) -> frozenset[str]:
        """The splits of the run's data it reads beyond the forget items ("general":
        the run must have general items; a config without them is refused up front)."""
        return frozenset()

    def check_depth(self, layers: int) -> None:
        """Refuse settings that name a layer a model of `layers` decoder layers does not
        have (ablate_direction's `layer`), before anything is trained."""

    def settings_key(self) -> dict[str, Any]:
        """The settings as the cache key reads them (`added_later` ones left out unset)."""
        dumped: dict[str, Any] = self.settings.model_dump(mode="json")
        for name in self.added_later:
            if dumped.get(name) is None:
                dumped.pop(name, None)
        return dumped

    @property
    def rows_depend_on_the_items(self) -> bool:
        """Whether an item's row depends on which other items are attacked with it
        (relearning trains on some forgotten items and answers the rest). Its control on the
        never-taught reference then runs over each unlearned model's own forgotten items,
        so that both models train on the same items and answer the same others; otherwise
        one control over every forget item the original knew serves every model."""
        return False

    def key_parts(self, ctx: AttackContext) -> list[Any]:
        """What the rows depend on beyond the model, items, KeyTokens, settings and judge."""
        return [list(ctx.demonstrations)] if self.uses_demonstrations else []

    def run(self, ctx: AttackContext) -> list[dict[str, Any]]:
        """Per item: the attack's prompts, their answers and whether any answer is correct."""
        return run_prompts(self, ctx)

    def checked_run(self, ctx: AttackContext) -> list[dict[str, Any]]:
        """`run(ctx)` as the runner keeps it: each row names an item it was given and says
        `recovered` true or false, numpy's and torch's scalars become Python's, and `prompt`
        defaults to the question. A plugin's mistake is one message naming the attack and
        the row (it was a KeyError or a JSON encoder's TypeError after the whole run)."""
        rows = self.run(ctx)
        where = f"attack {self.name}"
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise UnpactError(f"{where}: run() must return a list of dicts, one per item")
        given = {i.id: i for i in ctx.items}
        out = []
        for n, row in enumerate(rows):
            item = given.get(row.get("id"))  # type: ignore[arg-type]
            if item is None:
                raise UnpactError(
                    f"{where}: row {n} names {row.get('id')!r}, not an item it was given"
                )
            recovered = plain_scalar(row.get("recovered"))
            if not isinstance(recovered, bool):
                raise UnpactError(
                    f"{where}: row {n} ({item.id}): 'recovered' must be true or false, "
                    f"not {row.get('recovered')!r}"
                )
            row = {"prompt": item.question, **row, "recovered": recovered}
            try:
                out.append(json.loads(json.dumps(row, default=_plain_or_fail)))
            except (TypeError, ValueError) as exc:
                raise UnpactError(f"{where}: row {n} ({item.id}) cannot be saved: {exc}") from None
        return out


def _plain_or_fail(value: Any) -> Any:
    """JSON's fallback: numpy's and torch's scalars and arrays as Python's."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON")


@dataclass
class AttackContext:
    """What an attack is given for one model under attack."""

    model: Callable[[], AnyModel]  # the model under attack, opened on first call
    spec: str  # its spec: load a fresh copy from it to change weights
    items: list[QAItem]  # the forgotten items to attack
    keys: dict[str, list[str]]  # item id -> KeyTokens (whose: the attack's keys_from)
    retain: list[QAItem]  # the benchmark's retain items
    judge: JudgeSettings
    label: str = ""  # the model's label in the results (progress text)
    demonstrations: tuple[tuple[str, str], ...] = ()  # retain-set (question, answer) pairs
    device: str | None = None  # for an attack that loads its own copy (None: the default)
    dtype: str = "float32"  # the dtype the run evaluates in: a copy an attack loads, too
    original: dict[str, dict[str, Any]] = field(default_factory=dict)  # item id -> the
    # original model's record: {"output", "correct", "attribution"} (unPact, as saved)
    seed: int = 0  # for an attack's own randomness: fixed per run seed, model and attack
    original_spec: str = ""  # the original (taught) model's spec: ablate_direction's other end
    original_key: str = ""  # and its cache key (its content: a folder retrained in place)
    general: list[QAItem] = field(default_factory=list)  # the run's general-knowledge items
    attribution: dict[str, Any] | None = None  # attribute_many's settings, to explain
    # recovered answers (weight attacks); None: not explained

    def generator(self) -> random.Random:
        """A seeded `random.Random` for this attack on this model (torch's random numbers:
        `torch.Generator().manual_seed(ctx.seed)`)."""
        return random.Random(self.seed)

    def target(self, item: QAItem) -> Target:
        return Target(
            item.question,
            tuple(self.keys.get(item.id, [])),
            tuple(item.keywords),
            self.demonstrations,
        )


def attack_title(name: str) -> str:
    """An attack's display name ("any" is the union of a run's attacks)."""
    if name == "any":
        return "any attack"
    cls = ATTACKS.get(name)
    return (cls.title or cls.name) if cls is not None else name


def get_attack(name: str, settings: dict[str, Any] | None = None) -> Attack:
    """An attack by registered name, with validated settings."""
    from pydantic import ValidationError

    from unpact.unlearn.config import describe_errors

    if name not in ATTACKS:
        raise UnpactError(f"unknown attack {name!r}; choose from {', '.join(sorted(ATTACKS))}")
    cls = ATTACKS[name]
    if keys := unknown_keys(cls.Settings, settings or {}):
        raise UnpactError(f"attack {name}: {keys[0]}: unknown setting")
    try:
        return cls(cls.Settings(**(settings or {})))
    except ValidationError as e:
        raise UnpactError(f"attack {name}: {describe_errors(e)}") from None


def _prompt_of(items: list[QAItem], asked: list[tuple[int, str]], attack: str, m: int) -> str:
    """How an error names the `m`th prompt of `asked` ((item place, prompt) pairs)."""
    return f"{items[asked[m][0]].label}: {attack}'s prompt"


def run_prompts(attack: Attack, ctx: AttackContext) -> list[dict[str, Any]]:
    """The default run of a prompt attack: ask each item's prompts, draw `attack.samples`
    answers (or the greedy one; for multiple choice, greedy means the highest-LP option),
    judge them; an item is recovered if any answer is correct."""
    items = ctx.items
    per_item = [attack.prompts(ctx.target(i)) for i in items]
    for item, asked in zip(items, per_item):
        _check_asked(attack, item, asked)
    flat = [(n, p) for n, ps in enumerate(per_item) for p in ps]
    answers: dict[int, list[tuple[str, bool | None]]] = {n: [] for n in range(len(items))}
    by_lp = [(n, p) for n, p in flat if items[n].is_mcq and not attack.samples]
    if by_lp:
        lm = ctx.model()
        with items_named(partial(_prompt_of, items, by_lp, attack.name)):
            picks = choose_options(
                lm, [p for _, p in by_lp], [items[n].choices or () for n, _ in by_lp]
            )
        for (n, _), k in zip(by_lp, picks):
            choice = (items[n].choices or ())[k]
            answers[n].append((choice, choice == items[n].answer))
    generated = [(n, p) for n, p in flat if not (items[n].is_mcq and not attack.samples)]
    if generated:
        lm = ctx.model()
        prompts = encode_questions(
            lm,
            [items[n] for n, _ in generated],
            ctx.judge.max_new_tokens,
            [p for _, p in generated],
            f"prompt under attack {attack.name}",
        )
        with items_named(partial(_prompt_of, items, generated, attack.name)):
            gens = generate(
                lm,
                prompts,
                max_new_tokens=ctx.judge.max_new_tokens,
                num_samples=attack.samples,
                temperature=attack.temperature,
                seed=attack.seed,
                progress=attack.name,
            )
        for (n, _), g in zip(generated, gens):
            answers[n] += [(s.text, None) for s in g]
    # every generated answer judged in one call (an LLM judge: many requests in flight)
    free = [(n, t) for n in range(len(items)) for t, v in answers[n] if v is None]
    judged = judge_many(
        [Verdict(items[n].question, t, items[n].answer, items[n].aliases) for n, t in free],
        ctx.judge,
        attack.name,
    )
    right = {n for (n, _), ok in zip(free, judged) if ok}
    return [
        {
            "id": item.id,
            "prompt": per_item[n][0],
            "prompts": per_item[n],
            "outputs": [t for t, _ in answers[n]],
            "recovered": n in right or any(v for _, v in answers[n] if v is not None),
        }
        for n, item in enumerate(items)
    ]


def _check_asked(attack: Attack, item: QAItem, asked: Any) -> None:
    """An attack's prompts (a plugin's, typically) must be texts: anything else was a
    traceback from deep inside the tokenizer."""
    texts = isinstance(asked, (list, tuple)) and all(isinstance(p, str) for p in asked)
    if texts and asked and all(p.strip() for p in asked):
        return
    import inspect

    try:
        where = inspect.getsourcefile(type(attack)) or type(attack).__module__
    except TypeError:
        where = type(attack).__module__
    raise UnpactError(
        f"attack {attack.name} ({where}): for item {item.id} it asks {asked!r}; prompts() must "
        "give a non-empty list of non-empty texts (prompt(): one text)"
    )
