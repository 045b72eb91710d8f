"""Unlearning methods and the shared loop, on the tiny random model.

Every loss is checked against a slow, obvious computation (one full forward per item,
log-softmax over the whole vocabulary, the paper's formula written out), so a wrong sign,
a per-token instead of summed log-prob, or raw logits instead of log-probs all fail.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from unpact.data import load_benchmark
from unpact.errors import UnpactError
from unpact.testing import tiny_model
from unpact.unlearn import METHODS, Method, StepContext, get_method, resolve_config, unlearn
from unpact.unlearn.loop import _batch, batch_indices, encode_items
from unpact.unlearn.methods import layer_activations

ROOT = Path(__file__).resolve().parents[2]


def _batches(lm, folder):
    b = load_benchmark(folder)
    f = encode_items(lm, b.split("forget"))
    r = encode_items(lm, b.split("retain"))
    return _batch(f, [0, 1, 2]), _batch(r, [0, 1, 2, 3])


def _slow_token_logprobs(model, prompt, answer) -> torch.Tensor:
    ids = torch.tensor([[*prompt, *answer]], device=model.device)
    logits = model(input_ids=ids).logits[0].float()
    logp = logits.log_softmax(-1)
    start = len(prompt) - 1
    return torch.stack([logp[start + k, t] for k, t in enumerate(answer)])


def _slow_distributions(model, prompt, answer) -> torch.Tensor:
    ids = torch.tensor([[*prompt, *answer]], device=model.device)
    logits = model(input_ids=ids).logits[0].float()
    return logits.log_softmax(-1)[len(prompt) - 1 : len(prompt) - 1 + len(answer)]


def _slow_nll(model, batch) -> float:
    return sum(
        -_slow_token_logprobs(model, p, a).mean().item()
        for p, a in zip(batch.prompts, batch.answers)
    ) / len(batch)


def _ctx(lm, forget, retain, **kw) -> StepContext:
    return StepContext(model=lm.model, forget=forget, retain=retain, step=0, **kw)


def test_every_paper_method_is_registered():
    for name in ("ga", "ga_gd", "ga_kl", "npo", "npo_gd", "npo_kl", "simnpo", "tv", "rmu"):
        assert name in METHODS
        assert get_method(name).name == name
    with pytest.raises(UnpactError, match="unknown method 'nope'"):
        get_method("nope")


def test_ga_and_gd_losses_match_the_slow_computation(bench):
    lm = tiny_model(seed=1)
    forget, retain = _batches(lm, bench)
    with torch.no_grad():
        terms = get_method("ga_gd")(get_method("ga_gd").Settings(retain_weight=0.5)).losses(
            _ctx(lm, forget, retain)
        )
        slow_f, slow_r = _slow_nll(lm.model, forget), _slow_nll(lm.model, retain)
    assert terms["forget_ga"].item() == pytest.approx(-slow_f, rel=1e-5)
    assert terms["retain_nll"].item() == pytest.approx(0.5 * slow_r, rel=1e-5)


def test_npo_uses_summed_log_probs_against_the_reference(bench):
    """NPO on summed answer log-probs: -(2/b) mean log sigmoid(-b (lp_theta - lp_ref))."""
    lm = tiny_model(seed=1)
    forget, retain = _batches(lm, bench)
    ref = {i: -3.0 - k for k, i in enumerate(forget.ids)}  # hand-set reference log-probs
    beta = 0.1
    method = get_method("npo")(get_method("npo").Settings(beta=beta))
    with torch.no_grad():
        loss = method.losses(_ctx(lm, forget, retain, forget_ref_logprobs=ref))["forget_npo"]
        expected = 0.0
        for i, p, a in zip(forget.ids, forget.prompts, forget.answers):
            lp = _slow_token_logprobs(lm.model, p, a).sum().item()
            ratio = lp - ref[i]
            expected += -(2 / beta) * math.log(1 / (1 + math.exp(beta * ratio)))
        expected /= len(forget)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_npo_hand_value(monkeypatch):
    """Worked by hand: policy log p(y|x) = -3, reference -2, b = 0.1:
    -(2/0.1) * log sigmoid(-0.1 * (-3 - (-2))) = 20 * log(1 + e^-0.1) = 12.8879..."""
    import unpact.unlearn.methods as m

    monkeypatch.setattr(m, "sequence_logprobs", lambda model, batch: torch.tensor([-3.0]))
    monkeypatch.setattr(m, "reference_logprobs", lambda ctx: torch.tensor([-2.0]))
    ctx = StepContext(model=None, forget=None, retain=None, step=0)  # type: ignore[arg-type]
    value = m.NPO().losses(ctx)["forget_npo"].item()
    assert value == pytest.approx(12.88793, abs=1e-4)


def test_kl_regulariser_matches_the_slow_computation(bench):
    lm = tiny_model(seed=1)
    ref = tiny_model(seed=2)
    forget, retain = _batches(lm, bench)
    method = get_method("ga_kl")()
    with torch.no_grad():
        kl = method.losses(_ctx(lm, forget, retain, reference=ref.model))["retain_kl"].item()
        expected = 0.0
        for p, a in zip(retain.prompts, retain.answers):
            r = _slow_distributions(ref.model, p, a)
            c = _slow_distributions(lm.model, p, a)
            per_pos = torch.nn.functional.kl_div(c, r, log_target=True, reduction="none").sum(-1)
            expected += per_pos.mean().item()
        expected /= len(retain)
    assert kl > 0
    assert kl == pytest.approx(expected, rel=1e-4)


def test_simnpo_hand_computation(bench):
    lm = tiny_model(seed=1)
    forget, retain = _batches(lm, bench)
    s = get_method("simnpo").Settings(beta=2.5, gamma=0.5, retain_weight=0.0)
    with torch.no_grad():
        terms = get_method("simnpo")(s).losses(_ctx(lm, forget, retain))
        expected = 0.0
        for p, a in zip(forget.prompts, forget.answers):
            avg = _slow_token_logprobs(lm.model, p, a).mean().item()
            expected += -(2 / 2.5) * math.log(1 / (1 + math.exp(2.5 * avg + 0.5)))
        expected /= len(forget)
    assert set(terms) == {"forget_simnpo"}
    assert terms["forget_simnpo"].item() == pytest.approx(expected, rel=1e-5)


def test_rmu_losses_and_early_exit_activations(bench):
    lm = tiny_model(seed=1)
    forget, retain = _batches(lm, bench)
    layer = 0
    with torch.no_grad():
        fast = layer_activations(lm.model, forget, layer)
        for (p, a), (s, e), h in zip(zip(forget.prompts, forget.answers), forget.content, fast):
            out = lm.model(
                input_ids=torch.tensor([[*p, *a]], device=lm.device), output_hidden_states=True
            )
            assert torch.allclose(h, out.hidden_states[layer + 1][0, s:e], atol=1e-5)
        settings_ = get_method("rmu").Settings(layer=layer, steering_coeff=3.0, retain_weight=2.0)
        method = get_method("rmu")(settings_)
        frozen = {
            i: torch.zeros_like(h)
            for i, h in zip(retain.ids, layer_activations(lm.model, retain, layer))
        }
        terms = method.losses(_ctx(lm, forget, retain, retain_ref_activations=frozen))
        u = method.direction(fast[0].shape[-1]).to(fast[0].device)
        assert u.norm().item() == pytest.approx(1.0, abs=1e-6)
        # WMDP's RMU draws u uniformly in [0, 1) (`torch.rand`), then normalises it: every
        # component non-negative, seeded by the method's `seed`
        drawn = torch.rand(u.numel(), generator=torch.Generator().manual_seed(0))
        assert torch.equal(u.cpu(), drawn / drawn.norm()) and bool((u >= 0).all())
        expected_f = sum(((h - 3.0 * u) ** 2).mean().item() for h in fast) / len(fast)
        retain_h = layer_activations(lm.model, retain, layer)
        expected_r = sum((h**2).mean().item() for h in retain_h) / len(retain_h)
    assert terms["forget_rmu"].item() == pytest.approx(expected_f, rel=1e-5)
    assert terms["retain_rmu"].item() == pytest.approx(2.0 * expected_r, rel=1e-5)
    # Only the MLPs of layers max(0, l-2)..l are trained.
    assert method.trainable("model.layers.0.mlp.up_proj.weight")
    assert not method.trainable("model.layers.1.mlp.up_proj.weight")
    assert not method.trainable("model.layers.0.self_attn.q_proj.weight")
    # other layouts' MLPs: Llama 4's feed_forward, a Mamba block's mixer (it had nothing
    # RMU would train: "no weight of MambaForCausalLM is left to train"), GPT-2's
    for name in (
        "layers.0.feed_forward.w1",
        "backbone.layers.0.mixer.in_proj",
        "h.0.mlp.c_fc",
        "transformer.blocks.0.ffn.up_proj",
        "layers.0.shared_mlp.input_linear",
        "layers.0.mlp_block.up_proj",
    ):
        assert method.trainable(f"model.{name}.weight"), name
    assert not method.trainable("backbone.layers.1.mixer.in_proj.weight")
    assert not method.trainable("model.layers.0.mlp_norm.weight")  # a part named alike


def test_only_the_text_model_of_a_vision_language_model_trains():
    """RMU's `layers.1.mlp` also named the vision encoder's layer 1 of Gemma 3 from 4B;
    every method, and the injection, trains the text model and its head alone."""
    from unpact.testing import tiny_other
    from unpact.unlearn.config import resolve_config
    from unpact.unlearn.loop import _trainable
    from unpact.unlearn.methods import RMU, get_method

    net = tiny_other("gemma3_vl").model
    vision = [n for n, _ in net.named_parameters() if "vision" in n or "multi_modal" in n]
    assert vision
    for method in (RMU(RMU.Settings(layer=1)), get_method("ga")(None)):
        _trainable(net, method, resolve_config("ga"))
        trained = [n for n, p in net.named_parameters() if p.requires_grad]
        assert trained and not set(trained) & set(vision), method.name
        assert all("language_model" in n or "lm_head" in n for n in trained)
    from unpact.inject import InjectConfig, _make_trainable

    for p in net.parameters():
        p.requires_grad_(True)
    _make_trainable(net, InjectConfig())  # injection likewise
    assert not any(p.requires_grad for n, p in net.named_parameters() if n in vision)


def test_task_vector_negates_the_fine_tuning_direction():
    lm = tiny_model(seed=1)
    original = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(0.01)
    get_method("tv")(get_method("tv").Settings(alpha=2.0)).finalize(lm.model, original)
    for n, p in lm.model.named_parameters():
        assert torch.allclose(p, original[n] - 0.02, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 30), b=st.integers(1, 9), seed=st.integers(0, 5))
def test_batch_windows_cover_each_epoch_once(n, b, seed):
    stream = [i for s in range(n) for i in batch_indices(n, b, s, seed)]  # n * b items
    for e in range(b):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))
    assert batch_indices(n, b, 3, seed) == batch_indices(n, b, 3, seed)


# --------------------------------------------------------------------------- config


def test_config_resolution_and_errors(tmp_path):
    cfg = resolve_config("npo_gd", overrides=["lr=2e-5", "beta=0.3", "lora.r=4"])
    assert cfg.lr == 2e-5 and cfg.settings["beta"] == 0.3 and cfg.lora and cfg.lora.r == 4
    with pytest.raises(UnpactError, match="unknown setting for npo_gd"):
        resolve_config("npo_gd", overrides=["bogus=1"])
    with pytest.raises(UnpactError, match=r"settings\.beta"):
        resolve_config("npo_gd", overrides=["beta=-1"])
    with pytest.raises(UnpactError, match=r"lr"):
        resolve_config("ga", overrides=["lr=abc"])
    # a batch of 10**9 items was that many indices built, silently, before the first step
    for size in ("batch_size", "retain_batch_size"):
        with pytest.raises(UnpactError, match=rf"{size}: Input should be less than or equal"):
            resolve_config("ga", overrides=[f"{size}=1000000000"])
    bad = tmp_path / "c.yaml"
    bad.write_text("method: ga\nepochs: 2\nstepz: 3\n")
    with pytest.raises(UnpactError, match="stepz: unknown setting"):
        resolve_config(file=bad)
    with pytest.raises(UnpactError, match="unknown method"):
        resolve_config("gx")
    # an empty file is no settings; a list (`[]` too) is not a mapping of them
    bad.write_text("")
    assert resolve_config("ga", file=bad) == resolve_config("ga")
    for text in ("[]\n", "- lr: 1\n"):
        bad.write_text(text)
        with pytest.raises(UnpactError, match="expected a mapping of settings"):
            resolve_config("ga", file=bad)
    # a method's own setting at the top of a file or mapping goes to `settings`, as --set
    # does (it was "layer: unknown setting")
    bare = tmp_path / "rmu.yaml"
    bare.write_text("method: rmu\nlayer: 1\nsteps: 3\n")
    assert resolve_config(file=bare).settings["layer"] == 1
    both = resolve_config("rmu", values={"layer": 1, "settings": {"steering_coeff": 5}})
    assert (both.settings["layer"], both.settings["steering_coeff"]) == (1, 5)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_has_a_commented_defaults_file(name):
    from unpact.unlearn.config import defaults_path

    text = defaults_path(name).read_text()
    assert "#" in text
    cfg = resolve_config(name)
    cfg.method_settings()


# --------------------------------------------------------------------------- the loop


def _run(bench, out, method="npo_gd", extra=(), **kw):
    cfg = resolve_config(method, overrides=["steps=6", "lr=1e-3", "save_every=2", *extra])
    return unlearn(tiny_model(seed=3), bench, cfg, out, progress=False, **kw)


def _weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.model_dir / "model.safetensors"))


def _cpu_state(model) -> dict[str, torch.Tensor]:
    """A model's tensors on the CPU, where saved weights load (the tiny model may be on a
    GPU: UNPACT_TEST_DEVICE)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def test_same_seed_gives_bit_identical_weights_and_a_full_run_directory(bench, tmp_path):
    a = _run(bench, tmp_path / "a")
    b = _run(bench, tmp_path / "b")
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [json.loads(x) for x in (tmp_path / "a" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert {"forget_npo", "retain_nll", "lr", "tokens_per_s", "loss"} <= set(rows[0])
    assert (tmp_path / "a" / "config.yaml").is_file() and (tmp_path / "a" / "result.json").is_file()
    assert not (tmp_path / "a" / "checkpoints").exists()
    # and unlearning changed the model
    base = _cpu_state(tiny_model(seed=3).model)
    assert any(not torch.equal(wa[k], base[k]) for k in wa if k in base)


def test_a_runs_config_yaml_gives_its_settings_again(bench, tmp_path):
    """`unpact unlearn --config OLD/config.yaml` (the way to run those settings again, on
    this model or another) was refused: "format: unknown setting; model: unknown setting;
    benchmark: ...". The record's settings are the config; its model, benchmark and process
    count are the old run's."""
    extra = ("lora.r=4", "beta=0.3")
    _run(bench, tmp_path / "a", extra=extra)
    given = resolve_config("npo_gd", overrides=["steps=6", "lr=1e-3", "save_every=2", *extra])
    assert resolve_config(file=tmp_path / "a" / "config.yaml") == given
    assert resolve_config("npo_gd", file=tmp_path / "a" / "config.yaml", overrides=["lr=2"]).lr == 2
    with pytest.raises(UnpactError, match="--method ga but the config file says npo_gd"):
        resolve_config("ga", file=tmp_path / "a" / "config.yaml")
    other = tmp_path / "other.yaml"  # a file of settings naming a model is no record
    other.write_text("method: ga\nmodel: x\n")
    with pytest.raises(UnpactError, match="model: unknown setting"):
        resolve_config(file=other)


def test_resume_after_a_crash_ends_with_the_same_weights(bench, tmp_path):
    whole = _run(bench, tmp_path / "whole")
    with pytest.raises(Exception, match="stopped after step 4"):
        _run(bench, tmp_path / "cut", stop_after=4)
    assert not (tmp_path / "cut" / "model").exists()
    assert (tmp_path / "cut" / "checkpoints" / "step-4").is_dir()
    resumed = _run(bench, tmp_path / "cut", resume=True)
    ww, wr = _weights(whole), _weights(resumed)
    assert all(torch.equal(ww[k], wr[k]) for k in ww)
    a = [json.loads(x) for x in (tmp_path / "whole" / "losses.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "cut" / "losses.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_a_run_resumed_from_another_machine_s_checkpoint_says_which_steps_it_made(
    bench, tmp_path, capsys
):
    """A run interrupted on one machine (a preempted cluster job) and resumed on another
    has weights both computed; result.json named only the one that finished it. Each
    checkpoint notes where each part of its steps was trained; the result lists the parts
    another machine (or other releases) trained, and a run resumed where it began, none."""
    from unpact.determinism import made
    from unpact.unlearn.loop import MADE_NOTE

    with pytest.raises(Exception, match="stopped after step 4"):
        _run(bench, tmp_path / "here", stop_after=4)
    note = tmp_path / "here" / "checkpoints" / "step-4" / MADE_NOTE
    now = json.loads(json.dumps(made()))
    assert json.loads(note.read_text()) == [{"from": 0, "to": 4, "made": now}]
    resumed = _run(bench, tmp_path / "here", resume=True)
    assert resumed.made_before == []
    assert "made_before" not in json.loads((tmp_path / "here" / "result.json").read_text())

    with pytest.raises(Exception, match="stopped after step 2"):
        _run(bench, tmp_path / "moved", stop_after=2)
    other = {**now, "machine": {**now["machine"], "cpu": "Other CPU (cpu family 6, model 85)"}}
    first = tmp_path / "moved" / "checkpoints" / "step-2" / MADE_NOTE
    first.write_text(json.dumps([{"from": 0, "to": 2, "made": other}]))
    with pytest.raises(Exception, match="stopped after step 4"):
        _run(bench, tmp_path / "moved", resume=True, stop_after=4)
    parts = json.loads((tmp_path / "moved" / "checkpoints" / "step-4" / MADE_NOTE).read_text())
    assert parts == [{"from": 0, "to": 2, "made": other}, {"from": 2, "to": 4, "made": now}]
    finished = _run(bench, tmp_path / "moved", resume=True)
    written = json.loads((tmp_path / "moved" / "result.json").read_text())
    assert finished.made_before == written["made_before"] == [parts[0]]
    assert written["made"] == now
    # and `unpact unlearn` says so, where it printed nothing of it
    from unpact.cli import _say_made_elsewhere

    _say_made_elsewhere({"steps 0-2": other}, "result.json's made_before")
    assert "releases: steps 0-2 (result.json's made_before)" in " ".join(
        capsys.readouterr().out.split()
    )
    # a checkpoint without the note (older code), or with a damaged one: nothing known
    with pytest.raises(Exception, match="stopped after step 2"):
        _run(bench, tmp_path / "old", stop_after=2)
    (tmp_path / "old" / "checkpoints" / "step-2" / MADE_NOTE).write_text("[" * 100_000)
    assert _run(bench, tmp_path / "old", resume=True).made_before == []


def test_a_run_resumed_twice_at_once_is_refused_the_second_time(bench, tmp_path):
    """Two resumes of one interrupted run at once (or two starts by a script) each trained
    into the folder, checkpoints over each other. The training holds the folder's lock;
    the second is refused, naming the folder, and resumes once the first has let go."""
    from unpact.files import sole_writer

    with pytest.raises(Exception, match="stopped after step 4"):
        _run(bench, tmp_path / "cut", stop_after=4)
    refused = pytest.raises(UnpactError, match=r"another unpact process is writing there")
    with sole_writer(tmp_path / "cut", "--out"), refused:  # another process resuming it now
        _run(bench, tmp_path / "cut", resume=True)
    assert (tmp_path / "cut" / "checkpoints" / "step-4").is_dir()
    assert _run(bench, tmp_path / "cut", resume=True).steps == 6


def test_a_second_new_run_into_a_folder_being_started_writes_nothing_there(bench, tmp_path):
    """Two new runs started into one --out within milliseconds both passed the "holds a
    run" check; the lock was taken after config.yaml was written, so the refused one had
    already written its settings over the other's record. The lock comes first now."""
    from unpact.files import sole_writer

    (tmp_path / "r").mkdir()
    refused = pytest.raises(UnpactError, match=r"another unpact process is writing there")
    with sole_writer(tmp_path / "r", "--out"), refused:  # the other run, just starting
        _run(bench, tmp_path / "r")
    assert not (tmp_path / "r" / "config.yaml").exists()
    assert _run(bench, tmp_path / "r").steps == 6


def test_resume_refuses_other_settings_and_new_runs_refuse_a_used_directory(bench, tmp_path):
    _run(bench, tmp_path / "r")
    with pytest.raises(UnpactError, match="already holds a run"):
        _run(bench, tmp_path / "r")
    with pytest.raises(UnpactError, match="different settings"):
        _run(bench, tmp_path / "r", extra=("beta=0.5",), resume=True)
    # the run's record damaged (edited by hand): one message, not yaml's traceback
    saved = (tmp_path / "r" / "config.yaml").read_text()
    for damaged in ("lr: [1\n", "- a list\n"):
        (tmp_path / "r" / "config.yaml").write_text(damaged)
        with pytest.raises(
            UnpactError, match=r"(?s)--resume: .*config\.yaml: .*the run's own record"
        ):
            _run(bench, tmp_path / "r", resume=True)
    # a run's or an audit's folder: not an unlearn run to resume (20 "different settings")
    (tmp_path / "r" / "config.yaml").write_text("model: m\nmethods: [{method: ga}]\n")
    with pytest.raises(UnpactError, match=r"--resume: .* holds no `unpact unlearn` run"):
        _run(bench, tmp_path / "r", resume=True)
    # ... nor one to start anew in: not "pass --resume", which is then refused
    with pytest.raises(UnpactError, match=r"--out .*`unpact run` or `unpact audit` output"):
        _run(bench, tmp_path / "r")
    (tmp_path / "r" / "config.yaml").write_text(saved)
    # a folder of someone else's files is not a run's: nothing is written into it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(UnpactError, match="a folder holding other files, not a run"):
        _run(bench, tmp_path / "mine")
    assert sorted(f.name for f in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    (tmp_path / "hidden").mkdir()  # hidden files only (a leftover temporary, .DS_Store): fine
    (tmp_path / "hidden" / ".DS_Store").write_text("x")
    _run(bench, tmp_path / "hidden")


class _Exploding(Method):
    name = "test_exploding"

    def losses(self, ctx):
        from unpact.unlearn.methods import nll

        value = nll(ctx.model, ctx.forget)
        return {"forget_boom": value * (float("nan") if ctx.step == 2 else 1.0)}


def test_a_nan_loss_stops_the_run_naming_step_and_term(bench, tmp_path):
    cfg = resolve_config("test_exploding", overrides=["steps=5"])
    with pytest.raises(UnpactError, match=r"forget_boom is nan at step 3"):
        unlearn(tiny_model(), bench, cfg, tmp_path / "x", progress=False)
    assert not (tmp_path / "x" / "model").exists()
    assert not (tmp_path / "x" / "result.json").exists()


def test_a_training_that_cannot_fit_in_the_memory_free_is_refused_before_its_first_step(
    bench, tmp_path, monkeypatch
):
    """A 1B model loads on a 16 GiB laptop, then its first step allocated gradients and
    AdamW's two moments (three times the trainable weights) and the system killed the
    process without a word. Refused before the step, saying what to do; LoRA adapters,
    a sliver of the weights, fit where the whole model's training did not."""
    from types import SimpleNamespace

    import psutil

    lm = tiny_model(seed=3)
    size = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2 * size))
    said = r"ga_gd: training 0\.\d+B weights needs .* GiB for their gradients and AdamW's two"
    with pytest.raises(UnpactError, match=said + r".*--set lora\.r=8"):
        _run(bench, tmp_path / "full", method="ga_gd", device="cpu")
    assert not (tmp_path / "full" / "model").exists()
    result = _run(bench, tmp_path / "lora", method="ga_gd", extra=("lora.r=4",), device="cpu")
    assert (result.model_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("method", ["ga_gd", "tv"])
def test_lora_trains_adapters_and_merges_them(bench, tmp_path, method):
    result = _run(bench, tmp_path / "l", method=method, extra=("lora.r=4",))
    w = _weights(result)
    assert not any("lora" in k for k in w)
    base = _cpu_state(tiny_model(seed=3).model)
    changed = [k for k in w if not torch.equal(w[k], base[k])]
    assert changed and all(any(t in k for t in ("proj",)) for k in changed)


def test_a_lora_rank_above_every_layers_rank_is_one_message(bench, tmp_path):
    """`lora: {r: 100000000000000000000}` was torch's "Overflow when unpacking long long"
    from inside peft; a rank above what any adapted layer's update can have (the tiny
    model's widest: 64) only wastes memory. Both are refused before any step."""
    for rank in ("65", str(10**20)):
        cfg = resolve_config("ga_gd", overrides=["steps=1", f"lora.r={rank}"])
        with pytest.raises(UnpactError, match=rf"LoRA: rank {rank} is above .* \(64: their"):
            unlearn(tiny_model(seed=3), bench, cfg, tmp_path / rank, progress=False)


def test_lora_all_linear_adapts_every_layer_of_another_architecture(bench, tmp_path):
    """`lora.target_modules: all-linear` (peft's spelling): GPT-2's c_attn, c_fc and c_proj
    (Conv1D), which Llama's default names miss (refused, naming them), each get a low-rank
    update; the LM head, embeddings and norms stay."""
    from transformers.pytorch_utils import Conv1D

    from unpact.testing import tiny_other

    base = tiny_other("gpt2")
    before = {k: v.clone() for k, v in _cpu_state(base.model).items()}
    with pytest.raises(UnpactError, match=r"linear layers: c_attn, c_fc, c_proj"):
        cfg = resolve_config("ga_gd", overrides=["steps=1", "lora.r=2"])
        unlearn(tiny_other("gpt2"), bench, cfg, tmp_path / "named", progress=False)
    cfg = resolve_config(
        "ga_gd", overrides=["steps=3", "lr=1e-2", "lora.r=2", "lora.target_modules=all-linear"]
    )
    assert cfg.lora is not None and cfg.lora.target_modules == ["all-linear"]
    w = _weights(unlearn(base, bench, cfg, tmp_path / "all", progress=False))
    linear = {f"{n}.weight" for n, m in base.model.named_modules() if isinstance(m, Conv1D)}
    assert len(linear) == 8  # 2 blocks: c_attn, attn.c_proj, c_fc, mlp.c_proj
    # a layer peft will not adapt is one message naming the setting, not peft's ValueError
    refused = ["steps=1", "lora.r=2", "lora.target_modules=[out_proj]"]
    with pytest.raises(UnpactError, match=r"LoRA: Module 'out_proj' is incompatible .*target_m"):
        unlearn(
            tiny_other("mamba"),
            bench,
            resolve_config("ga_gd", overrides=refused),
            tmp_path / "mamba",
            progress=False,
        )
    for name, old in before.items():
        if name not in w:
            continue  # the tied LM head is saved once
        delta = (w[name] - old).float()
        if name in linear:
            assert delta.abs().max() > 1e-6, name
            assert torch.linalg.matrix_rank(delta, atol=1e-5).item() <= 2, name
        else:
            assert torch.equal(w[name], old), name


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_lora_reaches_a_mixtures_experts(bench, tmp_path, arch):
    """A mixture keeps its experts in 3-D parameters, not Linear layers: LoRA adapted the
    attention alone. Now the experts get adapters too (peft's target_parameters), merged
    into the saved weights; the router stays; RMU's layer choice holds for them."""
    from unpact.models import load_model
    from unpact.testing import tiny_other

    def trained(cfg, out):
        result = unlearn(tiny_other(arch), bench, cfg, out, progress=False)
        assert not any("lora" in k for k in _weights(result))  # merged
        # read back as transformers loads it (Mixtral's file keeps one matrix per expert)
        w = load_model(str(result.model_dir)).model.state_dict()
        return {k for k in w if not torch.equal(w[k], base[k])}

    base = _cpu_state(tiny_other(arch).model)
    experts = {k for k in base if "experts" in k and base[k].dim() == 3}
    assert experts
    changed = trained(
        resolve_config("ga_gd", overrides=["steps=3", "lr=1e-2", "lora.r=4"]), tmp_path / "l"
    )
    assert experts <= changed
    assert not any("router" in k or "gate.weight" in k for k in changed)
    rmu = ["steps=2", "layer=1", "update_layers=[1]", "lora.r=4"]
    changed = trained(resolve_config("rmu", overrides=rmu), tmp_path / "r")
    assert {k for k in experts if "layers.1." in k} <= changed
    assert not {k for k in experts if "layers.0." in k} & changed
    dropout = resolve_config("ga_gd", overrides=["steps=1", "lora.dropout=0.1"])
    with pytest.raises(UnpactError, match=r"lora\.dropout to 0"):
        unlearn(tiny_other(arch), bench, dropout, tmp_path / "d", progress=False)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_method_runs_a_few_steps(bench, tmp_path, precision):
    for name in ("ga", "ga_kl", "npo", "npo_kl", "simnpo", "tv", "rmu", "keytoken_npo_gd"):
        extra = ("layer=1",) if name == "rmu" else ()
        cfg = resolve_config(name, overrides=["steps=2", f"precision={precision}", *extra])
        r = unlearn(tiny_model(seed=3), bench, cfg, tmp_path / name, progress=False)
        assert (r.model_dir / "model.safetensors").is_file(), name
        assert all(math.isfinite(v) for v in r.final_losses.values()), name


# ----------------------------------------------------------------- KeyToken-weighted NPO


def _slow_answer_lps(model, prompt, answer) -> torch.Tensor:
    with torch.no_grad():
        return _slow_token_logprobs(model, list(prompt), list(answer)).cpu()


def test_token_contributions_match_one_forward_pass_per_deleted_unit(bench):
    """c_ik = log p(y_k | x) - log p(y_k | x without unit i), each by its own pass."""
    from unpact.attribution import attribute_many, token_contributions

    lm = tiny_model(seed=1)
    f = encode_items(lm, load_benchmark(bench).split("forget")[:3])
    for unit in ("token", "word"):
        found = token_contributions(lm, f["encoded"], f["answers"], unit=unit)
        for enc, answer, tc in zip(f["encoded"], f["answers"], found):
            x = list(enc.input_ids)
            full = _slow_answer_lps(lm.model, x, answer)
            assert torch.allclose(torch.tensor(tc.logprobs), full, atol=1e-4)
            for u, row in zip(tc.units, tc.by_unit):
                s, e = u.span
                without = _slow_answer_lps(lm.model, x[:s] + x[e:], answer)
                assert torch.allclose(torch.tensor(row), full - without, atol=1e-4)
    # the means over answer tokens are attribute_many's contributions
    items = load_benchmark(bench).split("forget")[:3]
    recs = attribute_many(lm, [i.question for i in items], [i.answer for i in items])
    plain = token_contributions(
        lm,
        [lm.encode_prompt(i.question) for i in items],
        [lm.encode_answer(i.answer) for i in items],
    )
    for r, tc in zip(recs, plain):
        assert max(abs(a - b) for a, b in zip(r.contributions, tc.contributions)) < 1e-5


def test_keytoken_weights_by_hand(bench):
    """prepare(): KeyTokens from the per-item contributions, routing r_k = sum over
    KeyTokens of max(c_ik, 0), weight min(cap, (r_k / mean r) ** gamma)."""
    from unpact.attribution import key_tokens

    lm = tiny_model(seed=1)
    f = encode_items(lm, load_benchmark(bench).split("forget")[:4])
    method = get_method("keytoken_npo")(
        get_method("keytoken_npo").Settings(gamma=2.0, max_weight=3.0)
    )
    method.prepare(lm, f)
    routing = {}
    for item_id, enc, answer in zip(f["ids"], f["encoded"], f["answers"]):
        x = list(enc.input_ids)
        full = _slow_answer_lps(lm.model, x, answer)
        rows = []
        for t in range(enc.content_start, enc.content_end):
            rows.append(full - _slow_answer_lps(lm.model, x[:t] + x[t + 1 :], answer))
        keys = key_tokens([float(r.mean()) for r in rows])
        assert keys, "the tiny model routes its answers through some tokens"
        routing[item_id] = sum(rows[i].clamp(min=0) for i in keys)
        assert torch.allclose(method.reference_token_logprobs[item_id].cpu(), full, atol=1e-4)
    mean = torch.cat(list(routing.values())).mean()
    for item_id, r in routing.items():
        expected = ((r / mean) ** 2).clamp(max=3.0)
        assert torch.allclose(method.token_weights[item_id].cpu(), expected, atol=1e-3)
    every = torch.cat(list(method.token_weights.values()))
    assert every.max() <= 3.0 and every.min() >= 0 and (every < 0.1).any()


def test_keytoken_npo_hand_value(monkeypatch):
    """One item, two answer tokens: policy log-probs (-3, -1), reference (-2, -1), weights
    (2, 0.5), b = 1: tokenwise -2 log sigmoid(-(lp - ref)) = (2 log(1 + e^-1), 2 log 2);
    the loss is their weighted mean (2 * 0.62652 + 0.5 * 1.38629) / 2 = 0.97310."""
    import unpact.unlearn.methods as m

    monkeypatch.setattr(m, "token_logprobs", lambda model, batch: [torch.tensor([-3.0, -1.0])])
    method = m.KeyTokenNPOGD(m.KeyTokenNPOGD.Settings(beta=1.0, retain_weight=0.0))
    method.token_weights = {"a": torch.tensor([2.0, 0.5])}
    method.reference_token_logprobs = {"a": torch.tensor([-2.0, -1.0])}
    forget = m.Batch(("a",), ((1,),), ((2, 3),), ((0, 3),))
    ctx = StepContext(model=None, forget=forget, retain=None, step=0)  # type: ignore[arg-type]
    monkeypatch.setattr(m, "nll", lambda model, batch: torch.tensor(0.0))
    value = method.losses(ctx)["forget_keytoken_npo"].item()
    assert value == pytest.approx(0.97310, abs=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=6), min_size=1, max_size=5
    ),
    st.floats(0, 3),
    st.floats(0.5, 10),
)
def test_key_routing_weights_invariants(rows, gamma, cap):
    from unpact.unlearn.methods import key_routing_weights

    routing = {str(n): torch.tensor(r) for n, r in enumerate(rows)}
    w = key_routing_weights(routing, gamma, cap)
    every = torch.cat([w[k] for k in routing])
    if gamma == 0:
        assert torch.equal(every, torch.ones_like(every))
        return
    assert every.min() >= 0 and every.max() <= cap + 1e-6
    flat = torch.cat(list(routing.values()))
    assert torch.all(every[flat == 0] == 0)  # tokens the key tokens do not carry: spared
    if flat.sum() > 0 and gamma == 1 and (flat / flat.mean()).max() <= cap:
        assert float(every.mean()) == pytest.approx(1.0, abs=1e-4)


def test_keytoken_npo_unlearns_and_resumes_identically(bench, tmp_path):
    whole = _run(bench, tmp_path / "whole", method="keytoken_npo")
    with pytest.raises(Exception, match="stopped after step 4"):
        _run(bench, tmp_path / "cut", method="keytoken_npo", stop_after=4)
    resumed = _run(bench, tmp_path / "cut", method="keytoken_npo", resume=True)
    ww, wr = _weights(whole), _weights(resumed)
    assert all(torch.equal(ww[k], wr[k]) for k in ww)
    assert math.isfinite(whole.final_losses["forget_keytoken_npo"])
    assert whole.final_losses["retain_kl"] >= 0


def _draws() -> tuple[float, float, list[float]]:
    import random

    import numpy as np

    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_training_gives_the_callers_random_streams_back(bench, tmp_path):
    """Unlearning seeds Python's, NumPy's and torch's generators for its own draws
    (accelerate's set_seed); a script that calls it between its own seeded draws used to
    get other draws after the call than without it."""
    lm = tiny_model(seed=3)  # (building the tiny model seeds torch itself)
    cfg = resolve_config("npo_gd", overrides=["steps=3", "lr=1e-3"])
    _seed_all(1234)
    expected = _draws()
    _seed_all(1234)
    unlearn(lm, bench, cfg, tmp_path / "u", progress=False)
    assert _draws() == expected


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path):
    """YAML keeps the last of two equal keys silently: a second `methods:` block replaced
    the first. A merge (`<<:`) may still be overridden."""
    from unpact.unlearn.config import read_yaml_mapping

    f = tmp_path / "c.yaml"
    f.write_text("model: default\nmethods:\n  - method: ga_gd\nmethods:\n  - method: rmu\n")
    with pytest.raises(UnpactError, match=r"key 'methods' given twice \(lines 2 and 4\)"):
        read_yaml_mapping(f)
    f.write_text("methods:\n  - {method: ga, config: {lr: 1, lr: 2}}\n")
    with pytest.raises(UnpactError, match=r"key 'lr' given twice \(lines 2 and 2\)"):
        read_yaml_mapping(f)
    f.write_text("base: &b {lr: 1, steps: 2}\nm:\n  <<: *b\n  lr: 3\n")
    assert read_yaml_mapping(f)["m"] == {"lr": 3, "steps": 2}


def test_accelerates_settings_from_the_environment_change_nothing_and_are_said(
    bench, tmp_path, monkeypatch, caplog
):
    """accelerate reads mixed precision, torch.compile and gradient accumulation from the
    environment, where `accelerate launch` puts its config file's: with
    $ACCELERATE_MIXED_PRECISION=bf16 the same config trained other weights (by 1e-4), which
    neither the saved config nor a run's cache key recorded; gradient accumulation divided
    each loss. The method's settings decide now, and the unused settings are said once."""
    import unpact.unlearn.loop as loop

    given = {"method": "ga", "steps": 3, "lr": 1e-2, "batch_size": 2}
    plain = _weights(unlearn(tiny_model(seed=3), bench, given, tmp_path / "a", progress=False))
    monkeypatch.setattr(loop, "_SAID_UNUSED", set(), raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "no")  # the value that changes nothing
    for out in ("b", "c"):
        again = _weights(unlearn(tiny_model(seed=3), bench, given, tmp_path / out, progress=False))
        for name, tensor in plain.items():
            assert torch.equal(tensor, again[name]), name
    said = [r.getMessage() for r in caplog.records if r.name == "unpact.unlearn.loop"]
    assert len(said) == 1, said
    assert said[0].startswith(
        "not used: ACCELERATE_MIXED_PRECISION=bf16, ACCELERATE_GRADIENT_ACCUMULATION_STEPS=4 ("
    )
    # under DeepSpeed its own config sets both (accelerate refuses a precision unlike it)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert loop._settings_not_from_the_environment() == {"dynamo_backend": "no"}


def test_the_python_api_takes_a_mapping_config_and_names_a_wrong_argument(bench, tmp_path):
    """`unlearn(lm, bench, {"method": "ga", ...}, out)` was "'dict' object has no
    attribute 'method'"; it is now read as `unpact unlearn` reads a config file (the
    method's defaults under it, a bare settings key into `settings`), and gives the weights
    of the resolved config. `out=None`, a config of another type, or a model given to
    `inject` (which takes a spec) name the argument, in one line."""
    from unpact.inject import inject

    given = {"method": "npo_gd", "steps": 2, "lr": 1e-3, "beta": 0.2}
    by_mapping = unlearn(tiny_model(seed=3), bench, given, tmp_path / "m", progress=False)
    resolved = resolve_config(values=given)
    assert resolved.settings["beta"] == 0.2
    by_config = unlearn(tiny_model(seed=3), bench, resolved, tmp_path / "c", progress=False)
    assert _weights(by_mapping).keys() == _weights(by_config).keys()
    for name, tensor in _weights(by_mapping).items():
        assert torch.equal(tensor, _weights(by_config)[name]), name
    with pytest.raises(TypeError, match=r"config: give an UnlearnConfig or a mapping"):
        unlearn(tiny_model(), bench, "npo_gd", tmp_path / "s", progress=False)
    with pytest.raises(TypeError, match=r"out: give a path .*, not NoneType"):
        unlearn(tiny_model(), bench, resolved, None, progress=False)
    with pytest.raises(
        TypeError, match=r"not LanguageModel LanguageModel\(.{0,50}\.\.\.; a model in m"
    ):
        inject(tiny_model(), bench, {"max_epochs": 1}, cache_dir=tmp_path / "i")


def test_a_model_without_one_list_of_decoder_blocks_unlearns_and_rmu_says_why(bench, tmp_path):
    """XLM as a causal LM keeps its attentions and feed-forwards in lists side by side, no
    one list of decoder blocks: every unlearning stopped on "cannot find its decoder
    layers", looked for to check RMU's layer settings. GA unlearns it; RMU, which reads a
    block's output, is one message naming the model's class."""
    from unpact.errors import NotForThisModel
    from unpact.testing import tiny_other

    base = tiny_other("xlm")
    before = {k: v.clone() for k, v in _cpu_state(base.model).items()}
    cfg = resolve_config("ga", overrides=["steps=2", "lr=1e-3"])
    w = _weights(unlearn(base, bench, cfg, tmp_path / "ga", progress=False))
    assert any(not torch.equal(w[k], before[k]) for k in w)
    rmu = resolve_config("rmu", overrides=["steps=1", "layer=1", "update_layers=[1]"])
    with pytest.raises(NotForThisModel, match=r"XLMWithLMHeadModel: cannot find its decoder"):
        unlearn(tiny_other("xlm"), bench, rmu, tmp_path / "rmu", progress=False)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: accelerate trains there"
)
def test_a_model_loaded_on_the_cpu_trains_on_the_gpu_with_its_references(bench, tmp_path):
    """accelerate moves only the module it wraps to the GPU: a KL method's frozen copy of a
    model loaded on the CPU (every spec loads there) stayed on the CPU, and the first step's
    KL mixed devices. The references are now made where the model trains."""
    for name in ("ga_kl", "npo_kl", "keytoken_npo"):
        lm = tiny_model(seed=3)
        lm.model.to("cpu")
        cfg = resolve_config(name, overrides=["steps=2"])
        r = unlearn(lm, bench, cfg, tmp_path / name, progress=False)
        assert lm.device.type == "cuda", name
        assert all(math.isfinite(v) for v in r.final_losses.values()), name


