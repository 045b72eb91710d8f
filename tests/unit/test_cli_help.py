"""Every command answers `--help`, and an unknown option is one usage error (exit code 2),
whatever typer and click releases pyproject.toml allows together."""

from __future__ import annotations

import re
from pathlib import Path

import click
from typer.main import get_command
from typer.testing import CliRunner

from unpact.cli import app


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command's words (`("data", "show")`), subcommands of groups included."""
    out: list[tuple[str, ...]] = []
    for name, command in sorted(group.commands.items()):
        out.append((*path, name))
        if isinstance(getattr(command, "commands", None), dict):  # a group (typer may
            out += _commands(command, (*path, name))  # vendor its own click's classes)
    return out


def test_every_command_answers_help_and_an_unknown_option_is_a_usage_error():
    """typer 0.13, the old lower bound, under click 8.2 or later (which pip takes beside it)
    answered `unpact --help`, every command's `--help` and every usage error with a
    TypeError traceback (click's `make_metavar` took a new argument); typer 0.15.4, the
    bound now, keeps click below 8.2, and later releases follow click."""
    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "Usage" in top.output, top.output
    commands = _commands(get_command(app))  # type: ignore[arg-type]
    assert ("run",) in commands and ("audit",) in commands
    for words in commands:
        shown = runner.invoke(app, [*words, "--help"])
        assert shown.exit_code == 0 and "Usage" in shown.output, (words, shown.exception)
        wrong = runner.invoke(app, [*words, "--no-such-option"])
        assert wrong.exit_code == 2, (words, wrong.output, wrong.exception)
        assert "No such option" in wrong.output and "Traceback" not in wrong.output, words


ROOT = Path(__file__).resolve().parents[2]


def _documented() -> dict[tuple[str, ...], set[str]]:
    """The options the README and docs/ give each `unpact ...` command in code spans."""
    found: dict[tuple[str, ...], set[str]] = {}
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for span in re.findall(r"`(unpact [^`]+)`", doc.read_text(encoding="utf-8")):
            words = []
            for word in span.split()[1:]:
                if not re.fullmatch(r"[a-z][a-z-]*", word):
                    break
                words.append(word)
            found.setdefault(tuple(words), set()).update(re.findall(r"--[a-z][a-z0-9-]*", span))
    return found


def test_every_option_the_docs_give_a_command_is_in_its_help():
    """The README's and docs' commands (`unpact audit --original DIR ...`) name only options
    their command has: a renamed or dropped option fails here, not in a user's shell."""
    runner = CliRunner()
    known = set(_commands(get_command(app)))  # type: ignore[arg-type]
    wide = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}  # no option name cut by a line's end
    documented = _documented()
    assert len(documented) > 5
    for words, options in documented.items():
        command = next(words[:k] for k in range(len(words), -1, -1) if words[:k] in known | {()})
        shown = runner.invoke(app, [*command, "--help"], env=wide).output
        missing = sorted(o for o in options if o not in shown)
        assert not missing, (command, missing)


def test_version_names_unpact_and_the_libraries_its_numbers_depend_on():
    """`unpact --version` (there was none): one line for a bug report or a run's record."""
    from importlib.metadata import version

    shown = CliRunner().invoke(app, ["--version"])
    assert shown.exit_code == 0, shown.output
    line = shown.output.strip()
    assert "\n" not in line
    assert line.startswith(f"unpact {version('unpact')} (torch {version('torch')}, transformers ")
    assert "; Python 3." in line


def test_every_help_text_is_reflowed_not_broken_at_the_sources_line_ends():
    """typer's rich help keeps a single line break inside a paragraph: `unpact --help` drew
    `serve`'s summary in six ragged lines ("formats (for trying the" / "remote backend:
    ..."), broken where its docstring's lines ended. Each command's help (and each group's)
    is paragraphs of one line each."""
    import inspect

    def walk(command: click.Command, words: tuple[str, ...]) -> None:
        text = inspect.cleandoc(command.help or "").partition("\f")[0]
        for paragraph in text.split("\n\n"):
            assert "\n" not in paragraph.strip(), (words, paragraph)
        if isinstance(getattr(command, "commands", None), dict):
            for name, sub in command.commands.items():
                walk(sub, (*words, name))

    walk(get_command(app), ())


