"""`unpact audit`: the whole battery on a model pair a user already has, and a verdict per
test in plain words.

An audit is a run (`unpact.run`) whose original model is given, not taught (injection off),
with one "method" (the given unlearned model), the never-taught reference when the user has
one (`--reference`: TOFU and MUSE publish theirs; `unpact inject --teach retain` makes one),
every recovery attack (prompt, weights, hidden states) and the indistinguishability figures.
Two presets size it: `laptop` (a 2-core CPU: 4.3 minutes on news with the default
model: benchmarks/audit.py) and `gpu` (every item, more samples, both bit widths, each
also in the paper's own format).

In an audit every attack, prompt attacks included, also runs on the reference (its control):
a never-taught model sampling five answers, or picking among four options, gets some right.

`verdicts(results, records)` reads the run's figures and per-item records: forgotten?
recoverable, by which attack, beyond its control on the reference (an exact McNemar test on
the same items)? indistinguishable from the reference (PrivLeak's interval holds 0, forget
quality above alpha)? did the focus move?
"""

from __future__ import annotations

import inspect
import os
import re
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple, get_args, overload

from unpact.attacks import ATTACKS
from unpact.errors import UnpactError
from unpact.files import as_path
from unpact.metrics import (
    ItemRecord,
    McNemar,
    attacked,
    display,
    exact_interval,
    mcnemar_pairs,
)
from unpact.run.config import EvalDtype, check_served_dtype
from unpact.types import SettingsModel, is_remote_spec, plain_values, spec_text

# The battery: every attack of the field that needs no user data beyond the benchmark.
PROMPT_ATTACKS = ("focus_on_key", "probab", "focus_on_key_probab")
WEIGHT_ATTACKS = ("quantize", "relearn_unrelated", "ablate_direction", "logit_lens", "probe")

PRESETS: dict[str, dict[str, Any]] = {
    # a 2-core CPU: the first 20 forget and retain items, 40 general ones, 5 samples
    "laptop": {
        "data": {"forget_items": 20, "retain_items": 20, "general_items": 40},
        "attacks": [
            {"name": "focus_on_key"},
            {"name": "probab", "settings": {"samples": 5}},
            {"name": "quantize", "settings": {"bits": 4}},
            {"name": "relearn_unrelated"},
            {"name": "ablate_direction"},
            {"name": "logit_lens"},
            {"name": "probe"},
        ],
        "attribution": {"gradient": []},
        # MUSE's raw forget text has thousands of paragraphs: score 20 of each split
        "membership": {"gradnorm": False, "documents": 20},
    },
    # a GPU: every item, PROBAB's 10 samples, quantization at 8 and 4 bits, the checks
    "gpu": {
        "data": {},
        "attacks": [
            {"name": "focus_on_key"},
            {"name": "probab", "settings": {"samples": 10}},
            {"name": "focus_on_key_probab", "settings": {"samples": 10}},
            {"name": "quantize", "label": "quantize_8bit", "settings": {"bits": 8}},
            {"name": "quantize", "settings": {"bits": 4}},
            # the paper's own formats: its code loads the model with bitsandbytes'
            # load_in_4bit (FP4 in blocks of 64) and load_in_8bit (LLM.int8's rows and activations)
            {"name": "quantize", "label": "quantize_fp4", "settings": {"algorithm": "fp4"}},
            {
                "name": "quantize",
                "label": "quantize_llm_int8",
                "settings": {"algorithm": "llm_int8"},
            },
            {"name": "relearn_unrelated"},
            {"name": "ablate_direction"},
            {"name": "logit_lens"},
            {"name": "probe"},
        ],
        "attribution": {},
        # as many as MUSE's verbmem and knowmem sets; VerbMem continues 128 tokens, as MUSE
        "membership": {"documents": 100, "verbmem_new_tokens": 128},
    },
}


