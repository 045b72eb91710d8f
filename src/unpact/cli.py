"""The `unpact` command line: parse, call the library, print. No logic of its own.

A user mistake (an `UnpactError`) prints one line and exits with code 2; usage errors do
the same through click.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from unpact import configs as builtin_run_configs
from unpact.attribution import ALPHA, BETA, MAX_WORK
from unpact.errors import UnpactError, check_text, items_named

if TYPE_CHECKING:
    import socket

    from unpact.attribution import Attribution
    from unpact.types import AnyModel

app = typer.Typer(
    name="unpact",
    help="Tell whether a language model has really forgotten what it was made to unlearn.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)


def _print_version(asked: bool) -> None:
    """`--version`: unpact's release and those of the libraries its numbers depend on, for
    a bug report or a run's provenance (results.json keeps them as `versions`)."""
    if not asked:
        return
    from unpact.determinism import library_versions

    found = library_versions()
    libraries = ", ".join(f"{n} {v}" for n, v in found.items() if n not in ("unpact", "python"))
    out.print(
        f"unpact {found['unpact']} ({libraries}; Python {found['python']})",
        highlight=False,
        soft_wrap=True,  # one line, whatever the terminal's width
    )
    raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print unpact's version and those of the libraries its numbers depend on "
            "(torch, transformers, tokenizers, accelerate, peft, numpy, scipy, scikit-learn).",
        ),
    ] = False,
) -> None:
    """The options before any command: `--version` (the app's help is `app`'s)."""


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="'default' (embedded SmolLM2-135M-Instruct), a Hugging Face model directory, "
        "a .gguf file, a hub id, or a served model openai:MODEL@BASE_URL (vLLM or another "
        "OpenAI-compatible server; API key from $UNPACT_API_KEY).",
    ),
]
LocalModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="'default' (embedded SmolLM2-135M-Instruct), a Hugging Face model directory, "
        "a .gguf file or a hub id: weights on this machine (a served model's cannot be "
        "changed or served again).",
    ),
]
BENCHMARK_HELP = (
    "A built-in benchmark (news, books, wmdp), a folder in the item format, or a real one: "
    "muse-news:PATH, muse-books:PATH, tofu:PATH (tofu\\[forget05]:PATH picks the forget set), "
    "wmdp:PATH (docs/data.md)."
)
PluginOpt = Annotated[
    list[str] | None,  # text, not Path: an empty value stays empty, not the current folder
    typer.Option(
        "--plugin",
        help="A Python file, a package's folder or an importable module's name that defines "
        "attacks, metrics or unlearning methods (repeatable); they are then usable by name "
        "(docs/architecture.md).",
    ),
]
ConcurrencyOpt = Annotated[
    int, typer.Option(min=1, help="Requests in flight at once to a served (openai:...) model.")
]
DtypeOpt = Annotated[str, typer.Option(help="Weights dtype: float32, bfloat16 or float16.")]
DeviceOpt = Annotated[
    str, typer.Option(help="cpu, cuda, cuda:N or auto (a CUDA GPU if there is one, else the CPU).")
]
RemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow a model's own Python code to run.")
]
RawOpt = Annotated[
    bool,
    typer.Option(
        "--no-chat-template",
        help="Use the prompt raw, not as a user turn of the model's chat template.",
    ),
]


TemplateFileOpt = Annotated[
    str | None,
    typer.Option(
        "--chat-template",
        help="A Jinja chat template (a file, or the template itself) used in place of the "
        "model's own: for a checkpoint fine-tuned in another prompt format (docs/audit.md).",
    ),
]


def _with_template(model: str, chat_template: str | None) -> str:
    """`model`, or its copy using the --chat-template given (`with_chat_template`)."""
    if chat_template is None:
        return model
    from unpact.models import with_chat_template_named

    return with_chat_template_named({"model": model}, chat_template)["model"]


def _asked(model: str, chat_template: str | None, raw: bool) -> str:
    """The model to load for `--chat-template FILE` or `--no-chat-template` (one of them)."""
    if chat_template is not None and raw:
        raise UnpactError("--chat-template and --no-chat-template together: give one of them")
    return _with_template(model, chat_template)


def _load(
    model: str, dtype: str, device: str, trust_remote_code: bool, concurrency: int = 16
) -> AnyModel:
    from unpact.backends import open_model
    from unpact.remote import RemoteSettings

    return open_model(
        model,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        remote=RemoteSettings(concurrency=concurrency),
    )


def _named_items(data: Path | None = None) -> AbstractContextManager[None]:
    """An error about "item N" (the API's 0-based place in its lists) in the command's own
    terms: the one --prompt needs no name, a --data file's prompt is named by its line."""
    if data is None:
        return items_named(lambda n: "")

    def line(n: int) -> str:
        from unpact.files import json_lines, read_text

        lines = [k for k, _ in json_lines(read_text(data))]  # read_prompts' lines, in order
        return f"{data}, line {lines[n]}"

    return items_named(line)


def _check_text(**texts: str) -> None:
    """Catch empty inputs before spending seconds on loading a model."""
    for name, text in texts.items():
        if not text.strip():
            raise UnpactError(f"empty {name}: give the text with --{name}")


@app.command()
def generate(
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="The question or text to continue.")
    ],
    model: ModelOpt = "default",
    chat_template: TemplateFileOpt = None,
    no_chat_template: RawOpt = False,
    sample: Annotated[
        int,
        typer.Option(help="Draw N samples (temperature sampling) instead of the greedy answer."),
    ] = 0,
    seed: Annotated[
        int, typer.Option(min=0, max=2**32 - 1, help="Seed for --sample (as a config's seed).")
    ] = 0,
    temperature: Annotated[float, typer.Option(help="Sampling temperature for --sample.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer, in tokens.")] = 32,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Print the model's greedy answer to PROMPT, or N seeded samples."""
    from unpact.scoring import generate as run_generate

    _check_text(prompt=prompt)
    _used_alone(
        "samples: give --sample N as well",
        bool(sample),
        **{"--temperature": temperature != 1.0, "--seed": seed != 0},
    )
    lm = _load(_asked(model, chat_template, no_chat_template), dtype, device, trust_remote_code)
    with _named_items():
        (gens,) = run_generate(
            lm,
            [prompt],
            chat_template=not no_chat_template and lm.has_chat_template,
            max_new_tokens=max_new_tokens,
            num_samples=sample,
            temperature=temperature,
            seed=seed,
        )
    for i, g in enumerate(gens):
        out.print(f"[{i}] {g.text}" if sample else g.text, markup=False, highlight=False)


