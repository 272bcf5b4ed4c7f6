"""Model resolution: local folders, GGUF, hub IDs (real download code, tested on a local hub cache), errors."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from lorakit.errors import UserError
from lorakit.model import default_gguf_file, is_hub_id, pick_dtype, resolve_model_path

from conftest import ROOT


def test_hub_id_versus_path():
    assert is_hub_id("Qwen/Qwen2.5-7B-Instruct")
    assert not is_hub_id("./Qwen/x") and not is_hub_id("/models/qwen") and not is_hub_id("Qwen2.5-7B-Instruct")
    assert not is_hub_id("data/self_cognition.json")


def test_missing_local_path_shows_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=str(tmp_path / "Qwen2.5-7B-Instruct")):
        resolve_model_path("Qwen2.5-7B-Instruct")


def test_folder_without_config_is_explained(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_offline_hub_id_fails_fast_naming_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"--model someorg/somemodel: could not download it from the Hugging Face hub"):
        resolve_model_path("someorg/somemodel")


def test_hub_download_code_on_a_local_hub_cache(tmp_path, tiny_qwen2_dir):
    """snapshot_download is the real path for hub IDs; here it finds the files in a local hub cache."""
    snapshot = tmp_path / "models--lorakit-test--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_qwen2_dir, snapshot)
    (tmp_path / "models--lorakit-test--tiny" / "refs").mkdir()
    (tmp_path / "models--lorakit-test--tiny" / "refs" / "main").write_text("a" * 40)
    code = "from lorakit.model import resolve_model_path; print(resolve_model_path('lorakit-test/tiny'))"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(snapshot)


def test_gguf_file_is_converted_to_the_cached_folder(smollm2_dir):
    assert resolve_model_path(str(default_gguf_file())) == smollm2_dir
    assert (smollm2_dir / "config.json").is_file() and (smollm2_dir / "tokenizer.json").is_file()
    assert resolve_model_path(None) == smollm2_dir


def test_dtype_choice_on_cpu(capsys):
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("bfloat16", cpu) == torch.float32
    assert "using float32" in capsys.readouterr().err
