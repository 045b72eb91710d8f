"""Training on a GPU under torch's deterministic algorithms (`unpact.determinism`): the same
unlearning twice on an H200 gave other weights (CUDA's index_add_ and memory-efficient
attention's backward add with atomics). Here, on any device: the settings given back, and a
step torch refuses for want of a deterministic kernel done again and said once."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from unpact import determinism
from unpact.determinism import (
    CUBLAS_WORKSPACE,
    deterministic_kernels,
    kernels_for,
    refused_nondeterminism,
    reproducibly,
    set_environment,
)
from unpact.testing import tiny_model
from unpact.train import Trainer

# torch's own words (ATen's alertNotDeterministic) for an operation without a deterministic
# CUDA kernel, as transformers' grouped experts meet it in torch.histc
REFUSAL = (
    "histc_cuda does not have a deterministic implementation, but you set "
    "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this "
    "operation, or you can use the 'warn_only=True' option, if that's acceptable for your "
    "application."
)


def test_import_asks_for_cublas_fixed_workspace_and_keeps_the_users_own(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    set_environment()
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    set_environment()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.mark.parametrize("caller", [(False, False), (True, True)], ids=["off", "warn-only"])
def test_deterministic_kernels_give_the_callers_settings_back(caller):
    cudnn = torch.backends.cudnn
    torch.use_deterministic_algorithms(caller[0], warn_only=caller[1])
    was = cudnn.deterministic, cudnn.benchmark
    try:
        with deterministic_kernels():
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            assert cudnn.deterministic and not cudnn.benchmark
            with deterministic_kernels(strict=False):
                assert torch.is_deterministic_algorithms_warn_only_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled() == caller[0]
        assert torch.is_deterministic_algorithms_warn_only_enabled() == caller[1]
        assert (cudnn.deterministic, cudnn.benchmark) == was
    finally:
        torch.use_deterministic_algorithms(False)


def test_torch_s_refusals_are_recognised_and_nothing_else():
    assert refused_nondeterminism(RuntimeError(REFUSAL))
    cublas = (
        "Deterministic behavior was enabled with either `torch.use_deterministic_algorithms"
        "(True)` or `at::Context::setDeterministicAlgorithms(true)`, but this operation is not "
        "deterministic because it uses CuBLAS and you have CUDA >= 10.2. To enable "
        "deterministic behavior in this case, you must set an environment variable before "
        "running your PyTorch application: CUBLAS_WORKSPACE_CONFIG=:4096:8"
    )
    assert refused_nondeterminism(RuntimeError(cublas))
    assert not refused_nondeterminism(RuntimeError("CUDA out of memory"))
    assert not refused_nondeterminism(ValueError(REFUSAL))


def _step_twice(refuse_first: bool, kernels: str) -> tuple[list[torch.Tensor], Trainer]:
    lm = tiny_model(seed=2)
    lm.model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]], device=lm.device)
    trainer = Trainer(list(lm.model.parameters()), lr=1e-2, what="injection")
    trainer.kernels = kernels
    calls = []

    def losses() -> dict[str, torch.Tensor]:
        calls.append(torch.are_deterministic_algorithms_enabled())
        loss = lm.model(input_ids=ids, labels=ids).loss
        if refuse_first and len(calls) == 1:
            loss.backward()  # a gradient half made when torch refuses, as in a backward pass
            raise RuntimeError(REFUSAL)
        return {"nll": loss}

    trainer.step(losses, 0)
    trainer.step(losses, 1)
    return [p.detach().cpu().clone() for p in lm.model.parameters()], trainer


def test_a_step_torch_refuses_is_done_again_without_strictness_and_said_once(caplog, monkeypatch):
    """The refused step's half-made gradient is dropped: the weights are those of the same
    two steps never refused; every later step runs warn-only, torch's warning not shown."""
    monkeypatch.setattr(determinism, "_REFUSED", set())
    plain, _ = _step_twice(refuse_first=False, kernels="loose")
    with caplog.at_level(logging.WARNING, logger="unpact"):
        refused, trainer = _step_twice(refuse_first=True, kernels="strict")
    assert trainer.kernels == "loose"
    assert all(torch.equal(a, b) for a, b in zip(plain, refused))
    said = [r.getMessage() for r in caplog.records if r.name == "unpact"]
    assert said == [
        "injection: not bit-reproducible on this device: histc_cuda does not have a "
        f"deterministic implementation{REFUSAL.split('implementation', 1)[1]}"
    ]
    assert not torch.are_deterministic_algorithms_enabled()  # given back after each step