@app.command()
def score(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The question.")],
    answer: Annotated[
        str, typer.Option("--answer", "-a", help="The answer to score (teacher-forced).")
    ],
    model: ModelOpt = "default",
    chat_template: TemplateFileOpt = None,
    no_chat_template: RawOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Print each answer token's log-prob given the prompt, and their mean LP."""
    from unpact.scoring import score as run_score

    _check_text(prompt=prompt, answer=answer)
    lm = _load(_asked(model, chat_template, no_chat_template), dtype, device, trust_remote_code)
    with _named_items():
        (result,) = run_score(
            lm, [prompt], [answer], chat_template=not no_chat_template and lm.has_chat_template
        )
    table = Table("#", "token", "id", "log-prob", title="Answer tokens")
    for k, (tok, tid, lp) in enumerate(
        zip(result.answer_tokens, result.answer_ids, result.logprobs)
    ):
        table.add_row(str(k), escape(repr(tok)), str(tid), f"{lp:.4f}")
    out.print(table)
    n = len(result.logprobs)
    out.print(f"LP (mean log-prob over {n} token{'s' * (n != 1)}) = {result.lp:.4f}")


# `unpact attribute`'s KeyToken rule, checks by gradient methods and size guard
GradientOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Also attribute the same answers to the same units by a gradient method, "
        "to check unPact: grad_x_input or integrated_gradients (repeatable). Prints each "
        "unit's scores and their Spearman correlation and top-k overlap with unPact; "
        "--json records them under 'gradient'. Needs a local model."
    ),
]
IG_STEPS, IG_BASELINE, TOP_K = 64, "mean", 3  # the gradient checks' defaults
IgStepsOpt = Annotated[
    int, typer.Option(help="Integrated gradients: midpoints of the path integral.")
]
IgBaselineOpt = Annotated[
    str,
    typer.Option(help="Integrated gradients: content embeddings replaced by mean, zero or pad."),
]
AlphaOpt = Annotated[float, typer.Option(help="KeyToken threshold on normalised contribution.")]
BetaOpt = Annotated[
    float, typer.Option(help="KeyToken rule switch on the share of positive units.")
]
TargetTokensOpt = Annotated[int, typer.Option(min=1, help="Longest generated target, in tokens.")]
TopKOpt = Annotated[int, typer.Option(help="Units compared by --gradient's top-k overlap.")]
MaxWorkOpt = Annotated[
    int,
    typer.Option(
        min=1,
        help="Refuse a prompt whose attribution scores more token positions than this "
        "((units + 1) x tokens: the work grows with the square of the prompt).",
    ),
]


@app.command()
def attribute(
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="The prompt to attribute.")
    ] = None,
    answer: Annotated[
        str | None,
        typer.Option("--answer", "-a", help="The answer y (default: the model's greedy answer)."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help='JSONL: {"prompt" (or "question"), "answer"?} per line; or .txt: a prompt a line.'
        ),
    ] = None,
    model: ModelOpt = "default",
    unit: Annotated[str, typer.Option(help="Attribution unit: token or word.")] = "token",
    baseline: Annotated[
        str,
        typer.Option(help="How a unit is removed: delete, token (replace) or mask (attention)."),
    ] = "delete",
    baseline_token_id: Annotated[
        int | None,
        typer.Option(help="Replacement id for --baseline token (default: unk, else pad)."),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(help="reference (the given answer) or generated (the greedy answer)."),
    ] = None,
    alpha: AlphaOpt = ALPHA,
    beta: BetaOpt = BETA,
    chat_template: TemplateFileOpt = None,
    no_chat_template: RawOpt = False,
    max_new_tokens: TargetTokensOpt = 32,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the record (JSONL with --data) here.")
    ] = None,
    html_out: Annotated[
        Path | None, typer.Option("--html", help="Write an HTML heatmap page here.")
    ] = None,
    gradient: GradientOpt = None,
    ig_steps: IgStepsOpt = IG_STEPS,
    ig_baseline: IgBaselineOpt = IG_BASELINE,
    top_k: TopKOpt = TOP_K,
    max_work: MaxWorkOpt = MAX_WORK,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    trust_remote_code: RemoteCodeOpt = False,
    concurrency: ConcurrencyOpt = 16,
) -> None:
    """unPact: each prompt unit's contribution to the answer's log-prob, and the KeyTokens."""
    from unpact.attribution import attribute_many

    settings = _attribute_settings(unit, baseline, target, alpha, beta, baseline_token_id)
    gradient = _gradient_options(gradient, ig_steps, ig_baseline, top_k)
    prompts, answers = _attribute_inputs(prompt, answer, data)
    for option, path in (("--json", json_out), ("--html", html_out)):
        _check_out_file(option, path)  # before any model loads
    model = _asked(model, chat_template, no_chat_template)
    lm = _load(model, dtype, device, trust_remote_code, concurrency)
    if gradient and not lm.has_weights:
        raise UnpactError(f"--gradient needs the model's weights; {lm.spec} is served")
    many = len(prompts) > 1  # a progress bar
    with _named_items(data):
        records = attribute_many(
            lm,
            prompts,
            answers,
            chat_template=not no_chat_template and lm.has_chat_template,
            max_new_tokens=max_new_tokens,
            progress=many,
            max_work=max_work,
            **settings,
        )
        checks = _gradient_checks(lm, records, gradient, ig_steps, ig_baseline, top_k, many)
    _show_attributions(records, checks, gradient, top_k, json_out, html_out, many=data is not None)


def _show_attributions(
    records: list[Attribution],
    checks: dict[str, list[dict[str, object]]],
    gradient: list[str],
    top_k: int,
    json_out: Path | None,
    html_out: Path | None,
    many: bool,
) -> None:
    """Print each record (with its gradient checks) and write the JSON(L) and HTML files."""
    from unpact.attribution import html_page

    dicts = [r.to_dict() for r in records]
    for n, record in enumerate(records):
        out.print(record)
        if checks:
            dicts[n]["gradient"] = {g: checks[g][n] for g in gradient}
            out.print(_gradient_table(record, {g: checks[g][n] for g in gradient}, top_k))
    if json_out is not None:
        one = json.dumps(dicts[0], indent=1) + "\n"
        json_out.write_text(
            "".join(json.dumps(d) + "\n" for d in dicts) if many else one, encoding="utf-8"
        )
        err.print(f"wrote {escape(str(json_out))}")
    if html_out is not None:
        html_out.write_text(html_page(records), encoding="utf-8")
        err.print(f"wrote {escape(str(html_out))}")


def _check_out_file(option: str, path: Path | None) -> None:
    """An output file's place must take a file: not a folder, in a folder that exists."""
    if path is None:
        return
    if path.is_dir():
        raise UnpactError(f"{option} {path}: a folder is there; give a file name")
    if not path.parent.is_dir():
        raise UnpactError(f"{option} {path}: no folder {path.parent}")


def _attribute_settings(
    unit: str, baseline: str, target: str | None, alpha: float, beta: float, token_id: int | None
) -> dict[str, Any]:
    """`unpact attribute`'s settings, checked before any model loads, as `attribute_many`
    takes them."""
    from unpact.attribution import check_settings

    check_settings(unit, baseline, target, alpha, beta)
    given = {"--baseline-token-id": token_id is not None}
    _used_alone("--baseline token", baseline == "token", **given)
    return {
        "unit": unit,
        "baseline": baseline,
        "target": target,
        "alpha": alpha,
        "beta": beta,
        "baseline_token_id": token_id,
    }


