"""The command line in real subprocesses: `python -m unpact ...` (its entry point turns a user
mistake into one message and exit code 2) and `accelerate launch` with two processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.unit.test_gradient import ANSWERS, PROMPTS
from unpact.gradient import gradient_attributions, spearman, top_k_overlap
from unpact.testing import tiny_model

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny.model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    return path


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    cmd = [sys.executable, "-m", "unpact", "attribute", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_cli_attribute_with_gradient_checks(tiny, tiny_dir, tmp_path):
    """`unpact attribute --gradient ...` = gradient_attributions and the agreement statistics
    on the record's own units and answer tokens, printed and in the JSON record."""
    out = tmp_path / "a.json"
    res = _cli(
        *("--model", str(tiny_dir), "-p", PROMPTS[0], "-a", ANSWERS[0], "--json", str(out)),
        *("--gradient", "grad_x_input", "--gradient", "integrated_gradients"),
        *("--ig-steps", "8", "--ig-baseline", "zero", "--top-k", "2"),
    )
    assert res.returncode == 0, res.stderr
    assert "Spearman" in res.stdout and "top-2 overlap" in res.stdout
    record = json.loads(out.read_text())
    contributions = record["contributions"]
    for method in ("grad_x_input", "integrated_gradients"):
        (g,) = gradient_attributions(
            tiny, PROMPTS[:1], ANSWERS[:1], method=method, steps=8, ig_baseline="zero"
        )
        got = record["gradient"][method]
        assert got["scores"] == pytest.approx(g.scores, abs=1e-5)
        assert got["spearman"] == pytest.approx(spearman(g.scores, contributions), abs=1e-6)
        assert got["top_k_overlap"] == top_k_overlap(g.scores, contributions, 2)
    assert record["gradient"]["integrated_gradients"]["steps"] == 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gradient", "saliency"], "--gradient 'saliency'"),
        (["--gradient", "integrated_gradients", "--ig-baseline", "one"], "--ig-baseline 'one'"),
        (["--gradient", "grad_x_input", "--top-k", "0"], "at least 1"),
        # an option of another one left out was ignored without a word
        (["--ig-steps", "8"], "--ig-steps applies to --gradient integrated_gradients"),
        (["--gradient", "grad_x_input", "--ig-baseline", "zero"], "--ig-baseline applies to"),
        (["--top-k", "2"], "--top-k applies to --gradient checks"),
        (["--baseline-token-id", "5"], "--baseline-token-id applies to --baseline token"),
        (["--max-new-tokens", "-1"], "Invalid value for '--max-new-tokens'"),  # was taken
    ],
)
def test_cli_gradient_mistakes_exit_2(tiny_dir, args, message):
    res = _cli("--model", str(tiny_dir), "-p", PROMPTS[0], "-a", ANSWERS[0], *args)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def _cli_run(args: list[str], out: Path, launcher: list[str]) -> list[dict]:
    # TMPDIR: torch elastic's launcher leaves its log folders (torchelastic_*) there
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(out.parent)}
    cmd = [*launcher, "unlearn", *args, "--out", str(out), "--no-eval"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    first = ""
    if proc.returncode != 0 and _killed_by_signal(proc.stderr):
        # Once in six full suites of one session (never in 22 runs of this launch alone,
        # idle or beside two busy processes) a worker died of SIGABRT with nothing of
        # unpact's reported (the cause was cut from the output kept): asked once more,
        # from a clean folder. A fault of unpact's own fails both times; both are shown,
        # with the lines that name a crash's cause.
        first = proc.stderr[-3000:]
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    # a worker's own message (e.g. "error: ...") comes before the launcher's trace
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if "error:" in line.lower()]
    causes = [line for line in lines if any(w in line for w in _CRASH_WORDS)]
    assert proc.returncode == 0, "\n".join(
        [*errors[-10:], *causes[-10:], first, proc.stderr[-2000:]]
    )
    return [json.loads(x) for x in (out / "losses.jsonl").read_text().splitlines()]


# what a worker that crashed (rather than raised) says before the launcher's summary
_CRASH_WORDS = ("terminate called", "what():", "Aborted", "gloo", "Segmentation fault")


