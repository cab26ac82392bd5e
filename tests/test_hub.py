"""Hub ids: a model in the local hub cache loads offline; one that is not says why in one line."""

import shutil

import pytest
from huggingface_hub import constants

from turbo_demo.checkpoints.checkpoint import load_model
from turbo_demo.checkpoints.hub import fetch, is_hub_id
from turbo_demo.errors import UserError


def test_what_reads_as_a_hub_id():
    assert is_hub_id("PowerInfer/TurboSparse-Mistral-Instruct") and is_hub_id("Qwen/Qwen3-0.6B")
    for path in ("/etc/passwd", "./models/x", "~/x", "a/../b", "a/b/c", "just-a-name", "org/"):
        assert not is_hub_id(path), path


def test_a_cached_hub_model_loads_offline(tiny_dirs, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_dirs["drelu"], repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    heard = []
    path = fetch("someone/tiny", heard.append)
    assert path == repo / "snapshots" / commit and heard == []  # no download, no progress
    assert load_model(path).config.model_type == "bamboo"


def test_an_uncached_hub_model_offline_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="not in the local hub cache, and HF_HUB_OFFLINE is set"):
        fetch("someone/missing")