def _used_alone(what: str, present: bool, **given: bool) -> None:
    """An option given (True in `given`) without the one it belongs to (`present`) is an
    error naming both, not a setting ignored without a word."""
    for name, set_ in given.items():
        if set_ and not present:
            raise UnpactError(f"{name} applies to {what}")


def _gradient_options(
    gradient: list[str] | None, ig_steps: int, ig_baseline: str, top_k: int
) -> list[str]:
    """The --gradient methods asked for (each once), after checking their options."""
    methods = list(dict.fromkeys(gradient or []))
    ig = {"--ig-steps": ig_steps != IG_STEPS, "--ig-baseline": ig_baseline != IG_BASELINE}
    _used_alone("--gradient integrated_gradients", "integrated_gradients" in methods, **ig)
    _used_alone("--gradient checks", bool(methods), **{"--top-k": top_k != TOP_K})
    if methods:
        from unpact.gradient import GRADIENT_METHODS, IG_BASELINES

        for g in methods:
            if g not in GRADIENT_METHODS:
                raise UnpactError(f"--gradient {g!r}: choose {' or '.join(GRADIENT_METHODS)}")
        if ig_baseline not in IG_BASELINES:
            raise UnpactError(f"--ig-baseline {ig_baseline!r}: choose {', '.join(IG_BASELINES)}")
        if ig_steps < 1 or top_k < 1:
            raise UnpactError("--ig-steps and --top-k must be at least 1")
    return methods


def _attribute_inputs(
    prompt: str | None, answer: str | None, data: Path | None
) -> tuple[list[str], list[str | None]]:
    """The prompts (and answers, None: the model's own) of --prompt/--answer or --data."""
    from unpact.attribution import read_prompts

    if (prompt is None) == (data is None):
        raise UnpactError("give either --prompt TEXT or --data FILE.jsonl")
    if data is not None:
        if answer is not None:
            raise UnpactError("--answer goes with --prompt; with --data put answers in the file")
        return read_prompts(data)
    assert prompt is not None
    _check_text(prompt=prompt)
    return [prompt], [answer]


def _gradient_checks(
    lm: AnyModel,
    records: list[Attribution],
    methods: list[str],
    steps: int,
    ig_baseline: str,
    top_k: int,
    progress: bool,
) -> dict[str, list[dict[str, object]]]:
    """Per gradient method, per record: `unpact.gradient.check_unpact`'s row."""
    from unpact.gradient import check_unpact

    found: dict[str, list[dict[str, object]]] = {}
    for method in methods:
        rows = check_unpact(
            lm,  # type: ignore[arg-type]  # a LanguageModel: checked when loaded
            records,
            method,  # type: ignore[arg-type]
            steps=steps,
            ig_baseline=ig_baseline,  # type: ignore[arg-type]
            top_k=top_k,
            progress=progress,
        )
        if method == "integrated_gradients":
            rows = [r | {"steps": steps, "ig_baseline": ig_baseline} for r in rows]
        found[method] = rows
    return found


def _gradient_table(record: Attribution, checks: dict[str, dict[str, object]], top_k: int) -> Table:
    table = Table("unit", "unPact", *checks, title="unPact against gradient attributions")
    for n, u in enumerate(record.units):
        cells = [f"{c['scores'][n]:+.4f}" for c in checks.values()]  # type: ignore[index]
        table.add_row(escape(u.text), f"{record.contributions[n]:+.4f}", *cells)

    def num(v: object) -> str:
        return "–" if v is None else f"{v:.3f}"

    table.add_row("Spearman", "", *[num(c["spearman"]) for c in checks.values()])
    table.add_row(f"top-{top_k} overlap", "", *[num(c["top_k_overlap"]) for c in checks.values()])
    return table


def _paired(a: list[Any], b: list[Any], before: Path, after: Path) -> tuple[list[Any], list[Any]]:
    """The records of two files in pairs: in order, or by prompt where each file holds
    distinct prompts (two `attribute --data` runs of one file, one of them sorted; or
    after unlearning, the forgotten items' alone): the prompts both hold, in `before`'s
    order, with a note of those one file alone holds."""
    prompts, theirs = [r.prompt for r in a], [r.prompt for r in b]
    if prompts == theirs:
        return a, b
    if len(set(prompts)) == len(a) and len(set(theirs)) == len(b):
        by_prompt = {r.prompt: r for r in b}
        shared = [r for r in a if r.prompt in by_prompt]
        if not shared:
            raise UnpactError(f"{before} and {after} have no prompt in common")
        if len(shared) < max(len(a), len(b)):
            err.print(
                f"note: compared the {len(shared)} prompt(s) both files hold; "
                f"{len(a) - len(shared)} of {before}'s {len(a)} and {len(b) - len(shared)} of "
                f"{after}'s {len(b)} are in one file alone",
                highlight=False,
                markup=False,
            )
        return shared, [by_prompt[r.prompt] for r in shared]
    if len(a) != len(b):
        raise UnpactError(
            f"{before} has {len(a)} records but {after} has {len(b)}, and a prompt repeats "
            "in one of them, so they cannot be paired by prompt"
        )
    return a, b


@app.command()
def compare(
    before: Annotated[
        Path, typer.Argument(help="Attribution JSON/JSONL, e.g. of the original model.")
    ],
    after: Annotated[
        Path,
        typer.Argument(
            help="Attribution JSON/JSONL of the same prompts, e.g. after unlearning (or of "
            "some of them: distinct prompts are paired by prompt)."
        ),
    ],
) -> None:
    """Focus shift between two attributions of the same prompts (SPEC section 3)."""
    from unpact.attribution import contribution_similarity, keytoken_similarity

    a_records, b_records = _paired(_read_records(before), _read_records(after), before, after)
    table = Table(
        "#",
        "prompt",
        "KeyTokens before",
        "after",
        "keytoken sim.",
        "contribution sim.",
        "sensitivity before",
        "after",
        title="Focus shift (before -> after)",
    )
    ks, cs = [], []
    for i, (a, b) in enumerate(zip(a_records, b_records)):
        try:
            k, c = keytoken_similarity(a, b), contribution_similarity(a, b)
        except UnpactError as exc:
            asked = (
                f"{a.prompt[:60]!r}"
                if a.prompt == b.prompt
                else f"{a.prompt[:60]!r} and {b.prompt[:60]!r}"
            )
            raise UnpactError(f"record {i} ({asked}): {exc}") from None
        ks.append(k)
        cs.append(c)
        table.add_row(
            str(i),
            escape(a.prompt[:40]),
            escape(", ".join(a.key_token_texts)),
            escape(", ".join(b.key_token_texts)),
            f"{k:.3f}",
            f"{c:.3f}",
            f"{a.prompt_sensitivity:.3f}",
            f"{b.prompt_sensitivity:.3f}",
        )
    out.print(table)
    out.print(
        f"mean keytoken_similarity = {sum(ks) / len(ks):.4f}   "
        f"mean contribution_similarity = {sum(cs) / len(cs):.4f}"
    )
    differ = [(a.answer, b.answer) for a, b in zip(a_records, b_records) if a.answer != b.answer]
    if differ:  # the paper's focus shift is one answer's, before and after
        err.print(
            f"note: {len(differ)} of {len(a_records)} record(s) attribute different answers "
            f"before and after (the first: {differ[0][0]!r} / {differ[0][1]!r}): their focus "
            "shift compares two targets, not one answer before and after",
            highlight=False,
            markup=False,
        )


