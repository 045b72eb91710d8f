"""Integration: the embedded default model (SmolLM2-135M-Instruct), its cache, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.unit.test_scoring import reference_logprobs
from unpact.models import default_gguf, gguf_cache, load_model
from unpact.scoring import answer_logprobs, generate, score

pytestmark = pytest.mark.integration

QUESTIONS = [
    ("What is the capital of France?", " Paris"),
    ("What is the chemical symbol for gold? Answer with the symbol only.", "Au"),
    ("Name the largest planet of the solar system.", "The largest planet is Jupiter."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare"),
]


def test_greedy_answers_paris(default_lm):
    ((answer,),) = generate(default_lm, ["What is the capital of France?"])
    assert "Paris" in answer.text


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_loads_and_scores_in_half_precision(default_lm, dtype):
    """Every load in bfloat16 was refused as an architecture whose logits are not its head
    applied to its last hidden state: the check applied the head to the last position
    alone, which a bfloat16 matmul rounds one step (0.0625) off the forward's."""
    half = load_model("default", dtype=dtype)
    ((answer,),) = generate(half, ["What is the capital of France?"])
    assert "Paris" in answer.text
    (got,), (full,) = (
        score(lm, ["What is the capital of France?"], [" Paris"]) for lm in (half, default_lm)
    )
    assert got.lp == pytest.approx(full.lp, abs=0.1)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_scoring_equals_one_at_a_time(default_lm, padding_side):
    prompts = [default_lm.encode_prompt(q).input_ids for q, _ in QUESTIONS]
    prompts.append(
        default_lm.encode_prompt("Paris is the capital of", chat_template=False).input_ids
    )
    answers = [default_lm.encode_answer(a) for _, a in QUESTIONS] + [
        default_lm.encode_answer(" France")
    ]
    got = answer_logprobs(
        default_lm.model, prompts, answers, padding_side=padding_side, token_budget=100
    )
    for p, a, lp in zip(prompts, answers, got):
        torch.testing.assert_close(
            lp, reference_logprobs(default_lm.model, p, a), atol=1e-4, rtol=0
        )


def test_the_right_answer_scores_higher(default_lm):
    right, wrong = score(default_lm, ["What is the capital of France?"] * 2, ["Paris", "Berlin"])
    assert right.lp > wrong.lp + 1.0


def test_chat_segments_tokenise_like_the_whole_rendered_prompt(default_lm):
    tok = default_lm.tokenizer
    for q, _ in QUESTIONS:
        enc = default_lm.encode_prompt(q)
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        assert list(enc.input_ids) == tok(rendered, add_special_tokens=False)["input_ids"]


def test_cache_built_once_reused_and_rebuilt_when_corrupt(
    default_lm, tmp_path, monkeypatch, caplog, printed
):
    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path))
    ids = torch.tensor([default_lm.encode_prompt("What is the capital of France?").input_ids])
    with torch.no_grad():
        expected = default_lm.model(ids).logits

    printed()
    folder = gguf_cache(default_gguf())  # first use: builds
    # transformers' own tensor bar printed a line per update into logs; the status says it
    assert "Converting and de-quantizing" not in printed()
    assert folder.parent == tmp_path / "models"
    manifest = json.loads((folder / "unpact-manifest.json").read_text())
    assert "model.safetensors" in manifest["files"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp")]

    import unpact.models as models

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was rebuilt although it was whole")

    with monkeypatch.context() as m:
        m.setattr(models, "_build_gguf_cache", no_rebuild)
        second = load_model("default")
    with torch.no_grad():
        assert torch.equal(second.model(ids).logits, expected)

    weights = folder / "model.safetensors"
    with weights.open("r+b") as fh:  # flip one byte deep inside the tensor data
        fh.seek(weights.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level("WARNING"):
        rebuilt = load_model("default")
    assert "does not match its checksum" in caplog.text
    with torch.no_grad():
        assert torch.equal(rebuilt.model(ids).logits, expected)


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "unpact", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_generate_and_score(default_lm):
    gen = run_cli("generate", "--prompt", "What is the capital of France?")
    assert gen.returncode == 0, gen.stderr
    assert "Paris" in gen.stdout

    sc = run_cli("score", "--prompt", "What is the capital of France?", "--answer", "Paris")
    assert sc.returncode == 0, sc.stderr
    (expected,) = score(default_lm, ["What is the capital of France?"], ["Paris"])
    assert f"LP (mean log-prob over 1 token) = {expected.lp:.4f}" in sc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["score", "--prompt", "hi", "--answer", " "], "empty answer"),
        (["score", "--prompt", "", "--answer", "x"], "empty prompt"),
        (["generate", "--prompt", "hi", "--model", "./nowhere"], "no such file or directory"),
        (["generate", "--prompt", "hi", "--model", "nobody/nothing"], "resolves to nothing"),
        (["score", "--prompt", "word " * 9000, "--answer", "x"], "longer than the model's context"),
    ],
)
def test_cli_user_mistakes_exit_2_without_traceback(args, message):
    res = run_cli(*args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert message in res.stderr
    assert "Traceback" not in res.stderr
