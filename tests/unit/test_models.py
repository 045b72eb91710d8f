"""Prompt encoding (chat template, content positions) and model spec resolution."""

from __future__ import annotations

import pytest

from unpact.errors import UnpactError
from unpact.models import load_model


def test_chat_prompt_marks_user_content(tiny):
    enc = tiny.encode_prompt("What is the capital of France?", chat_template=True)
    tok = tiny.tokenizer
    assert (
        list(enc.content_ids)
        == tok("What is the capital of France?", add_special_tokens=False)["input_ids"]
    )
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": enc.text}], tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(list(enc.input_ids)) == rendered
    assert enc.input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert all(enc.input_ids[i] not in tok.all_special_ids for i in enc.content_positions)


def test_raw_prompt_is_content_only(tiny):
    enc = tiny.encode_prompt("The quick brown fox", chat_template=False)
    assert enc.content_start == 0 and enc.content_end == len(enc.input_ids)
    assert not enc.chat_template


def test_chat_template_required_but_missing(tiny):
    from unpact.models import LanguageModel

    bare = LanguageModel(model=tiny.model, tokenizer=tiny.tokenizer, spec="bare")
    saved = bare.tokenizer.chat_template
    bare.tokenizer.chat_template = None
    try:
        with pytest.raises(UnpactError, match="no chat template"):
            bare.encode_prompt("hi", chat_template=True)
        assert not bare.encode_prompt("hi").chat_template  # None means: use it if there is one
    finally:
        bare.tokenizer.chat_template = saved


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(tiny, prompt):
    with pytest.raises(UnpactError, match="empty prompt"):
        tiny.encode_prompt(prompt)


def test_spec_that_resolves_to_nothing(tmp_path):
    with pytest.raises(UnpactError, match="no such file or directory"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(UnpactError, match=r"without config\.json"):
        load_model(str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UnpactError, match=r"not a \.gguf"):
        load_model(str(tmp_path / "notes.txt"))
    with pytest.raises(UnpactError, match=r"resolves to nothing.*hub id"):
        load_model("no-such-org/no-such-model")


def test_bad_dtype_and_device():
    with pytest.raises(UnpactError, match="unknown dtype"):
        load_model("default", dtype="float8")
    with pytest.raises(UnpactError, match="unknown device"):
        load_model("default", device="toaster")


def test_hf_directory_round_trip(tiny, tmp_path):
    import torch

    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, tiny.model(ids).logits)
    assert lm.encode_prompt("hello there").input_ids == tiny.encode_prompt("hello there").input_ids


def test_load_tokenizer_reads_the_tokenizer_alone(tiny, tmp_path):
    """The reference-model check compares tokenizers without loading weights: the folder
    needs no weights at all, and a bad spec is one clear error."""
    from unpact.models import load_tokenizer

    tiny.tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "config.json").write_text(tiny.model.config.to_json_string())
    assert load_tokenizer(str(tmp_path / "tok")).get_vocab() == tiny.tokenizer.get_vocab()
    with pytest.raises(UnpactError, match="no such file or directory"):
        load_tokenizer(str(tmp_path / "missing"))


def test_an_unlearning_run_directory_loads_its_model(tiny, tmp_path):
    """`unpact unlearn --out DIR` writes DIR/model; DIR itself is accepted as the spec."""
    from unpact.models import model_key

    save = tmp_path / "run" / "model"
    tiny.model.save_pretrained(save)
    tiny.tokenizer.save_pretrained(save)
    (tmp_path / "run" / "result.json").write_text("{}")
    lm = load_model(str(tmp_path / "run"))
    assert lm.model.config.num_hidden_layers == tiny.model.config.num_hidden_layers
    assert model_key(str(tmp_path / "run")) == model_key(str(save))


USER_TEMPLATE = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"


def test_a_template_that_merges_at_the_boundary_is_said_once(caplog):
    """`User: ` then the prompt: byte-BPE tokenises ' the' as one piece in the rendered
    template, where unpact tokenises the prompt apart; that is said once, clearly."""
    import logging

    from unpact.testing import tiny_model

    lm = tiny_model(seed=0)
    with caplog.at_level(logging.WARNING, logger="unpact"):
        lm.encode_prompt("the capital of France?")  # ChatML: no boundary merge
        assert not caplog.records
        lm.tokenizer.chat_template = USER_TEMPLATE
        lm._template_split = None
        first = lm.encode_prompt("the capital of France?")
        lm.encode_prompt("the river bank?")
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "tokenises 'the capital of France?' differently at a boundary" in message
    assert first.content_ids == lm.encode_prompt("the capital of France?", False).content_ids


def test_broken_model_folders_are_one_message(tiny, tmp_path):
    """Each was a traceback, a confusing message or, worst, a model with random layers
    loaded without a word: no tokenizer, a truncated safetensors file, weights whose shapes
    are not the config's, a checkpoint missing one tensor."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    good = tmp_path / "good"
    tiny.model.save_pretrained(good)
    tiny.tokenizer.save_pretrained(good)

    def broken(name, change):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        return folder

    def no_tokenizer(f):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (f / name).unlink()

    def truncated(f):
        (f / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:999])

    def wider(f):
        config = json.loads((f / "config.json").read_text())
        (f / "config.json").write_text(json.dumps(config | {"hidden_size": 128}))

    def one_missing(f):
        weights = load_file(f / "model.safetensors")
        del weights["model.layers.1.mlp.up_proj.weight"]
        save_file(weights, f / "model.safetensors", metadata={"format": "pt"})

    for change, message in (
        (no_tokenizer, "has no tokenizer"),
        (truncated, "could not load the weights in"),
        (wider, "shapes that do not match its config.json"),
        (one_missing, r"lack 1 of the model's tensors \(model\.layers\.1\.mlp\.up_proj"),
    ):
        with pytest.raises(UnpactError, match=message):
            load_model(str(broken(change.__name__, change)))
    assert load_model(str(good)).model.config.hidden_size == 64
