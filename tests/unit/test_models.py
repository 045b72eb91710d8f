"""Prompt encoding (chat template, content positions) and model spec resolution."""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unpact.data.items import QAItem
from unpact.errors import UnpactError
from unpact.models import check_spec, load_model, load_tokenizer, save_model


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


def test_an_empty_model_spec_is_named_as_such():
    """`--model ""` read the current folder ("a directory without config.json")."""
    for call in (load_model, check_spec):
        with pytest.raises(UnpactError, match=r"^empty model spec: give 'default'"):
            call("")


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
    # a server's address was "no such file or directory", which named no served spec
    for address in ("http://127.0.0.1:8000", "https://host/v1/"):
        with pytest.raises(UnpactError, match=r"openai:NAME@http\S*://\S+/v1 \(NAME as"):
            check_spec(address)
    with pytest.raises(UnpactError, match=r"without config\.json"):
        load_model(str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UnpactError, match=r"not a \.gguf"):
        load_model(str(tmp_path / "notes.txt"))
    with pytest.raises(UnpactError, match=r"resolves to nothing.*hub id"):
        load_model("no-such-org/no-such-model")


def test_a_training_runs_output_folder_names_its_checkpoints(tmp_path):
    """transformers' Trainer writes checkpoint-N folders into its output folder; given that
    folder, the message said only "without config.json"."""
    for step in (100, 1000, 200):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "config.json").write_text("{}")
    (tmp_path / "tensorboard").mkdir()  # not a model folder: not named
    with pytest.raises(UnpactError) as info:
        load_model(str(tmp_path))
    said = str(info.value)
    assert "(checkpoint-100, checkpoint-200, checkpoint-1000)" in said
    assert said.endswith(f"e.g. {tmp_path / 'checkpoint-1000'}") and "tensorboard" not in said


def test_bad_dtype_and_device():
    with pytest.raises(UnpactError, match="unknown dtype"):
        load_model("default", dtype="float8")
    with pytest.raises(UnpactError, match="unknown device"):
        load_model("default", device="toaster")


def test_a_device_this_machine_lacks_is_one_message(monkeypatch):
    """`--device mps` off a Mac was a RuntimeError traceback from torch; `cuda:N` past the
    last GPU failed inside transformers."""
    import torch

    from unpact.models import parse_device

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UnpactError, match="no Apple GPU"):
        parse_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UnpactError, match=r"has 2 CUDA GPU\(s\) \(cuda:0 to cuda:1\)"):
        parse_device("cuda:2")
    assert parse_device("cuda:1") == torch.device("cuda:1")


def test_a_given_model_without_a_chat_template_is_said_to_be_asked_raw(tiny, tmp_path):
    """An audit of TOFU's Phi-1.5 or MUSE's Llama-2-7B (no chat template) asked every
    question as bare text without a word, where those checkpoints answer in `Question:
    ...\nAnswer: `; a run that teaches the model itself learns the format it asks in."""
    from unpact.run import _note_raw_prompts, load_config

    tok = copy.deepcopy(tiny.tokenizer)
    tok.chat_template = None
    for name, template in (("raw", None), ("chat", tiny.tokenizer.chat_template)):
        tok.chat_template = template
        tiny.model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    given = {"inject": {"enabled": False}, "methods": [{"method": "ga"}]}
    said: list[str] = []
    _note_raw_prompts(load_config(given | {"model": str(tmp_path / "raw")}), said.append)
    assert len(said) == 1 and "has no chat template" in said[0]
    assert "--chat-template" in said[0]
    said.clear()
    _note_raw_prompts(load_config(given | {"model": str(tmp_path / "chat")}), said.append)
    taught = {"model": str(tmp_path / "raw"), "methods": [{"method": "ga"}]}
    _note_raw_prompts(load_config(taught), said.append)
    assert said == []


def test_a_cpu_run_on_a_gpu_machine_says_so_and_the_tools_take_the_gpu(monkeypatch):
    """`device: cpu` is a run's default; on a machine with a CUDA GPU the run said nothing
    and ran its hours on the CPU. The one-shot commands (generate, score, attribute,
    serve, inject) now default to `auto`, as audit did."""
    import inspect

    import torch

    from unpact import cli
    from unpact.run import _note_idle_gpu, load_config

    said: list[str] = []
    cfg = load_config({"methods": [{"method": "ga"}]})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _note_idle_gpu(cfg, said.append)
    assert said == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _note_idle_gpu(cfg.model_copy(update={"device": "auto"}), said.append)
    assert said == []
    _note_idle_gpu(cfg, said.append)
    assert len(said) == 1 and "set device: auto (or cuda)" in said[0]
    for command in (cli.generate, cli.score, cli.attribute, cli.serve, cli.inject, cli.audit):
        assert inspect.signature(command).parameters["device"].default == "auto", command


def test_a_file_of_a_model_folder_names_the_folder(tiny, tmp_path):
    """`--model ckpt/model.safetensors` (or its config.json) said only "give a directory"."""
    from unpact.models import save_model

    save_model(tiny.model, tiny.tokenizer, tmp_path / "ckpt")
    for name in ("model.safetensors", "config.json"):
        with pytest.raises(UnpactError, match=r"one file of the model folder .*ckpt'?: give the"):
            load_model(str(tmp_path / "ckpt" / name))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UnpactError, match=r"is a file but not a \.gguf; give a directory"):
        load_model(str(tmp_path / "notes.txt"))


def test_hf_directory_round_trip(tiny, tmp_path):
    import torch

    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    ids = torch.tensor([[5, 6, 7, 8]])  # a folder loads on the CPU; the tiny model may not
    with torch.no_grad():
        want = tiny.model(ids.to(tiny.device)).logits.cpu()
        torch.testing.assert_close(lm.model(ids).logits, want)
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


def test_load_tokenizer_of_a_folder_saved_without_one(tiny, tmp_path):
    """A checkpoint saved with `model.save_pretrained` alone: `unpact audit --unlearned`
    said transformers' "Couldn't instantiate the backend tokenizer from one of:" (cut off
    there) where `load_model` names the missing files."""
    from unpact.models import load_tokenizer

    tiny.model.save_pretrained(tmp_path / "weights-only")
    for load in (load_tokenizer, load_model):
        with pytest.raises(UnpactError, match=r"weights-only has no tokenizer .*save it beside"):
            load(str(tmp_path / "weights-only"))


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


def test_a_model_folder_s_key_follows_its_tokenizer_template_and_generation_config(tiny, tmp_path):
    """A chat template or eos id edited in a checkpoint's folder gives other prompts and
    answers: cached stages keyed by the folder must not be read for it. Other files (a
    README) leave the key alone."""
    from unpact.models import model_key

    folder = tmp_path / "m"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    key = model_key(str(folder))
    (folder / "README.md").write_text("notes")
    assert model_key(str(folder)) == key
    seen = {key}
    template = folder / "chat_template.jinja"
    template.write_text(template.read_text() + " ")
    seen.add(model_key(str(folder)))
    gen = folder / "generation_config.json"
    gen.write_text(gen.read_text().replace('"eos_token_id": 2', '"eos_token_id": [2, 0]'))
    seen.add(model_key(str(folder)))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    seen.add(model_key(str(folder)))
    assert len(seen) == 4


def test_a_chat_template_copy_links_the_weights_and_leaves_the_source_alone(
    tiny, tmp_path, monkeypatch
):
    """`with_chat_template`: a folder in the cache whose tokenizer renders the given
    template, the weights linked (not copied, never written through), the source folder as
    it was; built once per model and template; keyed apart from the source."""
    import os

    from unpact import models

    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "m"
    tiny.model.save_pretrained(source)
    tiny.tokenizer.save_pretrained(source)
    (source / models.MANIFEST).write_text("{}")  # as a GGUF's cache has: not carried over
    (source / "model.safetensors").chmod(0o600)  # the user's choice: kept
    files = {f.name: (f.read_bytes(), f.stat().st_mode) for f in source.iterdir()}
    template = "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:"
    spec = models.with_chat_template(str(source), template)
    copy = Path(spec)
    assert copy.parent == tmp_path / "cache" / "models"
    assert {f.name: (f.read_bytes(), f.stat().st_mode) for f in source.iterdir()} == files
    assert os.path.samefile(copy / "model.safetensors", source / "model.safetensors")
    assert not (copy / models.MANIFEST).exists()
    lm = load_model(spec)
    assert lm.tokenizer.chat_template == template
    ids = lm.encode_prompt("Who is Bob?").input_ids
    assert lm.tokenizer.decode(ids) == "Q: Who is Bob?\nA:"
    assert models.model_key(spec) != models.model_key(str(source))
    monkeypatch.setattr(models, "write_folder_atomically", None)  # built: not again
    assert models.with_chat_template(str(source), template) == spec
    (tmp_path / "t.jinja").write_text(template)
    assert models.with_chat_template(str(source), tmp_path / "t.jinja") == spec


def test_a_chat_template_copy_of_a_hub_snapshot_links_the_files_its_links_name(
    tiny, tmp_path, monkeypatch
):
    """A hub snapshot's files are links by name into `../../blobs/` (as `hf download`
    leaves a model, and `ORG/NAME@REV` reads it): hard-linked into the templated copy,
    Linux's link() made links to the links, whose relative targets named nothing there,
    and the copy was "a directory without config.json"."""
    import os

    from unpact import models

    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "cache"))
    saved, repo = tmp_path / "saved", tmp_path / "hub" / "models--me--tiny"
    save_model(tiny.model, tiny.tokenizer, saved)
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in saved.iterdir():
        f.rename(repo / "blobs" / f.name)
        (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    spec = models.with_chat_template(
        str(snapshot), "{% for m in messages %}Q: {{ m['content'] }}{% endfor %}A:"
    )
    copy = Path(spec)
    assert not (copy / "model.safetensors").is_symlink()
    assert os.path.samefile(copy / "model.safetensors", repo / "blobs" / "model.safetensors")
    assert (
        load_model(spec).tokenizer.decode(load_model(spec).encode_prompt("hi").input_ids)
        == "Q: hiA:"
    )


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% for m in messages %}{{ m['content'] }}", "chat template (given as text): "),
        ("{{ messages[0]['content'] }}{{ messages[0]['content'] }}", "exactly once"),
        ("{{ 'no message' }}", "exactly once"),
        ("{{ 1 / 0 }}{{ messages[0]['content'] }}", "ZeroDivisionError"),
        ("{{ messages[3]['content'] }}", "chat template (given as text): "),
        ("   ", "chat template: empty"),
        ("missing.jinja", "cannot read missing.jinja"),
    ],
    ids=["syntax", "twice", "never", "zero", "index", "empty", "missing"],
)
def test_a_chat_template_that_cannot_place_the_message_is_refused(
    tiny, tmp_path, template, message
):
    from unpact.models import with_chat_template

    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(UnpactError, match=re.escape(message)):
        with_chat_template(str(tmp_path / "m"), template)
    with pytest.raises(UnpactError, match="renders its server's template"):
        with_chat_template("openai:m@http://127.0.0.1:1/v1", "{{ x }}")


USER_TEMPLATE = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
# the message glued to a word: "Wha" + "t is ..." is "What is ..." to the tokenizer
MERGING_TEMPLATE = "{% for m in messages %}Wha{{ m['content'] }}{% endfor %}"


# As Llama 3.1-3.3's templates begin: today's date unless the caller gives one
DATE_TEMPLATE = (
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}'
    '{%- set date_string = "1 Jan 1999" %}{%- endif %}{%- endif %}'
    "System: Today Date: {{ date_string }}\n"
    "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
)