def _read_records(path: Path) -> list[Attribution]:
    from unpact.attribution import load_records

    try:
        return load_records(path)
    except UnpactError:
        raise  # names the file and line already
    except OSError as exc:
        raise UnpactError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UnpactError(f"{path}: {exc}") from None


def _inject_help(name: str, more: str = "") -> str:
    """An injection option's help: the InjectConfig field's description (then `more`) and
    default."""
    from unpact.inject import InjectConfig

    field = InjectConfig.model_fields[name]
    text = field.description or ""
    default = "" if field.default is None else f" (default: {field.default})"
    return f"{text[:1].upper()}{text[1:]}{more}{default}."


@app.command()
def inject(
    model: LocalModelOpt = "default",
    benchmark: Annotated[str, typer.Option(help=BENCHMARK_HELP)] = "news",
    lr: Annotated[float | None, typer.Option(help=_inject_help("lr"))] = None,
    batch_size: Annotated[int | None, typer.Option(help=_inject_help("batch_size"))] = None,
    max_epochs: Annotated[int | None, typer.Option(help=_inject_help("max_epochs"))] = None,
    target_accuracy: Annotated[
        float | None, typer.Option(help=_inject_help("target_accuracy"))
    ] = None,
    rehearsal: Annotated[
        bool | None, typer.Option("--rehearsal/--no-rehearsal", help=_inject_help("rehearsal"))
    ] = None,
    rehearsal_per_step: Annotated[
        int | None,
        typer.Option(
            help=_inject_help(
                "rehearsal_per_step", "; fewer is faster and keeps less general knowledge"
            ),
            min=0,
        ),
    ] = None,
    precision: Annotated[str | None, typer.Option(help=_inject_help("precision"))] = None,
    seed: Annotated[int | None, typer.Option(help=_inject_help("seed"))] = None,
    device: DeviceOpt = "auto",  # where it trains: not part of the key
    max_new_tokens: Annotated[int | None, typer.Option(help=_inject_help("max_new_tokens"))] = None,
    teach: Annotated[
        str,
        typer.Option(
            help="What to teach: forget+retain (the original model) or retain (the "
            "never-taught reference: the same recipe without the forget facts)."
        ),
    ] = "forget+retain",
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Also write the taught model to this folder (usable as --model DIR)."
        ),
    ] = None,
    chat_template: TemplateFileOpt = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Any other injection setting: key=value (e.g. min_epochs=4, trainable=mlp, "
            "general=null, checkpoint_every=2); the names of a run config's inject.settings.",
        ),
    ] = None,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Teach a benchmark's fictional facts to a model (cached by content hash)."""
    from unpact.inject import inject as run_inject
    from unpact.models import trusting_remote_code

    given = {
        "lr": lr,
        "batch_size": batch_size,
        "max_epochs": max_epochs,
        "target_accuracy": target_accuracy,
        "rehearsal": rehearsal,
        "rehearsal_per_step": rehearsal_per_step,
        "precision": precision,
        "seed": seed,
        "device": device,
        "max_new_tokens": max_new_tokens,
    }
    config = _inject_config(given, set_ or [])
    if out_dir is not None:
        _new_folder(out_dir)
    with trusting_remote_code(trust_remote_code):
        result = run_inject(_with_template(model, chat_template), benchmark, config, teach=teach)
    _print_injection(result)
    where = result.path
    if out_dir is not None:
        from unpact.run.store import link_model

        link_model(result.path, out_dir)
        where = out_dir
    out.print(f"use it with --model {escape(str(where))}")


def _new_folder(out_dir: Path) -> None:
    """`unpact inject --out`: a new or empty folder, made before the training (a file in
    the way was said after it)."""
    from unpact.files import make_folder

    if out_dir.exists() and not _empty_folder(out_dir):
        raise UnpactError(f"--out {out_dir}: exists and is not an empty folder")
    make_folder(out_dir, "--out")


def _print_injection(result: Any) -> None:
    """`unpact inject`'s lines on what the injection reached (or found cached)."""
    acc = "  ".join(f"{k} {v:.1%}" for k, v in result.accuracy.items())
    out.print(f"{'cached' if result.cached else 'injected'}: {escape(str(result.path))}")
    before = result.base_accuracy.get("general")
    out.print(
        f"accuracy after: {acc}   (general before: {'-' if before is None else f'{before:.1%}'}; "
        f"{result.epochs} epoch{'s' * (result.epochs != 1)}, {result.seconds:.0f} s)"
    )
    if result.general_kept is not None:
        out.print(f"kept {result.general_kept:.0%} of the general questions the base model answers")
    if result.small_benchmark_note:
        out.print(escape(result.small_benchmark_note))
    parts = {"the cached model": result.made} if result.cached else {}
    parts |= {f"epochs {p['from']}-{p['to']}": p["made"] for p in result.made_before}
    parts |= {f"its {what}": then for what, then in result.inputs_made.items()}
    _say_made_elsewhere(parts, "inject.json's made, made_before and inputs_made")


def _say_made_elsewhere(parts: dict[str, Any], where: str) -> None:
    """A note naming the parts of a model this command gives (read from the cache, or
    trained before it resumed from a checkpoint) that another machine or other library
    releases computed, as `unpact run` says it of its stages: made here they may differ in
    the last digits. `parts`: each part's name and its `determinism.made` note."""
    from unpact.determinism import made, made_elsewhere

    now = made()
    names = [name for name, then in parts.items() if made_elsewhere(then, now) is not None]
    if names:
        out.print(
            "note: computed on another machine or under other library releases: "
            f"{escape(', '.join(names))} ({where}); made here, the numbers may differ in the "
            "last digits"
        )


def _inject_config(options: dict[str, Any], sets: list[str]) -> Any:
    """The InjectConfig of `unpact inject`'s options (None: not given; the default device
    `auto` counts as not given) and its `--set key=value` items, each setting given once."""
    from unpact.inject import InjectConfig
    from unpact.unlearn.config import parse_override

    given = {k: v for k, v in options.items() if v is not None and (k, v) != ("device", "auto")}
    for item in sets:
        key, value = parse_override(item)
        if key not in InjectConfig.model_fields:
            known = ", ".join(InjectConfig.model_fields)
            raise UnpactError(f"--set {key}: not an injection setting; known: {known}")
        if key in given:
            option = "--" + key.replace("_", "-")
            raise UnpactError(f"--set {key} and {option} both given: give one")
        given[key] = value
    return InjectConfig(**({"device": options["device"]} | given))


def _empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _method_names() -> list[str]:
    from unpact.unlearn.methods import METHODS

    return list(METHODS)


