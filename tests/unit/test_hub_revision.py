"""A hub model at a revision, `ORG/NAME@REV` (a branch, tag or commit): an audit of a
published checkpoint names the commit it audited. Here from the local hub cache, offline
(the suite's mode); `tests/process/test_cli.py` fetches one from a fake hub."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from unpact.errors import UnpactError
from unpact.models import (
    hub_at,
    hub_commits,
    hub_revision,
    hub_snapshot,
    load_model,
    load_tokenizer,
    model_key,
    save_model,
)
from unpact.testing import tiny_model

A, B = "a" * 40, "b" * 40


def hub_snapshot_of(hub: Path, repo: str, commit: str, model: Path, *refs: str) -> Path:
    """`model`'s files as the local hub cache holds `repo` at `commit`, each of `refs`
    (branches, tags) pointing to it."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model, folder / "snapshots" / commit)
    for ref in refs:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return folder / "snapshots" / commit


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local hub cache holding me/tiny: `main` and tag v1 at commit A (seed 0), branch
    refs/pr/1 at commit B (seed 1)."""
    from huggingface_hub import constants

    root = tmp_path / "hub"
    for seed, commit, refs in ((0, A, ("main", "v1")), (1, B, ("refs/pr/1",))):
        lm = tiny_model(seed=seed)
        save_model(lm.model, lm.tokenizer, tmp_path / f"seed{seed}")
        hub_snapshot_of(root, "me/tiny", commit, tmp_path / f"seed{seed}", *refs)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    hub_snapshot.cache_clear()
    hub_revision.cache_clear()
    yield root
    hub_snapshot.cache_clear()
    hub_revision.cache_clear()


def _logits(lm) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(torch.tensor([[5, 6, 7]])).logits


@pytest.mark.parametrize(
    ("spec", "seed"),
    [("me/tiny@main", 0), ("me/tiny@v1", 0), (f"me/tiny@{A}", 0), ("me/tiny@refs/pr/1", 1)],
)
def test_a_revision_loads_the_weights_of_its_commit(hub, spec, seed):
    assert torch.equal(_logits(load_model(spec)), _logits(tiny_model(seed=seed)))


def test_each_commit_is_its_own_model_and_a_moved_branch_another(hub, tmp_path):
    """The key is the snapshot's: its folder (the commit) and files. A branch moved to
    another commit (a checkpoint pushed again) gives another key, as a new commit should."""
    keys = {spec: model_key(spec) for spec in ("me/tiny@main", "me/tiny@v1", f"me/tiny@{B}")}
    assert keys["me/tiny@main"] == keys["me/tiny@v1"] != keys[f"me/tiny@{B}"]
    # a run's results.json names the commit each was read at
    assert hub_commits(["me/tiny@main", "me/tiny@v1", "/a/folder"]) == {
        "me/tiny@main": A,
        "me/tiny@v1": A,
    }
    (hub / "models--me--tiny" / "refs" / "main").write_text(B)
    hub_snapshot.cache_clear()
    assert model_key("me/tiny@main") == keys[f"me/tiny@{B}"]
    assert hub_commits(["me/tiny@main"]) == {"me/tiny@main": B}


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        (
            "me/tiny@v9",
            "offline (HF_HUB_OFFLINE is set), and the local hub cache holds no 'v9' of me/tiny",
        ),
        (
            "me/other@main",
            "offline (HF_HUB_OFFLINE is set), and the local hub cache holds no 'main' of me/other",
        ),
    ],
)
def test_a_revision_the_cache_lacks_is_one_message(hub, spec, said, monkeypatch):
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")  # the suite sets both; the message names those set
    with pytest.raises(UnpactError, match=re.escape(f"model spec '{spec}': {said}")):
        load_model(spec)


def test_only_hub_ids_with_a_revision_are_read_so(hub, tmp_path, monkeypatch):
    """A folder of that name is read as the folder; served models and plain hub ids are
    not revisions; a revision may hold slashes (refs/pr/1), not spaces."""
    assert hub_at("me/tiny@refs/pr/1") == ("me/tiny", "refs/pr/1")
    assert hub_at("gpt2@v1") == ("gpt2", "v1")  # a legacy id, without an organisation
    for spec in (
        "me/tiny",
        "openai:smol@http://127.0.0.1:8000/v1",
        "a/b@c d",
        "-x@y",
        "x.gguf",
        "a/b/c@d",
        "./a@b",
        "~/a@b",
    ):
        assert hub_at(spec) is None, spec
    lm = tiny_model(seed=1)  # the hub's v1 is seed 0's
    save_model(lm.model, lm.tokenizer, tmp_path / "me" / "tiny@v1")
    monkeypatch.chdir(tmp_path)
    assert torch.equal(_logits(load_model("me/tiny@v1")), _logits(lm))


def test_a_plain_hub_id_loads_the_commit_its_key_names(hub):
    """`ORG/NAME` is keyed by the commit its `main` resolves to; the weights it loads are
    that commit's (its snapshot, read as a folder), not whatever `main` is when the
    load comes: after `main` moves, both key and weights move together."""
    key = model_key("me/tiny")
    (hub / "models--me--tiny" / "refs" / "main").write_text(B)  # pushed after the key
    assert torch.equal(_logits(load_model("me/tiny")), _logits(tiny_model(seed=0)))
    assert hub_commits(["me/tiny"]) == {"me/tiny": A}
    hub_revision.cache_clear()  # a new process
    assert model_key("me/tiny") != key
    assert torch.equal(_logits(load_model("me/tiny")), _logits(tiny_model(seed=1)))
    assert hub_commits(["me/tiny"]) == {"me/tiny": B}


def test_a_snapshot_fetched_without_its_weights_says_so_offline(hub):
    """The tokenizer alone fetched (`load_tokenizer` of a hub id), then offline: the
    weights are not in the local hub cache, which is said, not that the hub has none."""
    (hub / "models--me--tiny" / "snapshots" / A / "model.safetensors").unlink()
    with pytest.raises(
        UnpactError, match=f"the local hub cache holds me/tiny at {A} without its weights"
    ):
        load_model("me/tiny@v1")


def _hub_run_config(**extra: object) -> dict:
    """A run of two commits of the hub's tiny model (one the original, one "unlearned")
    on TOFU's fixture files."""
    from tests.unit.test_real_data import FIXTURES

    return {
        "model": "me/tiny@refs/pr/1",
        "data": {"benchmark": f"tofu:{FIXTURES / 'tofu'}", "general": None},
        "inject": {"enabled": False},
        "methods": [{"model": "me/tiny@v1", "name": "other"}],
        "attacks": [],
        "judge": {"max_new_tokens": 16},
        "statistics": {"resamples": 0},
    } | extra