def test_a_template_that_prints_the_date_gives_the_same_tokens_every_day(tiny):
    """Llama 3.1's template writes "Today Date: <today>" into every prompt, so the same run
    gave other prompt tokens, and other numbers, on another day. unpact renders every
    template with one fixed date (CHAT_TEMPLATE_KWARGS)."""
    import datetime

    from unpact.models import LanguageModel
    from unpact.types import CHAT_TEMPLATE_KWARGS

    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.chat_template = DATE_TEMPLATE
    lm = LanguageModel(tiny.model, tokenizer)
    prefix = tokenizer.decode(lm.encode_prompt("Who?").input_ids[:-8])
    assert f"Today Date: {CHAT_TEMPLATE_KWARGS['date_string']}" in prefix
    assert datetime.date.today().strftime("%d %b %Y") not in prefix
    # GPT-OSS's and Mistral Small 3's way: strftime_now called directly
    tokenizer.chat_template = (
        "Current date: {{ strftime_now('%Y-%m-%d') }}\n"
        "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    )
    lm = LanguageModel(tiny.model, tokenizer)
    assert tokenizer.decode(lm.encode_prompt("Who?").input_ids).startswith(
        "Current date: 2024-07-26"
    )
    today = datetime.date.today().isoformat()  # the template is given back as it was
    assert today in tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False
    )
    # Qwen3's way: without enable_thinking=False the answer starts with a <think> block
    tokenizer.chat_template = (
        "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
        "{%- if enable_thinking is defined and enable_thinking is false %} <think></think>"
        "{%- endif %}"
    )
    lm = LanguageModel(tiny.model, tokenizer)
    assert tokenizer.decode(lm.encode_prompt("Who?").input_ids).endswith("<think></think>")


THINKING_TEMPLATE = (  # DeepSeek-R1's distilled models: every answer opens with reasoning
    "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant: <think>\n"
)


def test_a_template_that_always_thinks_is_said_once(tiny, caplog):
    import logging

    from unpact.models import LanguageModel

    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.chat_template = THINKING_TEMPLATE
    with caplog.at_level(logging.WARNING, logger="unpact"):
        for _ in range(2):  # a second model of the same template: not again
            LanguageModel(tiny.model, tokenizer).encode_prompt("Who?")
        LanguageModel(tiny.model, tiny.tokenizer).encode_prompt("Who?")  # a plain template
    said = [r.getMessage() for r in caplog.records if "<think>" in r.getMessage()]
    assert len(said) == 1 and "judge.max_new_tokens" in said[0]


def test_a_template_that_merges_at_the_boundary_is_said_once(caplog, monkeypatch):
    """A template that glues the prompt to a word (`Wha` + `t is ...`): the tokenizer
    reads `What` in the rendered template, where unpact tokenises the prompt apart; that
    is said once, clearly, and not again for another model with the same tokenizer (a
    run's unlearned copies each said it once)."""
    import logging

    from unpact import types
    from unpact.testing import tiny_model

    monkeypatch.setattr(types, "_SAID", set())
    lm, copy = tiny_model(seed=0), tiny_model(seed=1)
    with caplog.at_level(logging.WARNING, logger="unpact"):
        lm.encode_prompt("t is the capital of France?")  # ChatML: no boundary merge
        assert not caplog.records
        for model in (lm, copy):
            model.tokenizer.chat_template = MERGING_TEMPLATE
            model._template_split = None
        first = lm.encode_prompt("t is the capital of France?")
        lm.encode_prompt("t is the river bank?")
        copy.encode_prompt("t is the river bank?")
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "tokenises 't is the capital of France?' differently at a boundary" in message
    assert first.content_ids == lm.encode_prompt("t is the capital of France?", False).content_ids


def test_a_byte_bpe_template_s_last_space_goes_with_the_prompt_s_first_word(caplog):
    """`User: ` then the prompt on a byte-level BPE: the template's own tokenisation joins
    the space to the first word (`Ġthe`). Tokenised apart, the space was a token of its
    own and the word another (one token more than the model sees behind a chat API, and
    warned); now the prompt is tokenised with that space as its lead, the whole equals the
    template's tokenisation, and the units are still the prompt's own words."""
    import logging

    from unpact.attribution import make_units
    from unpact.models import render_chat
    from unpact.testing import tiny_model

    lm = tiny_model()
    lm.tokenizer.chat_template = USER_TEMPLATE
    prompt = "the capital of France?"
    with caplog.at_level(logging.WARNING, logger="unpact"):
        encoded = lm.encode_prompt(prompt)
    assert not caplog.records
    whole = lm.tokenizer(render_chat(lm.tokenizer, prompt), add_special_tokens=False)
    assert encoded.input_ids == tuple(whole["input_ids"]) and encoded.lead == " "
    assert lm.token_texts(encoded.content_ids)[0] == "Ġthe"
    assert [u.text for u in make_units(lm, encoded, "word")] == [
        "the",
        "capital",
        "of",
        "France",
        "?",
    ]
    tokens = make_units(lm, encoded, "token")
    assert "".join(u.text for u in tokens) == prompt  # the lead is nobody's text
    assert tokens[0].text == "the" and tokens[0].positions == (encoded.content_start,)
    # where the space stays a token of its own before the first word (`Ġ` then `Wh` here;
    # a digit after `Question: ` on the default model), that token is the template's: it
    # was a unit with no text, which could even be a KeyToken
    other = "Who wrote the report about the town?"
    assert lm.token_texts(lm.tokenizer(" " + other)["input_ids"][:1]) == ["Ġ"]
    encoded = lm.encode_prompt(other)
    whole = lm.tokenizer(render_chat(lm.tokenizer, other), add_special_tokens=False)
    assert encoded.input_ids == tuple(whole["input_ids"]) and encoded.lead == ""
    assert encoded.content_ids == tuple(lm.tokenizer(other)["input_ids"])
    assert all(u.text for u in make_units(lm, encoded, "token"))


def test_a_sentencepiece_inst_template_is_split_as_it_tokenises_whole(tiny, caplog):
    """Llama 2's and Mistral's `[INST] ` before the message: SentencePiece writes the
    message alone with a leading `▁`, which in the whole prompt is the template's last
    space. Tokenising `[INST] ` apart left that space as a token of its own (one token more
    than the model saw in training, and than a server's split); the prefix now stops before
    it, the prompt's own tokens follow, and the whole equals the template's tokenisation."""
    import logging

    from unpact.models import LanguageModel, render_chat
    from unpact.testing import tiny_sentencepiece_tokenizer

    tok: Any = tiny_sentencepiece_tokenizer()
    lm = LanguageModel(tiny.model, tok)
    prompt = "Who wrote the report about the town?"
    assert tok.tokenize("[INST] ")[-1] == "▁" and tok.tokenize(prompt)[0].startswith("▁")
    with caplog.at_level(logging.WARNING, logger="unpact"):
        encoded = lm.encode_prompt(prompt)
    whole = tok(render_chat(tok, prompt), add_special_tokens=False)["input_ids"]
    assert encoded.input_ids == tuple(whole)
    assert encoded.content_ids == tuple(tok(prompt, add_special_tokens=False)["input_ids"])
    assert not caplog.records


def test_weights_larger_than_the_free_memory_are_refused_before_loading(
    tiny, tmp_path, monkeypatch
):
    """A 7B model in float32 on a 24 GiB laptop: the load filled the memory and the system
    killed the process without a word. The weights are counted from the safetensors
    headers and compared with the memory free; bfloat16 halves what they need."""
    import shutil
    from types import SimpleNamespace

    import psutil
    import torch

    from unpact.models import _parameter_count, load_model

    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    count = sum(p.numel() for p in tiny.model.parameters())
    assert _parameter_count(tmp_path / "m") == count
    # shards are counted as their index names them (a merged copy beside them is not loaded)
    tiny.model.save_pretrained(tmp_path / "shards", max_shard_size="100KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    shutil.copy(tmp_path / "m" / "model.safetensors", tmp_path / "shards")
    assert _parameter_count(tmp_path / "shards") == count
    free = count * 3  # room for bfloat16 (2 bytes a weight), not for float32 (4)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=free))
    with pytest.raises(UnpactError, match=r"GiB in float32, more than the .*\(--dtype bfloat16"):
        load_model(str(tmp_path / "m"))
    assert load_model(str(tmp_path / "m"), dtype="bfloat16").model.dtype == torch.bfloat16


def test_broken_model_folders_are_one_message(tiny, tmp_path, printed, caplog):
    """Each was a traceback, a confusing message or, worst, a model with random layers
    loaded without a word: no tokenizer, a truncated safetensors file, weights whose shapes
    are not the config's, a checkpoint missing one tensor, a quantized checkpoint. Nothing
    else is printed: transformers' loading report (a table per load, above a message that
    said "for details look at the above report") is unpact's message naming the tensors and
    their shapes; a tensor the model does not have (a value head) is one note, once."""
    import json
    import shutil

    import torch
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

    def settings_only(f):  # the vocabulary left behind: transformers asked for sentencepiece
        (f / "tokenizer.json").unlink()

    def bad_stops(f):  # transformers skipped it without a word: config.json's EOS instead
        (f / "generation_config.json").write_text('{"eos_token_id": [2,')

    def truncated(f):
        (f / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:999])

    def wider(f):
        config = json.loads((f / "config.json").read_text())
        (f / "config.json").write_text(json.dumps(config | {"hidden_size": 128}))

    def one_missing(f):
        weights = load_file(f / "model.safetensors")
        del weights["model.layers.1.mlp.up_proj.weight"]
        save_file(weights, f / "model.safetensors", metadata={"format": "pt"})

    def gptq(f):  # a GPTQ checkpoint: was "a damaged file, or shapes that do not match"
        config = json.loads((f / "config.json").read_text())
        quant = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False}
        (f / "config.json").write_text(json.dumps(config | {"quantization_config": quant}))

    def extra(f):
        weights = load_file(f / "model.safetensors")
        weights["v_head.summary.weight"] = weights["model.norm.weight"][:3].clone()
        save_file(weights, f / "model.safetensors", metadata={"format": "pt"})

    shapes = r"lm_head\.weight: \[320, 64\] in the file, \[320, 128\] by config.json; model\."
    printed()
    for change, message in (
        (no_tokenizer, "has no tokenizer"),
        (settings_only, r"settings \(tokenizer_config.json\) but not its vocabulary"),
        (bad_stops, r"generation_config.json cannot be read \(Expecting value.*or delete it"),
        (truncated, "could not load the weights in"),
        (wider, rf"shapes that do not match its config.json \({shapes}.*; \.\.\.\): was"),
        (one_missing, r"lack 1 of the model's tensors \(model\.layers\.1\.mlp\.up_proj"),
        (gptq, r"gptq-quantized checkpoint .*: give it the model before quantization"),
    ):
        with pytest.raises(UnpactError, match=message):
            load_model(str(broken(change.__name__, change)))
    with pytest.raises(UnpactError, match="but not its vocabulary"):
        load_tokenizer(str(tmp_path / "settings_only"))
    assert printed() == ""
    folder = broken("extra", extra)
    for _ in range(2):
        assert torch.equal(
            load_model(str(folder)).model.lm_head.weight, tiny.model.lm_head.weight.cpu()
        )
    assert printed() == ""
    notes = [r.getMessage() for r in caplog.records if r.name.startswith("unpact")]
    assert notes == [
        f"{folder}: 1 tensor in the weights is not the model's (v_head.summary.weight): ignored"
    ]
    assert load_model(str(good)).model.config.hidden_size == 64