def _killed_by_signal(stderr: str) -> bool:
    """Whether accelerate's launcher reports a worker killed by SIGABRT or SIGSEGV (not a
    worker that exited with an error of its own)."""
    return "ChildFailedError" in stderr and ("(SIGABRT)" in stderr or "(SIGSEGV)" in stderr)


def test_two_processes_follow_the_one_process_loss_curve(bench, tmp_path):
    """`accelerate launch` with 2 CPU processes (DDP over gloo) and one process with the
    same global batch give the same loss at every step (within 1e-4)."""
    model_dir = tmp_path / "tiny"
    lm = tiny_model(seed=3)
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    args = [
        "--model", str(model_dir), "--benchmark", str(bench), "--method", "npo_kl",
        "--set", "steps=5", "--set", "lr=1e-3", "--set", "batch_size=4",
    ]  # fmt: skip
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    import socket

    with socket.socket() as s:  # a free port, not the default 29500 another run may hold
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    two = _cli_run(
        args,
        tmp_path / "two",
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--main_process_port", port,
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "unpact"],
    )  # fmt: skip
    one = _cli_run(args, tmp_path / "one", [sys.executable, "-m", "unpact"])
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        for key in ("forget_npo", "retain_kl", "loss"):
            assert abs(a[key] - b[key]) <= 1e-4, (a["step"], key, a[key], b[key])
    # the curve moves, so agreement is not trivial
    assert abs(one[-1]["forget_npo"] - one[0]["forget_npo"]) > 1e-2
    cfg = (tmp_path / "two" / "config.yaml").read_text()
    assert "processes: 2" in cfg


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "npo", "--set", "beta=-1"], "settings.beta"),
        (["--method", "npo", "--set", "betta=1"], "unknown setting for npo"),
        (["--method", "npo", "--set", "oops"], "expected key=value"),
        (
            ["--method", "npo", "--set", "lr=[2e-5"],
            "the value after = cannot be read",
        ),  # once yaml's traceback
        (["--method", "npo", "--chat-template", "no.jinja"], "--chat-template: cannot read"),
        (
            ["--method", "npo", "--chat-template", "{{ 'no message' }}"],
            "--chat-template: chat template (given as text): it does not place",
        ),
        (["--method", "npo", "--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_cli_user_mistakes_give_one_message_and_exit_2(args, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "unpact", "unlearn", *args, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_passes_precision_and_rejects_an_unknown_one(monkeypatch):
    from pathlib import Path

    from typer.testing import CliRunner

    import unpact.inject
    from unpact.cli import app
    from unpact.inject import InjectResult

    # the real command (its entry point turns a user mistake into exit 2): no model loads
    cmd = [sys.executable, "-m", "unpact", "inject", "--precision", "fp8"]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown precision 'fp8'" in bad.stderr

    runner = CliRunner()

    seen = []

    def fake(model, benchmark, config, teach="forget+retain"):
        seen.append(config)
        return InjectResult(Path("x"), {"forget": 1.0}, {}, 1, 0.0, True)

    monkeypatch.setattr(unpact.inject, "inject", fake)
    assert runner.invoke(app, ["inject", "--precision", "fp32"]).exit_code == 0
    assert runner.invoke(app, ["inject"]).exit_code == 0
    assert [c.precision for c in seen] == ["fp32", "auto"]
    # the answer length its judge reads (a run's inject.settings.max_new_tokens)
    assert runner.invoke(app, ["inject", "--max-new-tokens", "40"]).exit_code == 0
    assert seen[-1].max_new_tokens == 40 and seen[0].max_new_tokens == 24
    # every other setting with --set, as `unpact unlearn` takes its own (the options
    # reached 11 of the 25; min_epochs, trainable, general, checkpoint_every... did not)
    sets = ["min_epochs=2", "trainable=mlp", "general=null", "lr_decay_to=1"]
    done = runner.invoke(app, ["inject", *(a for s in sets for a in ("--set", s))])
    assert done.exit_code == 0, done.output
    c = seen[-1]
    assert (c.min_epochs, c.trainable, c.general, c.lr_decay_to) == (2, "mlp", None, 1)
    assert runner.invoke(app, ["inject", "--device", "cpu", "--set", "seed=3"]).exit_code == 0
    assert (seen[-1].device, seen[-1].seed) == ("cpu", 3)
    for args, said in [
        (["--set", "min_epoch=2"], "--set min_epoch: not an injection setting; known: lr,"),
        (["--set", "lr=1", "--lr", "2"], "--set lr and --lr both given"),
        (["--set", "lr"], "expected key=value"),
        (["--set", "lr=[1"], "the value after = cannot be read"),
        (["--set", "trainable=all_of_it"], "unknown trainable 'all_of_it'"),
    ]:
        done = runner.invoke(app, ["inject", *args])
        assert done.exit_code != 0 and said in " ".join(str(done.exception).split()), args


def test_a_run_config_and_the_cli_take_a_real_benchmark(tmp_path):
    import subprocess
    import sys

    from unpact.run import load_config

    spec = f"tofu:{FIXTURES / 'tofu'}"
    config = load_config({"data": {"benchmark": spec}, "methods": [{"method": "ga"}]})
    assert config.data.benchmark == spec
    done = subprocess.run(
        [sys.executable, "-m", "unpact", "data", "show", "tofu:tests/fixtures/tofu"],
        capture_output=True,
        text=True,
        cwd=FIXTURES.parent.parent,
    )
    assert done.returncode == 0 and "tofu-forget01: 6 items" in done.stdout


def _unpact(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNPACT_CACHE": str(cwd / "cache")}
    cmd = [sys.executable, "-m", "unpact", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_bad_files_and_folders_are_one_message_and_exit_2(tmp_path, tiny):
    """What a new user tries: an --out that is a file, a .gguf that is not one, a model
    folder of pickle weights, an output file where a folder is; each is one message, exit
    2, no traceback, before any model loads or anything is written."""
    import torch

    (tmp_path / "afile").write_text("mine\n")
    (tmp_path / "x.gguf").write_text("not a gguf\n")
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(12))  # a cut download
    pickled = tmp_path / "pickled"
    tiny.model.config.save_pretrained(pickled)
    tiny.tokenizer.save_pretrained(pickled)
    torch.save(tiny.model.state_dict(), pickled / "pytorch_model.bin")
    (tmp_path / "adir").mkdir()
    tiny.model.save_pretrained(tmp_path / "tinymodel")
    tiny.tokenizer.save_pretrained(tmp_path / "tinymodel")
    unlearned_config = "format: 1\nmodel: tinymodel\nbenchmark: news\nmethod: ga\n"
    (tmp_path / "unlearned").mkdir()
    (tmp_path / "unlearned" / "config.yaml").write_text(unlearned_config)
    tiny.model.save_pretrained(tmp_path / "unlearned" / "model")
    tiny.tokenizer.save_pretrained(tmp_path / "unlearned" / "model")
    words = " ".join(["word"] * 20)
    cases = [
        (
            ["attribute", "-p", words, "-a", "x", "--model", "tinymodel", "--max-work", "50"],
            "over the limit of 50",
        ),
        (["run", "demo", "--out", "afile"], "--out afile: a file is there"),
        # a run's files once went into any folder, a model's among them
        (["run", "demo", "--out", "tinymodel"], "and no unpact run; give a new folder"),
        (["demo", "--out", "afile"], "--out afile: a file is there"),
        # an `unpact unlearn` run's folder: its config.yaml was overwritten by the run's
        (["run", "demo", "--out", "unlearned"], "holds an `unpact unlearn` run"),
        (
            [
                *("audit", "--original", "tinymodel", "--unlearned", "unlearned/model"),
                *("--benchmark", "news", "--out", "unlearned"),
            ],
            "holds an `unpact unlearn` run",
        ),
        (["unlearn", "--method", "ga", "--out", "afile", "--no-eval"], "a file is there"),
        # a file where a parent folder goes: NotADirectoryError, inject's after training
        (["run", "demo", "--out", "afile/run"], "--out afile/run: afile is a file"),
        (["unlearn", "--method", "ga", "--out", "afile/u", "--no-eval"], "afile is a file"),
        (["inject", "--model", "tinymodel", "--out", "afile/m"], "afile is a file"),
        (["generate", "-p", "hi", "--model", "x.gguf"], "x.gguf is not a GGUF file"),
        (["generate", "-p", "hi", "--model", "cut.gguf"], "cannot read the GGUF file"),
        (["generate", "-p", "hi", "--model", str(pickled)], "holds only pickle weights"),
        (["generate", "-p", "hi", "--temperature", "0.5"], "give --sample N as well"),
        # a seed for a greedy answer was ignored, and a negative one taken (a config's is not)
        (["generate", "-p", "hi", "--seed", "3"], "--seed applies to samples: give --sample N"),
        (["generate", "-p", "hi", "--sample", "2", "--seed", "-1"], "Invalid value for '--seed'"),
        (["attribute", "-p", "hi there", "--json", "adir"], "--json adir: a folder is there"),
        (["attribute", "-p", "hi there", "--html", "no/x.html"], "no folder no"),
        (["attribute", "--data", "adir"], "cannot read adir: it is a folder"),
        (["data", "show", "afile"], "afile is a file, not a benchmark folder"),
        (["run", "latin1.yaml", "--out", "r"], "cannot read latin1.yaml: not UTF-8 text"),
        # an answer its 32-token judge can never read: 0% before and after, once, after training
        (
            ["unlearn", "--method", "ga", "--model", "tinymodel", "--benchmark", "long"],
            "the evaluation's answer length is 32, but 1 answer(s) take more tokens",
        ),
    ]
    (tmp_path / "latin1.yaml").write_bytes("methods: [{method: ga}]  # caf\xe9\n".encode("latin-1"))
    from unpact.data.items import QAItem, write_folder

    sentence = " ".join(["the glassworks was founded by the brothers"] * 4)
    items = [
        QAItem("f", "Who founded it?", sentence, "forget"),
        QAItem("r", "Sky?", "blue", "retain"),
    ]
    write_folder(tmp_path / "long", items)
    # two at a time (each a fresh process, most of it imports): the slowest test, 60 s serial
    with ThreadPoolExecutor(2) as pool:
        finished = list(pool.map(lambda case: _unpact(*case[0], cwd=tmp_path), cases))
    for (args, message), done in zip(cases, finished, strict=True):
        assert done.returncode == 2, (args, done.stderr[-800:])
        assert message in " ".join(done.stderr.split()), (args, done.stderr)
        assert "Traceback" not in done.stderr, args
    assert (tmp_path / "afile").read_text() == "mine\n"
    assert (tmp_path / "unlearned" / "config.yaml").read_text() == unlearned_config
    assert not list((tmp_path / "cache").rglob(".tmp-*"))  # the cut GGUF left no half cache


def test_a_hub_id_without_a_reachable_hub_fails_at_once_without_retry_warnings(tmp_path):
    """A mistyped folder name is a hub id; on a machine without the hub, loading it used to
    retry each request five times with backoff (about 45 s) and print each retry as a
    warning before the error. Now one connection attempt says the hub is unreachable and
    the local hub cache alone is read."""
    import socket

    with socket.socket() as s:  # a local port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf")}
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "unpact", "generate", "-p", "hi", "--model", "mistyped-folder"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-800:]
    said = " ".join(done.stderr.split())
    assert f"http://127.0.0.1:{port} cannot be reached" in said, said
    assert "not in the local hub cache" in said
    assert "Retrying" not in done.stderr and "WARNING" not in done.stderr, done.stderr[-800:]


def _hub_snapshot(hf_home: Path, repo: str, commit: str, model: Path) -> None:
    """`model`'s files as the local hub cache holds `repo` at `commit`, its `main`."""
    import shutil

    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model, folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)


def test_a_hub_id_is_keyed_by_the_commit_it_loads(tiny_dir, tmp_path):
    """A hub id's cache key was its name alone: a model pushed again under the same id was
    read from the cached stages of the one before. Now the key holds the commit `main`
    resolves to: the hub's answer (a fake endpoint here), else the local hub cache's."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hf = tmp_path / "hf"
    _hub_snapshot(hf, "me/tiny", "a" * 40, tiny_dir)
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf)}
    code = "from unpact.models import model_key; print(model_key('me/tiny'))"

    def key(env):
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
        )
        assert done.returncode == 0, done.stderr[-800:]
        return done.stdout.strip()

    first = key(offline)
    # the hub id loads from the local hub cache, offline
    cmd = [sys.executable, "-m", "unpact", "generate", "-p", "hi", "--model", "me/tiny"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=offline, timeout=300)
    assert done.returncode == 0, done.stderr[-800:]
    _hub_snapshot(hf, "me/tiny", "b" * 40, tiny_dir)  # pushed again: main moved
    second = key(offline)
    assert second != first

    class Hub(BaseHTTPRequestHandler):  # the hub's model info, commit c...c
        def do_GET(self):
            data = json.dumps({"id": "me/tiny", "sha": "c" * 40}).encode()
            self.send_response(200 if self.path.startswith("/api/models/me/tiny") else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    online = {
        k: v for k, v in offline.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    online["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        online.pop(proxy, None)
    try:
        assert key(online) not in (first, second)
    finally:
        server.shutdown()
        server.server_close()


def test_serve_port_0_prints_the_port_it_listens_on_and_a_busy_port_is_exit_2(tiny_dir):
    """`unpact serve --port 0` once printed ...:0/v1, a URL no client can use; a port
    another program holds was a uvicorn log line and exit 1. vLLM's `--served-model-name`
    names the model as `--name` does."""
    import re
    import urllib.request

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "unpact", "serve", "--model", str(tiny_dir), "--port"]
    template = "{% for m in messages %}Q: {{ m['content'] }}{% endfor %}A:"  # as vLLM's option
    server = subprocess.Popen(
        [*cmd, "0", "--chat-template", template, "--served-model-name", "smol"],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        lines = [server.stderr.readline() for _ in range(2)]  # the path may wrap it
        found = re.search(r"127\.0\.0\.1:(\d+)/v1", "".join(lines))
        assert found, lines
        port = int(found.group(1))
        assert port != 0, lines
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=60) as r:
            assert json.load(r)["data"][0]["id"] == "smol"  # vLLM's option name
        body = {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": True}
        asked = urllib.request.Request(
            f"http://127.0.0.1:{port}/tokenize",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(asked, timeout=60) as r:
            tokens = json.load(r)["tokens"]
        busy = subprocess.run([*cmd, str(port)], capture_output=True, text=True, env=env)
    finally:
        server.terminate()
        server.wait(timeout=30)
        server.stderr.close()
    assert busy.returncode == 2, busy.stderr[-800:]
    assert f"--port {port}: cannot listen on 127.0.0.1" in busy.stderr
    assert "Traceback" not in busy.stderr
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_dir).decode(tokens) == "Q: hiA:"
    bad = subprocess.run(
        [*cmd, "0", "--chat-template", "nope.jinja"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "--chat-template: cannot read nope.jinja" in bad.stderr


def test_generate_score_and_attribute_take_a_chat_template_file(tiny, tiny_dir, tmp_path):
    """`--chat-template FILE` on the one-prompt commands asks the templated copy, as
    `audit`, `inject`, `unlearn` and `serve` do (they had only a switch between the model's
    own template and raw prompts); given with `--no-chat-template` it is one message."""
    from tests.unit.test_models import QA_TEMPLATE
    from unpact.models import LanguageModel, render_chat
    from unpact.scoring import score

    template = tmp_path / "qa.jinja"
    template.write_text(QA_TEMPLATE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    env["UNPACT_CACHE"] = str(tmp_path / "cache")
    base = [sys.executable, "-m", "unpact", "score", "--model", str(tiny_dir)]
    args = ["-p", PROMPTS[0], "-a", "Mira Quintrell", "--chat-template", str(template)]
    res = subprocess.run([*base, *args], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    tok = tiny.tokenizer.__class__.from_pretrained(tiny_dir)
    tok.chat_template = QA_TEMPLATE
    (expected,) = score(LanguageModel(tiny.model, tok), PROMPTS[:1], ["Mira Quintrell"])
    assert f"= {expected.lp:.4f}" in res.stdout
    joined = tok(render_chat(tok, PROMPTS[0]) + "Mira Quintrell", add_special_tokens=False)
    assert expected.prompt.input_ids + expected.answer_ids == tuple(joined["input_ids"])
    assert repr(expected.answer_tokens[0]) in res.stdout
    both = subprocess.run(
        [*base, *args, "--no-chat-template"], capture_output=True, text=True, env=env, timeout=300
    )
    assert both.returncode == 2
    assert both.stderr.strip() == (
        "error: --chat-template and --no-chat-template together: give one of them"
    )
    out = tmp_path / "a.json"
    res = _cli("--model", str(tiny_dir), *args, "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["lp"] == pytest.approx(expected.lp, abs=1e-5)


_LOAD_AND_DROP = """
import gc, sys, weakref
gc.disable()  # as if Python's next full collection were far off
import unpact.models as models
models.COLLECT_AFTER_LOAD_BYTES = 0  # collect after any load (a large or GPU model's case)
lm = models.load_model(sys.argv[1])
alive = weakref.ref(lm.model)
del lm
print("alive" if alive() is not None else "freed")
"""


def test_a_dropped_model_is_freed_at_once(tiny_dir):
    """The first load of an architecture left a cycle of import frames holding the model:
    dropped by the runner, a 7B original stayed on the GPU until a full collection. In a
    new process (the first import of the model's module is what leaves the garbage)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_DROP, str(tiny_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "freed"


_SAMPLE_GPT2 = """
import sys
from unpact.models import load_model
from unpact.scoring import generate
lm = load_model(sys.argv[1])
generate(lm, ["What is it?"], max_new_tokens=8, num_samples=3, seed=1)
"""


def test_sampling_a_model_whose_pad_is_a_token_prints_no_library_warning(tmp_path):
    """GPT-2's family pads with a token it also samples: a sample that ended early feeds
    it back, and transformers' forward warned 'We strongly recommend passing in an
    `attention_mask`' in the middle of PROBAB's output, though the mask was passed."""
    from unpact.models import save_model
    from unpact.testing import tiny_other

    lm = tiny_other("gpt2", 0)
    save_model(lm.model, lm.tokenizer, tmp_path / "g2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _SAMPLE_GPT2, str(tmp_path / "g2")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "attention_mask" not in done.stderr


@pytest.mark.parametrize("setting", ["HF_HUB_DISABLE_PROGRESS_BARS", "HF_HUB_ENABLE_HF_TRANSFER"])
def test_the_hub_s_environment_settings_print_no_library_warning(tiny_dir, tmp_path, setting):
    """With $HF_HUB_DISABLE_PROGRESS_BARS=1 every load warned "Cannot enable progress
    bars" (unpact turned transformers' bars back on after a load, where the user had them
    off); $HF_HUB_ENABLE_HF_TRANSFER=1, which many clusters still set, a FutureWarning
    from the hub library at every command: a chat-templated copy (made, then loaded) and
    its answer, and nothing else."""
    template = "{% for m in messages %}Q: {{ m['content'] }}{% endfor %}A:"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNPACT_CACHE": str(tmp_path), setting: "1"}
    cmd = [sys.executable, "-m", "unpact", "generate", "-m", str(tiny_dir), "-p", "hi"]
    done = subprocess.run(
        [*cmd, "--chat-template", template, "--max-new-tokens", "3"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]


def test_a_run_under_a_multi_process_launch_is_refused_not_hung(tiny_dir, tmp_path):
    """`accelerate launch -m unpact run` with 2 processes once hung for good: each copy ran
    the whole pipeline, the first trained its unlearning under DDP and the other waited on
    that stage's lock instead of joining. Now each copy stops at once with one message."""
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_dir}\n"
        "data: {benchmark: news, forget_items: 2, retain_items: 2, general: null}\n"
        "inject: {enabled: false}\n"
        "methods: [{method: ga_gd, config: {steps: 2, batch_size: 2, retain_batch_size: 2}}]\n"
        "attacks: [{name: focus_on_key}]\n"
        "judge: {max_new_tokens: 24}\n"
        "membership: {enabled: false}\n"
    )
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "UNPACT_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)}  # fmt: skip
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "unpact", "run", str(config), "--out", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode != 0
    assert "a run needs a single process, and this is one of 2 launched" in proc.stderr.replace(
        "\n", " "
    ), proc.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "stages").exists()
    # the same check in one process (no launcher): the Python API and `unpact audit` too
    env["WORLD_SIZE"] = "2"
    for args in (
        ["run", str(config), "--out", str(tmp_path / "out")],
        ["audit", "--original", str(tiny_dir), "--unlearned", str(tiny_dir), "--benchmark",
         "news", "--out", str(tmp_path / "out")],
    ):  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "unpact", *args],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "needs a single process" in proc.stderr


