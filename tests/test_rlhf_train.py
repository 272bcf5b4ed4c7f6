"""`lorakit rlhf` trains as a user runs it, on the tiny Qwen2: every type trains and saves a PEFT adapter with
TRL's metrics logged, the SFT adapter as the starting policy and reference, exact resume, infer reloads it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from test_rlhf_cli import PAIRS, only_run, records, rlhf, run_cli, write_pairs


@pytest.fixture(scope="module")
def dpo_run(tiny_qwen2_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rlhf")
    data = write_pairs(tmp / "pairs.jsonl")
    proc = rlhf(tiny_qwen2_dir, data, tmp / "out", "--max_steps", "4", "--save_steps", "2",
                "--per_device_train_batch_size", "2", "--val_dataset", str(data), "--lora_dropout", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, only_run(tmp / "out"), data


def test_dpo_logs_trl_metrics_and_saves_a_peft_adapter(dpo_run):
    proc, run, _ = dpo_run
    logs = records(run)
    train = [r for r in logs if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert all(key in r for r in train), key
    first = train[0]
    # step 1: the policy is the reference (the DPO term is log 2), plus rpo_alpha (default 1) x the chosen NLL
    assert first["loss"] == pytest.approx(math.log(2) + first["nll_loss"], abs=1e-4)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-4)
    assert train[-1]["rewards/margins"] > 0 and train[-1]["loss"] < first["loss"]
    assert any("eval_rewards/accuracies" in r for r in logs)
    ckpt = run / "checkpoint-4"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    saved = json.loads((run / "args.json").read_text())
    assert saved["command"] == "rlhf" and saved["rlhf"]["rlhf_type"] == "dpo" and saved["rlhf"]["beta"] == 0.1
    assert saved["rlhf"]["rpo_alpha"] == 1.0
    assert (run / "images" / "loss.png").is_file()
    assert "Try it:" in proc.stdout and f"lorakit infer --adapters {ckpt}" in proc.stdout


def test_adapter_reloads_in_infer(dpo_run):
    _, run, _ = dpo_run
    proc = run_cli("infer", "--adapters", str(run / "checkpoint-4"), "--query", "Name a colour.",
                   "--max_new_tokens", "4", "--stream", "false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()


def test_exact_resume(dpo_run, tmp_path):
    _, run, data = dpo_run
    out = tmp_path / "resumed"
    proc = rlhf(_model_of(run), data, out, "--max_steps", "4",
                "--save_steps", "2", "--per_device_train_batch_size", "2", "--val_dataset", str(data),
                "--lora_dropout", "0", "--resume_from_checkpoint", str(run / "checkpoint-2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    original = {r["step"]: r["loss"] for r in records(run) if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in records(only_run(out)) if "loss" in r}
    assert resumed[3] == pytest.approx(original[3], rel=1e-5) and resumed[4] == pytest.approx(original[4], rel=1e-5)


def _model_of(run: Path) -> str:
    return json.loads((run / "args.json").read_text())["model_path"]


@pytest.mark.parametrize("rlhf_type", ["orpo", "simpo", "cpo", "kto"])
def test_every_type_trains(tiny_qwen2_dir, tmp_path, rlhf_type):
    data = write_pairs(tmp_path / "pairs.jsonl")
    proc = rlhf(tiny_qwen2_dir, data, tmp_path / "out", "--rlhf_type", rlhf_type, "--max_steps", "2",
                "--per_device_train_batch_size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [r for r in records(only_run(tmp_path / "out")) if "loss" in r]
    assert len(logs) == 2 and all(math.isfinite(r["loss"]) for r in logs)
    keys = set().union(*logs)
    if rlhf_type == "kto":  # a batch of completions may hold only desirable (or only undesirable) ones
        assert "kl" in keys and ("rewards/chosen" in keys or "rewards/rejected" in keys)
    else:
        assert {"rewards/chosen", "rewards/accuracies", "logps/rejected"} <= keys


def test_continues_an_sft_adapter_as_policy_and_reference(tiny_qwen2_dir, tmp_path):
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"query": p, "response": c}) + "\n" for p, c, _ in PAIRS))
    sft = run_cli("sft", "--model", str(tiny_qwen2_dir), "--dataset", str(sft_data), "--output_dir",
                  str(tmp_path / "sft"), "--lora_rank", "4", "--lora_dropout", "0", "--max_steps", "3",
                  "--learning_rate", "1e-2", "--report_to", "none", "--system", "You are terse.")
    assert sft.returncode == 0, sft.stderr[-2000:]
    sft_ckpt = only_run(tmp_path / "sft") / "checkpoint-3"
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "dpo"
    proc = run_cli("rlhf", "--adapters", str(sft_ckpt), "--dataset", str(data), "--output_dir", str(out),
                   "--max_steps", "2", "--logging_steps", "1", "--report_to", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"continuing the SFT adapter {sft_ckpt}" in proc.stderr
    run = only_run(out)
    first = [r for r in records(run) if "loss" in r][0]
    # policy == reference == the SFT adapter: the DPO term is log 2 (plus the default rpo_alpha 1 x NLL)
    assert first["loss"] == pytest.approx(math.log(2) + first["nll_loss"], abs=1e-4)
    saved = json.loads((run / "args.json").read_text())
    assert saved["system"] == "You are terse." and saved["model_path"] == str(tiny_qwen2_dir)
    config = json.loads((run / "checkpoint-2" / "adapter_config.json").read_text())
    assert config["r"] == 4