def test_commands_that_need_weights_do_not_offer_a_served_model():
    """`inject`, `unlearn` and `serve` said --model could be a served model
    (openai:MODEL@BASE_URL), which each then refused; `serve` refused it as "this step
    changes or saves weights". Their help names local models only, and `serve` says why."""
    runner = CliRunner()
    for command in ("inject", "unlearn", "serve"):
        option = next(p for p in get_command(app).commands[command].params if p.name == "model")
        assert "openai:" not in (option.help or ""), command
    assert "openai:" in next(
        p.help for p in get_command(app).commands["attribute"].params if p.name == "model"
    )
    served = runner.invoke(app, ["serve", "--model", "openai:t@http://127.0.0.1:9/v1"])
    # an UnpactError: `unpact` (cli.main) prints its message and exits with 2
    assert "is a served model already" in str(served.exception), served.output


def test_every_benchmark_option_names_the_real_benchmarks_it_reads():
    """`audit --benchmark` offered the built-in ones and a folder alone, while it reads
    TOFU's, MUSE's and WMDP's files as `run`, `inject` and `unlearn` do: auditing an
    open-unlearning checkpoint on TOFU is what the command is for."""
    for command in ("audit", "inject", "unlearn"):
        option = next(p for p in get_command(app).commands[command].params if p.name == "benchmark")
        for spec in ("tofu:PATH", "muse-news:PATH", "muse-books:PATH", "wmdp:PATH"):
            assert spec in (option.help or ""), (command, spec)


def test_torchao_s_invalid_escape_is_not_shown_and_other_syntax_warnings_are():
    """Python 3.12 compiles torchao 0.18's quant_api.py (no bytecode written at install)
    with a SyntaxWarning for an escape in a docstring; `import unpact` hides it, and only
    it (the compiler's warning names the file, less ".py", as its module)."""
    import warnings

    import unpact

    with warnings.catch_warnings(record=True) as seen:
        # what `import unpact` does (pytest drops the filters set while it collected)
        unpact._quiet_libraries()
        for path in ("/x/site-packages/torchao/quantization/quant_api.py", "/x/mine/code.py"):
            warnings.warn_explicit("invalid escape sequence '\\.'", SyntaxWarning, path, 1542)
    assert [w.filename for w in seen] == ["/x/mine/code.py"]