def test_unlearn_trusts_a_checkpoint_s_own_code_only_when_told(tiny_dir, bench, tmp_path):
    """`unpact unlearn` had no --trust-remote-code: a model of its checkpoint's own code
    (auto_map) could not be unlearned. With it, the training, the evaluation before and
    after, and the saved model (with its code files) all work; without it, one message."""
    from tests.unit.test_models import own_code

    shutil.copytree(tiny_dir, tmp_path / "mine")
    own_code(tmp_path / "mine")
    args = ["--model", str(tmp_path / "mine"), "--benchmark", str(bench), "--method", "ga"]
    args += ["--set", "steps=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}

    def unlearn(*more: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "unpact", "unlearn", *args, *more]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)

    refused = unlearn("--out", str(tmp_path / "refused"))
    assert refused.returncode == 2 and "--trust-remote-code" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    done = unlearn("--out", str(tmp_path / "out"), "--trust-remote-code")
    assert done.returncode == 0, done.stderr
    assert "forget" in done.stdout and "Traceback" not in done.stderr
    saved = next((tmp_path / "out").rglob("modeling_mine.py")).parent
    assert json.loads((saved / "config.json").read_text())["model_type"] == "mine"


def test_run_and_inject_pass_trust_remote_code_on(monkeypatch, tmp_path):
    """`unpact run --trust-remote-code` sets the config's trust_remote_code (the run's
    loads trust the code); `unpact inject --trust-remote-code` loads within the trust."""
    from typer.testing import CliRunner

    import unpact.inject
    import unpact.run
    from unpact.cli import app
    from unpact.errors import UnpactError
    from unpact.models import remote_code_trusted

    seen: list[object] = []

    def fake_run(cfg, out, log=None, **_):
        seen.append(cfg.trust_remote_code)
        raise UnpactError("stopped")

    def fake_inject(model, benchmark, config, teach):
        seen.append(remote_code_trusted())
        raise UnpactError("stopped")

    monkeypatch.setattr(unpact.run, "run", fake_run)
    monkeypatch.setattr(unpact.inject, "inject", fake_inject)
    runner = CliRunner()
    for flag in ([], ["--trust-remote-code"]):
        for args in (["run", "demo", "--out", str(tmp_path / "r")], ["inject"]):
            assert str(runner.invoke(app, [*args, *flag]).exception) == "stopped"
    assert seen == [False, False, True, True]
    assert not remote_code_trusted()  # the command's trust ended with it