@app.command()
def unlearn(
    method: Annotated[
        str | None,
        typer.Option(help="Method: " + ", ".join(_method_names()) + " (unpact methods)."),
    ] = None,
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Run directory (model, config, losses): new, empty, or a run's (with --resume).",
        ),
    ] = Path("unlearned"),
    model: LocalModelOpt = "default",
    benchmark: Annotated[str, typer.Option(help=BENCHMARK_HELP)] = "news",
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="YAML file of settings (over the method's defaults); a run's config.yaml "
            "gives its settings (the model and benchmark are --model's and --benchmark's).",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override one setting: key=value (e.g. lr=2e-5, beta=0.2, lora.r=8)."
        ),
    ] = None,
    inject_first: Annotated[
        bool,
        typer.Option(
            "--inject/--no-inject",
            help="Teach the benchmark to MODEL first (cached), then unlearn that.",
        ),
    ] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its last checkpoint.")
    ] = False,
    evaluate: Annotated[
        bool,
        typer.Option(
            "--eval/--no-eval", help="Judge forget, retain and general accuracy before and after."
        ),
    ] = True,
    plugin: PluginOpt = None,
    chat_template: TemplateFileOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Unlearn a benchmark's forget split; writes the model (safetensors), config and loss log.

    Runs unchanged under `accelerate launch -m unpact unlearn ...` on several processes.
    """
    from unpact.models import trusting_remote_code
    from unpact.plugins import load_plugins
    from unpact.unlearn import resolve_config

    load_plugins(list(plugin or []))
    cfg = resolve_config(method, file=config, overrides=set_ or [])
    with trusting_remote_code(trust_remote_code):  # every model it loads, the evaluation's too
        _unlearn(
            cfg, model, benchmark, out_dir, inject_first, resume, evaluate, chat_template, device
        )


def _unlearn(
    cfg: Any,
    model: str,
    benchmark: str,
    out_dir: Path,
    inject_first: bool,
    resume: bool,
    evaluate: bool,
    chat_template: str | None,
    device: str,
) -> None:
    """`unpact unlearn` with its settings resolved."""
    from unpact.models import check_device
    from unpact.unlearn import unlearn as run_unlearn

    check_device(device)  # before anything loads or trains
    model = _with_template(model, chat_template)
    if evaluate:  # before the training, not after it
        from unpact.unlearn.evaluate import check_evaluable

        check_evaluable(model, benchmark)
    spec = model
    if inject_first:
        from unpact.inject import InjectConfig
        from unpact.inject import inject as run_inject

        spec = str(run_inject(model, benchmark, InjectConfig(device=device)).path)
    result = run_unlearn(spec, benchmark, cfg, out_dir, resume=resume, device=device)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    out.print(
        f"unlearned with {cfg.method} in {result.seconds:.0f} s ({result.steps} steps): "
        + escape(str(result.model_dir))
    )
    out.print(f"loss log: {escape(str(out_dir / 'losses.jsonl'))}")
    parts = {f"steps {p['from']}-{p['to']}": p["made"] for p in result.made_before}
    _say_made_elsewhere(parts, "result.json's made_before")
    if evaluate:
        _print_accuracy(spec, str(result.model_dir), benchmark, out_dir, cfg.method, device)


def _print_accuracy(
    before: str, after: str, benchmark: str, out_dir: Path, method: str, device: str
) -> None:
    """Forget, retain and general accuracy before and after unlearning, printed and kept
    in the run's accuracy.json."""
    from unpact.unlearn.evaluate import accuracy_before_after

    table = accuracy_before_after(before, after, benchmark, out_dir / "accuracy.json", device)
    grid = Table("split", "before", "after", title=escape(f"Accuracy ({method})"))
    for split, row in table.items():
        grid.add_row(split, f"{row['before']:.1%}", f"{row['after']:.1%}")
    out.print(grid)


data_app = typer.Typer(
    help="Benchmarks: list the built-in ones, show one or a folder of yours.", no_args_is_help=True
)
app.add_typer(data_app, name="data")


@data_app.command("list")
def data_list() -> None:
    """List the built-in benchmarks with their sizes per split."""
    from unpact.data import BUILTIN, load_benchmark
    from unpact.data.items import SPLITS

    table = Table("name", "items", *SPLITS, "documents", "kind", title="Built-in benchmarks")
    for name in BUILTIN:
        bench = load_benchmark(name)
        counts = bench.counts()
        kind = "multiple choice" if any(i.is_mcq for i in bench.items) else "QA"
        table.add_row(
            name,
            str(len(bench.items)),
            *(str(counts.get(s, 0)) for s in SPLITS),
            str(len(bench.documents)),
            kind,
        )
    out.print(table)
    out.print(
        "Your own: a folder with qa.jsonl (and documents.jsonl, verbmem.jsonl); see docs/data.md."
    )


@data_app.command("show")
def data_show(
    name: Annotated[str, typer.Argument(help=BENCHMARK_HELP)],
    n: Annotated[int, typer.Option("-n", help="How many items to show per split.")] = 3,
) -> None:
    """Validate a benchmark and show its counts per split and a few items."""
    from unpact.data import load_benchmark

    bench = load_benchmark(name)
    counts = ", ".join(f"{k}: {v}" for k, v in bench.counts().items())
    probes = f", {len(bench.verbatim)} VerbMem probes" if bench.verbatim else ""
    out.print(
        f"[bold]{escape(bench.name)}[/]: {len(bench.items)} items ({counts}), "
        f"{len(bench.documents)} documents"
        + probes
        + (f" - {escape(str(bench.path))}" if bench.path else "")
    )
    for split in ("forget", "retain", "general"):
        items = bench.split(split)[:n]
        if not items:
            continue
        table = Table("id", "question", "answer", "keywords", title=f"{split} (first {len(items)})")
        for item in items:
            answer = item.answer + (f"  (of {len(item.choices)} choices)" if item.choices else "")
            table.add_row(*map(escape, (item.id, item.question, answer, ", ".join(item.keywords))))
        out.print(table)


def _piped_console() -> Console:
    """Where the results table is printed: the terminal, or for a log file or pipe the
    full table rather than rich's 80-column default, unless $COLUMNS says a width (it was
    ignored there)."""
    if out.is_terminal:
        return out
    columns = os.environ.get("COLUMNS", "")
    return Console(width=int(columns) if columns.isdigit() and int(columns) > 0 else 200)


def _print_results(results: dict[str, Any], out_dir: Path) -> None:
    console = _piped_console()
    console.print(results_grid(results, console))
    for line in _left_out(results):
        console.print(escape(line))
    _where(console, results, out_dir)


def _left_out(results: dict[str, Any], verdicts: bool = True) -> list[str]:
    """Why a figure is missing ("–" in the table): results.json's `skipped` reasons and,
    with `verdicts`, each method's attack that was not run (relearning with a single
    forgotten item has none to train on and another to test)."""
    lines = [f"skipped {part}: {why}" for part, why in (results.get("skipped") or {}).items()]
    for label, tests in (results.get("verdicts") or {}).items() if verdicts else ():
        lines += [
            f"{label}: {t['test']} not run: {t['detail']}"
            for t in tests
            if t["verdict"] == "not run"
        ]
    return lines