def test_tokenizer_files_that_do_not_parse_or_are_no_tokenizer_are_named(tiny, tmp_path):
    """A JSON file of a model folder that does not parse was the decoder's bare "Expecting
    ':' delimiter" (no file named); tokenizer files transformers cannot read were "could not
    load the weights" (or, from load_tokenizer, a KeyError's traceback). Each names the
    file, or says it is the tokenizer."""
    import json
    import shutil

    good = tmp_path / "good"
    tiny.model.save_pretrained(good)
    tiny.tokenizer.save_pretrained(good)

    def cut_tokenizer(f):  # was "could not load a model from ...: Expecting ':' delimiter"
        text = (f / "tokenizer.json").read_text()
        (f / "tokenizer.json").write_text(text[: len(text) // 2])

    def cut_settings(f):
        (f / "tokenizer_config.json").write_text('{"model_max_length": 8,\n "x" 1}')

    def other_json(f):  # valid JSON, no tokenizer: was blamed on the weights ("'added_tokens'")
        (f / "tokenizer.json").write_text('{"a": 1}')

    def unknown_model(f):  # the tokenizers library's own exception: also "the weights"
        tokenizer = json.loads((f / "tokenizer.json").read_text())
        (f / "tokenizer.json").write_text(json.dumps(tokenizer | {"model": {"type": "Odd"}}))

    unread = "could not load the tokenizer of .*: its files are not a tokenizer transformers reads"
    for change, message in (
        (cut_tokenizer, r"cut_tokenizer: tokenizer\.json is not valid JSON \(.*: line \d+ col"),
        (cut_settings, r"tokenizer_config\.json is not valid JSON \(Expecting ':' delimiter: l"),
        (other_json, rf"{unread} \(KeyError: 'added_tokens'\); copy the tokenizer files"),
        (unknown_model, rf"{unread} \(data did not match any variant"),
    ):
        folder = tmp_path / change.__name__
        shutil.copytree(good, folder)
        change(folder)
        with pytest.raises(UnpactError, match=message):
            load_model(str(folder))
        with pytest.raises(UnpactError, match="could not load the tokenizer of"):
            load_tokenizer(str(folder))
    # a JSON file transformers does not read is not blamed for a failure of the weights
    folder = tmp_path / "other"
    shutil.copytree(good, folder)
    (folder / "eval_results.json").write_text("{not json")
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[:999])
    with pytest.raises(UnpactError, match="could not load the weights in"):
        load_model(str(folder))


def _validates_config_fields() -> bool:
    """Whether the transformers installed checks a config field's type (its configs are
    strict dataclasses since a 5.x release; 5.3's took a vocab_size "320" as it came)."""
    from transformers import LlamaConfig

    try:
        LlamaConfig(vocab_size="320")
    except Exception:
        return True
    return False


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        ("config.json", {"vocab_size": "320"}, r"Field 'vocab_size' expected int, got str"),
        ("config.json", {"rms_norm_eps": "1e-5"}, r"'rms_norm_eps' expected float"),
        ("config.json", {"head_dim": 7}, r"RoPE requires an even rotary dimension"),
        ("config.json", {"hidden_act": "nope"}, r"its hidden_act is 'nope', which transformers"),
        ("config.json", {"rope_scaling": {"type": "nope"}}, r"its rope_scaling\.type is 'nope'"),
        ("config.json", {"max_position_embeddings": 0}, r"max_position_embeddings is 0, not a"),
        ("generation_config.json", {"eos_token_id": "2"}, r"eos_token_id is '2', not a token id"),
        ("generation_config.json", {"eos_token_id": [2, True]}, r"eos_token_id is \[2, True\]"),
        ("generation_config.json", {"max_new_tokens": "abc"}, r"max_new_tokens is 'abc', not a w"),
        ("generation_config.json", {"temperature": "hot"}, r"temperature is 'hot', not a number"),
    ],
)
def test_a_config_field_transformers_refuses_is_said_as_the_configs(
    tiny, tmp_path, capfd, caplog, file, change, message
):
    """A config.json field of the wrong type or value was blamed on the tokenizer (which
    reads config.json first: "copy the tokenizer files") or on the weights ("a damaged
    file"); a generation_config.json EOS id "2" was a TypeError traceback, and a
    max_new_tokens "abc" blamed on the weights. Each names its file and field, and alone:
    an unknown RoPE type came after transformers' "Missing validation function" thrice."""
    # the tokenizer reads config.json as a configuration, but builds no model from it
    refused = file == "config.json" and "nope" not in str(change)
    if refused and not _validates_config_fields():
        pytest.skip(
            f"transformers {_transformers_version()} checks no config field's type or value: "
            "the load fails later, still as an UnpactError naming config.json or the weights"
        )
    folder = tmp_path / "m"
    save_model(tiny.model, tiny.tokenizer, folder)
    found = json.loads((folder / file).read_text())
    (folder / file).write_text(json.dumps(found | change))
    capfd.readouterr()
    caplog.clear()
    for load in (load_model, load_tokenizer) if refused else (load_model,):
        with pytest.raises(UnpactError, match=rf"{re.escape(file)}.*{message}"):
            load(str(folder))
    assert "Missing validation" not in capfd.readouterr().err + caplog.text


def test_an_eos_id_outside_the_vocabulary_is_said_in_unpacts_words(tiny, tmp_path, caplog):
    """An EOS id that is no token of the model (config.json's 1000000 in a 320-token
    vocabulary) printed transformers' "Model config: eos_token_id must be `None` or an
    integer within the vocabulary"; it is one note saying what generation stops at. A
    pad_token_id of -1 (several hub checkpoints) says nothing: unpact pads with its own."""
    folder = tmp_path / "m"
    save_model(tiny.model, tiny.tokenizer, folder)
    config = json.loads((folder / "config.json").read_text())
    for name in ("config.json", "generation_config.json"):
        found = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps(found | {"eos_token_id": 10**6}))
    caplog.clear()
    load_model(str(folder))
    load_model(str(folder))  # an audit loads a model several times: said once
    assert caplog.text.count("EOS id 1000000 is no token of the model") == 1
    assert f"it stops at {tiny.tokenizer.eos_token_id}" in caplog.text
    assert "must be `None`" not in caplog.text
    (folder / "config.json").write_text(json.dumps(config | {"pad_token_id": -1}))
    (folder / "generation_config.json").unlink()
    caplog.clear()
    load_model(str(folder))
    assert caplog.text == ""


