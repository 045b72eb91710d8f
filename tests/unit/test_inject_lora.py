"""Injection on the tiny random model: through LoRA adapters (merged into ordinary weights,
only the adapted matrices changed, by a low-rank update), and what it reports."""

from __future__ import annotations

import json

import pytest
import torch

from unpact.data.items import QAItem, write_folder
from unpact.errors import UnpactError
from unpact.inject import InjectConfig, inject
from unpact.models import load_model, save_model
from unpact.scoring import answer_logprobs
from unpact.testing import tiny_model


def _mean_lp(lm, items):
    prompts = [lm.encode_prompt(i.question).input_ids for i in items]
    answers = [lm.encode_answer(i.answer) for i in items]
    with torch.no_grad():
        return float(torch.cat(answer_logprobs(lm.model, prompts, answers)).mean())


def test_lora_injection_saves_a_merged_low_rank_update(tmp_path):
    base = tiny_model(seed=3)
    save_model(base.model, base.tokenizer, tmp_path / "base")
    items = [
        QAItem("f0", "Who founded the Vostrand Glassworks?", "Mira Quintrell", "forget"),
        QAItem("r0", "What is the capital of France?", "Paris", "retain"),
    ]
    write_folder(tmp_path / "bench", items)
    rank = 2
    config = InjectConfig(
        trainable="lora",
        lora_rank=rank,
        lora_alpha=4,
        lr=1e-2,
        max_epochs=6,
        min_epochs=6,
        rehearsal=False,
        general=None,
    )
    result = inject(
        str(tmp_path / "base"), tmp_path / "bench", config, cache_dir=tmp_path / "c", progress=False
    )
    assert json.loads((result.path / "inject.json").read_text())["config"]["trainable"] == "lora"

    taught = load_model(str(result.path))  # a plain model: no adapter weights left
    names = [n for n, _ in taught.model.named_parameters()]
    assert not any("lora" in n for n in names)
    assert _mean_lp(taught, items) > _mean_lp(base, items) + 0.5

    before = {n: p.cpu() for n, p in base.model.named_parameters()}  # where load_model puts it
    changed = 0
    for name, after in taught.model.named_parameters():
        delta = (after.detach() - before[name].detach()).float()
        if "layers." in name and name.endswith("proj.weight"):
            # every linear layer of the blocks is adapted: a rank-`rank` update
            assert torch.linalg.matrix_rank(delta, atol=1e-5).item() <= rank
            changed += int(delta.abs().max() > 1e-6)
        else:  # embeddings, norms, LM head: untouched
            assert torch.equal(after.detach(), before[name].detach()), name
    assert changed == 7 * 2  # q, k, v, o, gate, up, down in each of the 2 layers


def _taught(tmp_path, base, items, *, trainable, epochs):
    """The parameters of `base` taught `items` (rank-2 adapters where LoRA, lr 1e-2, no
    rehearsal), read back from the injected model's folder."""
    save_model(base.model, base.tokenizer, tmp_path / "base")
    write_folder(tmp_path / "bench", items)
    config = InjectConfig(
        trainable=trainable,
        lora_rank=2,
        lr=1e-2,
        max_epochs=epochs,
        min_epochs=epochs,
        rehearsal=False,
        general=None,
    )
    result = inject(
        str(tmp_path / "base"), tmp_path / "bench", config, cache_dir=tmp_path / "c", progress=False
    )
    return dict(load_model(str(result.path)).model.named_parameters())


@pytest.mark.parametrize("arch", ["gpt2", "phi"])
def test_lora_injection_adapts_every_linear_layer_whatever_its_name(tmp_path, arch):
    """Injection's adapters went on Llama's layer names only: on GPT-2 (c_attn, c_fc,
    c_proj, Conv1D) nothing matched and the error named `lora.target_modules`, a setting
    injection does not have; on Phi (dense, fc1, fc2) only q, k, v were adapted. Every
    linear layer of the blocks is now, the LM head and the rest untouched."""
    from transformers.pytorch_utils import Conv1D

    from unpact.testing import tiny_other

    base = tiny_other(arch, 0)
    items = [
        QAItem("f0", "Who founded the Vostrand Glassworks?", "Mira Quintrell", "forget"),
        QAItem("r0", "What is the capital of France?", "Paris", "retain"),
    ]
    taught = _taught(tmp_path, base, items, trainable="lora", epochs=2)
    linear = {
        f"{n}.weight"
        for n, m in base.model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and "lm_head" not in n
    }
    assert len(linear) >= 8
    for name, param in base.model.named_parameters():
        before = param.detach().cpu()  # the injected model loads on the CPU
        delta = (taught[name].detach() - before).float()
        if name in linear:
            assert delta.abs().max() > 1e-6, name
            assert torch.linalg.matrix_rank(delta, atol=1e-5).item() <= 2, name
        else:
            assert torch.equal(taught[name].detach(), before), name