def test_a_refusal_is_said_once_per_computation_and_later_ones_start_loose(caplog, monkeypatch):
    monkeypatch.setattr(determinism, "_REFUSED", set())
    assert kernels_for("cuda:1", "GradNorm") == "strict"
    assert kernels_for(torch.device("cpu"), "GradNorm") == "default"
    modes = []

    def refused_when_strict() -> int:
        modes.append(torch.is_deterministic_algorithms_warn_only_enabled())
        if not modes[-1]:
            raise RuntimeError(REFUSAL)
        return 7

    with caplog.at_level(logging.WARNING, logger="unpact"):
        assert reproducibly(refused_when_strict, "strict", "GradNorm") == (7, "loose")
        assert kernels_for("cuda", "GradNorm") == "loose"
        assert kernels_for("cuda", "Gradient x input") == "strict"
        assert reproducibly(refused_when_strict, "strict", "GradNorm") == (7, "loose")
    assert modes == [False, True, False, True]
    assert len([r for r in caplog.records if r.name == "unpact"]) == 1


def test_gradient_attributions_and_gradnorm_run_under_the_devices_kernels(monkeypatch):
    """On a GPU ("strict") they run under torch's deterministic algorithms; on a CPU those
    change none of their numbers."""
    import unpact.gradient as gradient
    import unpact.membership_scores as scores

    lm = tiny_model(seed=4)
    prompts, answers = ["Who wrote it?", "Where is it?"], [" Ann", " Rome"]
    plain = gradient.gradient_attributions(lm, prompts, answers, method="grad_x_input")
    norms = scores.gradient_norms(lm, prompts, answers)
    batched = scores.gradient_norms_batched(lm, prompts, answers)
    seen = []
    for module in (gradient, scores):
        monkeypatch.setattr(module, "kernels_for", lambda device, what: "strict")
    one, chunk = gradient._one, scores._ghost_chunk

    def spy(fn):
        def wrapped(*args, **kwargs):
            seen.append(torch.are_deterministic_algorithms_enabled())
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(gradient, "_one", spy(one))
    monkeypatch.setattr(scores, "_ghost_chunk", spy(chunk))
    monkeypatch.setattr(scores, "_weight_gradients", spy(scores._weight_gradients))
    strict = gradient.gradient_attributions(lm, prompts, answers, method="grad_x_input")
    assert [a.scores for a in strict] == [a.scores for a in plain]
    assert scores.gradient_norms(lm, prompts, answers) == norms
    assert scores.gradient_norms_batched(lm, prompts, answers) == batched
    assert seen == [True] * 5 and not torch.are_deterministic_algorithms_enabled()


def test_other_errors_of_a_strict_step_are_raised_as_they_are():
    lm = tiny_model(seed=2)
    trainer = Trainer(list(lm.model.parameters()), lr=1e-2)
    trainer.kernels = "strict"

    def losses() -> dict[str, torch.Tensor]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        trainer.step(losses, 0)
    assert trainer.kernels == "strict"
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_gpu_trains_under_deterministic_kernels_a_cpu_under_its_own():
    """The CPU's kernels are deterministic already (MKL's strict mode does the rest)."""
    p = torch.nn.Parameter(torch.zeros(3))
    assert Trainer([p], lr=1e-3).kernels == "default"
    if torch.cuda.is_available():
        q = torch.nn.Parameter(torch.zeros(3, device="cuda"))
        assert Trainer([q], lr=1e-3).kernels == "strict"