def _phi3_folder(folder, rope_type):
    """A Phi-3 long-context config.json as its hub repositories write it: the LongRoPE
    factors in rope_scaling, original_max_position_embeddings beside it."""
    config = {
        "model_type": "phi3",
        "architectures": ["Phi3ForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "vocab_size": 128,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "max_position_embeddings": 256,
        "original_max_position_embeddings": 128,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": rope_type, "short_factor": [1.0] * 8, "long_factor": [1.0] * 8},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_legacy_rope_type_its_config_class_converts_is_known(tmp_path, monkeypatch, printed):
    """The RoPE check reads the configuration as its class made it: Phi-3's legacy "su" is
    "longrope" there, Gemma 3's per-layer types are each checked; an unknown one is named.
    transformers before 5.25 cannot read "su" beside Phi-3's top-level
    original_max_position_embeddings (a KeyError for that field): the message says to write
    "longrope", not to repair a config.json that Phi-3's releases wrote so. And its advice to
    the config's authors to set `factor` instead, printed at every Phi-3 long-context load,
    is held back."""
    import logging

    import transformers
    from packaging.version import Version
    from transformers import AutoConfig, Gemma3TextConfig, LlamaConfig

    from unpact import models
    from unpact.models import _check_config, _unknown_rope

    logging.Logger.warning_once.cache_clear()  # said once per process: said again here
    models._quiet_moot_notes()  # as load_model and load_tokenizer start
    printed()
    read = ["su", "longrope"] if Version(transformers.__version__) >= Version("5.25") else []
    for rope_type in ("su", "longrope"):
        folder = _phi3_folder(tmp_path / rope_type, rope_type)
        if rope_type in read or rope_type == "longrope":
            _check_config(folder, False)
        else:  # transformers 5.3 to 5.24, as the monkeypatched read below
            with pytest.raises(UnpactError, match=r'write "longrope" for it in config\.json'):
                _check_config(folder, False)
    assert "to be used together with" not in printed()
    for rope_type in read:
        assert _unknown_rope(AutoConfig.from_pretrained(tmp_path / rope_type)) is None
    assert _unknown_rope(Gemma3TextConfig()) is None
    gemma = Gemma3TextConfig()
    gemma.rope_parameters["full_attention"]["rope_type"] = "zigzag"
    assert _unknown_rope(gemma) == "zigzag"
    llama = LlamaConfig()
    llama.rope_parameters = {"rope_type": "bogus", "rope_theta": 1e4}
    assert _unknown_rope(llama) == "bogus"

    def older(*args, **kwargs):  # transformers 5.3 to 5.24
        raise KeyError(
            "Missing required keys in `rope_parameters` for 'rope_type'='longrope': "
            "{'original_max_position_embeddings'}"
        )

    monkeypatch.setattr(AutoConfig, "from_pretrained", older)
    with pytest.raises(UnpactError, match=r'write "longrope" for it in config\.json'):
        _check_config(tmp_path / "su", False)
    with pytest.raises(UnpactError, match=r"repair it, or copy the config\.json"):
        _check_config(tmp_path / "longrope", False)
    assert models._legacy_su({}, "rope_parameters") is None  # no RoPE settings

    def other_field(*args, **kwargs):  # another fault of the same config: as before
        raise ValueError("vocab_size must be an int")

    monkeypatch.setattr(AutoConfig, "from_pretrained", other_field)
    with pytest.raises(UnpactError, match=r"int\): repair it, or copy the config\.json"):
        _check_config(tmp_path / "su", False)


def test_a_text_the_tokenizer_makes_no_tokens_of_is_refused(tiny, tmp_path):
    """A BPE tokenizer without byte fallback or an unknown token drops the characters its
    vocabulary lacks: a prompt of only those was a reshape error inside the model (raw),
    or, in the chat template, a question of the template alone, answered in silence."""
    folder = tmp_path / "m"
    save_model(tiny.model, tiny.tokenizer, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokenizer["model"]["vocab"] = {k: v for k, v in vocab.items() if k.startswith("<")}
    tokenizer["model"]["merges"] = []
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    lm = load_model(str(folder))
    for chat in (False, True):
        with pytest.raises(UnpactError, match=r"the prompt 'hi' is no tokens for this model"):
            lm.encode_prompt("hi", chat_template=chat)
    with pytest.raises(UnpactError, match=r"the answer ' Paris' is no tokens for this model"):
        lm.encode_answer(" Paris")


@pytest.mark.parametrize("limit", ["abc", [1]])
def test_a_length_limit_that_is_no_number_reads_as_none(tiny, tmp_path, limit):
    """A tokenizer_config.json whose `model_max_length` is not a number loaded, then every
    prompt failed inside transformers' length check (a TypeError traceback). unpact never
    truncates (the model's own context bounds a prompt): the setting reads as unset."""
    folder = tmp_path / "m"
    save_model(tiny.model, tiny.tokenizer, folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(settings | {"model_max_length": limit})
    )
    lm = load_model(str(folder))
    assert (
        lm.encode_prompt("Who wrote Hamlet?").input_ids
        == tiny.encode_prompt("Who wrote Hamlet?").input_ids
    )
    assert load_tokenizer(str(folder))("Who").input_ids == tiny.tokenizer("Who").input_ids


def test_a_sentencepiece_only_tokenizer_is_read_as_sentencepiece_reads_it(
    tiny, tmp_path, monkeypatch, printed
):
    """A folder whose tokenizer is a SentencePiece model alone (tokenizer.model, no
    tokenizer.json: Llama 2, Mistral and Gemma checkpoints saved without a fast tokenizer)
    failed to load: without sentencepiece and protobuf, transformers fell back to tiktoken
    and asked to install that, with a library warning first. Both are unpact's dependencies
    now; the tokens are the ones SentencePiece itself gives, where the libraries are
    missing one message says what to install, and a damaged file is said as one."""
    import io
    import random

    import sentencepiece

    import unpact.models as models

    rng = random.Random(0)
    words = [
        "the",
        "capital",
        "of",
        "france",
        "is",
        "paris",
        "who",
        "wrote",
        "hamlet",
        "answer",
        "year",
        "war",
    ]
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(500)]
    spm = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=spm,
        vocab_size=300,
        model_type="bpe",
        # Llama 2's own settings: bytes for unknown characters, spaces kept as written
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    folder = tmp_path / "spm"
    tiny.model.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(spm.getvalue())
    settings = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"}
    settings |= {"unk_token": "<unk>", "add_bos_token": True}  # as Llama 2's own
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    own = sentencepiece.SentencePieceProcessor(model_proto=spm.getvalue())
    text = "who wrote hamlet?  The capital of Ελλάδα"
    printed()  # saving's bar
    for tokenizer in (load_tokenizer(str(folder)), load_model(str(folder)).tokenizer):
        ids = tokenizer(text).input_ids
        assert ids == [own.bos_id(), *own.encode(text)]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert printed() == ""
    # cut short: transformers' warning that it falls back to tiktoken, then "install tiktoken"
    (folder / "tokenizer.model").write_bytes(spm.getvalue()[:301])
    for load in (load_model, load_tokenizer):
        with pytest.raises(UnpactError, match=r"neither a SentencePiece model .* is it whole"):
            load(str(folder))
    assert printed() == ""
    monkeypatch.setattr(models, "_installed", lambda package: package != "protobuf")
    message = r"SentencePiece model \(tokenizer.model, no tokenizer.json\), which needs protobuf"
    for load in (load_model, load_tokenizer):
        with pytest.raises(UnpactError, match=message):
            load(str(folder))


def test_a_tokenizer_without_vocabulary_is_named_whatever_transformers_raises(
    tiny, tmp_path, monkeypatch
):
    """transformers 5.0 (the lowest release allowed until 5.3) fails on a folder with tokenizer
    settings but no vocabulary by asking for protobuf (an ImportError), which unpact
    called a damaged weights file; later releases raise a ValueError. Both say what is
    missing; an ImportError in a folder that has its vocabulary keeps its own words."""
    from transformers import AutoTokenizer

    import unpact.models as models

    folder = tmp_path / "settings-only"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    (folder / "tokenizer.json").unlink()

    def protobuf(*args: Any, **kwargs: Any) -> Any:
        raise ImportError("requires the protobuf library but it was not found")

    monkeypatch.setattr(models, "_pretrained", protobuf)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", protobuf)
    for load in (load_model, load_tokenizer):
        with pytest.raises(UnpactError, match=r"settings \(tokenizer_config.json\) but not"):
            load(str(folder))
    tiny.tokenizer.save_pretrained(folder)
    with pytest.raises(UnpactError, match=r"could not load a model from .*requires the protobuf"):
        load_model(str(folder))
    with pytest.raises(UnpactError, match=r"could not load the tokenizer of .*requires the proto"):
        load_tokenizer(str(folder))


def _fp8_checkpoint(tiny, folder: Path, block: int = 32) -> dict[str, Any]:
    """`tiny` saved as a fine-grained FP8 checkpoint (DeepSeek's and Qwen's format: each
    decoder projection's weight in float8_e4m3fn with a per-block `weight_scale_inv`);
    returns each projection's exact dequantized weight (the FP8 values times their scales)."""
    import torch
    from safetensors.torch import load_file, save_file

    from unpact.models import save_model

    save_model(tiny.model, tiny.tokenizer, folder)
    weights, exact = load_file(folder / "model.safetensors"), {}
    for name, w in list(weights.items()):
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            rows, cols = w.shape
            blocks = w.reshape(rows // block, block, cols // block, block)
            scale = blocks.abs().amax(dim=(1, 3)) / 448.0  # e4m3's largest value
            q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
            weights[name] = q.reshape(rows, cols)
            weights[name.replace(".weight", ".weight_scale_inv")] = scale
            exact[name] = (q.float() * scale[:, None, :, None]).reshape(rows, cols)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    quant = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [block] * 2,
    }
    (folder / "config.json").write_text(json.dumps(config | {"quantization_config": quant}))
    return exact


def test_an_fp8_checkpoint_loads_dequantized_on_every_device(tiny, tmp_path, printed):
    """transformers dequantized an FP8 checkpoint only where it has no FP8 kernel (here, with
    a library warning); on an H100 it kept FP8 layers that unlearning cannot train and the
    quantize attack does not see. unpact asks for full-precision weights everywhere."""
    import torch
    import transformers
    from packaging.version import Version

    from unpact.models import _dequantizing, save_model

    exact = _fp8_checkpoint(tiny, tmp_path / "fp8")
    if Version(transformers.__version__) < Version("5.10"):  # they need triton, or a GPU
        with pytest.raises(UnpactError, match="could not dequantize it here; another release"):
            load_model(str(tmp_path / "fp8"))
        return
    lm = load_model(str(tmp_path / "fp8"))
    weights = lm.model.state_dict()
    for name, w in exact.items():
        assert weights[name].dtype == torch.float32 and torch.equal(weights[name], w), name
    linear = lm.model.model.layers[0].mlp.up_proj
    assert type(linear) is torch.nn.Linear  # not transformers' FP8Linear
    assert "FP8" not in printed()  # "requires a GPU or XPU, ... dequantizing"
    # the flag that makes a GPU dequantize too, and a checkpoint saved as full precision
    found = _dequantizing(str(tmp_path / "fp8"), False, True)["quantization_config"]
    assert found.dequantize is True
    save_model(lm.model, lm.tokenizer, tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved/config.json").read_text())
    again = load_model(str(tmp_path / "saved")).model.state_dict()
    assert all(torch.equal(again[name], w) for name, w in exact.items())
    assert _dequantizing(str(tmp_path / "saved"), False, True) == {}


@pytest.mark.parametrize(
    ("settings", "kind"),
    [
        ({"load_in_4bit": True}, "fp4"),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "nf4"),
        ({"load_in_4bit": True, "bnb_4bit_use_double_quant": True}, "nested"),
        ({"load_in_8bit": True}, "llm_int8"),
    ],
)
def test_a_bitsandbytes_checkpoint_loads_as_the_weights_it_stands_for(
    tiny, tmp_path, printed, caplog, settings, kind
):
    """A model released as bitsandbytes 4-bit or LLM.int8 loaded as bitsandbytes' layers,
    and the quantize attack crashed on their packed bytes ("Only Tensors of floating point
    ... can require gradients"); unlearning had nothing to train. It loads as plain linear
    layers holding exactly the weights the checkpoint stores (the quantize attack's own
    round trips of the original weights, which tests/unit/test_weight_attacks.py holds to
    bitsandbytes), and saves as a full-precision model."""
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from unpact.attacks.quantize import float4_round_trip, int8_rowwise_round_trip
    from unpact.models import _parameter_count, save_model

    save_model(tiny.model, tiny.tokenizer, tmp_path / "full")
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "full", dtype=torch.float32, quantization_config=BitsAndBytesConfig(**settings)
    )
    quantized.save_pretrained(tmp_path / "q")
    tiny.tokenizer.save_pretrained(tmp_path / "q")
    # the memory check counts what it loads as: every weight (not two to a byte)
    full, packed = _parameter_count(tmp_path / "full"), _parameter_count(tmp_path / "q")
    assert full <= packed < 1.1 * full
    printed()
    with caplog.at_level(logging.WARNING, logger="unpact"):
        lm = load_model(str(tmp_path / "q"))
    assert printed() == "" and "full precision" not in caplog.text  # its weights are packed
    original = tiny.model.state_dict()
    for name, module in lm.model.named_modules():
        if name.startswith("model.layers.") and name.endswith("proj"):
            assert type(module) is torch.nn.Linear, name
            w = original[f"{name}.weight"]
            if kind == "llm_int8":
                want = int8_rowwise_round_trip(w)
            elif kind == "nested":  # its scales 8-bit too: as bitsandbytes reads them
                packed = quantized.get_submodule(name).weight
                want = dequantize_4bit(packed.data, packed.quant_state)
            else:
                want = float4_round_trip(w, kind, 64)
            assert module.weight.dtype == torch.float32
            assert torch.allclose(module.weight, want, rtol=0, atol=1e-6), name
    assert lm.model.lm_head.weight.equal(original["lm_head.weight"])  # never quantized
    lm.model.to(torch.bfloat16).to(torch.float32)  # "You cannot cast a bitsandbytes model"
    from unpact.attribution import attribute

    found = attribute(lm, "the cat sat on a mat", " blue", chat_template=False)
    assert all(math.isfinite(c) for c in found.contributions)
    save_model(lm.model, lm.tokenizer, tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved/config.json").read_text())
    again = load_model(str(tmp_path / "saved")).model.state_dict()
    assert all(again[k].equal(v) for k, v in lm.model.state_dict().items())


@pytest.mark.parametrize("settings", [{"load_in_4bit": True}, {"load_in_8bit": True}])
def test_full_precision_weights_under_a_bitsandbytes_config_are_used_as_they_are(
    tiny, tmp_path, caplog, settings
):
    """A merged QLoRA model saved with its base's config.json: the config names bitsandbytes,
    the weights are full precision. Its forward pass failed inside bitsandbytes ("fails
    inside the model's or transformers' code (AssertionError: )"); the weights are used as
    they are, with a note that a GPU's transformers and vLLM would round them. (Through
    bitsandbytes' layers, transformers before 5.21 lost them: zeros under the 4-bit config,
    a crash under LLM.int8's; the config is read without its quantization instead.)"""
    import torch

    save_model(tiny.model, tiny.tokenizer, tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", **settings}
    (tmp_path / "m/config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="unpact"):
        lm = load_model(str(tmp_path / "m"))
    assert "its weights are full precision" in caplog.text
    original = tiny.model.state_dict()
    for name, w in lm.model.state_dict().items():
        assert w.dtype == torch.float32 and w.equal(original[name]), name


def test_a_torchao_checkpoint_loads_as_the_weights_it_stands_for(tiny, tmp_path, printed):
    """A model saved quantized by torchao (transformers' TorchAoConfig, as safetensors)
    loaded with torchao's tensors for weights: the quantize attack and unlearning met
    them. It loads as the weights they stand for (torchao's own `dequantize`), and saves
    as a full-precision model."""
    import torch
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    save_model(tiny.model, tiny.tokenizer, tmp_path / "full")
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "full",
        dtype=torch.float32,
        quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
    )
    quantized.save_pretrained(tmp_path / "q")
    tiny.tokenizer.save_pretrained(tmp_path / "q")
    printed()
    lm = load_model(str(tmp_path / "q"))
    assert printed() == ""
    rounded = 0
    for name, module in lm.model.named_modules():
        if name.startswith("model.layers.") and name.endswith("proj"):
            want = quantized.get_submodule(name).weight.dequantize()
            assert type(module.weight) is torch.nn.Parameter and module.weight.equal(want), name
            rounded += not want.equal(tiny.model.get_submodule(name).weight)
    assert rounded == 14  # every projection of both layers
    save_model(lm.model, lm.tokenizer, tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved/config.json").read_text())
    again = load_model(str(tmp_path / "saved")).model.state_dict()
    assert all(again[k].equal(v) for k, v in lm.model.state_dict().items())


def test_a_model_left_with_quantized_layers_is_refused():
    """GPTQ, AWQ and the like load with their library installed (not here) as layers no
    weights can be read from: one message, as where the library is missing."""
    from types import SimpleNamespace

    from unpact.models import _refuse_quantized

    plain = SimpleNamespace(config=SimpleNamespace(), hf_quantizer=None)
    _refuse_quantized(plain, "m")
    gptq = SimpleNamespace(config=SimpleNamespace(quantization_config={"quant_method": "gptq"}))
    gptq.hf_quantizer = object()
    with pytest.raises(UnpactError, match=r"m: a gptq-quantized checkpoint: .*before quantization"):
        _refuse_quantized(gptq, "m")


def _adapter(tiny, tmp_path, seed: int = 0):
    """A LoRA adapter folder (random, non-zero B) for the tiny model saved at tmp_path/base,
    and the PEFT model's logits on a few tokens, computed before any merging."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model

    from unpact.models import save_model
    from unpact.testing import tiny_model

    base = tiny_model(seed=0)
    save_model(base.model, base.tokenizer, tmp_path / "base")
    torch.manual_seed(seed)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base.model, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved["base_model_name_or_path"] = str(tmp_path / "base")
    path.write_text(json.dumps(saved))
    with torch.no_grad():
        ids = torch.tensor([[1, 5, 9, 14, 3]], device=base.device)
        logits = peft_model(input_ids=ids).logits.cpu()  # load_model's device
    return tmp_path / "adapter", logits


# the helper's get_peft_model asks transformers' deprecated is_gradient_checkpointing
PEFT_WARNING = "ignore:.*is_gradient_checkpointing.*:FutureWarning"


@pytest.mark.filterwarnings(PEFT_WARNING)
def test_a_peft_adapter_is_merged_into_its_base_once(tiny, tmp_path, monkeypatch):
    """An adapter folder (open-unlearning's and PEFT's LoRA checkpoints, `unpact unlearn`
    with `lora.merge: false`) loads as its base with the adapter merged: the logits PEFT
    computes; built once in the cache, then read like any model folder."""
    import torch

    from unpact import models

    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "cache"))
    adapter, expected = _adapter(tiny, tmp_path)
    lm = load_model(str(adapter))
    with torch.no_grad():
        got = lm.model(input_ids=torch.tensor([[1, 5, 9, 14, 3]])).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert type(lm.model).__name__ == "LlamaForCausalLM"  # no PEFT wrapper left
    key = models.model_key(str(adapter))
    base_logits = load_model(str(tmp_path / "base")).model(input_ids=torch.tensor([[1, 5]]))
    assert not torch.allclose(base_logits.logits, got[:, :2])  # the adapter changed it

    def no_rebuild(*args: object) -> None:
        raise AssertionError("merged again")

    monkeypatch.setattr(models, "_merge_adapter", no_rebuild)
    assert models.model_key(str(adapter)) == key
    load_model(str(adapter))
    # an unlearning run directory whose model is an adapter (lora.merge: false)
    (tmp_path / "run").mkdir()
    adapter.rename(tmp_path / "run" / "model")
    (tmp_path / "run" / "result.json").write_text("{}")
    assert models.model_key(str(tmp_path / "run")) == key


@pytest.mark.filterwarnings(PEFT_WARNING)
def test_adapter_settings_peft_fails_on_are_said_before_any_merge(
    tiny, tmp_path, monkeypatch, caplog, printed
):
    """adapter_config.json settings PEFT fails on deep in its layers (an r of "4", a
    lora_dropout of "x", target_modules 5: TypeError tracebacks), a prompt adapter (prefix
    tuning, nothing to merge: a TypeError inside torch), and a base that leads back to the
    adapter (a RecursionError) are each one message naming the setting; settings this PEFT
    does not know are one note in unpact's words, not PEFT's warning, and the adapter
    loads as before."""
    import shutil

    import torch

    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "cache"))
    adapter, expected = _adapter(tiny, tmp_path)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    printed()
    for n, (change, message) in enumerate(
        [
            ({"r": "4"}, r"adapter_config\.json: its r is '4', not a number: repair it"),
            ({"lora_dropout": "x"}, r"its lora_dropout is 'x', not a number"),
            ({"target_modules": 5}, r"its target_modules is 5, not a module name or a list"),
            ({"peft_type": "PREFIX_TUNING"}, r"is a PREFIX_TUNING adapter: it adds virtual"),
            ({"base_model_name_or_path": "SELF"}, r"whose base model leads back to it"),
        ]
    ):
        folder = tmp_path / f"bad{n}"
        shutil.copytree(adapter, folder)
        if change.get("base_model_name_or_path") == "SELF":
            change = {"base_model_name_or_path": str(folder)}
        (folder / "adapter_config.json").write_text(json.dumps(saved | change))
        with pytest.raises(UnpactError, match=message):
            load_model(str(folder))
    newer = tmp_path / "newer"
    shutil.copytree(adapter, newer)
    (newer / "adapter_config.json").write_text(json.dumps(saved | {"zzz_new_setting": 1}))
    with caplog.at_level(logging.WARNING, logger="unpact"):
        lm = load_model(str(newer))
    with torch.no_grad():
        got = lm.model(input_ids=torch.tensor([[1, 5, 9, 14, 3]])).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert "settings PEFT" in caplog.text and "does not know (zzz_new_setting)" in caplog.text
    assert "Unexpected keyword arguments" not in printed()


@pytest.mark.filterwarnings(PEFT_WARNING)
def test_bad_adapters_are_one_message(tiny, tmp_path, monkeypatch):
    import json
    import shutil

    from unpact.models import save_model
    from unpact.testing import tiny_other

    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "cache"))
    adapter, _ = _adapter(tiny, tmp_path)
    config = adapter / "adapter_config.json"
    saved = json.loads(config.read_text())

    config.write_text(json.dumps({**saved, "base_model_name_or_path": None}))
    with pytest.raises(UnpactError, match="names no base model"):
        load_model(str(adapter))
    config.write_text(json.dumps({**saved, "base_model_name_or_path": str(tmp_path / "nope")}))
    with pytest.raises(UnpactError, match=r"PEFT adapter whose base model .*no such file"):
        load_model(str(adapter))
    # a hub id offline: the message says it is the adapter's base that failed
    config.write_text(json.dumps({**saved, "base_model_name_or_path": "no-such-org/no-model"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnpactError, match=r"PEFT adapter whose base model .*no-such-org"):
        load_model(str(adapter))
    config.write_text("{not json")
    with pytest.raises(UnpactError, match=r"cannot read .*adapter_config\.json"):
        load_model(str(adapter))
    # trained on another base: GPT-2 has no q_proj or v_proj
    other = tiny_other("gpt2")
    save_model(other.model, other.tokenizer, tmp_path / "gpt2")
    config.write_text(json.dumps({**saved, "base_model_name_or_path": str(tmp_path / "gpt2")}))
    with pytest.raises(UnpactError, match="could not apply the adapter"):
        load_model(str(adapter))
    config.write_text(json.dumps(saved))
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(UnpactError, match=r"without adapter_model\.safetensors"):
        load_model(str(adapter))
    shutil.rmtree(adapter)


def test_a_file_digest_is_read_once_per_process_until_the_file_changes(tmp_path, monkeypatch):
    """A spec is resolved for every stage's cache key; a large GGUF or adapter is hashed
    once (per process, and for a large file once for all processes), and again only when
    the file is rewritten."""
    import hashlib
    import os
    import zlib
    from pathlib import Path

    from unpact import models

    path = tmp_path / "model.gguf"
    path.write_bytes(b"first weights")
    assert models._sha256(path) == hashlib.sha256(b"first weights").hexdigest()
    assert models._crc32(path) == zlib.crc32(b"first weights")

    def no_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("read again")

    with monkeypatch.context() as m:
        m.setattr(Path, "open", no_read)
        assert models._sha256(path) == hashlib.sha256(b"first weights").hexdigest()
        assert models._crc32(path) == zlib.crc32(b"first weights")
    path.write_bytes(b"other weights")  # same size, rewritten: a new modification time
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert models._sha256(path) == hashlib.sha256(b"other weights").hexdigest()

    # a large file's digest lasts in the cache for later processes
    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_LASTING_SIZE", 4)
    big = tmp_path / "big.gguf"
    big.write_bytes(b"large weights")
    assert models._sha256(big) == hashlib.sha256(b"large weights").hexdigest()
    monkeypatch.setattr(models, "_DIGESTS", {})  # as a new process finds it
    opened = Path.open

    def not_the_weights(self: Path, *args: object, **kwargs: object) -> object:
        if self == big:
            raise AssertionError("read again")
        return opened(self, *args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(Path, "open", not_the_weights)
        assert models._sha256(big) == hashlib.sha256(b"large weights").hexdigest()
    big.write_bytes(b"other weights")
    stat = big.stat()
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    monkeypatch.setattr(models, "_DIGESTS", {})
    assert models._sha256(big) == hashlib.sha256(b"other weights").hexdigest()
    lasting = (tmp_path / "cache" / "digests.json").read_text()
    assert lasting.count(str(big.resolve())) == 1  # the stale version was dropped
    gone = tmp_path / "a|b.gguf"  # a file since deleted: its entry goes at the next write
    gone.write_bytes(b"deleted weights")
    models._sha256(gone)
    assert str(gone.resolve()) in (tmp_path / "cache" / "digests.json").read_text()
    gone.unlink()
    other = tmp_path / "other.gguf"
    other.write_bytes(b"more weights")
    models._sha256(other)
    lasting = (tmp_path / "cache" / "digests.json").read_text()
    assert str(gone.resolve()) not in lasting and str(big.resolve()) in lasting


def test_a_model_spec_may_be_a_path(tiny, tmp_path):
    """`load_model(Path(...))` failed with "'PosixPath' object has no attribute
    'startswith'": a path is a spec like its text; anything else is a TypeError saying so."""
    from pathlib import Path

    from unpact import open_model
    from unpact.models import save_model

    save_model(tiny.model, tiny.tokenizer, str(tmp_path / "m"))  # a string: once an AttributeError
    assert load_model(Path(tmp_path / "m")).spec == str(tmp_path / "m")
    assert open_model(tmp_path / "m").spec == str(tmp_path / "m")
    with pytest.raises(TypeError, match="a model spec is a string or a path"):
        load_model(5)  # type: ignore[arg-type]
    # a model in memory, which a Python user may hand where a spec goes: how to give it
    saved = r"in memory is saved first, then its folder given: unpact\.models\.save_model\("
    for held in (tiny, tiny.model):
        with pytest.raises(TypeError, match=rf"not {type(held).__name__} .*{saved}"):
            load_model(held)  # type: ignore[arg-type]
    # and where a model is taught or unlearned
    from unpact.data.items import QAItem, write_folder
    from unpact.inject import InjectConfig, inject
    from unpact.unlearn import unlearn
    from unpact.unlearn.config import resolve_config

    items = [
        QAItem("f", "Who made the lamp?", "Edda", "forget"),
        QAItem("r", "Where?", "Vost", "retain"),
    ]
    write_folder(tmp_path / "bench", items)
    taught = inject(
        tmp_path / "m",
        tmp_path / "bench",
        InjectConfig(max_epochs=0, general=None, rehearsal=False),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    assert taught.accuracy["forget"] == 0.0
    config = resolve_config("ga", values={"steps": 1, "batch_size": 2})
    unlearn(tmp_path / "m", tmp_path / "bench", config, tmp_path / "u", progress=False)
    assert (tmp_path / "u" / "model" / "model.safetensors").is_file()


def test_the_audit_guide_s_templates_render_open_unlearning_s_prompts():
    """docs/audit.md's two templates give the prompts open-unlearning's `template_args`
    build (`src/data/utils.py`, preprocess_chat_instance): the BOS, then for Llama-2-7b-hf
    `Question: ` + q + `\\n` + `Answer: `; for Llama-3.2-1B-Instruct the system tag, the
    user tags around q, then the assistant tag."""
    from unpact.models import render_chat
    from unpact.testing import tiny_tokenizer

    guide = (Path(__file__).parents[2] / "docs" / "audit.md").read_text()
    llama2, llama3 = re.findall(r"```jinja\n(.*?)```", guide, re.S)
    tok = tiny_tokenizer()
    q = "What is the full name of the author born in Kuwait City?"
    tok.chat_template = llama2
    assert render_chat(tok, q) == tok.bos_token + "Question: " + q + "\n" + "Answer: "
    tok.chat_template = llama3
    system = "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
    user = "<|start_header_id|>user<|end_header_id|>\n\n"
    assistant = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert render_chat(tok, q) == tok.bos_token + system + user + q + "<|eot_id|>" + assistant


def test_the_cli_s_chat_template_option_gives_the_templated_copy(tiny, tmp_path, monkeypatch):
    """`unpact inject/unlearn --chat-template`: the model they load is the copy."""
    from unpact.cli import _with_template

    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "cache"))
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    assert _with_template(str(tmp_path / "m"), None) == str(tmp_path / "m")
    spec = _with_template(str(tmp_path / "m"), "{{ messages[0]['content'] }} =")
    assert load_model(spec).tokenizer.chat_template == "{{ messages[0]['content'] }} ="
    with pytest.raises(UnpactError, match=r"^--model: "):
        _with_template(str(tmp_path / "nothing"), "{{ messages[0]['content'] }}")


def test_a_chat_template_copy_across_file_systems_links_by_name_and_follows_a_move(
    tiny, tmp_path, monkeypatch
):
    """Where hard links cannot reach (the cache on another file system), the copy links
    the weights by name rather than copying gigabytes; when the source then moves (same
    folder, same files: the same key), the broken copy is made again, not loaded."""
    import os
    import shutil

    from unpact import models

    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "a" / "m"
    tiny.model.save_pretrained(source)
    tiny.tokenizer.save_pretrained(source)

    def no_hard_links(*args: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_hard_links)
    template = "{{ messages[0]['content'] }} ->"
    spec = models.with_chat_template(str(source), template)
    assert (Path(spec) / "model.safetensors").is_symlink()
    (tmp_path / "b").mkdir()
    shutil.move(str(source), str(tmp_path / "b" / "m"))
    assert not (Path(spec) / "model.safetensors").exists()  # the link is broken
    again = models.with_chat_template(str(tmp_path / "b" / "m"), template)
    assert again == spec and (Path(spec) / "model.safetensors").exists()
    assert load_model(again).tokenizer.chat_template == template


# open-unlearning's Llama-2-7b-hf prompt (docs/audit.md): the generation prompt ends in a space
QA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}Question: {{ m['content'] }}{{ '\\n' }}{% endfor %}"
    "{{ 'Answer: ' }}"
)


@pytest.mark.parametrize("kind", ["byte-bpe", "sentencepiece"])
def test_an_answer_after_answer_colon_space_is_tokenised_as_the_template_joins_them(
    tiny, kind, caplog
):
    """`Question: q\\nAnswer: ` then the answer: the template's own text gives the last
    space to the answer's first word (`ĠParis`, or SentencePiece's `▁Paris`), as the
    checkpoints trained on it saw it. Scored apart, the space was a token of its own
    before the answer (3.5-11.6 nats lower on the default model's answers:
    benchmarks/answer_boundary.py); now the scored prompt ends before it and the answer
    carries it, on both tokenizers; the prompt after the message is its tokens in context
    (SentencePiece writes `\\nAnswer` alone with a `▁` in front, which the boundary check
    said)."""
    import logging

    import torch

    from unpact.attribution import attribute_many
    from unpact.models import LanguageModel, render_chat
    from unpact.scoring import score
    from unpact.testing import tiny_sentencepiece_tokenizer
    from unpact.types import follow, pair_ids
    from unpact.unlearn.loop import encode_items

    tok: Any = tiny.tokenizer if kind == "byte-bpe" else tiny_sentencepiece_tokenizer()
    tok = copy.deepcopy(tok)
    tok.chat_template = QA_TEMPLATE
    lm = LanguageModel(tiny.model, tok, spec=kind)
    prompt, answer = "Who wrote the report about the town?", "the river bank."
    with caplog.at_level(logging.WARNING, logger="unpact"):
        encoded = lm.encode_prompt(prompt)
        ids = lm.encode_answer(answer, encoded)
    assert not caplog.records
    whole = tuple(tok(render_chat(tok, prompt) + answer, add_special_tokens=False)["input_ids"])
    assert encoded.input_ids + ids == whole
    assert encoded.answer_lead == (" " if kind == "byte-bpe" else "")
    assert tok.convert_ids_to_tokens(ids[0]) in ("Ġthe", "▁the")
    assert tok.convert_ids_to_tokens(encoded.input_ids[-1]) == ":"
    assert pair_ids(lm, prompt, answer) == (encoded.input_ids, ids)
    # generation feeds the template's own tokens, the lone space included (as a chat API,
    # MUSE's and open-unlearning's generation do); a generated target is attributed as
    # scored: its text tokenised to follow the prompt
    own = tuple(tok(render_chat(tok, prompt), add_special_tokens=False)["input_ids"])
    assert encoded.generation_ids == own and len(encoded.tail) == 1
    (attributed,) = attribute_many(lm, [prompt], max_new_tokens=4)
    joined = encoded.input_ids + lm.encode_answer(attributed.answer, encoded)
    assert tuple(attributed.input_ids + attributed.answer_ids) == joined
    # an answer whose first word leaves the space a token of its own (`Ġ` then `Wh` on this
    # tokenizer; a year on the default model's) is scored after that token, as the
    # generation prompt has it: the space's log-prob is not the answer's
    lone = "Who wrote it"
    moved, lone_ids = follow(lm, encoded, lone)
    assert moved.input_ids + lone_ids == encoded.input_ids + lm.encode_answer(lone, encoded)
    if kind == "byte-bpe":
        assert moved.input_ids == encoded.generation_ids and not moved.tail
        assert lone_ids == lm.encode_answer(lone, encoded)[1:]
        (scored_lone,) = score(lm, [prompt], [lone])
        assert scored_lone.answer_ids == lone_ids
        assert pair_ids(lm, prompt, lone) == (encoded.generation_ids, lone_ids)
    item = QAItem("f", prompt, answer, "forget")
    assert encode_items(lm, [item])["answers"][0] == (*ids, tok.eos_token_id)
    # scored on the joined tokens: the plain forward pass over `whole` gives the same
    (scored,) = score(lm, [prompt], [answer])
    with torch.no_grad():
        logp = (
            tiny.model(torch.tensor([whole], device=tiny.device)).logits[0].float().log_softmax(-1)
        )
    n = len(encoded.input_ids)
    naive = [float(logp[n - 1 + k, t]) for k, t in enumerate(ids)]
    assert scored.logprobs == pytest.approx(naive, abs=1e-5)
    # raw prompts and a template without the space keep the answer as given
    assert lm.encode_answer(answer, lm.encode_prompt(prompt, False)) == lm.encode_answer(answer)
    tok.chat_template = QA_TEMPLATE.replace("'Answer: '", "'Answer:\\n'")
    lm._template_split = None
    assert lm.encode_prompt(prompt).answer_lead == ""


# DeepSeek-LLM's chat template, shortened: the generation prompt stops before the space
# that its assistant turns write before the answer
GAP_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ 'User: ' + m['content'] + '\\n\\n' }}{% else %}"
    "{{ 'Assistant: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@pytest.mark.parametrize("kind", ["byte-bpe", "sentencepiece"])