def _where(console: Console, results: dict[str, Any], out_dir: Path) -> None:
    """The chat template the models were asked in, if not their own, and the files."""
    if results.get("chat_template"):
        shown = " ".join(str(results["chat_template"]).split())
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        console.print(f"asked in the chat template {escape(shown)} (every model)")
    console.print(
        f"results: {out_dir / 'results.json'} (per item: {out_dir / 'items.jsonl'})", markup=False
    )
    console.print(f"report:  {out_dir / 'report.html'}", markup=False)


def results_grid(results: dict[str, Any], console: Console) -> Table:
    """The run's table, one row per method; turned to one row per figure (a column per
    method) when that is wider than the console, where rich would cut every header to a
    few letters ("recove…")."""
    from unpact.results import table

    head, rows = table(results)
    title = escape(f"unpact: {results['benchmark']} on {results['model']}")
    grid = Table(*head, title=title)
    for row in rows:
        grid.add_row(*map(escape, row))  # a sweep's run is label[key=value]: text, not markup
    if Console(width=100_000).measure(grid).maximum <= console.width:
        return grid
    turned = Table("figure", *(escape(r[0]) for r in rows), title=title)
    for n, name in enumerate(head[1:], start=1):
        turned.add_row(name.replace("\n", " "), *(escape(r[n]) for r in rows))
    return turned


def _logged(job: Callable[[Callable[[str], None]], Any]) -> Any:
    """`job(log)`, its log lines timed on stderr; Ctrl-C is one line saying how to go on
    (finished stages are cached, and unfinished ones were never renamed into place)."""
    import time

    start = time.perf_counter()

    def log(text: str) -> None:
        err.print(f"[dim]{time.perf_counter() - start:6.0f} s[/]  {escape(text)}", highlight=False)

    try:
        return job(log)
    except (KeyboardInterrupt, Terminated) as exc:
        err.print(f"{_stopped(exc)}: run the same command again to continue where it stopped")
        raise typer.Exit(_stop_code(exc)) from None


class Terminated(BaseException):
    """SIGTERM (a scheduler's time limit, `kill`), stopping the CLI as Ctrl-C does: the
    work in hand is left unfinished and said, not the process ended in silence. Not a
    KeyboardInterrupt, which typer turns into a silent exit 130 (143 is SIGTERM's)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _stop_on_sigterm() -> None:
    """SIGTERM raises `Terminated` in the main thread, where nothing else handles it. Not
    in one of several launched processes: a process blocked in a collective with a dead
    peer would not run the handler, and the launcher's SIGTERM would wait on it."""
    import signal

    world = os.environ.get("WORLD_SIZE", "").strip()
    if world and world != "1":
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _stopped(exc: BaseException) -> str:
    return "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"


def _stop_code(exc: BaseException) -> int:
    return 143 if isinstance(exc, Terminated) else 130  # 128 + the signal's number


def _run(
    config: str | Path,
    out_dir: Path,
    plugins: list[str] | None = None,
    trust_remote_code: bool = False,
) -> None:
    from unpact.plugins import load_plugins
    from unpact.run import load_config
    from unpact.run import run as run_experiment

    load_plugins(list(plugins or []))
    cfg = load_config(config)  # a bad config fails here, before any model loads
    if trust_remote_code:
        cfg = cfg.model_copy(update={"trust_remote_code": True})
    result = _logged(lambda log: run_experiment(cfg, out_dir, log=log))
    runs: dict[str, dict[str, object]] | None = result.results.get("runs")
    if runs is None:
        _print_results(result.results, out_dir)
        return
    for key, results in runs.items():
        _print_results(results, out_dir / key)
    out.print(
        f"all runs: {out_dir / 'results.md'}, side by side: {out_dir / 'report.html'}", markup=False
    )


@app.command(
    help="Run an experiment end to end: inject, unlearn, judge, attribute, attack, report.\n\n"
    "Every stage is cached by content hash, so re-running after an interruption redoes only "
    "what was not finished. Writes results.json, results.csv, items.jsonl, models/ and "
    "report.html into --out. Config reference: docs/runner.md."
)
def run(
    config: Annotated[
        str,
        typer.Argument(
            help="A run config (YAML file) or a built-in one: "
            + ", ".join(builtin_run_configs.names())
            + "."
        ),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Run directory: new, empty, or a run's (continued).")
    ] = Path("runs/run"),
    plugin: PluginOpt = None,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code",
            help="Allow every model's own Python code to run (the config's trust_remote_code).",
        ),
    ] = False,
) -> None:
    _run(config, out_dir, plugin, trust_remote_code)


@app.command(
    help="The paper end to end on the default model, reduced to minutes: news (20 forget and "
    "20 retain facts taught first), GA+GD, NPO+KL and RMU, FocusOnKey, PROBAB, both and "
    "4-bit quantization, the report. Same as `unpact run demo`."
)
def demo(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Run directory: new, empty, or a run's (continued).")
    ] = Path("runs/demo"),
) -> None:
    _run("demo", out_dir)


JudgeReplyOpt = Annotated[
    int | None,
    typer.Option(
        help="Reply length the LLM judge is given (default 3; a reasoning model such as "
        "OpenAI's o-series or GPT-5 thinks first and needs a few hundred)."
    ),
]

JudgePromptOpt = Annotated[
    str | None,
    typer.Option(
        help="The LLM judge's prompt (a file, or the text itself), with {question}, "
        "{answer} and {output} where they go, asking for a yes or a no (default: "
        "docs/runner.md's)."
    ),
]

AUDITED_KINDS = (
    "a Hugging Face model folder (a LoRA adapter's too), a .gguf file, a hub id, 'default' "
    "(embedded SmolLM2-135M-Instruct), or a served model openai:MODEL@BASE_URL (the attacks "
    "on weights are then skipped)"
)
AUDIT_GENERAL_HELP = (
    "General-knowledge questions, judged for the damage beside the forgetting and relearned "
    "on by relearn_unrelated: 'general' (the built-in set), a benchmark (its general split, "
    "as tofu:PATH's world facts and real authors; else every item), or none (relearn_unrelated "
    "left out)."
)
AUDIT_JUDGE_HELP = (
    "contains (the reference answer in the greedy answer), rouge (ROUGE-L recall >= 0.5: for "
    "sentence-long answers such as TOFU's), or openai:MODEL@URL (an LLM asked whether the "
    "answer gives the reference; key from $OPENAI_API_KEY when set)."
)