def test_an_artefact_is_made_elsewhere_by_its_cpu_its_gpus_or_a_release():
    from unpact.determinism import made, made_elsewhere

    now = made()
    assert made_elsewhere(now, now) is None
    cpu = {**now, "machine": {**now["machine"], "cpu_kernels": "AVX2_OTHER"}}
    assert made_elsewhere(cpu, now) == {"machine": cpu["machine"]}
    # made on a GPU, read by a run on the CPU (or on other GPUs)
    gpu = {**now, "machine": {**now["machine"], "gpus": ["NVIDIA H100 80GB HBM3"]}}
    assert made_elsewhere(gpu, now) == {"machine": gpu["machine"]}
    assert made_elsewhere(gpu, gpu) is None
    two = {**now, "machine": {**now["machine"], "gpus": ["NVIDIA H100 80GB HBM3"] * 2}}
    assert made_elsewhere(gpu, two) is None  # one of the node's two visible then
    other = {**now, "machine": {**now["machine"], "gpus": ["NVIDIA A100-SXM4-80GB"]}}
    assert made_elsewhere(gpu, other) == {"machine": gpu["machine"]}
    # made on the CPU alone, read by a run that also uses a GPU: the CPU's numbers
    assert made_elsewhere(now, gpu) is None
    older = {**now, "versions": {**now["versions"], "torch": "2.10.0", "numpy": "1.26.4"}}
    differ = {k: v for k, v in older["versions"].items() if now["versions"][k] != v}
    assert made_elsewhere(older, now) == {"versions": differ} and "torch" in differ
    # a note written without a field (older code) is not a difference in it
    assert made_elsewhere({"machine": {}, "versions": {}}, now) is None
    # nor is one edited by hand into something else
    for damaged in ("x", [], {"machine": "x", "versions": ["torch"]}, {"machine": None}):
        assert made_elsewhere(damaged, now) is None


def test_a_stage_s_damaged_note_of_where_it_was_made_is_unknown(tmp_path):
    """Read as `seconds` is: what is not a JSON object, however deeply nested, is None."""
    from unpact.determinism import made
    from unpact.run.store import Stage

    stage = Stage(tmp_path, "evals", "k")
    assert stage.made() is None  # not written
    stage.write([{"id": "x"}], 1.0, made())
    assert stage.made() == json.loads(json.dumps(made()))
    for damaged in ("[" * 100_000, '"text"', "{"):
        stage.origin.write_text(damaged)
        assert stage.made() is None


def test_a_resumed_training_s_parts_are_one_per_machine_in_turn():
    """`with_part`: a part resumed where it was made goes on as one (the same machine and
    releases, from the step it stopped at); another machine's is a part of its own."""
    from unpact.determinism import made, made_before, parts_noted, with_part

    now = json.loads(json.dumps(made()))
    other = {**now, "versions": {**now["versions"], "torch": "2.10.0"}}
    assert with_part([], 0, 2) == [{"from": 0, "to": 2, "made": now}]
    assert with_part([{"from": 0, "to": 2, "made": now}], 2, 4) == [
        {"from": 0, "to": 4, "made": now}
    ]
    there = [{"from": 0, "to": 2, "made": other}]
    assert with_part(there, 2, 4) == [*there, {"from": 2, "to": 4, "made": now}]
    back = with_part([*there, {"from": 2, "to": 4, "made": now}], 4, 6)
    assert back == [*there, {"from": 2, "to": 6, "made": now}]
    assert made_before(back) == there
    assert parts_noted(json.dumps(back)) == back
    for damaged in (None, "", "{", '{"from": 0}', '[{"from": "0", "to": 2, "made": {}}]'):
        assert parts_noted(damaged) == []
