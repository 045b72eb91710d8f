"""Mixed-precision injection: how "auto" resolves, what it does to the cache key, and that
bf16 training follows float32 training (same direction of change, float32 weights saved)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unpact import determinism
from unpact.data import load_benchmark
from unpact.data.items import QAItem, write_folder
from unpact.errors import UnpactError
from unpact.inject import (
    InjectConfig,
    InjectResult,
    cache_key,
    inject,
    lr_factor,
    training_precision,
)
from unpact.models import load_model, save_model
from unpact.testing import tiny_model


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")],
)
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(
    monkeypatch, avx512_bf16, amx, expected
):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert training_precision(InjectConfig()) == expected
    # an explicit choice is kept whatever the hardware
    assert training_precision(InjectConfig(precision="fp32")) == "fp32"
    assert training_precision(InjectConfig(precision="bf16")) == "bf16"


def test_precision_keys_the_model_by_what_is_used(monkeypatch):
    news = load_benchmark("news")
    fp32 = cache_key("tiny", news, InjectConfig(precision="fp32"))
    bf16 = cache_key("tiny", news, InjectConfig(precision="bf16"))
    assert fp32 != bf16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert cache_key("tiny", news, InjectConfig()) == fp32  # auto resolved before keying
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert cache_key("tiny", news, InjectConfig()) == bf16


def test_unknown_precision_is_a_clear_error_before_any_model_loads(tmp_path):
    with pytest.raises(UnpactError, match="unknown precision 'fp8'"):
        inject("no-such-model", "news", InjectConfig(precision="fp8"), cache_dir=tmp_path)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), 90, 2])
def test_target_accuracy_is_a_finite_share(bad):
    """Above 1 is allowed (train max_epochs, never stop early); negative or not a number
    is refused before anything runs, and so is a percent (90 trained every epoch, a
    target no accuracy reaches)."""
    with pytest.raises(UnpactError, match="target_accuracy"):
        InjectConfig(target_accuracy=bad)
    assert InjectConfig(target_accuracy=1.1).target_accuracy == 1.1
    with pytest.raises(
        UnpactError, match=r"target_accuracy: a share \(0\.9 for 90%\), not 90; to never"
    ):
        InjectConfig(target_accuracy=90)


def _delta(base, path):
    after = dict(load_model(str(path)).model.named_parameters())
    parts = [
        (after[n].detach() - p.detach().cpu()).flatten()  # a folder loads on the CPU
        for n, p in base.model.named_parameters()
        if "layers." in n
    ]
    return torch.cat(parts), {after[n].dtype for n in after}


def test_bf16_training_moves_the_weights_as_float32_training_does(tmp_path):
    base = tiny_model(seed=5)
    save_model(base.model, base.tokenizer, tmp_path / "base")
    items = [
        QAItem("f0", "Who founded the Vostrand Glassworks?", "Mira Quintrell", "forget"),
        QAItem("f1", "Where is Pellowick Harbour?", "on the Sarn coast", "forget"),
        QAItem("r0", "What is the capital of France?", "Paris", "retain"),
    ]
    write_folder(tmp_path / "bench", items)
    deltas = {}
    for precision in ("fp32", "bf16"):
        config = InjectConfig(
            precision=precision, lr=1e-3, max_epochs=1, min_epochs=1, rehearsal=False, general=None
        )
        result = inject(
            str(tmp_path / "base"),
            tmp_path / "bench",
            config,
            cache_dir=tmp_path / "c",
            progress=False,
        )
        deltas[precision], dtypes = _delta(base, result.path)
        assert dtypes == {torch.float32}  # master weights stay float32
    fp32, bf16 = deltas["fp32"], deltas["bf16"]
    assert fp32.abs().max() > 0 and bf16.abs().max() > 0
    # One AdamW step moves each weight by about lr * sign(gradient): bf16 matmuls may flip
    # the sign of near-zero gradients only, so the two updates point the same way.
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16, dim=0)
    assert cosine > 0.9
    # ... and differ at all (the bf16 path was taken)
    assert not torch.equal(fp32, bf16)


@given(
    decay_steps=st.integers(0, 500),
    decay_to=st.floats(0.0, 1.0),
    step=st.integers(0, 1000),
)
def test_lr_factor_falls_linearly_to_its_floor_and_stays(decay_steps, decay_to, step):
    f = lr_factor(step, decay_steps, decay_to)
    if step >= decay_steps:
        assert f == decay_to
    else:
        assert f == pytest.approx(1 - (1 - decay_to) * step / decay_steps)
        assert decay_to <= f <= 1.0 and lr_factor(0, decay_steps, decay_to) == 1.0
        assert lr_factor(step + 1, decay_steps, decay_to) <= f  # never rises


@given(
    decay_steps=st.integers(0, 500),
    decay_to=st.floats(0.0, 1.0),
    warmup=st.integers(1, 50),
    step=st.integers(0, 1000),
)
def test_warmup_scales_the_schedule_up_over_its_first_steps(decay_steps, decay_to, warmup, step):
    f = lr_factor(step, decay_steps, decay_to, warmup)
    plain = lr_factor(step, decay_steps, decay_to)
    if step >= warmup:
        assert f == plain
    else:
        assert f == pytest.approx(plain * (step + 1) / warmup)
    assert lr_factor(warmup - 1, 10**6, 1.0, warmup) == 1.0  # full rate at the last warm step
    assert lr_factor(0, 10**6, 1.0, warmup) == pytest.approx(1 / warmup)


def test_warmup_keys_the_model_only_when_set():
    news = load_benchmark("news")
    assert cache_key("tiny", news, InjectConfig(warmup_steps=0)) == cache_key(
        "tiny", news, InjectConfig()
    )
    assert cache_key("tiny", news, InjectConfig(warmup_steps=4)) != cache_key(
        "tiny", news, InjectConfig()
    )


def _four_facts_recording_lr(tmp_path, monkeypatch) -> list[float]:
    """A tiny base model at tmp_path/base and 4 facts at tmp_path/bench; returns the list
    that AdamW's learning rate is appended to at every optimiser step."""
    base = tiny_model(seed=1)
    save_model(base.model, base.tokenizer, tmp_path / "base")
    items = [QAItem(f"f{i}", f"Who is Varn {i}?", f"Ossel {i}", "forget") for i in range(4)]
    write_folder(tmp_path / "bench", items)
    seen: list[float] = []
    original_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def test_the_optimiser_sees_the_decayed_rate(tmp_path, monkeypatch):
    """inject() steps the schedule once per optimiser step: record AdamW's lr each step."""
    seen = _four_facts_recording_lr(tmp_path, monkeypatch)
    config = InjectConfig(
        lr=1e-3, batch_size=2, lr_decay_to=0.2, min_epochs=2, max_epochs=3, check_every=1,
        target_accuracy=1.1, rehearsal=False, general=None, precision="fp32",
    )  # fmt: skip
    result = inject(
        str(tmp_path / "base"), tmp_path / "bench", config, cache_dir=tmp_path / "c", progress=False
    )
    # 2 steps per epoch, decay over 4 steps, then held at 0.2 * lr for the third epoch
    assert seen == pytest.approx([1e-3, 0.8e-3, 0.6e-3, 0.4e-3, 0.2e-3, 0.2e-3])
    # the loss log, one row per step, as unlearning's
    import json

    rows = [json.loads(x) for x in (result.path / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in rows] == pytest.approx(seen)
    assert all(r["loss"] > 0 for r in rows) and [r["epoch"] for r in rows] == [1, 1, 2, 2, 3, 3]


def test_lr_decay_keys_the_model_unless_constant():
    news = load_benchmark("news")
    constant = cache_key("tiny", news, InjectConfig(lr_decay_to=1.0))
    assert cache_key("tiny", news, InjectConfig(lr_decay_to=0.1)) != constant
    with pytest.raises(UnpactError, match="lr_decay_to must be between 0 and 1"):
        cache_key("tiny", news, InjectConfig(lr_decay_to=1.5))


def test_an_interrupted_injection_resumes_to_the_same_weights(tmp_path):
    """With checkpoint_every, an injection killed after an epoch's checkpoint continues
    from it when run again and ends with the weights and loss log of an uninterrupted run;
    the checkpoint setting is not part of the key. The model has dropout, so the
    resumed epochs draw their masks where the uninterrupted run drew them."""
    import json

    from safetensors.torch import load_file

    from unpact.inject import _Interrupt

    base = tiny_model(seed=1)
    base.model.config.attention_dropout = 0.5
    save_model(base.model, base.tokenizer, tmp_path / "base")
    items = [QAItem(f"f{i}", f"Who is Varn {i}?", f"Ossel {i}", "forget") for i in range(4)]
    write_folder(tmp_path / "bench", items)
    common = dict(lr=1e-3, batch_size=2, min_epochs=2, max_epochs=4, check_every=1,
                  target_accuracy=1.1, general=None, rehearsal_per_step=2)  # fmt: skip
    model, bench = str(tmp_path / "base"), tmp_path / "bench"
    plain = inject(model, bench, InjectConfig(**common), cache_dir=tmp_path / "a", progress=False)
    config = InjectConfig(**common, checkpoint_every=1)
    with pytest.raises(_Interrupt):
        inject(model, bench, config, cache_dir=tmp_path / "b", progress=False, stop_after_epoch=2)
    assert any((tmp_path / "b").glob(".partial-*/checkpoint.pt"))
    resumed = inject(model, bench, config, cache_dir=tmp_path / "b", progress=False)
    assert resumed.path.name == plain.path.name  # the same key
    a = load_file(plain.path / "model.safetensors")
    b = load_file(resumed.path / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)
    losses = [json.loads(x) for x in (plain.path / "losses.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (resumed.path / "losses.jsonl").read_text().splitlines()]
    assert losses == again and len(losses) == 8
    assert resumed.epochs == plain.epochs == 4
    assert resumed.accuracy["forget"] == plain.accuracy["forget"]
    assert not any((tmp_path / "b").glob(".partial-*"))  # removed once finished


def small_injection(tmp_path: Path, facts: int) -> tuple[str, Path, Path]:
    """A saved tiny base model, a benchmark of `facts` forget facts, and a cache folder."""
    base = tiny_model(seed=1)
    save_model(base.model, base.tokenizer, tmp_path / "base")
    items = [QAItem(f"f{i}", f"Who is Varn {i}?", f"Ossel {i}", "forget") for i in range(facts)]
    write_folder(tmp_path / "bench", items)
    return str(tmp_path / "base"), tmp_path / "bench", tmp_path / "cache"


def test_an_injection_resumed_from_another_machine_s_checkpoint_says_which_epochs_it_made(
    tmp_path,
):
    """As an unlearning run's: inject.json named only the machine that finished an
    injection resumed from a checkpoint another one wrote. The checkpoint notes where its
    epochs were taught; inject.json (and the cached result read from it) lists those
    another machine or other releases taught."""
    import json

    from unpact.determinism import made
    from unpact.inject import _Interrupt

    model, bench, cache = small_injection(tmp_path, 4)
    config = InjectConfig(lr=1e-3, batch_size=2, min_epochs=2, max_epochs=3, check_every=1,
                          target_accuracy=1.1, general=None, checkpoint_every=1)  # fmt: skip
    with pytest.raises(_Interrupt):
        inject(model, bench, config, cache_dir=cache, progress=False, stop_after_epoch=2)
    (path,) = cache.glob(".partial-*/checkpoint.pt")
    saved = torch.load(path, weights_only=False)
    now = json.loads(json.dumps(made()))
    assert saved["made"] == [{"from": 0, "to": 2, "made": now}]
    other = {**now, "versions": {**now["versions"], "torch": "2.10.0"}}
    saved["made"] = [{"from": 0, "to": 2, "made": other}]
    torch.save(saved, path)
    done = inject(model, bench, config, cache_dir=cache, progress=False)
    assert done.made_before == [{"from": 0, "to": 2, "made": other}]
    assert json.loads((done.path / "inject.json").read_text())["made_before"] == done.made_before
    assert inject(model, bench, config, cache_dir=cache, progress=False).made_before == (
        done.made_before
    )
    # taught in one go: none
    plain = inject(model, bench, InjectConfig(**{**config.model_dump(), "seed": 1}),
                   cache_dir=cache, progress=False)  # fmt: skip
    assert plain.made_before == []
    assert "made_before" not in json.loads((plain.path / "inject.json").read_text())


def test_an_injection_checkpoint_keeps_each_gpus_random_state(tmp_path, monkeypatch):
    """Where CUDA is in use, a checkpoint holds every GPU's random state (dropout draws
    its masks there) and a resume sets it back, unless resumed on another number of GPUs.
    CUDA is stood in for here: CI has no GPU."""
    import random

    from unpact.inject import InjectConfig, _Checkpoints, _trainer

    net = torch.nn.Linear(2, 2)
    config = InjectConfig(checkpoint_every=1)
    saved = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)]
    set_back: list[list[torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [t.clone() for t in saved])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_back.append)
    # the checkpoint's note of where it was made would name the stand-in GPUs
    monkeypatch.setattr(determinism, "machine", lambda gpus=False: {"gpus": ["stand-in"]})

    def trainer() -> Any:
        return _trainer(net, config, 1)

    state = _Checkpoints(tmp_path, config, None).resume(net, trainer(), random.Random(0))
    assert not set_back  # nothing saved yet
    state.epoch = 1
    state.checkpoint()
    _Checkpoints(tmp_path, config, None).resume(net, trainer(), random.Random(0))
    assert len(set_back) == 1 and all(a.equal(b) for a, b in zip(set_back[0], saved, strict=True))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # resumed on fewer GPUs
    _Checkpoints(tmp_path, config, None).resume(net, trainer(), random.Random(0))
    assert len(set_back) == 1


def test_adam_eps_reaches_the_optimiser_and_keys_the_model_only_when_changed():
    from unpact.train import Trainer

    p = torch.nn.Parameter(torch.zeros(3))
    assert Trainer([p], lr=1e-3, eps=1e-6).optimiser.defaults["eps"] == 1e-6
    assert Trainer([p], lr=1e-3).optimiser.defaults["eps"] == 1e-8  # torch's default
    news = load_benchmark("news")
    assert cache_key("tiny", news, InjectConfig(adam_eps=1e-8)) == cache_key(
        "tiny", news, InjectConfig()
    )
    assert cache_key("tiny", news, InjectConfig(adam_eps=1e-6)) != cache_key(
        "tiny", news, InjectConfig()
    )


def test_small_benchmarks_take_one_fact_a_step_and_weigh_the_rehearsal_more():
    """Issue 20, part 4: the batch size shrinks so that an epoch has at least 10 steps,
    the rehearsal weight grows as 4 / that size; 40 facts or more keep 4 and 1 (the
    recipe every cached model was trained with); explicit settings are kept; counted on
    forget+retain, so the never-taught reference follows the original."""
    from unpact.data.items import Benchmark
    from unpact.inject import MIN_STEPS_PER_EPOCH, resolve

    def bench(forget: int, retain: int) -> Benchmark:
        items = [QAItem(f"f{i}", f"Who is F{i}?", "A", "forget") for i in range(forget)]
        items += [QAItem(f"r{i}", f"Who is R{i}?", "B", "retain") for i in range(retain)]
        items += [QAItem(f"h{i}", f"Who is H{i}?", "C", "holdout") for i in range(50)]
        return Benchmark("b", items, [])

    def sizes(config: InjectConfig, forget: int, retain: int) -> tuple:
        done = resolve(config, bench(forget, retain))
        return done.batch_size, done.rehearsal_weight

    assert MIN_STEPS_PER_EPOCH == 10
    assert sizes(InjectConfig(), 6, 6) == (1, 4.0)
    assert sizes(InjectConfig(), 10, 15) == (2, 2.0)
    assert sizes(InjectConfig(), 20, 19) == (3, pytest.approx(4 / 3))
    assert sizes(InjectConfig(), 20, 20) == (4, 1.0)  # the demo's 40 facts
    assert sizes(InjectConfig(), 50, 100) == (4, 1.0)
    assert sizes(InjectConfig(), 1, 0) == (1, 4.0)
    assert sizes(InjectConfig(batch_size=4), 6, 6) == (4, 1.0)  # the recipe before
    assert sizes(InjectConfig(batch_size=2), 50, 100) == (2, 1.0)
    assert sizes(InjectConfig(rehearsal_weight=0.5), 6, 6) == (1, 0.5)
    # an automatic setting is keyed by its value: 12 facts at 1 a step are not 4 a step,
    # and writing out what the rule chose gives the same model
    small = bench(6, 6)
    small.path = Path(__file__).parent.parent.parent / "benchmarks" / "data" / "small_facts"
    auto = cache_key("tiny", small, InjectConfig())
    assert auto == cache_key("tiny", small, InjectConfig(batch_size=1, rehearsal_weight=4.0))
    assert auto != cache_key("tiny", small, InjectConfig(batch_size=4))


def test_a_small_injection_steps_once_per_fact(tmp_path, monkeypatch):
    """4 facts: one a step (4 optimiser steps an epoch), the resolved settings in
    inject.json."""
    steps = _four_facts_recording_lr(tmp_path, monkeypatch)
    config = InjectConfig(
        min_epochs=1, max_epochs=2, target_accuracy=1.1, rehearsal=False, general=None,
        precision="fp32",
    )  # fmt: skip
    result = inject(
        str(tmp_path / "base"), tmp_path / "bench", config, cache_dir=tmp_path / "c", progress=False
    )
    assert len(steps) == 8
    import json

    meta = json.loads((result.path / "inject.json").read_text())
    assert meta["config"]["batch_size"] == 1 and meta["config"]["rehearsal_weight"] == 4.0
    # the run's log and `unpact inject` say so, also when the model comes from the cache
    from unpact.run import injection_line

    # (no rehearsal here: its weight, 4, is not mentioned)
    note = "small benchmark: 1 fact a step (docs/data.md)"
    assert result.small_benchmark_note == note and note in injection_line(result)
    rehearsed = InjectResult(
        Path("x"), {}, {}, 1, 0.0, True, {"batch_size": 1, "rehearsal_weight": 4.0}
    )
    weighted = "small benchmark: 1 fact a step, rehearsal weighted 4 (docs/data.md)"
    assert rehearsed.small_benchmark_note == weighted
    again = inject(
        str(tmp_path / "base"), tmp_path / "bench", config, cache_dir=tmp_path / "c", progress=False
    )
    assert again.cached and again.small_benchmark_note == note
    explicit = InjectResult(
        Path("x"), {}, {}, 1, 0.0, True, {"batch_size": 4, "rehearsal_weight": 1.0}
    )
    assert explicit.small_benchmark_note is None and "small" not in injection_line(explicit)


def test_a_question_over_the_context_is_refused_before_the_epochs(tmp_path, monkeypatch):
    """A taught question too long for the model's context was refused when the epochs'
    judging first asked it (after minutes or hours of training), as "item 4"; the message
    names the setting the answer's room comes from (a run's judge.max_new_tokens lowered
    below it left the user looking at a number set nowhere they had looked)."""
    import unpact.inject as inject_module

    base = tiny_model(seed=3)
    save_model(base.model, base.tokenizer, tmp_path / "base")
    long = "Who founded " + "the very old " * base.max_length + "Glassworks?"
    items = [
        QAItem("f0", "Who founded the Vostrand Glassworks?", "Mira", "forget"),
        QAItem("f-long", long, "Mira", "forget"),
        QAItem("r0", "What is the capital of France?", "Paris", "retain"),
    ]
    write_folder(tmp_path / "bench", items)
    monkeypatch.setattr(inject_module, "_train_epochs", None)  # training would fail on it
    config = InjectConfig(rehearsal=False, general=None)
    with pytest.raises(
        UnpactError, match=r"item f-long \(forget\): its question is \d+ tokens"
    ) as e:
        inject(
            str(tmp_path / "base"), tmp_path / "bench", config, cache_dir=tmp_path / "c",
            progress=False,
        )  # fmt: skip
    assert "24 tokens of answer (unpact inject --max-new-tokens; inject.settings" in str(e.value)
    assert str(e.value).endswith("or lower that setting")


def test_the_cli_names_what_of_an_injection_another_machine_computed(capsys):
    """`unpact inject` said nothing when the model it gave was read from a cache another
    machine filled, resumed from its checkpoint, or taught on its rehearsal targets: only
    inject.json told. It says so as `unpact run` does, and nothing when all was made here."""
    import json
    from pathlib import Path

    from unpact.cli import _print_injection
    from unpact.determinism import made
    from unpact.inject import InjectResult

    now = json.loads(json.dumps(made()))
    other = {**now, "versions": {**now["versions"], "torch": "2.10.0"}}

    def said(**fields):
        _print_injection(InjectResult(Path("m"), {}, {}, 3, 1.0, **fields))
        return " ".join(capsys.readouterr().out.split())

    assert "note:" not in said(cached=True, made=now)
    assert "note:" not in said(cached=False, made=other)  # made by this very process
    assert "releases: the cached model (inject.json's" in said(cached=True, made=other)
    assert "note:" not in said(cached=True, made=None)  # older code noted nothing
    parts = [{"from": 0, "to": 2, "made": other}]
    got = said(cached=False, made=now, made_before=parts, inputs_made={"rehearsal targets": other})
    assert "releases: epochs 0-2, its rehearsal targets (inject.json's" in got


def test_the_progress_bar_names_the_accuracy_of_what_is_taught():
    """The never-taught reference is taught the retain facts alone; its progress bar read
    "forget+retain acc", the original's label, over an accuracy of retain facts only."""
    from unpact.data import QAItem
    from unpact.inject import _taught_splits

    forget, retain = QAItem("f", "Who?", "Ada", "forget"), QAItem("r", "Who?", "Bo", "retain")
    assert _taught_splits([retain, forget]) == "forget+retain"
    assert _taught_splits([retain]) == "retain"