@app.command(
    help="Audit a model pair you already have: is the unlearned model's knowledge gone, "
    "recoverable (prompt attacks, quantization, relearning on unrelated data, directional "
    "ablation, logit lens, probes — each beside the same attack on the never-taught "
    "reference), indistinguishable from the reference (membership inference, PrivLeak, "
    "forget quality)? Prints a verdict per test; writes results.json, items.jsonl and "
    "report.html into --out. Cached like `unpact run`. Guide: docs/audit.md."
)
def audit(
    original: Annotated[str, typer.Option(help=f"The model before unlearning: {AUDITED_KINDS}.")],
    unlearned: Annotated[str, typer.Option(help="The unlearned model, of the same kinds.")],
    benchmark: Annotated[str, typer.Option(help=BENCHMARK_HELP)],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Audit directory: new, empty, or an audit's (continued).")
    ],
    reference: Annotated[
        str | None,
        typer.Option(
            help="A model never taught the forget facts (TOFU/MUSE publish one; `unpact "
            "inject --teach retain` makes one): the controls and indistinguishability need it."
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            help="The model before it learned the benchmark, for the Reference attack and "
            "fluency (default: --reference)."
        ),
    ] = None,
    preset: Annotated[
        str,
        typer.Option(
            help="laptop (a 2-core CPU: ~5 min on news, default model) or gpu (every item)."
        ),
    ] = "laptop",
    attacks: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated subset of the preset's attacks, or of the other's (quantize_8bit, "
            "quantize_fp4, quantize_llm_int8), or any registered attack."
        ),
    ] = None,
    general: Annotated[str, typer.Option(help=AUDIT_GENERAL_HELP)] = "general",
    judge: Annotated[str, typer.Option(help=AUDIT_JUDGE_HELP)] = "contains",
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Greedy answer length when judging (default 32).")
    ] = None,
    judge_max_tokens: JudgeReplyOpt = None,
    judge_prompt: JudgePromptOpt = None,
    chat_template: TemplateFileOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    plugin: PluginOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    concurrency: ConcurrencyOpt = 16,
) -> None:
    from unpact.run.audit import audit as run_audit

    chosen = [a.strip() for a in attacks.split(",") if a.strip()] if attacks is not None else None
    options: dict[str, Any] = {
        "reference": reference,
        "base": base,
        "preset": preset,
        "attacks": chosen,
        "general": None if general == "none" else general,
        "device": device,
        "dtype": dtype,
        "judge": judge,
        "max_new_tokens": max_new_tokens,
        "judge_max_tokens": judge_max_tokens,
        "judge_prompt": judge_prompt,
        "chat_template": chat_template,
        "plugins": list(plugin or []),
        "trust_remote_code": trust_remote_code,
        "concurrency": concurrency,
    }
    result = _logged(
        lambda log: run_audit(original, unlearned, benchmark, out_dir, log=log, **options)
    )
    _print_verdicts(result.results, out_dir)


def _print_verdicts(results: dict[str, Any], out_dir: Path) -> None:
    grid = Table(
        "test", "verdict", "evidence", title=escape(f"unpact audit: {results['benchmark']}")
    )
    for v in results["verdicts"]["unlearned"]:
        grid.add_row(escape(v["test"]), escape(v["verdict"]), escape(v["detail"]))
    console = _piped_console()
    console.print(grid)
    for line in _left_out(results, verdicts=False):
        console.print(escape(line))
    _where(console, results, out_dir)


@app.command(
    help="Serve a local model over an OpenAI-compatible API in vLLM's formats.\n\n"
    "For trying the remote backend (--model openai:NAME@http://127.0.0.1:PORT/v1), as an "
    "LLM judge (--judge openai:NAME@http://127.0.0.1:PORT/v1) or for lm-evaluation-harness's "
    "local-completions model. Not a production server."
)
def serve(
    model: LocalModelOpt = "default",
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            "--served-model-name",
            help="The model name clients give (openai:NAME@URL); vLLM's spelling works too. "
            "Default, as vLLM's: --model as given (a hub id without its @REV).",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on: 127.0.0.1 (this machine only), or as vLLM's --host "
            "an address of this machine, 0.0.0.0 or :: for every interface (anyone who can "
            "reach it may then use the model: give --api-key).",
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port to listen on (0: one the system chooses).")
    ] = 8000,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    trust_remote_code: RemoteCodeOpt = False,
    chat_template: TemplateFileOpt = None,
    generation_config: Annotated[
        str,
        typer.Option(
            "--generation-config",
            help="auto: the model's generation_config gives the sampling defaults a request "
            "leaves unset and bounds every request by its max_new_tokens, as vLLM's default; "
            "vllm: neither (vLLM's --generation-config vllm).",
        ),
    ] = "auto",
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            help="As vLLM's --api-key: every route but /health, /ping, /version then wants "
            "'Authorization: Bearer KEY' (clients: the key in $UNPACT_API_KEY) and answers 401 "
            "without it. "
            "Repeatable: any of the keys. Without it, as vLLM, the key in $VLLM_API_KEY "
            "where that is set (out of the process list).",
        ),
    ] = None,
    max_num_seqs: Annotated[
        int,
        typer.Option(
            "--max-num-seqs",
            min=1,
            help="As vLLM's: how many plain greedy completions in flight (temperature 0, one "
            "choice, no stop strings or logit shaping) one batch generates together; 1: each "
            "on its own. A request's greedy answer can then move with what shares its batch, "
            "by float rounding, as in vLLM.",
        ),
    ] = 16,
) -> None:
    """`unpact serve` (its help is the decorator's)."""
    from unpact.serve import make_app

    if generation_config not in ("auto", "vllm"):
        raise UnpactError(f"--generation-config: auto or vllm, not {generation_config!r}")
    keys = _serve_keys(api_key)  # before the model loads
    if name is None:  # vLLM's served name: the model as given (its revision apart)
        from unpact.models import hub_at

        name = at[0] if (at := hub_at(model)) else model
    lm = _served_model(model, dtype, device, trust_remote_code, chat_template)
    app_ = make_app(lm, name, "vllm" if generation_config == "vllm" else "auto", keys, max_num_seqs)
    _serve_on(app_, host, port, model, name, bool(keys))


def _served_model(
    model: str, dtype: str, device: str, trust_remote_code: bool, chat_template: str | None
) -> Any:
    """The local model `unpact serve` serves, with --chat-template's template in place of
    its own."""
    from unpact.models import (
        ChatTemplateError,
        check_chat_template,
        load_model,
        read_chat_template,
    )
    from unpact.types import is_remote_spec

    if is_remote_spec(model):
        raise UnpactError(
            f"--model {model!r} is a served model already: unpact serve serves weights on "
            "this machine (point a client at that server itself)"
        )
    try:
        template = None if chat_template is None else read_chat_template(chat_template)
        lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        if template is not None:
            lm.tokenizer.chat_template = template[0]
            check_chat_template(lm.tokenizer, template[1])
    except ChatTemplateError as e:
        raise UnpactError(f"--chat-template: {e}") from None
    return lm


def _serve_on(app_: Any, host: str, port: int, model: str, name: str, keyed: bool) -> None:
    """Listen on `host`:`port`, say the spec clients give (and that the model is open to
    whoever reaches the machine, where it is), then run `app_` until stopped."""
    import uvicorn

    from unpact.remote import LOOPBACK_HOSTS

    sock = _listening(host, port)
    port = sock.getsockname()[1]  # the one the system chose for --port 0
    err.print(f"serving {model} as {_served_at(host, name, port)} (Ctrl-C stops)", markup=False)
    if not keyed and host not in LOOPBACK_HOSTS:
        err.print(
            f"note: listening on {host} without --api-key: anyone who can reach this machine "
            "may use the model",
            markup=False,
        )
    uvicorn.Server(uvicorn.Config(app_, log_level="warning")).run(sockets=[sock])