def test_a_lora_run_beside_bitsandbytes_prints_no_library_warning(tiny_dir, bench, tmp_path):
    """peft imports bitsandbytes whenever it is installed (as on most GPU machines), and
    bitsandbytes, on a CPU machine, logged that it could not fetch its CPU kernel from the
    hub, the `kernels` package that it skipped a trust check offline: two warnings on
    every LoRA unlearning. unpact quiets those loggers as it quiets torchao's."""
    pytest.importorskip("bitsandbytes")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "unpact", "unlearn", "--model", str(tiny_dir)]
    cmd += ["--benchmark", str(bench), "--method", "ga", "--no-eval", "--out", str(tmp_path)]
    cmd += ["--set", "steps=1", "--set", "lora.r=2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    assert "kernels" not in said and "WARNING" not in said and "Warning" not in said, said


def test_a_hub_revision_fetches_the_model_s_files_and_no_second_copy(tiny_dir, tmp_path):
    """`--model ORG/NAME@REV` from a hub (a fake one here, answering as the hub's API
    does): the revision's commit, its config, tokenizer and weights, and neither the
    second copy of the weights some repositories keep (Mistral's consolidated.safetensors)
    nor pickle weights; then offline, from the local hub cache, the same answer."""
    import hashlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    files = {p.name: p.read_bytes() for p in tiny_dir.iterdir() if p.is_file()}
    files |= {"consolidated.safetensors": files["model.safetensors"], "pytorch_model.bin": b"x"}
    commit, pickled, asked = "c" * 40, "d" * 40, []
    # each commit's files; a branch of a pickle-only upload beside it
    trees = {
        commit: files,
        pickled: {"config.json": files["config.json"], "pytorch_model.bin": b"x"},
    }
    refs = {"v2": commit, commit: commit, "pickles": pickled, pickled: pickled}

    def _sha1(data: bytes) -> str:  # a git blob's id, as the hub's tree lists it
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    class Hub(BaseHTTPRequestHandler):
        def send(self, code: int, body: bytes = b"", **headers: str) -> None:
            self.send_response(code)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key.replace("_", "-"), value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            path = self.path.split("?")[0]
            asked.append(path)
            kind, _, rest = path.removeprefix("/api/models/me/tiny/").partition("/")
            if kind == "revision" and rest in refs:
                sha, listed = refs[rest], trees[refs[rest]]
                found = {
                    "id": "me/tiny",
                    "sha": sha,
                    "siblings": [{"rfilename": f} for f in listed],
                }
                return self.send(200, json.dumps(found).encode(), Content_Type="application/json")
            if kind == "tree" and rest in trees:
                tree = [
                    {"type": "file", "path": f, "size": len(d), "oid": _sha1(d)}
                    for f, d in trees[rest].items()
                ]
                return self.send(200, json.dumps(tree).encode(), Content_Type="application/json")
            sha, _, name = path.removeprefix("/me/tiny/resolve/").partition("/")
            if name in trees.get(sha, {}):
                etag = f'"{hashlib.sha256(trees[sha][name]).hexdigest()}"'
                return self.send(200, trees[sha][name], X_Repo_Commit=sha, ETag=etag)
            return self.send(404, b"{}", X_Error_Code="RepoNotFound")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HOME": str(tmp_path)}
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "unpact", "generate", "-p", "hi", "--max-new-tokens", "4"]
    try:
        online = subprocess.run(
            [*cmd, "-m", "me/tiny@v2"], capture_output=True, text=True, env=env, timeout=300
        )
        pickles = subprocess.run(
            [*cmd, "-m", "me/tiny@pickles"], capture_output=True, text=True, env=env, timeout=300
        )
    finally:
        server.shutdown()
    said = " ".join(pickles.stderr.split())
    assert pickles.returncode == 2, said
    assert f"the hub's me/tiny holds no safetensors weights at {pickled}" in said
    assert online.returncode == 0, online.stderr[-800:]
    fetched = {p.rsplit("/", 1)[-1] for p in asked if f"/resolve/{commit}/" in p}
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= fetched, fetched
    assert not {"consolidated.safetensors", "pytorch_model.bin"} & fetched, fetched
    env["HF_HUB_OFFLINE"] = "1"
    offline = subprocess.run(
        [*cmd, "-m", f"me/tiny@{commit}"], capture_output=True, text=True, env=env, timeout=300
    )
    local = subprocess.run(
        [*cmd, "-m", str(tiny_dir)], capture_output=True, text=True, env=env, timeout=300
    )
    assert offline.returncode == 0, offline.stderr[-800:]
    assert offline.stdout == online.stdout == local.stdout != ""