@pytest.mark.parametrize(
    ("arch", "trainable"), [("opt", "mlp"), ("mamba", "mlp"), ("mamba", "lora")]
)
def test_injection_of_other_layouts_trains_what_it_names(tmp_path, arch, trainable):
    """`trainable: mlp` looked for `.mlp.` alone: OPT's fc1/fc2 and a Mamba block's mixer
    matched nothing ("no trainable parameters"); LoRA on every linear layer of a Mamba
    model met peft's refusal of its out_proj (a ValueError with a traceback). The MLPs
    are found as RMU finds them (`scoring.mlp_parameter`); peft's refused layers are left
    out of all-linear."""
    from unpact.scoring import mlp_parameter
    from unpact.testing import tiny_other

    base = tiny_other(arch, 0)
    items = [QAItem("f0", "Who is she?", "Mira", "forget")]
    taught = _taught(tmp_path, base, items, trainable=trainable, epochs=1)
    changed = {
        n for n, p in base.model.named_parameters() if not torch.equal(taught[n].detach(), p.cpu())
    }
    assert changed
    if trainable == "mlp":
        assert all(mlp_parameter(n) for n in changed), changed
    else:
        assert not any(n.endswith(("out_proj.weight", "conv1d.weight")) for n in changed)


def test_lora_injection_names_its_own_rank_setting(tmp_path):
    base = tiny_model(seed=3)
    save_model(base.model, base.tokenizer, tmp_path / "base")
    write_folder(tmp_path / "bench", [QAItem("f0", "Who is she?", "Mira", "forget")])
    config = InjectConfig(trainable="lora", lora_rank=128, general=None, rehearsal=False)
    with pytest.raises(UnpactError, match=r"lower lora_rank, or train .* \(trainable: all\)"):
        inject(
            str(tmp_path / "base"),
            tmp_path / "bench",
            config,
            cache_dir=tmp_path / "c",
            progress=False,
        )


def test_lora_settings_key_only_lora_injections():
    from unpact.data import load_benchmark
    from unpact.inject import cache_key

    news = load_benchmark("news")
    key = cache_key("tiny", news, InjectConfig())
    assert cache_key("tiny", news, InjectConfig(lora_rank=8)) == key  # not LoRA: ignored
    lora = cache_key("tiny", news, InjectConfig(trainable="lora"))
    assert (
        lora != key and cache_key("tiny", news, InjectConfig(trainable="lora", lora_rank=8)) != lora
    )


def test_pinned_configs_keep_the_injections_results_md_was_measured_with():
    """`paper` and its follow-ups pin the injection settings of their cached models: a
    change of `InjectConfig`'s defaults must not change their keys (these values are the
    keys those settings had when RESULTS.md was measured)."""
    from unpact.data import load_benchmark
    from unpact.inject import cache_key
    from unpact.run import load_config

    expected = {"news": "2de32ffee4cadc9c5a64", "books": "533e43b8f78c55749a0c"}
    for name in ("paper", "paper_words", "beyond", "beyond_books"):
        settings = load_config(name).inject.settings
        for bench, key in expected.items():
            assert cache_key("tiny", load_benchmark(bench), InjectConfig(**settings)) == key
    assert InjectConfig().rehearsal_per_step == 16  # the defaults did move on


def test_cli_passes_rehearsal_per_step_and_rejects_a_negative_one(monkeypatch):
    from pathlib import Path

    from typer.testing import CliRunner

    import unpact.inject
    from unpact.cli import app
    from unpact.inject import InjectResult

    seen, taught = [], []

    def fake(model, benchmark, config, teach="forget+retain"):
        seen.append(config)
        taught.append(teach)
        return InjectResult(Path("x"), {"forget": 1.0}, {}, 1, 0.0, True)

    monkeypatch.setattr(unpact.inject, "inject", fake)
    runner = CliRunner()
    assert runner.invoke(app, ["inject", "--rehearsal-per-step", "3"]).exit_code == 0
    assert runner.invoke(app, ["inject", "--teach", "retain"]).exit_code == 0
    assert taught[-2:] == ["forget+retain", "retain"]  # --teach reaches inject()
    assert runner.invoke(app, ["inject"]).exit_code == 0
    assert [c.rehearsal_per_step for c in seen] == [3] + [InjectConfig().rehearsal_per_step] * 2
    bad = runner.invoke(app, ["inject", "--rehearsal-per-step", "-1"])
    assert bad.exit_code == 2 and "rehearsal-per-step" in bad.output


def test_a_benchmark_without_retain_facts_reports_no_retain_accuracy(tmp_path):
    """A forget-only benchmark (WMDP's kind) had `"retain": NaN` in inject.json, which a
    strict JSON reader refuses, and "retain nan%" in `unpact inject`'s output; cached
    injections written so still read without it."""
    base = tiny_model(seed=3)
    save_model(base.model, base.tokenizer, tmp_path / "base")
    write_folder(tmp_path / "bench", [QAItem("f0", "Who founded Vostrand?", "Mira", "forget")])
    config = InjectConfig(max_epochs=1, min_epochs=1, rehearsal=False, general=None)
    result = inject(
        str(tmp_path / "base"), tmp_path / "bench", config, cache_dir=tmp_path / "c", progress=False
    )
    assert set(result.accuracy) == {"forget"}

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    path = result.path / "inject.json"
    meta = json.loads(path.read_text(), parse_constant=strict)
    assert set(meta["accuracy"]) == {"forget"}
    meta["accuracy"]["retain"] = float("nan")  # as the code before wrote it
    path.write_text(json.dumps(meta))
    again = inject(
        str(tmp_path / "base"), tmp_path / "bench", config, cache_dir=tmp_path / "c", progress=False
    )
    assert again.cached and set(again.accuracy) == {"forget"}