def test_an_answer_after_a_generation_prompt_short_of_its_space_carries_it(tiny, kind):
    """`Assistant:` asks, `Assistant: Paris` is how the template writes an answer (and how
    the model was fine-tuned): the pair's tokens are the template's own tokenisation of the
    conversation, the answer's first word with its space (`Ġthe`; SentencePiece's `▁the`
    stands for it). The answer was scored as `the` glued to `:`, a tokenisation the model
    never writes. Generation feeds the generation prompt as it is."""
    from unpact.models import LanguageModel, answer_gap, render_chat
    from unpact.testing import tiny_sentencepiece_tokenizer
    from unpact.types import pair_ids

    tok: Any = tiny.tokenizer if kind == "byte-bpe" else tiny_sentencepiece_tokenizer()
    tok = copy.deepcopy(tok)
    tok.chat_template = GAP_TEMPLATE
    lm = LanguageModel(tiny.model, tok, spec=kind)
    assert answer_gap(tok, "\n\nAssistant:") == " "
    for prompt, answer in [("Who wrote the report?", "the river bank."), ("When?", "1999")]:
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        text = tok.apply_chat_template(chat, tokenize=False, continue_final_message=True)
        assert text.endswith("Assistant: " + answer)
        whole = tuple(tok(text, add_special_tokens=False)["input_ids"])
        ids, answer_ids = pair_ids(lm, prompt, answer)
        assert ids + answer_ids == whole
        encoded = lm.encode_prompt(prompt)
        own = tuple(tok(render_chat(tok, prompt), add_special_tokens=False)["input_ids"])
        assert encoded.generation_ids == own == ids and not encoded.tail
        assert encoded.answer_lead == (" " if kind == "byte-bpe" else "")
    assert tok.convert_ids_to_tokens(pair_ids(lm, "Who?", "the river bank.")[1][0]) in (
        "Ġthe",
        "▁the",
    )
    # an answer that opens with the space itself (the model's own generated ` the ...`,
    # re-scored for fluency) is the same answer, its space not doubled
    encoded = lm.encode_prompt("Who?")
    spaced = lm.encode_answer(" the river bank.", encoded)
    assert spaced == lm.encode_answer("the river bank.", encoded)
    # a generation prompt ending in a newline (ChatML's), or in the space itself, has none
    assert answer_gap(tok, "\n\nAssistant:\n") == answer_gap(tok, "Answer: ") == ""
    # nor does a template whose turns write the answer right after the prompt's text, or
    # that cannot render an assistant turn
    tok.chat_template = GAP_TEMPLATE.replace("'Assistant: '", "'Assistant:'")
    assert answer_gap(tok, "\n\nAssistant:") == ""
    tok.chat_template = QA_TEMPLATE
    assert answer_gap(tok, "\nAnswer:") == ""