def test_a_run_names_the_commit_each_hub_model_was_read_at(hub, tmp_path):
    """results.json's `hub_commits` and the report: a branch moves, the commit stays."""
    from unpact.run import run

    config = _hub_run_config()
    result = run(config, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert result.results["hub_commits"] == {"me/tiny@refs/pr/1": B, "me/tiny@v1": A}
    report = " ".join((tmp_path / "out" / "report.html").read_text().split())
    assert f"<code>me/tiny@refs/pr/1</code> commit <code>{B[:12]}</code>" in report


def test_a_run_with_its_own_chat_template_names_the_hub_commits_too(hub, tmp_path, monkeypatch):
    """`chat_template:` runs every model as a templated copy in the cache: results.json's
    `hub_commits` named none of the hub models those copies were made from."""
    from unpact.run import run

    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "cache"))
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %} A:"
    config = _hub_run_config(chat_template=template)
    for out in ("first", "again"):  # the copies made, then read from the cache
        result = run(config, tmp_path / out, cache_dir=tmp_path / "stages", progress=False)
        assert result.results["hub_commits"] == {"me/tiny@refs/pr/1": B, "me/tiny@v1": A}


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_a_hub_lora_adapter_is_merged_into_its_base_as_a_local_one_is(hub, tiny, tmp_path):
    """A hub repository of a LoRA adapter (its base named in adapter_config.json), by its
    id or at a revision: merged into its base, as an adapter folder is."""
    import json

    from tests.unit.test_models import _adapter

    ADAPTER = "adapter_config.json"
    adapter, logits = _adapter(tiny, tmp_path)
    hub_snapshot_of(hub, "me/lora", "e" * 40, adapter, "main")
    for spec in ("me/lora", "me/lora@main"):
        assert load_tokenizer(spec).get_vocab() == tiny.tokenizer.get_vocab()
        merged = load_model(spec)
        with torch.no_grad():
            got = merged.model(torch.tensor([[1, 5, 9, 14, 3]])).logits
        torch.testing.assert_close(got, logits, atol=1e-5, rtol=1e-5)
    # the hub adapter's base, itself on the hub: its commit is named beside the adapter's
    config = json.loads((hub / "models--me--lora" / "snapshots" / ("e" * 40) / ADAPTER).read_text())
    (hub / "models--me--lora" / "snapshots" / ("e" * 40) / ADAPTER).write_text(
        json.dumps(config | {"base_model_name_or_path": "me/tiny", "revision": "v1"})
    )
    load_model("me/tiny@v1")
    assert hub_commits(["me/lora"]) == {"me/lora": "e" * 40, "me/tiny@v1": A}


