"""Several processes (CPU, gloo): N processes with global batch B train exactly as one process with
the same global batch; FSDP2 full fine-tuning; resume across process counts; failures end the job;
two torchrun "nodes" on 127.0.0.1. Strategy mapping and the torchrun command as pure functions."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from conftest import run_cli as _run_cli
from lorakit.launch import Strategy, resolve_strategy, torchrun_argv
from lorakit.errors import UserError
from test_sft_cli import losses, only_run, write_rows

ENV = {"OMP_NUM_THREADS": "1"}
# 10 rows, micro-batches of 2, global batch 4: steps of 2, 2 and 1 micro-batches (the last leaves rank 1 a
# zero-weighted repeat); checkpoints at steps 2 and 3.
COMMON = ["--lora_rank", "4", "--lora_dropout", "0", "--learning_rate", "5e-3", "--per_device_train_batch_size", "2",
          "--logging_steps", "1", "--save_steps", "2", "--report_to", "none", "--num_train_epochs", "1"]


def run_cli(*args, env=None, **kwargs):
    return _run_cli(*args, env={**ENV, **(env or {})}, timeout=600, **kwargs)


def sft(model_dir, data, out, *extra, env=None):
    return run_cli("sft", "--model", str(model_dir), "--dataset", str(data), "--output_dir", str(out), *COMMON, *extra,
                   env=env)


def assert_same_losses(a: dict[int, float], b: dict[int, float]) -> None:
    assert list(a) == list(b), (a, b)
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-6), (step, a, b)


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    worst = max(float((x[k] - y[k]).abs().max()) for k in x)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("dist-data") / "rows.json", 10)


@pytest.fixture(scope="module")
def one_process(tiny_qwen2_dir, rows, tmp_path_factory) -> Path:
    """The reference: one process, 2 micro-batches of 2 accumulated per step."""
    out = tmp_path_factory.mktemp("one")
    proc = sft(tiny_qwen2_dir, rows, out, "--gradient_accumulation_steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run(out)


@pytest.fixture(scope="module")
def two_processes(tiny_qwen2_dir, rows, tmp_path_factory):
    """NPROC_PER_NODE=2: each process one micro-batch of 2 per step (same global batch of 4)."""
    out = tmp_path_factory.mktemp("two")
    proc = sft(tiny_qwen2_dir, rows, out, "--gradient_accumulation_steps", "1", env={"NPROC_PER_NODE": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, only_run(out)


def test_deepspeed_and_fsdp_flags_map_to_fsdp2(tmp_path):
    full = resolve_strategy(deepspeed="zero3", fsdp=[], train_type="lora", launched=True)
    assert (full.kind, full.reshard_after_forward, full.offload) == ("fsdp", True, False)
    for name in ("default-zero2", "zero2", "ZeRO2"):
        s = resolve_strategy(deepspeed=name, fsdp=[], train_type="lora", launched=True)
        assert (s.kind, s.reshard_after_forward, s.offload) == ("fsdp", False, False), name
    s = resolve_strategy(deepspeed="zero3-offload", fsdp=[], train_type="lora", launched=True)
    assert (s.kind, s.reshard_after_forward, s.offload) == ("fsdp", True, True)
    assert resolve_strategy(deepspeed="zero0", fsdp=[], train_type="full", launched=True).kind == "ddp"
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    s = resolve_strategy(deepspeed=str(config), fsdp=[], train_type="lora", launched=True)
    assert (s.kind, s.reshard_after_forward, s.offload) == ("fsdp", True, True)
    assert "ZeRO" not in s.describe() and "offloaded to the CPU" in s.describe()
    s = resolve_strategy(deepspeed=None, fsdp=["shard_grad_op auto_wrap", "offload"], train_type="lora", launched=True)
    assert (s.kind, s.reshard_after_forward, s.offload) == ("fsdp", False, True)
    # defaults: DDP for LoRA, FSDP2 for full fine-tuning, nothing without a launcher
    assert resolve_strategy(deepspeed=None, fsdp=[], train_type="lora", launched=True) == Strategy("ddp", asked="--train_type lora")
    assert resolve_strategy(deepspeed=None, fsdp=[], train_type="full", launched=True).kind == "fsdp"
    assert resolve_strategy(deepspeed=None, fsdp=[], train_type="full", launched=False).kind == "single"
    for bad, words in (("zero4", "zero0"), ("nope.json", "no such file")):
        with pytest.raises(UserError, match=words):
            resolve_strategy(deepspeed=bad, fsdp=[], train_type="lora", launched=True)
    with pytest.raises(UserError, match="full_shard, shard_grad_op"):
        resolve_strategy(deepspeed=None, fsdp=["hybrid"], train_type="lora", launched=True)
    with pytest.raises(UserError, match="give one of them"):
        resolve_strategy(deepspeed="zero2", fsdp=["full_shard"], train_type="lora", launched=True)


def test_torchrun_command_from_ms_swift_variables():
    assert torchrun_argv("sft", ["--x", "1"], environ={}) is None  # no NPROC_PER_NODE: one process
    inside = {"NPROC_PER_NODE": "2", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    assert torchrun_argv("sft", [], environ=inside) is None  # already under torchrun: no second launch
    cmd = torchrun_argv("sft", ["--x", "1"], environ={"NPROC_PER_NODE": "4"})
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "1",
                   "--standalone", "-m", "lorakit", "sft", "--x", "1"]
    env = {"NPROC_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29555"}
    cmd = torchrun_argv("rlhf", [], environ=env, timeout_s=60)
    assert cmd[3:] == ["--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1",
                       "--master_port", "29555", "--rdzv_conf", "timeout=60", "-m", "lorakit", "rlhf"]
    with pytest.raises(UserError, match="MASTER_ADDR"):
        torchrun_argv("sft", [], environ={"NPROC_PER_NODE": "2", "NNODES": "2"})
    with pytest.raises(UserError, match="NODE_RANK=2 with NNODES=2"):
        torchrun_argv("sft", [], environ={"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "x"})
    with pytest.raises(UserError, match="NPROC_PER_NODE='two'"):
        torchrun_argv("sft", [], environ={"NPROC_PER_NODE": "two"})


def test_two_processes_train_exactly_as_one(one_process, two_processes):
    proc, run = two_processes
    assert "DDP" in proc.stderr and proc.stderr.count("distributed: ") == 1
    assert_same_losses(losses(run), losses(one_process))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert_same_weights(run / "checkpoint-3" / "adapter_model.safetensors",
                        one_process / "checkpoint-3" / "adapter_model.safetensors", atol=1e-6)
    # rank 0 alone prints and writes: one summary, one run folder, the same token count
    assert proc.stdout.count("Training finished") == 1 and proc.stderr.count("run folder:") == 1
    ref = json.loads((one_process / "checkpoint-3" / "trainer_state.json").read_text())
    got = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert got["data_order"] == ref["data_order"]  # the global plan: 2 processes x 1 = 2 micro-batches a step
    assert torch.load(run / "checkpoint-3" / "optimizer.pt", weights_only=False)["state"].keys() == \
        torch.load(one_process / "checkpoint-3" / "optimizer.pt", weights_only=False)["state"].keys()


def test_resume_from_two_processes_into_one(tiny_qwen2_dir, rows, two_processes, tmp_path):
    _, run = two_processes
    proc = sft(tiny_qwen2_dir, rows, tmp_path, "--gradient_accumulation_steps", "2",
               "--resume_from_checkpoint", str(run / "checkpoint-2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 2" in proc.stderr and "different data plan" not in proc.stderr
    resumed = only_run(tmp_path)
    assert_same_losses(losses(resumed), losses(run))
    assert_same_weights(resumed / "checkpoint-3" / "adapter_model.safetensors",
                        run / "checkpoint-3" / "adapter_model.safetensors", atol=1e-6)


def test_fsdp2_full_fine_tuning_matches_one_process(tiny_qwen2_dir, rows, tmp_path):
    flags = ["--train_type", "full", "--learning_rate", "1e-3", "--save_steps", "3"]
    one = sft(tiny_qwen2_dir, rows, tmp_path / "one", *flags, "--gradient_accumulation_steps", "2")
    assert one.returncode == 0, one.stderr[-3000:]
    two = sft(tiny_qwen2_dir, rows, tmp_path / "two", *flags, "--gradient_accumulation_steps", "1",
              "--deepspeed", "default-zero3", env={"NPROC_PER_NODE": "2"})
    assert two.returncode == 0, two.stderr[-3000:]
    line = next(x for x in two.stderr.splitlines() if x.startswith("distributed: "))
    assert "--deepspeed default-zero3 -> FSDP2 fully_shard" in line and "DeepSpeed itself is not used" in line
    a, b = only_run(tmp_path / "one"), only_run(tmp_path / "two")
    assert_same_losses(losses(b), losses(a))
    ckpt = b / "checkpoint-3"  # a plain Hugging Face folder, gathered from the shards
    assert (ckpt / "config.json").is_file() and not (ckpt / "adapter_config.json").exists()
    assert_same_weights(ckpt / "model.safetensors", a / "checkpoint-3" / "model.safetensors", atol=2e-5)
    opt_a = torch.load(a / "checkpoint-3" / "optimizer.pt", weights_only=False)
    opt_b = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert opt_a["state"].keys() == opt_b["state"].keys()  # indexed like one process's: resumable by any count
    assert torch.allclose(opt_a["state"][0]["exp_avg_sq"], opt_b["state"][0]["exp_avg_sq"], rtol=1e-4, atol=1e-12)


def test_a_failing_rank_ends_the_job_with_its_error(tiny_qwen2_dir, rows, tmp_path):
    started = time.monotonic()
    proc = sft(tiny_qwen2_dir, rows, tmp_path, "--gradient_accumulation_steps", "1",
               env={"NPROC_PER_NODE": "2", "LORAKIT_TEST_FAIL_RANK": "1:2"})
    assert proc.returncode != 0
    assert "rank 1 of 2 failed" in proc.stderr and "injected failure" in proc.stderr
    assert time.monotonic() - started < 300  # no hang (rank 0 was waiting in a collective)
    assert not list(tmp_path.glob("*/checkpoint-2"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_on_localhost(tiny_qwen2_dir, rows, one_process, tmp_path):
    port = str(_free_port())
    procs = []
    for node in (0, 1):
        env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "NPROC_PER_NODE": "1",
               "NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        cmd = [sys.executable, "-m", "lorakit.cli", "sft", "--model", str(tiny_qwen2_dir), "--dataset", str(rows),
               "--output_dir", str(tmp_path), *COMMON, "--gradient_accumulation_steps", "1"]
        procs.append(subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "2 process(es) on 2 node(s)" in outs[0][1]
    assert_same_losses(losses(only_run(tmp_path)), losses(one_process))


def test_ctrl_c_ends_every_process(tiny_qwen2_dir, rows, tmp_path):
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "NPROC_PER_NODE": "2"}
    cmd = [sys.executable, "-m", "lorakit.cli", "sft", "--model", str(tiny_qwen2_dir), "--dataset", str(rows),
           "--output_dir", str(tmp_path), *COMMON, "--max_steps", "100000", "--save_steps", "100000"]
    proc = subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own process group, as a terminal's job
    try:
        for line in proc.stderr:  # wait until training runs
            if line.startswith("run folder:"):
                break
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: every process of the job
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break  # no process of the group is left
            time.sleep(0.5)
        else:
            pytest.fail("worker processes still alive 30 s after Ctrl-C")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0


def test_dpo_on_two_processes_matches_one(tiny_qwen2_dir, tmp_path):
    from test_rlhf_cli import records, write_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl")  # 6 pairs: 3 steps of 2 (one per process)
    flags = ["rlhf", "--model", str(tiny_qwen2_dir), "--dataset", str(pairs), "--lora_rank", "4", "--lora_dropout", "0",
             "--learning_rate", "1e-3", "--per_device_train_batch_size", "1", "--logging_steps", "1",
             "--report_to", "none", "--save_steps", "3"]
    one = run_cli(*flags, "--output_dir", str(tmp_path / "one"), "--gradient_accumulation_steps", "2")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(*flags, "--output_dir", str(tmp_path / "two"), "--gradient_accumulation_steps", "1",
                  env={"NPROC_PER_NODE": "2"})
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = only_run(tmp_path / "one"), only_run(tmp_path / "two")
    assert_same_losses(losses(b), losses(a))
    for x, y in zip(records(a), records(b)):  # rewards summed over both processes, as one process sums its micro-batches
        assert y["rewards/margins"] == pytest.approx(x["rewards/margins"], rel=1e-5, abs=1e-7)
        assert y["rewards/accuracies"] == x["rewards/accuracies"]
    assert_same_weights(b / "checkpoint-3" / "adapter_model.safetensors", a / "checkpoint-3" / "adapter_model.safetensors",
                        atol=1e-6)