def _serve_keys(api_key: list[str] | None) -> list[str]:
    """The keys `unpact serve` wants: --api-key's, else $VLLM_API_KEY's where set and not
    empty (vLLM's `args.api_key or envs.VLLM_API_KEY`: a key kept out of `ps`'s listing)."""
    from unpact.serve.auth import check_keys

    env_key = os.environ.get("VLLM_API_KEY") or None
    if api_key or env_key is None:
        return check_keys(api_key or [])
    return check_keys([env_key], "$VLLM_API_KEY")


def _listening(host: str, port: int) -> socket.socket:
    """A socket listening on `host`:`port` (an IPv4 or IPv6 address, or a name of this
    machine); clients that come before uvicorn starts wait, not refused. An address that is
    not this machine's, or a port taken or refused, is one message."""
    import socket

    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise UnpactError(f"--host {host!r}: not an address ({why})") from None
    family, _, _, _, address = found[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRNOTAVAIL:  # the address is not one of this machine's
            raise UnpactError(
                f"--host {host}: not an address of this machine ({e.strerror})"
            ) from None
        raise UnpactError(f"--port {port}: cannot listen on {host} ({e.strerror})") from None
    return sock


def _served_at(host: str, name: str, port: int) -> str:
    """The model spec a client on this machine gives for what `unpact serve` serves: every
    interface (0.0.0.0, ::) is reached at the loopback address; an IPv6 address goes in
    brackets."""
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
    at = wildcard.get(host, host)
    at = f"[{at}]" if ":" in at else at
    spec = f"openai:{name}@http://{at}:{port}/v1"
    return f"{spec}, on every interface" if host in wildcard else spec


def _settings_text(settings: type[object]) -> str:
    """A pydantic settings class as `name=default` pairs."""
    fields = getattr(settings, "model_fields", {})
    parts = []
    for name, f in fields.items():
        default = f.get_default(call_default_factory=True)
        parts.append(f"{name}={default!r}" if not f.is_required() else name)
    return ", ".join(parts) or "-"


def _name(header: str) -> Column:
    """A listing's name column: whole on one line, however narrow the terminal (a name is
    what a config or --attacks is written with; 'recovery_control.<at…' was printed)."""
    return Column(header, no_wrap=True, overflow="fold")


@app.command("methods")
def methods_cmd(plugin: PluginOpt = None) -> None:
    """List the registered unlearning methods (plugins' included) and their settings."""
    from unpact.plugins import load_plugins
    from unpact.unlearn.methods import METHODS

    load_plugins(list(plugin or []))
    table = Table(_name("method"), "what it does", "settings", title="Unlearning methods")
    for name, cls in METHODS.items():
        about = cls.summary or (cls.__doc__ or "").strip().split("\n")[0]
        table.add_row(escape(name), escape(about), escape(_settings_text(cls.Settings)))
    out.print(table)


@app.command("attacks")
def attacks_cmd(plugin: PluginOpt = None) -> None:
    """List the registered recovery attacks (plugins' included) and their settings."""
    from unpact.attacks import ATTACKS
    from unpact.plugins import load_plugins

    load_plugins(list(plugin or []))
    table = Table(_name("attack"), "what it does", "settings", title="Recovery attacks")
    for name, cls in ATTACKS.items():
        about = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        table.add_row(escape(name), escape(about), escape(_settings_text(cls.Settings)))
    out.print(table)


@app.command("metrics")
def metrics_cmd(plugin: PluginOpt = None) -> None:
    """List the registered metrics (plugins' included): format, direction, interval."""
    from unpact.metrics import METRICS
    from unpact.plugins import load_plugins

    load_plugins(list(plugin or []))
    table = Table(_name("metric"), "what it is", "shown as", title="Metrics")
    for m in METRICS.values():
        better = {True: "higher better", False: "lower better", None: None}[m.higher_is_better]
        shown = [m.fmt, better, "interval" if m.interval else "no interval"]
        name = m.name + (".<attack>" if m.per_attack else "")
        table.add_row(escape(name), escape(m.description), "\n".join(s for s in shown if s))
    out.print(table)


CLEAR_HELP = (
    "Remove a part of the cache (repeatable): models, injected, stages, benchmarks, digests, "
    "or all. Each is remade when a run needs it again; run it while no unpact process runs."
)


@app.command("cache")
def cache_cmd(
    clear: Annotated[list[str] | None, typer.Option("--clear", help=CLEAR_HELP)] = None,
) -> None:
    """Show where the cache is and what each part of it takes on disk, or clear parts."""
    from unpact import cache
    from unpact.models import cache_root

    root = cache_root()
    if clear:
        for part in cache.clear(clear, root):
            kept = f" ({_bytes_text(part.shared)} stays: linked from run folders)"
            freed = _bytes_text(part.size - part.shared)
            out.print(
                f"cleared {part.name}: {part.entries} entries, {freed} freed"
                + (kept if part.shared else ""),
                highlight=False,
            )
        return
    parts = cache.usage(root)
    table = Table(
        "part", "entries", "on disk", "written", "what it holds (to remake)", title="Cache"
    )
    for part in parts:
        when = time.strftime("%Y-%m-%d", time.localtime(part.newest)) if part.newest else ""
        table.add_row(
            escape(part.name),
            str(part.entries),
            _bytes_text(part.size),
            when,
            escape(part.description),
        )
    out.print(table)
    total = _bytes_text(sum(p.size for p in parts))
    out.print(
        f"{total} in {escape(str(root))}; `unpact cache --clear PART` frees a part", highlight=False
    )


def _bytes_text(n: int) -> str:
    """A size for people: 512 B, 4.0 KB, 1.2 GB (powers of 1000, as `df -H` gives them)."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            break
        size /= 1000
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def writes_any_text() -> None:
    """stdout and stderr in an encoding short of Unicode (PYTHONIOENCODING=ascii, a
    Windows console's cp1252) write what it lacks as escapes (a Greek answer as
    \\u03b1...): printing it was a UnicodeEncodeError traceback, after the work was done."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if encoding not in ("utf8", "utf_8") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main() -> None:
    """Entry point: run the CLI, turning user mistakes into one message and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    writes_any_text()
    _stop_on_sigterm()
    from unpact.errors import disk_full, not_permitted, out_of_memory
    from unpact.plugins import plugin_failure

    try:
        # bytes that are not UTF-8 (a Latin-1 terminal, a file pasted in another encoding)
        # reach Python as lone surrogates, which every tokenizer and file refuses
        for before, arg in zip(sys.argv, sys.argv[1:]):
            option = before.startswith("-") and not arg.startswith("-")
            check_text(arg, f"the value of {before}" if option else f"the argument {arg!a}")
        app()
    except UnpactError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except (KeyboardInterrupt, Terminated) as exc:  # not a fault (run and audit say more)
        err.print(_stopped(exc))
        sys.exit(_stop_code(exc))
    except Exception as exc:  # a full disk, a path refused, no memory, a plugin failing: exit 2
        failure = disk_full(exc) or not_permitted(exc) or out_of_memory(exc) or plugin_failure(exc)
        if failure is None:
            raise
        err.print(f"[bold red]error:[/] {escape(str(failure))}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
