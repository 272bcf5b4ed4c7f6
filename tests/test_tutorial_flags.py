"""The tutorials' flags on `lorakit sft`: mistakes refused before any weights load, ignored flags named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from lorakit.data.render import render_prompt, strip_system_markers, system_markers


@pytest.fixture(scope="module")
def no_weights_dir(tiny_qwen2_dir, tmp_path_factory) -> Path:
    """The tiny Qwen2's config and tokenizer without its weights: any command that reads weights fails on it."""
    out = tmp_path_factory.mktemp("no-weights")
    for f in tiny_qwen2_dir.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture
def rows(tmp_path) -> Path:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"query": f"Question {i}?", "response": f"Answer {i}."} for i in range(8)]))
    return path


def test_unknown_target_modules_refused_before_weights_load(no_weights_dir, rows, tmp_path):
    proc = run_cli("sft", "--model", str(no_weights_dir), "--dataset", str(rows), "--output_dir", str(tmp_path / "o"),
                   "--target_modules", "q_proj,v_proj,qkv_proj", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--target_modules qkv_proj: no such module in Qwen2ForCausalLM" in proc.stderr
    assert "Its linear layers are: down_proj gate_proj k_proj o_proj q_proj up_proj v_proj" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_tutorial_flags_accepted_and_ignored_ones_named(no_weights_dir, rows, tmp_path):
    proc = run_cli("sft", "--model", str(no_weights_dir), "--dataset", f"{rows}#20", "--dry_run", "true",
                   "--target_modules", "q_proj,v_proj,o_proj,up_proj,down_proj,gate_proj", "--bf16", "true",
                   "--fp16", "false", "--eval_steps", "5", "--model_name", "Nova", "--model_author", "Acme",
                   "--system", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>", "--output_dir",
                   str(tmp_path / "o"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = proc.stderr
    assert f"note: {rows}#20 asks for 20 rows of 8: oversampled, each row used 2 or 3 times" in err
    assert "note: --eval_steps 5 changes nothing: there are no validation rows" in err
    assert "note: --model_name and --model_author only fill the {{NAME}}/{{AUTHOR}} placeholders" in err
    assert "warning: --system held the chat template's own markers ('<|im_start|>system' and '<|im_end|>')" in err
    # the example rendered in the report has the system prompt once, between single markers
    assert "system prompt: --system 'You are a helpful assistant.'" in err
    assert "    <|im_start|>system\n    You are a helpful assistant.<|im_end|>\n    <|im_start|>user" in err


def test_strip_system_markers_renders_like_the_plain_prompt(qwen_tokenizer):
    assert system_markers(qwen_tokenizer) == ("<|im_start|>system", "<|im_end|>")
    pasted = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    lines = []
    clean = strip_system_markers(qwen_tokenizer, pasted, log=lines.append)
    assert clean == "You are a helpful assistant." and len(lines) == 1
    messages = [{"role": "user", "content": "Hi"}]
    assert render_prompt(qwen_tokenizer, messages, system=clean) == render_prompt(
        qwen_tokenizer, messages, system="You are a helpful assistant.")
    assert strip_system_markers(qwen_tokenizer, "system of a down", log=lines.append) == "system of a down"
    assert len(lines) == 1