def audit_config(
    original: str | os.PathLike[str],
    unlearned: str | os.PathLike[str],
    benchmark: str | os.PathLike[str],
    *,
    reference: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    preset: str = "laptop",
    attacks: list[str] | None = None,
    general: str | os.PathLike[str] | None = "general",
    device: str = "auto",
    judge: str = "contains",
    max_new_tokens: int | None = None,
    judge_max_tokens: int | None = None,
    judge_prompt: str | os.PathLike[str] | None = None,
    chat_template: str | os.PathLike[str] | None = None,
    plugins: list[str | os.PathLike[str]] | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    concurrency: int = 16,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The run config of an audit, and the parts it leaves out with the reason (an attack
    that needs weights on a served model). `plugins` (files or module names, as `--plugin`)
    are imported first, so that `attacks` may name theirs."""
    from unpact.plugins import load_plugins

    original, unlearned, benchmark = spec_text(original), spec_text(unlearned), _text(benchmark)
    reference, base, general = _text(reference), _text(base), _text(general)
    general = None if general == "none" else general  # as `--general none` says it
    chat_template, judge_prompt = _text(chat_template), _text(judge_prompt)
    entries = [_absolute(_text(p)) for p in plugins or []]
    load_plugins(entries)
    judged = _judge(judge, max_new_tokens, judge_max_tokens, judge_prompt)
    _check_choices(preset=preset, dtype=dtype)
    pair = {"--original": original, "--unlearned": unlearned, "--reference": reference}
    chosen, skipped = _runnable(_chosen_attacks(preset, attacks), pair, benchmark, general)
    for a in chosen:  # every verdict is against the same attack on the reference
        a.setdefault("control", True)
    preset_cfg = PRESETS[preset]
    config: dict[str, Any] = {
        "model": original,
        "data": {"benchmark": benchmark, "general": general, **preset_cfg["data"]},
        "inject": {"enabled": False},
        "methods": [{"model": unlearned, "name": "unlearned"}],
        "attacks": chosen,
        "attribution": preset_cfg["attribution"],
        "judge": judged,
        "membership": {
            **preset_cfg["membership"],
            "reference": reference,
            "base": base or reference,
        },
        "device": device,
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "remote": {"concurrency": concurrency},  # requests in flight to a served model
    }
    if chat_template is not None:  # every model as a copy with this template
        config["chat_template"] = str(chat_template)
    if plugins:  # a continued audit's config names them too
        config["plugins"] = entries
    return config, skipped


def _runnable(
    chosen: list[dict[str, Any]],
    pair: dict[str, str | None],
    benchmark: str,
    general: str | None,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The chosen attacks this audit can run, and why it leaves out each other one (by its
    `skipped` key): weights on a served model (of `pair`, the models by their options),
    relearning on general items with `--general none`, a split the benchmark has no items
    in (a plugin's attack), and a direction between models of two shapes (ablate_direction,
    `stream_mismatch`: the run refused the whole audit for it)."""
    from unpact.attacks import get_attack
    from unpact.data.sources import load_benchmark

    served = [s for s in (pair["--original"], pair["--unlearned"]) if s and is_remote_spec(s)]
    splits = cache(lambda: set(load_benchmark(benchmark).counts()))  # read once, if needed

    def left_out(a: dict[str, Any]) -> str | None:
        if served and ATTACKS[a["name"]].changes_weights:
            return f"{served[0]} is served: no weights to attack"
        needs = get_attack(a["name"], a.get("settings")).needs_splits
        if general is None and "general" in needs:
            return "--general none: no general-knowledge items to use"  # e.g. relearning
        missing = sorted(needs - {"general"} - splits()) if needs - {"general"} else []
        if missing:
            return f"benchmark {benchmark} has no {missing[0]} items, which it reads"
        if ATTACKS[a["name"]].reads_original_states:
            return _no_direction(pair)
        return None

    kept, skipped = [], {}
    for a in chosen:
        why = left_out(a)
        if why is None:
            kept.append(a)
        else:
            skipped[f"attack.{a.get('label') or a['name']}"] = why
    return kept, skipped


def _no_direction(pair: dict[str, str | None]) -> str | None:
    """Why an attack that compares hidden states with the original's cannot attack this
    pair (`stream_mismatch` by the models' config.json, named by their options), or None;
    None too where a model cannot be read (its load says why, by its option)."""
    from unpact.attacks.weights import stream_words
    from unpact.run import stream_mismatch

    original, *others = pair.items()
    try:
        found = stream_mismatch(original[1], dict(others))
    except UnpactError:
        return None
    if found is None:
        return None
    option, spec, theirs, shape = found
    return (
        f"{option} {spec}'s residual stream ({stream_words(*theirs)}) is not "
        f"--original's ({stream_words(*shape)}): no direction between them (is it "
        "a fine-tune of the original?)"
    )


@cache
def _options_model() -> Any:
    """A pydantic model of `audit_config`'s keyword options, built from its signature (each
    default written once, there)."""
    import typing

    from pydantic import create_model

    hints = typing.get_type_hints(audit_config)
    fields: dict[str, Any] = {
        name: (_as_text(hints[name]), p.default)
        for name, p in inspect.signature(audit_config).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    }
    return create_model("AuditOptions", __base__=SettingsModel, **fields)


def _as_text(hint: Any) -> Any:
    """`hint` with `os.PathLike[str]` as `str`, at any depth: the options are checked once
    their paths are text (`plain_values`), and pydantic before 2.7 builds no schema for
    `os.PathLike[str]` (every option, even a right one, was its PydanticSchemaGenerationError)."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is os.PathLike or origin is os.PathLike:
        return str
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(dict.fromkeys(_as_text(a) for a in args))]  # noqa: UP007
    if origin is list:
        return list[_as_text(args[0])]  # type: ignore[misc]
    return hint


def checked_options(options: dict[str, Any]) -> dict[str, Any]:
    """The Python API's options, checked as the CLI's are parsed: an unknown name (a typo)
    or a value of the wrong type is one message naming the option. `attacks` may be given
    as the CLI takes it (comma-separated text) and `plugins` as one file or module."""
    from pydantic import ValidationError

    from unpact.unlearn.config import describe_errors

    given = plain_values(dict(options))  # paths as text, numpy numbers as Python's
    if isinstance(given.get("attacks"), str):  # "quantize" was read letter by letter
        given["attacks"] = [a.strip() for a in given["attacks"].split(",") if a.strip()]
    if isinstance(given.get("plugins"), str):
        given["plugins"] = [given["plugins"]]
    model = _options_model()
    try:
        validated = model(**given)
    except ValidationError as e:
        known = ", ".join(model.model_fields)
        raise UnpactError(
            "audit: " + describe_errors(e, unknown=f"unknown option (options: {known})")
        ) from None
    # as validated: max_new_tokens="8" passed as text and failed comparing it with 1
    return {name: getattr(validated, name) for name in given}


@overload
def _text(value: str | os.PathLike[str]) -> str: ...
@overload
def _text(value: str | os.PathLike[str] | None) -> str | None: ...
def _text(value: Any) -> Any:
    """A path given where text goes (a model folder, a benchmark, a plugin file, a chat
    template or judge prompt's file) as its text; anything else as it is."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _spec(value: Any, name: str) -> str:
    """A model argument of `audit` as its spec's text; a wrong type names the argument."""
    try:
        return spec_text(value)
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None


def _chosen_attacks(preset: str, attacks: list[str] | None) -> list[dict[str, Any]]:
    """The preset's attacks, or those `attacks` names (each once): the preset's by name or
    label, an attack another preset labels (`quantize_8bit`, `quantize_fp4`) with its
    settings there, any other registered one with its defaults."""
    from unpact.attacks import ATTACKS

    chosen = [dict(a) for a in PRESETS[preset]["attacks"]]
    if attacks is None:
        return chosen
    if not attacks:  # an audit with no attack at all was run, said nowhere
        raise UnpactError("--attacks: give at least one attack name")
    # each once: one named twice ran twice, or failed as "attacks.1.label ... listed twice"
    attacks = list(dict.fromkeys(attacks))
    known = {a.get("label") or a["name"] for a in chosen}
    labelled = {a["label"]: a for p in PRESETS.values() for a in p["attacks"] if "label" in a}
    for name in attacks:
        if name not in known and name not in labelled and name not in ATTACKS:
            raise UnpactError(
                f"--attacks: unknown attack {name!r}; choose from "
                f"{', '.join(sorted(set(ATTACKS) | known | set(labelled)))}"
            )
    chosen = [a for a in chosen if (a.get("label") or a["name"]) in attacks]
    return chosen + [dict(labelled.get(n, {"name": n})) for n in attacks if n not in known]


_CHOICES = {
    "preset": tuple(PRESETS),
    "judge": ("contains", "rouge", "openai:MODEL@URL"),
    "dtype": get_args(EvalDtype),
}
JUDGE_KEY_ENV = "OPENAI_API_KEY"  # an LLM judge's key, sent when this variable is set


def _judge(
    judge: str, max_new_tokens: int | None, reply_tokens: int | None, prompt: str | None = None
) -> dict[str, Any]:
    """The run's judge settings for `--judge`: contains-match for short answers, ROUGE-L
    recall for sentences (TOFU's), or an LLM behind an OpenAI-compatible endpoint
    (`openai:MODEL@URL`, its key from $OPENAI_API_KEY when set; `reply_tokens`, from
    `--judge-max-tokens`, the reply length it is given: a reasoning model needs room;
    `prompt`, from `--judge-prompt`, what it is asked: a file or the text)."""
    from unpact.remote import parse_remote_spec
    from unpact.types import REMOTE_PREFIX

    for option, n in (("max-new-tokens", max_new_tokens), ("judge-max-tokens", reply_tokens)):
        if n is not None and n < 1:
            raise UnpactError(f"--{option}: {n} is not a positive number")
    length = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    if judge.startswith(REMOTE_PREFIX):
        try:
            model, url = parse_remote_spec(judge)
        except UnpactError as e:
            raise UnpactError(f"--judge: {e}") from None
        key = JUDGE_KEY_ENV if os.environ.get(JUDGE_KEY_ENV) else None
        llm: dict[str, Any] = {"base_url": url, "model": model, "api_key_env": key}
        if reply_tokens is not None:
            llm["max_tokens"] = reply_tokens
        if prompt is not None:
            llm["prompt"] = _judge_prompt(prompt)
        return {"kind": "llm", "llm": llm} | length
    for option, given in (("judge-max-tokens", reply_tokens), ("judge-prompt", prompt)):
        if given is not None:
            raise UnpactError(f"--{option}: only for an LLM judge (--judge openai:MODEL@URL)")
    _check_choices(judge=judge)
    return {"kind": judge} | length


def _judge_prompt(given: str) -> str:
    """`--judge-prompt`: a file's text, or the prompt itself (it names a field in braces),
    checked as the run config checks `judge.llm.prompt`."""
    from pydantic import ValidationError

    from unpact.files import read_text
    from unpact.judge import LLMJudgeSettings

    if not given.strip():
        raise UnpactError("--judge-prompt: empty; give a file, or the prompt itself")
    path = Path(given).expanduser()
    if "{" not in given or path.is_file():
        try:
            given = read_text(path)
        except UnpactError as e:
            raise UnpactError(
                f"--judge-prompt: {e} (give a file, or the prompt with {{question}}, "
                "{answer} and {output} in it)"
            ) from None
    try:
        LLMJudgeSettings(base_url="-", model="-", prompt=given)
    except ValidationError as e:
        why = str(e.errors()[0]["msg"]).removeprefix("Value error, ")
        raise UnpactError(f"--judge-prompt: {why}") from None
    return given


def _check_choices(**given: str) -> None:
    """Each option one of its choices, or one message naming the option."""
    for option, value in given.items():
        if value not in _CHOICES[option]:
            choices = ", ".join(_CHOICES[option])
            raise UnpactError(f"--{option}: {value!r} is not one of {choices}")


def _note_same_models(named: dict[str, str], log: Any) -> None:
    """Say when two of the models are one (the same weights and tokenizer: one path given
    twice, say): the unlearned model or the reference as the original, where the audit
    would spend its minutes saying "not forgotten"; the reference as the unlearned model,
    which is then "indistinguishable from the reference" by construction."""
    from unpact.backends import model_key

    if log is None:
        return
    keys = {option: model_key(spec) for option, spec in named.items() if option != "base"}
    for option, other in (
        ("unlearned", "original"),
        ("reference", "original"),
        ("reference", "unlearned"),
    ):
        if option in keys and keys[option] == keys[other]:
            if (option, other) == ("reference", "original") and not any(
                is_remote_spec(named[o]) for o in (option, other)
            ):
                continue  # the run says it, and what it costs (`run._note_reference`)
            log(
                f"note: --{option} is the same model as --{other} (the same weights and "
                "tokenizer): nothing can differ between them"
            )


def _on_cpu(device: str) -> bool:
    """Whether the audit's local models would run on the CPU (`auto` without a GPU)."""
    from unpact.models import parse_device

    return parse_device(device).type == "cpu"


def _absolute(entry: str) -> str:
    """A plugin file as an absolute path (the run config that holds it is a dict, read
    from no folder); a module name as it is."""
    from pathlib import Path

    from unpact.plugins import is_path

    return str(Path(entry).expanduser().absolute()) if is_path(entry) else entry


def _mcnemar(records: list[ItemRecord], attack: str) -> McNemar:
    """Exact McNemar on the forgotten items attacked on both models: recovered only from
    the unlearned model (`only_a`), only from the reference (`only_b`), and the two-sided
    p-value (1 without such items)."""
    return mcnemar_pairs(
        [
            (r.recovered[attack], r.recovered_control[attack])
            for r in attacked(records, attack)
            if attack in r.recovered_control
        ]
    )


def _pct(value: Any) -> str:
    return display("percent", value)


def _ci(m: dict[str, Any], key: str) -> str:
    lo, hi = (m.get("ci") or {}).get(key) or (None, None)
    return "" if lo is None else f" [{_pct(lo)}, {_pct(hi)}]"


def verdicts(
    m: dict[str, Any],
    records: list[ItemRecord],
    attacks: list[str],
    alpha: float = 0.05,
    skipped: dict[str, str] | None = None,
    label: str = "",
    reference: dict[str, Any] | None = None,
    original: dict[str, Any] | None = None,
    *,
    level: float = 0.95,
) -> list[dict[str, Any]]:
    """One method's verdicts: {"test", "verdict", "detail"} per test, in plain words, and
    the evidence of the forgotten line, each attack (`_recovery_numbers`) and the focus as
    numbers too. `skipped` (results.json's) says why a figure of the method `label` was
    not measured; `reference`: the retrained reference's figures (results.json's
    `references`), whose accuracies and model utility the forgotten line and whose forget
    probability the indistinguishability evidence give beside the method's; `original`: the original's
    there, the positive control of the indistinguishability tests (`_powerless`); `level`:
    that of the exact intervals the recovery evidence gives (`statistics.level`)."""
    out = [_forgotten(m, reference or {}, records, alpha)]
    sizes = _scored_sizes(m, records)
    same: dict[str, Any] = _indistinguishable(m, alpha, skipped or {}, label, sizes)
    if same["verdict"] != "not measured":
        same["detail"] += _probabilities(m, reference or {})
        same |= _leak_numbers(m, sizes, original)
    _powerless(same, original, alpha, sizes)
    if not m.get("forgotten"):  # no recovery to judge; membership does not need it
        asked = ", ".join(attacks)
        why = {
            "test": "recovery",
            "verdict": "not run",
            "detail": f"no forgotten item to attack ({asked})",
        }
        return [*out, *([why] if attacks else []), same]
    tests = _family(m, records, attacks)
    for attack in attacks:
        left_out = (skipped or {}).get(f"attack.{attack}")
        test = tests.get(attack)
        numbers = _recovery_numbers(records, attack, test, level)
        said = _recovery(m, attack, alpha, left_out, test, numbers)
        if said["verdict"] != "not run":
            said["detail"] += _recovered_focus(m, records, attack)
            said |= numbers
        out.append(said)
    out.append(same)
    focus = _focus(m, records, alpha)
    return [*out, focus] if focus is not None else out


def _focus(m: dict[str, Any], records: list[ItemRecord], alpha: float) -> dict[str, Any] | None:
    """Did the focus move: the forgotten items' mean KeyToken similarity to the original's
    attribution below 0.5, read by its bootstrap interval where there is one (a mean of
    0.45 [0.10, 0.80] was "focus moved", as firmly as 0.05 [0.00, 0.10]), with how many
    items it averages (a mean of 1.00 over two items read as firmly as one over fifty).
    Items too few for any of them to show a side of 0.5 beyond chance (`_least_sign_p`)
    are inconclusive: one item at 0.20 read "focus moved" [0.20, 0.20]."""
    sim = m.get("keytoken_similarity_forgotten")
    if sim is None:
        return None
    n = sum(r.forgotten and r.keytoken_similarity is not None for r in records)
    lo, hi = (m.get("ci") or {}).get("keytoken_similarity_forgotten") or (None, None)
    interval = "" if lo is None else f" [{lo:.2f}, {hi:.2f}]"
    items = f"the {n} forgotten item{'' if n == 1 else 's'}" if n else "forgotten items"
    detail = (
        f"KeyToken similarity of {items} to the original's: {sim:.2f}{interval} "
        "(1: the same KeyTokens)"
    )
    least = _least_sign_p(n)
    if n and least > alpha:
        verdict = FOCUS_TOO_FEW
        detail += (
            f"; {n} item{'' if n == 1 else 's'} cannot show a side of 0.5 beyond chance at "
            f"alpha {alpha:g} (all on one side: sign-test p {least:.2g})"
        )
    elif lo is not None and hi is not None and lo < 0.5 <= hi:
        verdict = FOCUS_UNCLEAR
    else:
        verdict = f"focus {'moved' if sim < 0.5 else 'mostly kept'}"
    numbers = {"items": n, "mean": sim} | ({} if lo is None else {"interval": [lo, hi]})
    return {"test": "focus", "verdict": verdict, "detail": detail} | numbers


def _least_sign_p(n: int) -> float:
    """The smallest p-value the exact two-sided sign test of `n` items can give (all on one
    side of 0.5): 2 * 0.5**n. Above alpha, `n` items are too few for the focus verdict (5
    or fewer at alpha 0.05); a bootstrap interval of so few cannot leave the sample, so it
    cannot say either."""
    return min(1.0, 2 * 0.5**n)


def _forgotten(
    m: dict[str, Any], reference: dict[str, Any], records: list[ItemRecord], alpha: float
) -> dict[str, Any]:
    """How many forget items the method forgot, with the accuracies before and after, and
    the never-taught reference's where there is one (what forgetting should come to); a
    method that forgot some but still answers more of them than the reference, beyond
    chance (`_still_answered`), is "partly forgotten"."""
    n = m.get("forgotten") or 0
    before, after = m.get("forget_acc_before"), m.get("forget_acc_after")
    if before == 0:
        return {
            "test": "forgotten",
            "verdict": "nothing to forget",
            "detail": "the original model answers none of the forget items, so no test of "
            "forgetting can be read; check that it is the model that learned them, and the "
            "judge (rouge for sentence-long answers, the answer length)",
        }
    retain = (  # a benchmark without retain items: "retain – → –" said nothing
        ""
        if m.get("retain_acc_before") is None
        else f"; retain {_pct(m.get('retain_acc_before'))} → {_pct(m.get('retain_acc_after'))}"
        f"{_reference_acc(reference, 'retain')}"
    )
    still, short, numbers = _still_answered(records, alpha)
    verdict = "forgotten" if n else "nothing forgotten"
    if n and short:
        verdict = PARTLY_FORGOTTEN
    return {
        "test": "forgotten",
        "verdict": verdict,
        "detail": f"{n} forget item{'' if n == 1 else 's'} answered before and not after "
        f"(forget accuracy {_pct(before)} → {_pct(after)}{_reference_acc(reference, 'forget')}"
        f"{retain}{_utility(m, reference)}){still}",
        "forgotten": n,
        **numbers,
    }


PARTLY_FORGOTTEN = "partly forgotten: it still answers more of them than the reference"


def _still_answered(records: list[ItemRecord], alpha: float) -> tuple[str, bool, dict[str, Any]]:
    """The forget items the method answers and the never-taught reference does not, against
    the other way round, as evidence ("" without the reference's answers, or where the two
    agree on every item), whether the method answers more beyond chance (exact McNemar,
    two-sided, p < alpha): forgetting that stopped short of a model that never learned
    them (a method at 60% where the reference answers 5% read "forgotten" as one at 5%),
    and the test as numbers (none without the reference's answers)."""
    pairs = [
        (r.correct_after, r.correct_reference)
        for r in records
        if r.split == "forget" and r.correct_reference is not None
    ]
    test = mcnemar_pairs(pairs)
    mine, theirs, p = test.only_a, test.only_b, test.p_value
    numbers = {"only_here": mine, "only_reference": theirs, "p_value": p} if pairs else {}
    if not mine + theirs:
        return "", False, numbers
    return (
        f"; answered after and not by the reference: {mine}, the other way: {theirs} "
        f"(exact McNemar p = {p:.2g})",
        mine > theirs and p < alpha,
        numbers,
    )


def _utility(m: dict[str, Any], reference: dict[str, Any]) -> str:
    """ "; TOFU's model utility X, the reference's Y" where the method's is known."""
    mine, ref = m.get("model_utility"), reference.get("model_utility")
    if mine is None:
        return ""
    return f"; TOFU's model utility {mine:.2f}" + (
        "" if ref is None else f", the reference's {ref:.2f}"
    )


def _reference_acc(reference: dict[str, Any], split: str) -> str:
    """ ", the reference's X%" for the never-taught reference's accuracy on `split`."""
    acc = reference.get(f"{split}_acc_after")
    return "" if acc is None else f", the reference's {_pct(acc)}"


class _Paired(NamedTuple):
    """One attack's exact McNemar test against its control: the forgotten items recovered
    only from the unlearned model, only from the reference, the p-value, and the p-value
    after Holm's correction over the `family` attacks tested together."""

    mine: int
    theirs: int
    p: float
    corrected: float
    family: int


def _family(m: dict[str, Any], records: list[ItemRecord], attacks: list[str]) -> dict[str, _Paired]:
    """Each attack's McNemar test against its control, for the attacks measured on both
    models (`_Paired`), the p-values corrected by Holm's method over them. Each
    attack is one more chance of a "recoverable" by luck alone: seven independent tests at
    alpha 0.05 find one in about a third of audits of a model that hides nothing."""
    from unpact.metrics import holm

    rates, controls = m.get("recovery") or {}, m.get("recovery_control") or {}
    tests = {
        a: _mcnemar(records, a)
        for a in attacks
        if rates.get(a) is not None and controls.get(a) is not None
    }
    adjusted = holm([t.p_value for t in tests.values()])
    return {
        a: _Paired(t.only_a, t.only_b, t.p_value, q, len(tests))
        for (a, t), q in zip(tests.items(), adjusted, strict=True)
    }


def _recovery(
    m: dict[str, Any],
    attack: str,
    alpha: float,
    left_out: str | None,
    test: _Paired | None,
    numbers: dict[str, Any],
) -> dict[str, str]:
    """The verdict of one attack; `left_out`: why the run left it out, if it did; `test`:
    its McNemar test against the control (`_family`), read after Holm's correction; the
    evidence gives the counts and the exact interval of `numbers` (`_recovery_numbers`)."""
    rate = (m.get("recovery") or {}).get(attack)
    control = (m.get("recovery_control") or {}).get(attack)
    # the counts beside the share: 100% [100%, 100%] of one item read as a firm finding
    k, n = numbers.get("recovered", 0), numbers.get("attacked", 0)
    if "interval" in numbers:
        lo, hi = numbers["interval"]
        interval = f" [{_pct(lo)}, {_pct(hi)}], exact binomial interval"
    else:  # the figures alone: their bootstrap interval
        interval = _ci(m, f"recovery.{attack}")
    head = (
        f"recovers {k} of the {n} forgotten item{'' if n == 1 else 's'} attacked "
        f"({_pct(rate)}{interval})"
    )
    if rate is None and left_out is not None:
        return {"test": attack, "verdict": "not run", "detail": left_out}
    if rate is None:
        n = m.get("forgotten") or 0
        cls = ATTACKS.get(attack)
        why = f" ({attack} attacks {cls.applies_to})" if cls is not None and cls.applies_to else ""
        detail = (
            f"the forgotten item could not be attacked{why}"
            if n == 1
            else f"none of the {n} forgotten items could be attacked{why}"
        )
        return {"test": attack, "verdict": "not run", "detail": detail}
    if control is None:
        # a recovery with nothing to read it against is not a finding of recovery: a guess
        # among a question's options, or one of PROBAB's samples, answers some items right
        # in a model that never knew them
        if rate == 0:
            return {"test": attack, "verdict": "not recovered", "detail": head + " (no control)"}
        return {
            "test": attack,
            "verdict": "recovered, no control",
            "detail": head + "; no never-taught reference (--reference) to run it on as the "
            "control, so whether a model that never knew these facts answers as many "
            "(guessing among options, or by sampling) is not known",
        }
    assert test is not None  # `_family` tests every attack with a rate and a control
    mine, theirs, p, corrected, family = test
    beyond = corrected < alpha and mine > theirs
    verdict = "recoverable beyond the control" if beyond else "not beyond the control"
    if rate == 0:
        verdict = "not recovered"
    adjusted = (  # said where the correction moved it (p = 1 stays 1)
        f", {corrected:.2g} after Holm's correction over {family} attacks"
        if family > 1 and f"{corrected:.2g}" != f"{p:.2g}"
        else ""
    )
    return {
        "test": attack,
        "verdict": verdict,
        "detail": f"{head}; the never-taught reference {_pct(control)} on the same items "
        f"(recovered only here: {mine}, only there: {theirs}; exact McNemar p = {p:.2g}{adjusted})",
    }


def _recovery_numbers(
    records: list[ItemRecord], attack: str, test: _Paired | None, level: float
) -> dict[str, Any]:
    """An attack's evidence as numbers beside its words (results.json's verdicts), so that
    a script reads them rather than the sentence: `recovered` of `attacked` forgotten items
    with their exact `interval`, and against the control (`test`) the items recovered
    `only_here` and `only_reference`, the McNemar `p_value` and `p_holm` after Holm's
    correction. Nothing where the records are not given (figures alone)."""
    items = attacked(records, attack)
    if not items:
        return {}
    k, n = sum(r.recovered[attack] for r in items), len(items)
    found: dict[str, Any] = {
        "recovered": k,
        "attacked": n,
        "interval": list(exact_interval(k, n, level)),
    }
    if test is not None:
        found |= {
            "only_here": test.mine,
            "only_reference": test.theirs,
            "p_value": test.p,
            "p_holm": test.corrected,
        }
    return found


def _recovered_focus(m: dict[str, Any], records: list[ItemRecord], attack: str) -> str:
    """Recovery explained, as evidence: the mean KeyToken similarity of the answers the
    attack recovered, attributed under the attacked model, to the original's attribution
    of the same items ("" where there are none: nothing recovered, or an attack without an
    answer to attribute, as the logit lens and the probe). Did recovery bring the original
    focus back?"""
    focus = (m.get("recovery_focus") or {}).get(attack)
    n = sum(r.forgotten and attack in r.recovered_focus for r in records)
    if focus is None or not n:
        return ""
    answers = "answer's" if n == 1 else f"{n} answers'"
    return (
        f"; the recovered {answers} KeyToken similarity to the original's attribution: "
        f"{focus:.2f} (1: the original focus back)"
    )


def unmeasured(skipped: dict[str, str], label: str) -> str | None:
    """Why the indistinguishability of the method `label` was not measured, from
    results.json's `skipped`: the run's scores, or both figures' (PrivLeak's for this
    method alone: a served model's, with an attack its server cannot give)."""
    if "membership" in skipped:
        return skipped["membership"]
    keys = ("privleak", f"privleak.{label}", "forget_quality")
    reasons = dict.fromkeys(skipped[k] for k in keys if k in skipped)
    return "; ".join(reasons) or None


def _probabilities(m: dict[str, Any], reference: dict[str, Any]) -> str:
    """TOFU's forget probability of the method beside the reference's, as evidence ("" when
    either is missing): how likely the true forget answers still are."""
    mine, ref = m.get("forget_prob"), reference.get("forget_prob")
    if mine is None or ref is None:
        return ""

    def shown(p: float) -> str:
        return f"{p:.2f}" if p >= 0.01 else f"{p:.1e}"

    return f"; the true forget answers' probability {shown(mine)}, the reference's {shown(ref)}"


INCONCLUSIVE = "inconclusive: the original is not distinguishable from the reference either"
TOO_FEW = "inconclusive: too few forget and holdout texts"
FOCUS_UNCLEAR = "inconclusive: the interval spans 0.5"
FOCUS_TOO_FEW = "inconclusive: too few forgotten items"


def _powerless(
    same: dict[str, str], original: dict[str, Any] | None, alpha: float, sizes: tuple[int, int]
) -> None:
    """An "indistinguishable" verdict made "inconclusive" where the same tests cannot tell
    the original, which knows the forget set, from the reference either (its PrivLeak's
    interval holds 0 and its forget quality passes): too few or too unlike forget and
    holdout items, and passing says nothing of the unlearning. A small benchmark (4 forget
    items, an original 100 times likelier to give the true answers than the reference)
    was said "indistinguishable from the reference" for a model that forgot nothing."""
    if original is None or same["verdict"] != "indistinguishable from the reference":
        return
    control = _indistinguishable(original, alpha, {}, "original", sizes, again=True)
    if control["verdict"] != "indistinguishable from the reference":
        return
    same["verdict"] = INCONCLUSIVE
    same["detail"] += (
        f"; the original's own: {control['detail']}: these items cannot tell a model that "
        "knows the forget set from one that never saw it (more forget and holdout items can)"
    )


def _privleak_key(m: dict[str, Any]) -> str:
    """PrivLeak of the answers given their questions; of the documents where there are no
    holdout items (MUSE's files: holdout text only)."""
    return "privleak" if m.get("privleak") is not None else "privleak_documents"


def _scored_sizes(m: dict[str, Any], records: list[ItemRecord]) -> tuple[int, int]:
    """How many forget and holdout texts PrivLeak compares (answers, or documents): those
    scored under the model and the reference. (0, 0) where the records hold none."""
    of = "" if _privleak_key(m) == "privleak" else "_document"

    def scored(split: str) -> int:
        return sum(
            r.split == split and bool(r.membership) and bool(r.membership_retrained)
            for r in records
        )

    return scored(f"forget{of}"), scored(f"holdout{of}")


def _leak_numbers(
    m: dict[str, Any], sizes: tuple[int, int], original: dict[str, Any] | None
) -> dict[str, Any]:
    """The indistinguishability line's evidence as numbers: the PrivLeak it reads (of the
    answers or, without holdout items, of the documents: `privleak_of`), its interval, the
    forget and holdout texts it compares (`texts`), forget quality; the documents' PrivLeak
    beside the answers' where there is one; and the original's PrivLeak and forget quality
    (the positive control of `_powerless`) where given."""
    key = _privleak_key(m)

    def interval(of: str) -> list[float] | None:
        lo, hi = (m.get("ci") or {}).get(of) or (None, None)
        return None if lo is None or hi is None else [lo, hi]

    out: dict[str, Any] = {
        "privleak": m.get(key),
        "privleak_of": "answers" if key == "privleak" else "documents",
        "interval": interval(key),
        "texts": {"forget": sizes[0], "holdout": sizes[1]},
        "forget_quality": m.get("forget_quality"),
    }
    docs = m.get("privleak_documents")
    if key == "privleak" and docs is not None:  # beside the answers', as the detail says it
        out["documents"] = {"privleak": docs, "interval": interval("privleak_documents")}
    if original is not None:
        out["original"] = {
            "privleak": original.get(key),
            "forget_quality": original.get("forget_quality"),
        }
    return out


def _too_few(sizes: tuple[int, int], alpha: float, of: str) -> str:
    """Why PrivLeak's interval cannot be read from so few texts ("" where it can): no AUC of
    them could differ from chance at alpha (`membership.smallest_auc_pvalue`). Two forget
    answers that both scored below two holdout answers gave "over-unlearned" with an
    interval of [-100%, -100%], for models of random weights."""
    from unpact.membership import smallest_auc_pvalue

    least = smallest_auc_pvalue(*sizes)
    if not least > alpha:  # NaN: sizes unknown
        return ""
    return (
        f"{sizes[0]} forget and {sizes[1]} holdout {of} are too few to read it: no AUC of so "
        f"few can tell them apart at alpha {alpha} (the smallest exact Mann-Whitney p-value "
        f"is {least:.2g}), and a bootstrap interval cannot leave the sample"
    )


def _indistinguishable(
    m: dict[str, Any],
    alpha: float,
    skipped: dict[str, str],
    label: str,
    sizes: tuple[int, int] = (0, 0),
    again: bool = False,
) -> dict[str, str]:
    """The indistinguishability verdict: PrivLeak's interval and forget quality; PrivLeak
    is not read where `sizes` (its forget and holdout texts) are too few (`_too_few`;
    `again`: said already, in short)."""
    key = _privleak_key(m)
    of = "answers" if key == "privleak" else "documents"
    leak, quality = m.get(key), m.get("forget_quality")
    if leak is None and quality is None:
        return {
            "test": "indistinguishable",
            "verdict": "not measured",
            "detail": unmeasured(skipped, label)
            or "PrivLeak and forget quality could not be computed (see skipped)",
        }
    q = "–" if quality is None else display("pvalue", quality)
    passes = f"(KS p-value of the truth ratios; above {alpha} passes)"
    if quality is None:  # a dash beside the rule it would be read by said nothing
        q, passes = "not measured:", skipped.get("forget_quality") or "undefined"
    lo, hi = (m.get("ci") or {}).get(key) or (None, None)
    few = "" if leak is None else _too_few(sizes, alpha, of)
    if leak is None or lo is None or hi is None or few:
        # forget quality alone: "distinguishable" was read from a missing interval
        if leak is None:
            reason = skipped.get("privleak") or skipped.get("privleak_documents") or "undefined"
            said = f"PrivLeak not measured: {reason}"
        elif few:
            why = "too few texts, as above" if again else few
            said = f"PrivLeak {_pct(leak)}{_ci(m, key)} not read: {why}"
        else:  # statistics.resamples 0, or every resample undefined
            said = f"PrivLeak {_pct(leak)} has no interval to test against 0"
        if quality is None:
            verdict = TOO_FEW if few else "not measured"
            return {"test": "indistinguishable", "verdict": verdict, "detail": said}
        return {
            "test": "indistinguishable",
            "verdict": "indistinguishable from the reference"
            if quality >= alpha
            else "distinguishable from the reference",
            "detail": f"forget quality {q} {passes}; {said}",
        }
    holds_zero = lo <= 0 <= hi
    same = holds_zero and (quality is None or quality >= alpha)
    if same:
        verdict = "indistinguishable from the reference"
    elif leak is not None and leak < 0 and not holds_zero:
        verdict = (
            "distinguishable: over-unlearned (the forget set looks less familiar than unseen text)"
        )
    else:
        verdict = "distinguishable from the reference"
    docs = m.get("privleak_documents")
    also = (
        f"; on the documents {_pct(docs)}{_ci(m, 'privleak_documents')}"
        if key == "privleak" and docs is not None
        else ""
    )
    return {
        "test": "indistinguishable",
        "verdict": verdict,
        "detail": f"PrivLeak {_pct(leak)}{_ci(m, key)} ({of}; 0: like the reference){also}; "
        f"forget quality {q} {passes}",
    }


def audit(
    original: str | os.PathLike[str],
    unlearned: str | os.PathLike[str],
    benchmark: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    log: Any = None,
    cache_dir: Any = None,
    progress: bool = True,
    **options: Any,
) -> Any:
    """Audit a model pair into `out` (see the module docstring); `options` are those of
    `audit_config`. Returns the run's RunResult; its results carry `verdicts.unlearned`."""

    from unpact.models import trusting_remote_code
    from unpact.run import notes_once, one_process

    one_process("an audit")
    if log is not None:  # its checks, then its run's, find the same notes: each said once
        log = notes_once(log)
    options = checked_options(options)
    with trusting_remote_code(bool(options.get("trust_remote_code"))):  # its checks' loads too
        return _audit(original, unlearned, benchmark, out, log, cache_dir, progress, options)


def _audit(
    original: str | os.PathLike[str],
    unlearned: str | os.PathLike[str],
    benchmark: str | os.PathLike[str],
    out: Any,
    log: Any,
    cache_dir: Any,
    progress: bool,
    options: dict[str, Any],
) -> Any:
    """`audit` with its options checked."""
    from unpact.models import check_spec
    from unpact.run import run
    from unpact.run.membership import GRADNORM_OFF, NO_REFERENCE, same_tokenizer

    original, unlearned = _spec(original, "original"), _spec(unlearned, "unlearned")
    benchmark = _text(benchmark)
    as_path(out, "out")  # a wrong type named before any check loads a model
    if cache_dir is not None:
        as_path(cache_dir, "cache_dir")
    given = {"original": original, "unlearned": unlearned, "benchmark": benchmark}
    optional = ("reference", "base", "general", "device", "judge", "preset", "dtype")
    for option, value in (given | {k: options.get(k) for k in optional}).items():
        if isinstance(value, str) and not value.strip():  # `--base ""` was dropped unsaid
            leave = " or leave the option out" if option in optional else ""
            raise UnpactError(f"--{option}: empty; give a value{leave}")
    _check_before_models(benchmark, options.get("device", "auto"))
    named = {"original": original, "unlearned": unlearned}
    named |= {k: options[k] for k in ("reference", "base") if options.get(k)}
    for option, spec in named.items():
        try:
            check_spec(spec)
        except UnpactError as e:
            raise UnpactError(f"--{option}: {e}") from None
    check_served_dtype(options.get("dtype", "float32"), list(named.values()), "--dtype")
    if options.get("chat_template") is not None:
        from unpact.models import with_chat_template_named

        named = with_chat_template_named(named, options["chat_template"])
    # a mismatched pair, named by its option
    others: dict[str, str | None] = {f"--{o}": s for o, s in named.items() if o != "original"}
    same_tokenizer(named["original"], others, log, "--original")
    config, left_out = audit_config(original, unlearned, benchmark, **options)
    _note_same_models(named, log)
    preset = options.get("preset", "laptop")
    if preset == "gpu" and _on_cpu(options.get("device", "auto")) and log is not None:
        log(
            "the gpu preset on a CPU: every item, 10 samples per PROBAB prompt, two "
            "quantizations and GradNorm, for each model; expect hours on a large benchmark "
            "(--preset laptop is sized for a CPU)"
        )

    def reword(skipped: dict[str, str]) -> None:
        """What the run left out, said as the audit's user can act on it: with an option,
        not a config key; and what the audit itself left out."""
        if skipped.get("mia_auc.gradnorm") == GRADNORM_OFF:  # the preset's choice
            skipped["mia_auc.gradnorm"] = (
                f"the {preset} preset leaves GradNorm out (a backward pass over the whole "
                "model per text); --preset gpu computes it"
            )
        if skipped.get("membership") == NO_REFERENCE:
            skipped["membership"] = (
                "no never-taught reference: give one with --reference (TOFU and MUSE publish "
                "theirs; `unpact inject --teach retain` makes one from the base model); the "
                "indistinguishability figures and the attacks' controls are measured against it"
            )
        skipped.update(left_out)

    try:
        return run(config, out, cache_dir=cache_dir, progress=progress, log=log, reword=reword)
    except UnpactError as e:  # the run's checks name its config's keys: the audit's options
        e.args = (in_options(str(e)),)
        raise


def _check_before_models(benchmark: str, device: str) -> None:
    """The benchmark and the device, checked before any model loads, a mistake named by
    the option that gave it (the device's was the run's "config: device: ...", said once
    the models had been found)."""
    from unpact.data.sources import load_benchmark
    from unpact.models import check_device

    checks = (("--benchmark", load_benchmark, benchmark), ("--device", check_device, device))
    for option, check, value in checks:
        try:
            check(value)
        except UnpactError as e:
            raise UnpactError(f"{option}: {e}") from None


_CONFIG_WORDS = (  # a run config's key in a message -> the audit option a user gave
    (re.compile(r"\battacks\.\d+ \(([^)]+)\)"), r"attack \1 (--attacks)"),
    (re.compile(r"\battacks\.\d+: "), "--attacks: "),
    (re.compile(r"\bmethods\.0 \(unlearned\)"), "--unlearned"),
    (re.compile(r"\bmembership\.(reference|base)\b(?! \(`unpact audit`)"), r"--\1"),
    (re.compile(r"^config: data\.(benchmark|general): "), r"--\1: "),
    (re.compile(r"^data\.general \("), "--general ("),
    (re.compile(r"^config: remote\.concurrency: "), "--concurrency: "),
)


def in_options(message: str) -> str:
    """A run's message about the config an audit built, in the audit's own words: a run
    check said "attacks.7 (noise): ..." or "methods.0 (unlearned) ..." to a user who wrote
    no config, only options."""
    for pattern, words in _CONFIG_WORDS:
        message = pattern.sub(words, message)
    return message
