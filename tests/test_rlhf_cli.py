"""`lorakit rlhf` run as a user runs it, on the tiny Qwen2: flags, dry run, every type trains and saves,
the SFT adapter as the starting policy and reference, exact resume, and the adapter reloads in infer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import run_cli as _run_cli
from lorakit.args import RlhfArgs, RlhfGroup
from lorakit.cli import build_args, parse_argv
from lorakit.errors import UserError

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
PAIRS = [("What is the capital of France?", "Paris.", "Lyon."), ("Name a colour.", "Blue.", "Seven."),
         ("What is 2+2?", "4.", "5."), ("Say hello.", "Hello!", "Goodbye."),
         ("Name a fruit.", "An apple.", "A chair."), ("What is ice?", "Frozen water.", "Hot air.")]


def run_cli(*args, **kwargs):
    return _run_cli(*args, env=ONE_THREAD, **kwargs)


def write_pairs(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    return path


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]


def only_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def rlhf(model_dir, data, out, *extra):
    return run_cli("rlhf", "--model", str(model_dir), "--dataset", str(data), "--output_dir", str(out),
                   "--lora_rank", "4", "--logging_steps", "1", "--learning_rate", "1e-3", "--report_to", "none", *extra)


@pytest.mark.parametrize("argv, message", [
    (["--rlhf_type", "orpo", "--loss_type", "hinge"], "--loss_type 'hinge' does not apply to --rlhf_type orpo"),
    (["--rlhf_type", "ppo"], "--rlhf_type 'ppo' is not one of"),
    (["--ref_model", "x"], "the reference is always the starting policy"),
    (["--packing", "true"], "--packing does not apply to rlhf"),
    (["--loss_type", "exo_pair"], "exo_pair needs --label_smoothing > 0"),
    (["--label_smoothing", "0.5"], r"--label_smoothing must be in \[0, 0.5\)"),
    (["--rlhf_type", "kto", "--rpo_alpha", "1"], "--rpo_alpha applies to --rlhf_type dpo"),
])
def test_bad_flags_are_refused(argv, message):
    with pytest.raises(UserError, match=message):
        build_args(RlhfArgs, parse_argv("rlhf", argv))


def test_defaults_follow_ms_swift():
    assert (RlhfGroup().beta, RlhfGroup().loss_type) == (0.1, "sigmoid")
    assert (RlhfGroup(rlhf_type="simpo").beta, RlhfGroup(rlhf_type="simpo").loss_type) == (2.0, "simpo")
    assert RlhfGroup(rlhf_type="kto").loss_type == "kto" and RlhfGroup(rlhf_type="cpo").cpo_alpha == 1.0


def test_dry_run_shows_both_sides_and_stops(tiny_qwen2_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    proc = rlhf(tiny_qwen2_dir, data, tmp_path / "out", "--dry_run", "true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "format: prompt/chosen/rejected (6 rows)" in proc.stderr
    assert "chosen:" in proc.stderr and "[[Paris.<|im_end|>]]" in proc.stderr and "[[Lyon.<|im_end|>]]" in proc.stderr
    assert not (tmp_path / "out").exists()


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
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # step 1: the policy is the reference
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-4)
    assert train[-1]["rewards/margins"] > 0 and train[-1]["loss"] < math.log(2)
    assert any("eval_rewards/accuracies" in r for r in logs)
    ckpt = run / "checkpoint-4"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    saved = json.loads((run / "args.json").read_text())
    assert saved["command"] == "rlhf" and saved["rlhf"]["rlhf_type"] == "dpo" and saved["rlhf"]["beta"] == 0.1
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
    assert "rewards/chosen" in logs[0] and "logps/rejected" in logs[0]


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
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference == the SFT adapter
    saved = json.loads((run / "args.json").read_text())
    assert saved["system"] == "You are terse." and saved["model_path"] == str(tiny_qwen2_dir)
    config = json.loads((run / "checkpoint-2" / "adapter_config.json").read_text())
    assert config["r"] == 4