def test_a_prompts_error_names_its_data_line_or_nothing_for_the_one_prompt(tmp_path):
    """The API's "item N: " (0-based, in its lists) meant nothing to a user of one --prompt,
    and was not the line of a --data file with a blank line in it."""
    from unpact.errors import UnpactError
    from unpact.models import save_model
    from unpact.testing import tiny_model

    lm = tiny_model(seed=0)
    save_model(lm.model, lm.tokenizer, tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Who?", "answer": "Bob"}\n\n{"prompt": "Where?", "answer": ""}\n')
    base = ["--model", str(tmp_path / "m"), "--device", "cpu"]
    said = {}
    for name, args in {
        "data": ["attribute", *base, "--data", str(data)],
        "prompt": ["attribute", *base, "-p", "Where?", "-a", ""],
        "score": ["score", *base, "-p", "Where? " * 300, "-a", "x"],
    }.items():
        result = CliRunner().invoke(app, args)
        assert isinstance(result.exception, UnpactError), (name, result.output)
        said[name] = str(result.exception)
    assert said["data"] == f"{data}, line 3: empty answer: give the text whose log-prob to compute"
    assert said["prompt"] == "empty answer: give the text whose log-prob to compute"
    assert said["score"].startswith("prompt + answer is "), said["score"]


def test_a_piped_results_table_takes_the_width_columns_says(monkeypatch):
    """Piped or logged, the results table is 200 columns wide (rich's default 80 wrapped
    it into an unreadable column), unless $COLUMNS says a width, which was ignored."""
    from unpact import cli

    monkeypatch.setattr(type(cli.out), "is_terminal", property(lambda self: False))
    monkeypatch.delenv("COLUMNS", raising=False)
    assert cli._piped_console().width == 200
    monkeypatch.setenv("COLUMNS", "90")
    assert cli._piped_console().width == 90
    monkeypatch.setenv("COLUMNS", "wide")
    assert cli._piped_console().width == 200


def test_serve_reads_its_key_from_vllm_api_key_as_vllm_does(tmp_path, tiny, monkeypatch):
    """vLLM guards its routes with `args.api_key or envs.VLLM_API_KEY`: a key kept out of
    the process list (`ps` shows --api-key's). `unpact serve` read --api-key alone."""
    import unpact.serve
    from unpact.models import save_model

    save_model(tiny.model, tiny.tokenizer, tmp_path / "m")
    given: list[list[str]] = []

    def made(lm, name, generation, keys, *rest):
        given.append(keys)
        raise SystemExit(0)  # served no further

    monkeypatch.setattr(unpact.serve, "make_app", made)
    serve = ["serve", "--model", str(tmp_path / "m"), "--port", "0"]
    for env, args, keys in (
        ("env-key", [], ["env-key"]),
        ("env-key", ["--api-key", "flag-key"], ["flag-key"]),  # the option first, as vLLM
        ("", [], []),  # empty: unset
    ):
        monkeypatch.setenv("VLLM_API_KEY", env)
        assert CliRunner().invoke(app, serve + args).exit_code == 0
        assert given.pop() == keys
    monkeypatch.setenv("VLLM_API_KEY", "two words")
    result = CliRunner().invoke(app, serve)
    assert "$VLLM_API_KEY (number 1) holds ' '" in " ".join(str(result.exception).split())


def test_output_in_an_encoding_short_of_unicode_escapes_what_it_lacks(monkeypatch):
    """With PYTHONIOENCODING=ascii (or a Windows console's cp1252) a Greek answer or item
    printed was a UnicodeEncodeError traceback after the work was done. What the
    encoding lacks is written as an escape; UTF-8 streams are left as they are."""
    import io
    import sys

    from unpact.cli import writes_any_text

    narrow = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    wide = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", narrow)
    monkeypatch.setattr(sys, "stderr", wide)
    writes_any_text()
    print("Αθήνα", file=narrow, end="")
    narrow.flush()
    assert narrow.buffer.getvalue() == b"\\u0391\\u03b8\\u03ae\\u03bd\\u03b1"
    assert wide.errors == "strict"


def test_the_served_name_is_the_model_as_given_as_vllm_s(tiny, tmp_path, monkeypatch):
    """vLLM serves a model under `--model` as given unless `--served-model-name` names it
    (`get_served_model_name`); `unpact serve` served every model as "default", so that a
    client written for vLLM (openai:FOLDER@URL) met a 404. A hub id at a revision is served
    under the id, as vLLM's `--model ID --revision REV`."""
    import unpact.models
    import unpact.serve
    from unpact.models import save_model

    save_model(tiny.model, tiny.tokenizer, tmp_path / "m")
    named: list[str] = []

    def made(lm, name, generation, keys, *rest):
        named.append(name)
        raise SystemExit(0)  # served no further

    monkeypatch.setattr(unpact.serve, "make_app", made)
    monkeypatch.setattr(unpact.models, "hub_snapshot", lambda repo, rev: tmp_path / "m")
    for given, name in (
        ([str(tmp_path / "m")], str(tmp_path / "m")),
        (["me/tiny@v2"], "me/tiny"),
        (["me/tiny@v2", "--served-model-name", "smol"], "smol"),
        (["me/tiny@v2", "--name", "smol"], "smol"),
    ):
        done = CliRunner().invoke(app, ["serve", "--port", "0", "--model", *given])
        assert done.exit_code == 0, done.output
        assert named.pop() == name


def test_serve_s_max_num_seqs_reaches_the_app_and_is_at_least_one(tiny, tmp_path, monkeypatch):
    import unpact.serve
    from unpact.models import save_model

    save_model(tiny.model, tiny.tokenizer, tmp_path / "m")
    sizes: list[int] = []

    def made(lm, name, generation, keys, max_num_seqs):
        sizes.append(max_num_seqs)
        raise SystemExit(0)  # served no further

    monkeypatch.setattr(unpact.serve, "make_app", made)
    for given, size in (([], 16), (["--max-num-seqs", "1"], 1), (["--max-num-seqs", "64"], 64)):
        done = CliRunner().invoke(
            app, ["serve", "--port", "0", "--model", str(tmp_path / "m"), *given]
        )
        assert done.exit_code == 0, done.output
        assert sizes.pop() == size
    done = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "m"), "--max-num-seqs", "0"])
    assert done.exit_code == 2 and "--max-num-seqs" in done.output and not sizes