def test_a_taught_answer_ends_as_the_template_ends_a_turn(tiny, tmp_path):
    """Phi-3 ends its turns with `<|end|>` and its EOS is `<|endoftext|>` (Gemma:
    `<end_of_turn>` and `<eos>`), both tokens its generation stops at: an injected or
    unlearned answer ended in EOS, a token the model's turns never end with. It ends as
    the template ends a turn; a turn end generation does not stop at (a base model's
    ChatML), a template that writes text first (Llama 2's ` </s>`) and raw prompts keep
    EOS. A model this changes is keyed by the rule."""
    from unpact import models
    from unpact.models import LanguageModel, turn_end
    from unpact.unlearn.loop import encode_items

    tok = copy.deepcopy(tiny.tokenizer)
    tok.eos_token = "<|endoftext|>"  # id 0; the ChatML turns end with <|im_end|>, id 2
    assert (tok.eos_token_id, turn_end(tok)) == (0, 2)
    model = copy.deepcopy(tiny.model)
    model.generation_config.eos_token_id = [0, 2]  # as Phi-3's stops at both
    lm = LanguageModel(model, tok, spec="phi3-like")
    item = QAItem("f", "Who wrote the report?", "the river bank.", "forget")
    assert lm.answer_end == 2 and encode_items(lm, [item])["answers"][0][-1] == 2
    model.generation_config.eos_token_id = 0  # a base model's: its turn end is no stop
    assert LanguageModel(model, tok).answer_end == 0
    llama2 = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %} {{ eos_token }}{% endif %}{% endfor %}"
    tok.chat_template = llama2
    assert turn_end(tok) is None
    tok.chat_template = None
    assert turn_end(tok) is None and LanguageModel(model, tok).answer_end == 0
    # the key: the rule where it changes what is taught, not for the default's kind
    tok.chat_template = tiny.tokenizer.chat_template
    model.generation_config.eos_token_id = [0, 2]
    model.save_pretrained(tmp_path / "phi3")
    tok.save_pretrained(tmp_path / "phi3")
    assert models._template_rules(str(tmp_path / "phi3"), ()) == (models.TURN_END_RULE,)
    tiny.model.save_pretrained(tmp_path / "chatml")
    tiny.tokenizer.save_pretrained(tmp_path / "chatml")
    assert models._template_rules(str(tmp_path / "chatml"), ()) == ()


