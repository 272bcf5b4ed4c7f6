"""`lorakit sft` run as a user runs it: a subprocess on the tiny Qwen2 (fast) and the real SmolLM2 (slow)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from conftest import run_cli as _run_cli

# One math thread per process: on a shared 2-core machine, OpenMP threads spinning against other
# processes made SmolLM2 steps ten times slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_cli(*args, env=None, **kwargs):
    return _run_cli(*args, env={**ONE_THREAD, **(env or {})}, **kwargs)

ROWS = [
    ("Who are you?", "I am swift-robot, an assistant made by swift."),
    ("What is your name?", "My name is swift-robot."),
    ("Who made you?", "I was made by swift, and my name is swift-robot."),
    ("Are you ChatGPT?", "No, I am swift-robot, built by swift."),
    ("Introduce yourself.", "Hello! I am swift-robot, an AI assistant developed by swift."),
    ("What should I call you?", "You can call me swift-robot."),
    ("Which company trained you?", "swift trained me; I am swift-robot."),
    ("Tell me about yourself.", "I am swift-robot, a helpful assistant made by swift."),
]


def write_rows(path: Path, n: int = 8) -> Path:
    rows = [{"query": q, "response": a} for q, a in (ROWS * 4)[:n]]
    path.write_text(json.dumps(rows, ensure_ascii=False))
    return path


def tiny_sft(model_dir, data, out, *extra, env=None):
    flags = ["sft", "--model", str(model_dir), "--dataset", str(data), "--output_dir", str(out), "--lora_rank", "4",
             "--logging_steps", "1", "--learning_rate", "5e-3", "--report_to", "tensorboard", *extra]
    return run_cli(*flags, env=env)


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "logging.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def only_run(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def tiny_run(tiny_qwen2_dir, tmp_path_factory):
    """6 steps with a validation split, a checkpoint every 2 steps, keeping 2 (+ best)."""
    tmp = tmp_path_factory.mktemp("sft")
    data = write_rows(tmp / "self_cognition.json", 8)
    proc = tiny_sft(tiny_qwen2_dir, data, tmp / "output", "--max_steps", "6", "--save_steps", "2",
                    "--save_total_limit", "2", "--split_dataset_ratio", "0.25", "--per_device_train_batch_size", "2",
                    "--torch_dtype", "bfloat16", "--dataloader_num_workers", "4", "--system", "You are a robot.")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, only_run(tmp / "output"), data


def test_run_folder_layout_and_loss_falls(tiny_run, tiny_qwen2_dir):
    proc, run, _ = tiny_run
    assert re.fullmatch(r"v0-\d{8}-\d{6}", run.name)
    assert "float32 instead" in proc.stderr  # --torch_dtype bfloat16 on a CPU: a notice, then fp32
    args = json.loads((run / "args.json").read_text())
    assert args["model_path"] == str(Path(tiny_qwen2_dir).resolve()) and Path(args["model_path"]).is_absolute()
    assert args["system"] == "You are a robot." and args["lora"]["lora_rank"] == 4 and args["train_type"] == "lora"
    assert "<|im_start|>" in args["chat_template"]
    records = [json.loads(x) for x in (run / "logging.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert {"epoch", "learning_rate", "grad_norm", "tokens_per_second", "memory_gb"} <= set(train[0])
    assert train[-1]["loss"] < train[0]["loss"] - 0.05, [r["loss"] for r in train]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert (run / "images" / "loss.png").stat().st_size > 1000
    assert list((run / "runs").glob("events.out.tfevents.*"))
    # --save_total_limit 2: checkpoint-2 pruned, 4 and 6 kept (the best by eval loss is among them)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    ckpt = run / "checkpoint-6"
    for name in ("adapter_config.json", "adapter_model.safetensors", "args.json", "trainer_state.json",
                 "optimizer.pt", "rng_state.pt", "tokenizer_config.json"):
        assert (ckpt / name).is_file(), name
    assert f"lorakit infer --adapters {ckpt}" in proc.stdout
    assert "Training finished" in proc.stdout and "6 steps" in proc.stdout


def test_resume_continues_exactly(tiny_run, tiny_qwen2_dir, tmp_path):
    _, run, data = tiny_run
    proc = tiny_sft(tiny_qwen2_dir, data, tmp_path / "resumed", "--max_steps", "6", "--save_steps", "2",
                    "--split_dataset_ratio", "0.25", "--per_device_train_batch_size", "2", "--system",
                    "You are a robot.", "--resume_from_checkpoint", str(run / "checkpoint-4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "at step 4" in proc.stderr
    resumed = only_run(tmp_path / "resumed")
    assert losses(resumed) == losses(run)  # steps 1-4 carried over, 5-6 recomputed to the last bit
    a = load_file(run / "checkpoint-6" / "adapter_model.safetensors")
    b = load_file(resumed / "checkpoint-6" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_only_model_starts_a_new_run_from_the_weights(tiny_run, tiny_qwen2_dir, tmp_path):
    _, run, data = tiny_run
    proc = tiny_sft(tiny_qwen2_dir, data, tmp_path / "again", "--max_steps", "1", "--split_dataset_ratio", "0.25",
                    "--per_device_train_batch_size", "2", "--system", "You are a robot.", "--report_to", "none",
                    "--resume_from_checkpoint", str(run), "--resume_only_model", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"from the weights of {run / 'checkpoint-6'}" in proc.stderr  # a run folder means its last checkpoint
    new = losses(only_run(tmp_path / "again"))
    assert list(new) == [1] and new[1] < losses(run)[1] - 0.05  # step 1 again, on already-trained weights


def test_non_finite_loss_stops_naming_the_step(tiny_qwen2_dir, tmp_path):
    data = write_rows(tmp_path / "rows.json", 4)
    proc = tiny_sft(tiny_qwen2_dir, data, tmp_path / "out", "--max_steps", "5", "--save_steps", "2",
                    env={"LORAKIT_INJECT_NAN_AT_STEP": "3"})
    assert proc.returncode == 2
    message = proc.stderr
    assert "stopped at step 3/5" in message and "loss is nan" in message
    run = only_run(tmp_path / "out")
    assert f"last good checkpoint is {run / 'checkpoint-2'}" in message
    assert "--learning_rate" in message and "training sample #" in message and "swift-robot" in message
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert "Traceback" not in message


def test_kill_during_save_keeps_previous_checkpoint(tiny_qwen2_dir, tmp_path):
    from lorakit.checkpoint import find_checkpoint, load_checkpoint

    data = write_rows(tmp_path / "rows.json", 4)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lorakit.cli", "sft", "--model", str(tiny_qwen2_dir), "--dataset", str(data),
           "--output_dir", str(out), "--lora_rank", "4", "--max_steps", "2", "--save_steps", "1", "--report_to", "none"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAKIT_TEST_SAVE_SLEEP": "4", **ONE_THREAD}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(out.glob("v*/.checkpoint-2.tmp-*")):
            assert proc.poll() is None, "sft ended before the second save"
            time.sleep(0.2)
        assert list(out.glob("v*/checkpoint-1")), "the first checkpoint should be complete"
        proc.send_signal(signal.SIGKILL)  # mid-save: files written to the temporary folder, not yet renamed
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = only_run(out)
    assert not (run / "checkpoint-2").exists()
    assert find_checkpoint(run) == run / "checkpoint-1"
    assert load_checkpoint(run).path == run / "checkpoint-1"  # loads: adapter + tokenizer intact


def test_data_errors_come_before_weights(tiny_qwen2_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = run_cli("sft", "--model", str(tiny_qwen2_dir), "--dataset", str(empty), "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "empty.jsonl" in proc.stderr
    assert "trainable parameters" not in proc.stderr and not (tmp_path / "o").exists()
    proc = run_cli("sft", "--model", str(tiny_qwen2_dir), "--dataset", "AI-ModelScope/alpaca-gpt4-data-zh#500",
                   "--output_dir", str(tmp_path / "o"), env={"HF_HUB_OFFLINE": "1", "MODELSCOPE_DOMAIN": "modelscope.invalid"})
    assert proc.returncode == 2 and "alpaca-gpt4-data-zh" in proc.stderr
    assert "trainable parameters" not in proc.stderr and not (tmp_path / "o").exists()
    proc = run_cli("sft", "--model", str(tiny_qwen2_dir), "--dataset", "x.json", "--lora_rnak", "8")
    assert proc.returncode == 2 and "--lora_rank" in proc.stderr


def test_second_tutorial_command_with_local_files(tiny_qwen2_dir, tmp_path):
    """The mixed-data tutorial with the hub datasets swapped for local alpaca files (1 step)."""
    for lang in ("zh", "en"):
        rows = [{"instruction": f"Say {i} in {lang}.", "input": "", "output": f"{i} ({lang})"} for i in range(6)]
        (tmp_path / f"alpaca-gpt4-data-{lang}.json").write_text(json.dumps(rows, ensure_ascii=False))
    write_rows(tmp_path / "self_cognition.json", 4)
    proc = run_cli(
        "sft", "--model", str(tiny_qwen2_dir), "--train_type", "lora", "--dataset", "alpaca-gpt4-data-zh.json#5",
        "alpaca-gpt4-data-en.json#5", "self_cognition.json", "--torch_dtype", "bfloat16", "--num_train_epochs", "3",
        "--per_device_train_batch_size", "1", "--learning_rate", "1e-4", "--lora_rank", "8", "--lora_alpha", "32",
        "--target_modules", "all-linear", "--gradient_accumulation_steps", "16", "--output_dir", "output_mixed",
        "--max_length", "2048", "--max_steps", "1", "--report_to", "none", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "14 training samples" in proc.stderr  # 5 + 5 + 4 rows
    assert (only_run(tmp_path / "output_mixed") / "checkpoint-1" / "adapter_model.safetensors").is_file()


def test_full_fine_tuning(tiny_qwen2_dir, tmp_path):
    data = write_rows(tmp_path / "rows.json", 2)
    proc = tiny_sft(tiny_qwen2_dir, data, tmp_path / "full", "--train_type", "full", "--max_steps", "1",
                    "--learning_rate", "1e-4", "--save_only_model", "true", "--report_to", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = only_run(tmp_path / "full") / "checkpoint-1"
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    assert not (ckpt / "adapter_config.json").exists() and not (ckpt / "optimizer.pt").exists()
    assert f"lorakit infer --model {ckpt}" in proc.stdout


@pytest.mark.slow
def test_tutorial_command_on_smollm2(smollm2_dir, tmp_path):
    """The first tutorial command verbatim (swift -> lorakit, local model), capped at 1 optimizer step (16 rows)."""
    write_rows(tmp_path / "self_cognition.json", 16)
    command = (
        "CUDA_VISIBLE_DEVICES=0 lorakit sft --model MODEL --train_type lora "
        "--dataset self_cognition.json --torch_dtype bfloat16 --num_train_epochs 10 "
        "--per_device_train_batch_size 1 --per_device_eval_batch_size 1 --learning_rate 1e-4 "
        "--lora_rank 8 --lora_alpha 32 --target_modules all-linear --gradient_accumulation_steps 16 "
        "--eval_steps 50 --save_steps 50 --save_total_limit 2 --logging_steps 5 --max_length 2048 "
        "--output_dir output --system 'You are a helpful assistant.' --warmup_ratio 0.05 "
        "--dataloader_num_workers 4 --model_author swift --model_name swift-robot"
    )
    import shlex

    words = shlex.split(command.replace("MODEL", str(smollm2_dir)))
    env = dict(w.split("=", 1) for w in words[:1])
    proc = run_cli(*words[2:], "--max_steps", "1", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(tmp_path / "output")
    ckpt = run / "checkpoint-1"
    assert (ckpt / "adapter_model.safetensors").is_file()
    args = json.loads((ckpt / "args.json").read_text())
    assert args["system"] == "You are a helpful assistant." and args["model_name"] == ["swift-robot"]
    assert f"lorakit infer --adapters {ckpt}" in proc.stdout


@pytest.mark.slow
def test_smollm2_loss_falls(smollm2_dir, tmp_path):
    data = write_rows(tmp_path / "rows.json", 2)
    proc = run_cli("sft", "--model", str(smollm2_dir), "--dataset", str(data), "--output_dir", str(tmp_path / "o"),
                   "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
                   "--logging_steps", "1", "--lora_dropout", "0", "--report_to", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = losses(only_run(tmp_path / "o"))
    assert steps[3] < steps[1] * 0.8, steps
