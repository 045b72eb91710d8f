"""A whole run on architectures other than Llama (tiny random models): GPT-2 (Conv1D,
learned positions, `h`), OPT (`decoder.layers`, fc1/fc2), GPT-NeoX (`embed_in`,
`final_layer_norm`) and Mistral (a sliding window shorter than the prompts). RMU,
quantization, directional ablation, the logit lens and the probe once stopped on Llama's
module names or, for quantization, silently did nothing; Mistral's attribution and shared
prefixes on a shape error."""

from __future__ import annotations

import pytest

from tests.process.test_plugins import QUESTIONS
from unpact.data.items import QAItem, write_folder
from unpact.models import save_model
from unpact.scoring import generate
from unpact.testing import tiny_other

ATTACKS = [
    {"name": "quantize", "settings": {"bits": 4, "group_size": 32}},
    {"name": "ablate_direction"},
    {"name": "logit_lens"},
    {"name": "probe"},
]


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gpt_neox", "mistral"])
def test_a_run_attacks_and_unlearns_other_architectures(arch, tmp_path, printed):
    from unpact.run import run

    original, other = tiny_other(arch, 0), tiny_other(arch, 1)
    save_model(original.model, original.tokenizer, tmp_path / "original")
    save_model(other.model, other.tokenizer, tmp_path / "other")
    # the original's own greedy answers: it knows every item, the other model none
    outs = generate(original, QUESTIONS, max_new_tokens=4)
    items = [  # the perturbed answers give the probe its options
        QAItem(f"q{n}", q, a, "forget" if n < 4 else "retain", perturbed_answers=("zz", "qq"))
        for n, (q, o) in enumerate(zip(QUESTIONS, outs))
        for a in [o[0].text.strip() or "x"]
    ]
    write_folder(tmp_path / "bench", items)
    config = {
        "model": str(tmp_path / "original"),
        "data": {"benchmark": str(tmp_path / "bench"), "general": None},
        "inject": {"enabled": False},
        "methods": [
            {"model": str(tmp_path / "other"), "name": "other"},  # forgets every item
            {"method": "rmu", "config": {"steps": 1, "batch_size": 2, "settings": {"layer": 1}}},
        ],
        "attacks": ATTACKS,
        "judge": {"max_new_tokens": 4},
        "statistics": {"resamples": 10},
        "membership": {"enabled": False},
    }
    res = run(config, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False).results
    assert res["methods"]["other"]["forgotten"] == 4
    recovery = res["methods"]["other"]["recovery"]
    assert all(recovery[a["name"]] is not None for a in ATTACKS), recovery
    assert res["methods"]["rmu"]["forget_acc_before"] == 1.0
    # and no library warning in the output (GPT-2's padding warning once was)
    err = printed()
    assert "[transformers]" not in err and "Warning" not in err, err[-2000:]


def test_a_run_on_gemma_3n_leaves_out_what_reads_one_residual_stream(tmp_path):
    """Gemma 3n's layers carry parallel streams (AltUp): RMU, which steers one residual
    stream, stopped the whole run when its turn came, after the other methods. It is left
    out with the reason (`skipped["method.rmu"]`), as are the hidden-state attacks, and the
    run goes on: the other method, quantization and the report. A run whose every method
    is left out stops with the reasons."""
    from unpact.errors import UnpactError
    from unpact.judge import choose_options
    from unpact.run import run

    original, other = tiny_other("gemma3n_text", 0), tiny_other("gemma3n_text", 1)
    save_model(original.model, original.tokenizer, tmp_path / "original")
    save_model(other.model, other.tokenizer, tmp_path / "other")
    # multiple choice, the right option being the original's pick (its greedy answers are
    # punctuation, which no judge can read)
    words = ["Paris", "Quintrell", "seven", "Mira", "river", "glass", "1874", "Zorblax"]
    options = [tuple((words * 2)[n : n + 3]) for n in range(len(QUESTIONS))]
    picks = choose_options(original, QUESTIONS, options)
    items = [
        QAItem(f"q{n}", q, options[n][k], "forget" if n < 4 else "retain", choices=options[n])
        for n, (q, k) in enumerate(zip(QUESTIONS, picks))
    ]
    write_folder(tmp_path / "bench", items)
    rmu = {"method": "rmu", "config": {"steps": 1, "batch_size": 2, "settings": {"layer": 1}}}
    config = {
        "model": str(tmp_path / "original"),
        "data": {"benchmark": str(tmp_path / "bench"), "general": None},
        "inject": {"enabled": False},
        "methods": [{"model": str(tmp_path / "other"), "name": "other"}, rmu],
        "attacks": ATTACKS,
        "judge": {"max_new_tokens": 4},
        "statistics": {"resamples": 10},
        "membership": {"enabled": False},
    }
    out = run(config, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    res = out.results
    assert list(res["methods"]) == ["other"]
    assert res["skipped"]["method.rmu"].startswith("not run on original: ")
    assert "parallel streams" in res["skipped"]["method.rmu"]
    assert res["methods"]["other"]["recovery"]["quantize"] is not None
    for attack in ("ablate_direction", "logit_lens", "probe"):
        assert "parallel streams" in res["skipped"][f"attack.{attack}"]
    assert "method.rmu" in out.report.read_text()
    with pytest.raises(UnpactError, match=r"every method was left out: not run on original"):
        run(
            {**config, "methods": [rmu]},
            tmp_path / "out2",
            cache_dir=tmp_path / "cache",
            progress=False,
        )