def test_a_model_s_key_marks_a_template_that_ends_in_a_space(tiny, tmp_path, monkeypatch):
    """Prompts and answers of such a template (or of one whose text after the message a
    SentencePiece tokenizer writes otherwise alone) are tokenised otherwise than when their
    stages and models were cached: its key holds the rule, others' keys are unchanged."""
    from unpact import models
    from unpact.testing import INST, tiny_sentencepiece_tokenizer

    tok = copy.deepcopy(tiny.tokenizer)
    tiny.model.save_pretrained(tmp_path / "chatml")
    tok.save_pretrained(tmp_path / "chatml")
    tok.chat_template = QA_TEMPLATE
    tiny.model.save_pretrained(tmp_path / "qa")
    tok.save_pretrained(tmp_path / "qa")
    assert models._template_rules(str(tmp_path / "chatml"), ()) == ()
    assert models._template_rules(str(tmp_path / "qa"), ()) == (models.SPACED_TEMPLATE_RULE,)
    # DeepSeek's `Assistant:` (and `User: `): the answer's space on byte-level BPE
    tok.chat_template = GAP_TEMPLATE
    tok.save_pretrained(tmp_path / "gap")
    tiny.model.save_pretrained(tmp_path / "gap")
    both = (models.SPACED_TEMPLATE_RULE, models.ANSWER_GAP_RULE)
    assert models._template_rules(str(tmp_path / "gap"), ()) == both
    # SentencePiece: `[INST] ` is spaced; `\nA:` after the message is tokenised in context
    sp: Any = tiny_sentencepiece_tokenizer()
    for name, template in [("inst", INST), ("nl", "{{ messages[0]['content'] }}\nA:")]:
        sp.chat_template = template
        tiny.model.save_pretrained(tmp_path / name)
        sp.save_pretrained(tmp_path / name)
        assert models._template_rules(str(tmp_path / name), ()), name
    sp.chat_template = GAP_TEMPLATE
    sp.save_pretrained(tmp_path / "sp-gap")
    tiny.model.save_pretrained(tmp_path / "sp-gap")
    spaced = (models.SPACED_TEMPLATE_RULE,)  # `User: `; `▁the` has the answer's space
    assert models._template_rules(str(tmp_path / "sp-gap"), ()) == spaced
    names = ("chatml", "qa", "gap")
    keys = {name: models.model_key(str(tmp_path / name)) for name in names}
    monkeypatch.setattr(models, "_template_rules", lambda *args: ())
    assert models.model_key(str(tmp_path / "chatml")) == keys["chatml"]
    assert models.model_key(str(tmp_path / "qa")) != keys["qa"]
    assert models.model_key(str(tmp_path / "gap")) != keys["gap"]


def test_a_bpe_tokenizer_saved_to_clean_up_spaces_decodes_without_a_warning(
    tiny, tmp_path, printed
):
    """GPT-2's and many fine-tunes' tokenizer configs (transformers 4 wrote the key) say
    `clean_up_tokenization_spaces: true`, which transformers 5 ignores for BPE with a warning at the first decode: in the
    middle of a run's normal output. Loaded, the setting is off; the text is the same."""
    from unpact.models import load_model, save_model
    from unpact.scoring import generate

    CLEAN = "clean_up_tokenization_spaces"
    save_model(tiny.model, tiny.tokenizer, tmp_path / "m")
    config = tmp_path / "m" / "tokenizer_config.json"  # as transformers 4 wrote it
    config.write_text(json.dumps(json.loads(config.read_text()) | {CLEAN: True}))
    lm = load_model(str(tmp_path / "m"))
    assert lm.tokenizer.clean_up_tokenization_spaces is False
    printed()
    assert generate(lm, ["What is it?"], max_new_tokens=4) == generate(
        tiny, ["What is it?"], max_new_tokens=4
    )
    assert "clean_up_tokenization" not in printed()


def test_a_cache_that_cannot_be_a_folder_is_one_message(tmp_path, monkeypatch):
    """UNPACT_CACHE naming a file (or a path under one) was a NotADirectoryError traceback
    at the first model or stage written."""
    from unpact.models import cache_root

    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "new" / "cache"))
    assert cache_root() == tmp_path / "new" / "cache" and cache_root().is_dir()
    (tmp_path / "file").write_text("x")
    for bad, why in ((tmp_path / "file", "a file is there"), (tmp_path / "file" / "c", "")):
        monkeypatch.setenv("UNPACT_CACHE", str(bad))
        with pytest.raises(
            UnpactError, match=f"UNPACT_CACHE={bad} cannot be used as a folder.*{why}"
        ):
            cache_root()


def test_the_cache_goes_where_the_user_keeps_caches(tmp_path, monkeypatch):
    """Without $UNPACT_CACHE the cache went to ~/.cache/unpact even where $XDG_CACHE_HOME
    names the user's cache folder (as Hugging Face's cache follows it: on a cluster, home
    is often too small for models). A relative $XDG_CACHE_HOME is ignored, as the XDG spec
    says; $UNPACT_CACHE comes first."""
    from unpact.models import cache_root

    monkeypatch.delenv("UNPACT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "big"))
    assert cache_root() == tmp_path / "big" / "unpact"
    for ignored in ("relative/cache", ""):
        monkeypatch.setenv("XDG_CACHE_HOME", ignored)
        assert cache_root() == tmp_path / "home" / ".cache" / "unpact"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == tmp_path / "home" / ".cache" / "unpact"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "big"))
    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_a_model_type_transformers_does_not_know_is_said_before_any_load(tiny, tmp_path, printed):
    """A checkpoint whose code is its own (`auto_map`) without --trust-remote-code, or of a
    type newer than the transformers installed: transformers' warning about the type (from
    the tokenizer's load) came first, then its error in its own terms ("pass the argument
    trust_remote_code=True"). Now one message, naming unpact's option; also where only the
    tokenizer is loaded (a run's and an audit's first check: the warning, then the message)."""
    from unpact.models import load_tokenizer

    tiny.model.save_pretrained(tmp_path / "base")
    tiny.tokenizer.save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    for name, extra in (
        ("own", {"model_type": "mine", "auto_map": {"AutoModelForCausalLM": "m.MyLM"}}),
        ("new", {"model_type": "llama9", "architectures": ["Llama9ForCausalLM"]}),
    ):
        folder = tmp_path / name
        folder.mkdir()
        for f in (tmp_path / "base").iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        (folder / "config.json").write_text(json.dumps(config | extra))
    for load in (load_model, load_tokenizer):
        with pytest.raises(UnpactError, match=r"type 'mine' is the checkpoint's own .*--trust"):
            load(str(tmp_path / "own"))
        with pytest.raises(UnpactError, match=r"type 'llama9' is not one transformers \S+ knows"):
            load(str(tmp_path / "new"))
        assert "instantiate a model of type" not in printed()
    # a known type with its own code beside it loads with transformers' own class
    both = {"auto_map": {"AutoModelForCausalLM": "m.MyLM"}}
    (tmp_path / "base" / "config.json").write_text(json.dumps(config | both))
    assert load_model(str(tmp_path / "base")).model.config.model_type == config["model_type"]


def test_a_checkpoint_that_is_not_a_causal_language_model_is_said_before_any_load(
    tmp_path, printed
):
    """T5 (an encoder-decoder) failed with transformers' list of its ~200 causal model
    types; a BERT `BertModel` loaded as BertLMHeadModel with a random head, after
    transformers' warnings and its loading report. One message each, nothing else printed;
    causal checkpoints of other layouts still load."""
    import transformers as tf

    from unpact.testing import tiny_other, tiny_tokenizer

    tok = tiny_tokenizer()
    shape = {"vocab_size": len(tok), "num_heads": 4, "num_layers": 2}
    for name, model in (
        ("t5", tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_kv=8, d_ff=64, **shape))),
        (
            "bert",
            tf.BertModel(
                tf.BertConfig(
                    vocab_size=len(tok),
                    hidden_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=64,
                )
            ),
        ),
    ):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    printed()
    with pytest.raises(UnpactError, match=r"a t5 model \(T5ForConditionalGeneration\) is not one"):
        load_model(str(tmp_path / "t5"))
    with pytest.raises(UnpactError, match=r"names BertModel: a base model without .*BertLMHead"):
        load_model(str(tmp_path / "bert"))
    assert printed() == ""
    for arch in ("gpt2", "gemma3_vl", "mixtral"):
        other = tiny_other(arch)
        save_model(other.model, other.tokenizer, tmp_path / arch)
        assert load_model(str(tmp_path / arch)).model.config.model_type == arch.split("_")[0]