def test_a_hub_model_s_templated_copy_links_its_snapshot_s_files(hub, tmp_path, monkeypatch):
    """`--chat-template` on a hub id: the copy links the snapshot's weights (the blobs
    its links name), as for a folder; it was a whole copy written through a load."""
    import os

    from unpact.models import with_chat_template

    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "cache"))
    blob = hub / "models--me--tiny" / "snapshots" / A / "model.safetensors"
    for spec in ("me/tiny", "me/tiny@v1"):
        copy = Path(
            with_chat_template(spec, "{% for m in messages %}{{ m['content'] }}{% endfor %}A:")
        )
        assert os.path.samefile(copy / "model.safetensors", blob)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_an_adapter_s_base_is_read_at_the_revision_its_config_names(hub, tiny, tmp_path):
    """PEFT loads an adapter's base at its adapter_config.json's `revision`; unpact read
    the base's `main` whatever the revision said."""
    import json

    from tests.unit.test_models import _adapter
    from unpact.models import adapter_base

    adapter, logits = _adapter(tiny, tmp_path)  # trained on seed 0: me/tiny's v1 (A)
    config = json.loads((adapter / "adapter_config.json").read_text())

    def merged(base: str, revision: str | None) -> torch.Tensor:
        (adapter / "adapter_config.json").write_text(
            json.dumps(config | {"base_model_name_or_path": base, "revision": revision})
        )
        with torch.no_grad():
            return load_model(str(adapter)).model(torch.tensor([[1, 5, 9, 14, 3]])).logits

    torch.testing.assert_close(merged("me/tiny", "v1"), logits, atol=1e-5, rtol=1e-5)
    assert adapter_base(adapter) == "me/tiny@v1"
    # a results.json names the commit of the hub base the local adapter was merged into
    assert hub_commits([str(adapter), str(tmp_path)]) == {"me/tiny@v1": A}
    other = merged("me/tiny", "refs/pr/1")  # seed 1's weights under the same adapter
    assert not torch.allclose(other, logits, atol=1e-3)
    assert adapter_base(adapter) == "me/tiny@refs/pr/1"
    # a local base, and "main", are the base as named
    merged(str(tmp_path / "base"), "v9")
    assert adapter_base(adapter) == str(tmp_path / "base")
    merged("me/tiny", "main")
    assert adapter_base(adapter) == "me/tiny"


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"TRANSFORMERS_OFFLINE": "1"}, "TRANSFORMERS_OFFLINE is set"),
        (
            {"HF_HUB_OFFLINE": "yes", "TRANSFORMERS_OFFLINE": "1"},
            "HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE are set",
        ),
    ],
)
def test_offline_mode_names_the_variable_that_set_it(hub, monkeypatch, env, said):
    """huggingface_hub goes offline on TRANSFORMERS_OFFLINE too: the message named
    HF_HUB_OFFLINE to a user who had not set it."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UnpactError, match=re.escape(f"offline ({said}), and the local")):
        load_model("me/tiny@v9")


def test_a_legacy_hub_id_without_an_organisation_is_read_as_any_other(hub, tmp_path):
    """The hub's ids of its first models have no organisation (gpt2): `gpt2@REV` was
    refused with huggingface_hub's "Repo id must use alphanumeric chars" about the whole
    spec, and a plain `gpt2` was loaded by transformers from the hub id (its own loading
    bar), not from the snapshot at the commit its cache key names."""
    hub_snapshot_of(hub, "tinyone", A, hub / "models--me--tiny" / "snapshots" / B, "main", "v2")
    want = _logits(tiny_model(seed=1))
    for spec in ("tinyone", "tinyone@v2", "tinyone@main"):
        assert torch.equal(_logits(load_model(spec)), want), spec
    assert hub_commits(["tinyone", "tinyone@v2"]) == {"tinyone": A, "tinyone@v2": A}