def test_unlearning_trains_on_the_device_asked_for_and_refuses_one_not_here(bench, tmp_path):
    """`device` is where it trains: accelerate chose a GPU whenever there was one (a run on
    `device: cpu` unlearned on the GPU, one on cuda:1 on cuda:0)."""
    lm = tiny_model(seed=3)
    cfg = resolve_config("ga_kl", overrides=["steps=1"])
    unlearn(lm, bench, cfg, tmp_path / "cpu", progress=False, device="cpu")
    assert lm.device.type == "cpu"
    if torch.cuda.is_available():
        return
    with pytest.raises(UnpactError, match="'cuda:1' asked for, but no CUDA GPU"):
        unlearn(lm, bench, cfg, tmp_path / "gpu", progress=False, device="cuda:1")
    assert not (tmp_path / "gpu").exists()  # refused before anything was written
    with pytest.raises(UnpactError, match="unknown device 'tpu'"):
        unlearn(lm, bench, cfg, tmp_path / "tpu", progress=False, device="tpu")


def test_a_cpu_training_after_a_gpu_one_in_the_same_process(bench, tmp_path):
    """accelerate keeps one state per process, made by its first Accelerator: on a GPU
    machine a second `unlearn` on `device="cpu"` (or a run's `device: cpu` after an
    `auto` one) was accelerate's "AcceleratorState has already been initialized ... pass
    `cpu=True`" (seen on an H200 in the unit tier). The state a GPU training leaves is
    written here by hand, for a machine without one."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    Accelerator(cpu=True)
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["device"] = torch.device("cuda", 0)  # as a training on the GPU leaves it
    lm = tiny_model(seed=3)
    cfg = resolve_config("ga", overrides=["steps=1"])
    unlearn(lm, bench, cfg, tmp_path / "cpu", progress=False, device="cpu")
    assert lm.device.type == "cpu"
    assert PartialState._shared_state["device"].type == "cpu"


def test_bf16_precision_trains_under_autocast_and_keeps_float32_weights(bench, tmp_path):
    """`precision: bf16` (injection had it; unlearning, on the same step loop, did not):
    each step's matmuls in bf16, the weights and the saved model float32, numbers other
    than float32's; a float32 run resumed from before the setting existed is still the
    same run, and its runner key is the one it had."""
    import yaml

    seen: set[torch.dtype] = set()

    def spy(module, args, output):
        seen.add(output.dtype)

    lm = tiny_model(seed=3)
    handle = lm.model.model.layers[0].mlp.down_proj.register_forward_hook(spy)
    cfg = resolve_config("ga", overrides=["steps=2", "lr=1e-3", "precision=bf16"])
    bf16 = unlearn(lm, bench, cfg, tmp_path / "bf16", progress=False)
    handle.remove()
    assert torch.bfloat16 in seen
    weights = _weights(bf16)
    assert {w.dtype for w in weights.values()} == {torch.float32}
    two = ("steps=2", "save_every=1")
    fp32 = _weights(_run(bench, tmp_path / "fp32", method="ga", extra=two))
    assert any(not torch.equal(weights[k], fp32[k]) for k in weights)
    # a run begun before the setting: its config.yaml has no precision, and it resumes
    config = tmp_path / "old" / "config.yaml"
    with pytest.raises(Exception, match="stopped after step 1"):
        _run(bench, tmp_path / "old", method="ga", extra=two, stop_after=1)
    saved = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({k: v for k, v in saved.items() if k != "precision"}))
    resumed = _weights(_run(bench, tmp_path / "old", method="ga", extra=two, resume=True))
    assert all(torch.equal(resumed[k], fp32[k]) for k in fp32)


def test_an_adapter_saved_alone_names_its_base_wherever_it_is_loaded(bench, tmp_path, monkeypatch):
    """`lora.merge: false` after `--model ./base` wrote `base_model_name_or_path: "base"`,
    and the adapter then loaded only from the folder the run was started in ("We couldn't
    connect to 'https://huggingface.co'" from anywhere else)."""
    from unpact.models import load_model, save_model

    tiny = tiny_model(seed=3)
    save_model(tiny.model, tiny.tokenizer, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config("ga", overrides=["steps=1", "lora.r=4", "lora.merge=false"])
    done = unlearn("base", bench, cfg, "out", progress=False)
    saved = json.loads((tmp_path / "out" / "model" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "base")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "cache"))
    assert load_model(str(tmp_path / done.model_dir)).model.config.hidden_size == 64