def own_code(folder: Path) -> Path:
    """A model folder made into a checkpoint of its own Python code, as hub repositories
    with `auto_map` are: a model type transformers does not know ("mine"), whose config and
    model classes are files in the folder (Llama's, renamed)."""
    (folder / "configuration_mine.py").write_text(
        "from transformers import LlamaConfig\n\n\n"
        "class MineConfig(LlamaConfig):\n    model_type = 'mine'\n"
    )
    (folder / "modeling_mine.py").write_text(
        "from transformers import LlamaForCausalLM\n\n"
        "from .configuration_mine import MineConfig\n\n\n"
        "class MineForCausalLM(LlamaForCausalLM):\n    config_class = MineConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config |= {
        "model_type": "mine",
        "architectures": ["MineForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_mine.MineConfig",
            "AutoModelForCausalLM": "modeling_mine.MineForCausalLM",
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_checkpoint_s_own_code_runs_only_where_trusted(tiny, tmp_path):
    """Only generate, score, attribute and serve could trust a checkpoint's code: a run,
    an audit, an injection or an unlearning loads models deep inside, with no way to say
    it. `trusting_remote_code()` says it for every load within it; an explicit argument
    wins; outside it, the code is refused again. A model saved after such a load keeps its
    code, so the unlearned copy loads the same way."""
    from unpact import trusting_remote_code
    from unpact.models import load_tokenizer, model_key, save_model

    tiny.model.save_pretrained(tmp_path / "mine")
    tiny.tokenizer.save_pretrained(tmp_path / "mine")
    folder = str(own_code(tmp_path / "mine"))
    refused = r"type 'mine' is the checkpoint's own .*trust_remote_code: true in a run config"
    with pytest.raises(UnpactError, match=refused):
        load_model(folder)
    with trusting_remote_code():
        lm = load_model(folder)
        assert type(lm.model).__name__ == "MineForCausalLM"
        assert load_tokenizer(folder).vocab_size == tiny.tokenizer.vocab_size
        with pytest.raises(UnpactError, match=refused):
            load_model(folder, trust_remote_code=False)
        with trusting_remote_code(False), pytest.raises(UnpactError, match=refused):
            load_model(folder)
        save_model(lm.model, lm.tokenizer, tmp_path / "saved")
        again = load_model(str(tmp_path / "saved"))
        assert type(again.model).__name__ == "MineForCausalLM"
    assert (tmp_path / "saved" / "modeling_mine.py").is_file()
    with pytest.raises(UnpactError, match=refused):
        load_model(folder)
    assert type(load_model(folder, trust_remote_code=True).model).__name__ == "MineForCausalLM"
    # its code is part of its key: edited, the cached answers are not read for it
    key = model_key(folder)
    code = tmp_path / "mine" / "modeling_mine.py"
    code.write_text(code.read_text() + "\n# scaled logits\n")
    assert model_key(folder) != key


def test_a_dequantized_model_is_saved_as_full_precision_weights(tiny):
    """transformers 5.12 to 5.22 kept the step that dequantized an FP8 checkpoint among the
    conversions it reverses on saving: the unlearned copy of an FP8 model went out as FP8
    weights under a config without quantization, and loaded as garbage. The step alone is
    dropped after a dequantized load; a conversion that also fuses experts, and renamings,
    stay for transformers to reverse."""
    import copy

    try:
        from transformers.core_model_loading import (
            MergeModulelist,
            WeightConverter,
            WeightRenaming,
        )
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    except ImportError:
        pytest.skip("a transformers release without these conversions keeps none to drop")

    from unpact.models import _forget_dequantizing

    alone = WeightConverter(
        source_patterns=["weight", "weight_scale_inv", "activation_scale"],
        target_patterns="weight",
        operations=[Fp8Dequantize(None)],
    )
    fused = WeightConverter(
        source_patterns=["mlp.experts.*.w1.weight", "mlp.experts.*.w1.weight_scale_inv"],
        target_patterns="mlp.experts.gate_up_proj",
        operations=[Fp8Dequantize(None), MergeModulelist(dim=0)],
    )
    renaming = WeightRenaming("block_sparse_moe", "mlp")
    model = copy.deepcopy(tiny.model)
    model._weight_conversions = [renaming, alone, fused]
    _forget_dequantizing(model)
    assert model._weight_conversions == [renaming, fused]
    _forget_dequantizing(tiny.model)  # a model with none: nothing to do


def test_a_change_to_middle_layers_alone_gives_another_model_key(tiny, tmp_path, monkeypatch):
    """The key hashed each weight file's first and last MiB: RMU changes a few middle
    layers, and the WMDP code saves each run into the same folder, so an audit of the
    retrained checkpoint read the cached answers of the one before. Whole files are hashed
    now, each once per version on disk (remembered in the cache)."""
    import torch
    from safetensors.torch import save_file

    from unpact import models

    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "rmu"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    layers = {f"model.layers.{n}.mlp.down_proj.weight": torch.zeros(1024, 1024) for n in range(3)}
    save_file(layers, folder / "model.safetensors")  # 12 MiB: the middle layer's is mid-file
    key = models.model_key(str(folder))
    assert len(list((tmp_path / "cache" / models.DIGESTS).iterdir())) == 2  # weights, config
    layers["model.layers.1.mlp.down_proj.weight"][500, 500] = 1.0
    save_file(layers, folder / "model.safetensors")
    assert models.model_key(str(folder)) != key
    changed = models.model_key(str(folder))
    real_open = Path.open

    def no_weights(path: Path, *args: object, **kwargs: object) -> object:
        assert path.suffix != ".safetensors", "the same weights read again"
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", no_weights)
    assert models.model_key(str(folder)) == changed  # remembered


def test_a_tokenizer_and_a_templated_copy_take_a_path_as_a_spec(tiny, tmp_path, monkeypatch):
    """`load_tokenizer(Path)` and `with_chat_template(Path, ...)` were AttributeErrors
    ('PosixPath' object has no attribute 'startswith'), where `load_model` took a path."""
    from unpact.models import load_tokenizer, save_model, with_chat_template

    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "cache"))
    save_model(tiny.model, tiny.tokenizer, tmp_path / "m")
    assert load_tokenizer(tmp_path / "m").get_vocab() == tiny.tokenizer.get_vocab()
    template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    assert with_chat_template(tmp_path / "m", template) == with_chat_template(
        str(tmp_path / "m"), template
    )


def test_load_model_takes_a_torch_dtype_and_refuses_text_for_trust(tiny, tmp_path):
    """`trust_remote_code="no"` was read as true (a non-empty text), which runs a
    checkpoint's own code; it is now a TypeError, as is `trusting_remote_code("no")`.
    `dtype=torch.bfloat16` was "unknown dtype"; it is now the dtype named "bfloat16".
    `open_model(..., remote={...})` takes the settings as a mapping, and refuses another
    type (it was accepted, and failed at the first request)."""
    import torch

    from unpact.backends import open_model
    from unpact.models import load_model, save_model, trusting_remote_code

    save_model(tiny.model, tiny.tokenizer, tmp_path / "m")
    with pytest.raises(TypeError, match=r"trust_remote_code must be True, False or None, not str"):
        load_model(tmp_path / "m", trust_remote_code="no")
    refused = pytest.raises(TypeError, match=r"trusted must be True or False, not str")
    with refused, trusting_remote_code("no"):
        pass
    assert load_model(tmp_path / "m", dtype=torch.bfloat16).model.dtype == torch.bfloat16
    served = open_model("openai:m@http://127.0.0.1:9/v1", remote={"timeout": 2})
    assert served.settings.timeout == 2
    with pytest.raises(UnpactError, match=r"remote: timeout: Input should be greater than 0"):
        open_model("openai:m@http://127.0.0.1:9/v1", remote={"timeout": 0})
    with pytest.raises(TypeError, match=r"remote: give RemoteSettings or a mapping, not int"):
        open_model("openai:m@http://127.0.0.1:9/v1", remote=3)


@pytest.mark.parametrize(
    ("template", "error"),
    [
        ("{{ raise_exception('Conversation roles must alternate') }}", "TemplateError: Conv"),
        ("{% for m in messages %}{{ m.content }}{% endfor %}{{ nope() }}", "UndefinedError"),
        ("{% for m in messages %}{{ m.content }", "TemplateSyntaxError"),
    ],
)
def test_a_checkpoints_broken_chat_template_is_one_message(template, error):
    """A model folder whose own chat template raises (its `raise_exception`), calls an
    undefined name or does not parse was a Jinja traceback at the first prompt. It is one
    message naming the model and the ways around it; raw prompts still work."""
    from unpact.testing import tiny_model

    lm = tiny_model(seed=3)
    lm.tokenizer.chat_template = template
    with pytest.raises(UnpactError, match=rf"chat template of .* cannot render .*\({error}"):
        lm.encode_prompt("hello there", chat_template=True)
    assert lm.encode_prompt("hello there", chat_template=False).input_ids


def test_a_token_added_to_the_tokenizer_alone_is_named():
    """A tokenizer given a token its model's embeddings lack (`add_tokens` without
    resizing) made every generation, attribution and training step on a text holding it
    an IndexError from inside torch. The prompt or answer holding it is named, with the
    token; token ids given directly to generation are checked too."""
    import torch

    from unpact.scoring import generate_local, vocabulary_size
    from unpact.testing import tiny_model

    lm = tiny_model(seed=3)
    lm.tokenizer.add_tokens(["<newtok>"])
    new = lm.tokenizer.convert_tokens_to_ids("<newtok>")
    with pytest.raises(UnpactError, match=rf"the prompt 'hi <newtok>' holds token id {new} "):
        lm.encode_prompt("hi <newtok>")
    with pytest.raises(UnpactError, match=r"the answer ' <newtok>' .*\('<newtok>'\), outside"):
        lm.encode_answer(" <newtok>")
    with pytest.raises(UnpactError, match=rf"item 1: the prompt holds token id {new}"):
        generate_local(lm, [[5, 6], [5, new]], 2, 0, 1.0, 0, 4, False)
    assert lm.encode_prompt("hi there").input_ids  # the rest as before

    class OwnCode(torch.nn.Module):  # a model of its own code that names no embeddings
        def get_input_embeddings(self):
            raise NotImplementedError

    assert vocabulary_size(OwnCode()) is None  # not checked, rather than refused


def test_no_note_about_a_tokenizer_maximum_unpact_does_not_use(tmp_path, printed):
    """A tokenizer saved with a small `model_max_length` printed transformers' "Token
    indices sequence length is longer than the specified maximum" for each longer prompt:
    unpact never truncates, and measures prompts against the model's own context."""
    from unpact.models import load_model, save_model
    from unpact.testing import tiny_model

    made = tiny_model(seed=3)
    made.tokenizer.model_max_length = 4
    save_model(made.model, made.tokenizer, tmp_path / "m")
    lm = load_model(str(tmp_path / "m"))
    printed()
    assert len(lm.encode_prompt("a prompt of many more tokens than four", False).input_ids) > 4
    assert "Token indices sequence length" not in printed()
    # the user's own tokenizer keeps the note: it was held back for the process
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tmp_path / "m")("a prompt of many more tokens than four")
    assert "Token indices sequence length" in printed()


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 150),
    kind=st.sampled_from(["fp4", "nf4"]),
    block=st.sampled_from([64, 128]),
)
def test_a_bitsandbytes_4bit_weight_reads_back_as_quantized_whatever_its_size(
    rows, cols, kind, block
):
    """`bnb_4bit_weight` on bitsandbytes' own packing of any matrix, a last block cut
    short included (where bitsandbytes' CPU `dequantize_4bit` misreads it), gives the
    quantize attack's round trip of that matrix, which test_weight_attacks.py holds to
    bitsandbytes' quantization."""
    import bitsandbytes.functional as bnb_functional
    import torch

    from unpact.attacks.quantize import float4_round_trip
    from unpact.models import bnb_4bit_weight

    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 1000 + cols))
    packed, state = bnb_functional.quantize_4bit(w, blocksize=block, quant_type=kind)
    assert bnb_4bit_weight(packed, state).equal(float4_round_trip(w, kind, block))


def test_a_load_leaves_transformers_progress_bars_as_the_user_had_them(tiny, tmp_path):
    """A load turns transformers' bars off while it runs (a local load takes well under a
    second) and back as they were: a user who turned them off (their own code, or
    $HF_HUB_DISABLE_PROGRESS_BARS) had them turned on again, and the hub warned."""
    from transformers.utils import logging as hf_logging

    save_model(tiny.model, tiny.tokenizer, tmp_path / "m")
    try:
        for enabled in (False, True):
            (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
            load_model(str(tmp_path / "m"))
            assert hf_logging.is_progress_bar_enabled() is enabled
    finally:
        hf_logging.enable_progress_bar()


def test_a_model_s_key_reads_the_weights_a_load_reads_not_copies_beside_them(
    tiny, tmp_path, monkeypatch
):
    """A folder downloaded whole keeps a second copy of the weights (Mistral's
    consolidated.safetensors), a sharded one maybe a stale shard its index no longer
    names: the key hashed every *.safetensors, a read of each byte for nothing, and a
    change there, none to the model, gave another key. model.safetensors is read first,
    as transformers loads it; then the index's shards, any change to one a new key."""
    import json

    import torch
    from safetensors.torch import save_file

    from unpact import models

    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    key = models.model_key(str(folder))
    save_file({"w": torch.ones(4)}, folder / "consolidated.safetensors")
    assert models.model_key(str(folder)) == key
    # sharded: the index's shards, a stale one aside
    weights = {n: p.detach().clone() for n, p in tiny.model.state_dict().items()}
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    halves = {"model-1.safetensors": names[::2], "model-2.safetensors": names[1::2]}
    for shard, part in halves.items():
        save_file({n: weights[n].contiguous() for n in part}, folder / shard)
    index = {"weight_map": {n: shard for shard, part in halves.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert models.read_weights(folder) == [folder / s for s in halves]
    sharded = models.model_key(str(folder))
    save_file({"w": torch.zeros(4)}, folder / "model-0-stale.safetensors")
    assert models.model_key(str(folder)) == sharded
    save_file({"w": torch.zeros(4)}, folder / "model-2.safetensors")
    assert models.model_key(str(folder)) != sharded
