"""`lorakit rlhf --rlhf_type grpo` end to end on the tiny model, as a user runs it: logs, completions, plots,
an adapter infer loads, exact resume, and a failing reward function."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

NUMINA = Path(__file__).parent / "fixtures" / "grpo" / "numina_tir_mini.jsonl"
PLUGIN = textwrap.dedent("""
    def short(completions, solution, **kwargs):
        # uses a dataset column: every row of the NuminaMath fixture carries `solution`
        assert len(solution) == len(completions)
        return [1.0 / (1 + len(c)) for c in completions]
""")


def grpo_args(model: Path, out: Path, plugin: Path, *extra: str) -> list[str]:
    return ["rlhf", "--rlhf_type", "grpo", "--model", str(model), "--dataset", f"{NUMINA}#6", "--train_type", "lora",
            "--use_vllm", "true", "--output_dir", str(out), "--max_completion_length", "6", "--num_generations", "4",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--max_steps", "3",
            "--save_steps", "1", "--logging_steps", "1", "--learning_rate", "1e-2", "--lora_rank", "4",
            "--external_plugins", str(plugin), "--reward_funcs", "accuracy", "short", "--reward_weights", "1", "2",
            "--add_version", "false", "--report_to", "tensorboard", *extra]


@pytest.fixture(scope="module")
def grpo_run(tiny_qwen2_dir, tmp_path_factory):
    from conftest import run_cli

    root = tmp_path_factory.mktemp("grpo")
    plugin = root / "my_rewards.py"
    plugin.write_text(PLUGIN)
    out = root / "run"
    proc = run_cli(*grpo_args(tiny_qwen2_dir, out, plugin, "--log_completions", "true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, out, plugin, proc


def test_run_logs_every_step_with_trl_metric_names(grpo_run):
    _, out, _, proc = grpo_run
    assert "rollouts run on lorakit's own engine" in proc.stderr
    records = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("loss", "grad_norm", "kl", "reward", "reward_std", "rewards/accuracy/mean", "rewards/short/std",
                "frac_reward_zero_std", "completions/mean_length", "completions/min_length",
                "completions/max_length", "completions/clipped_ratio", "clip_ratio/region_mean",
                "time/rollout_s", "time/reference_s", "time/update_s"):
        assert key in steps[0], key
    assert 1 <= steps[0]["completions/min_length"] <= steps[0]["completions/max_length"] <= 7  # 6 + end of turn
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 3 * 8  # 3 rounds of 2 prompts x 4 generations
    assert set(completions[0]["rewards"]) == {"accuracy", "short"}
    assert (out / "images" / "reward.png").stat().st_size > 0 and list((out / "runs").iterdir())
    assert "Try it:" in proc.stdout and "held-out" not in proc.stdout
    # the summary counts the rollouts' tokens: their completions (8 a round) plus the prompts they answered
    printed = int(re.search(r"Training finished in .*: 3 steps, ([\d,]+) tokens\.", proc.stdout).group(1).replace(",", ""))
    completion_tokens = sum(r["completions/mean_length"] * 8 for r in steps)
    assert completion_tokens + 24 * 5 < printed < completion_tokens + 24 * 200


def test_checkpoint_is_an_adapter_infer_loads(grpo_run):
    from conftest import run_cli

    _, out, _, _ = grpo_run
    ckpt = out / "checkpoint-3"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    proc = run_cli("infer", "--adapters", str(ckpt), "--query", "What is 2 plus 2?", "--max_new_tokens", "4",
                   "--stream", "false")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_resume_continues_exactly(grpo_run, tiny_qwen2_dir):
    from conftest import run_cli

    root, out, plugin, _ = grpo_run
    again = root / "resumed"
    proc = run_cli(*grpo_args(tiny_qwen2_dir, again, plugin, "--resume_from_checkpoint", str(out / "checkpoint-2")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr
    a = load_file(out / "checkpoint-3" / "adapter_model.safetensors")
    b = load_file(again / "checkpoint-3" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() < 1e-6, key
    first = [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines()]
    second = [json.loads(x) for x in (again / "logging.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in second if "reward" in r] == pytest.approx([r["reward"] for r in first if "reward" in r])


def test_raising_reward_stops_with_the_function_and_sample_named(grpo_run, tiny_qwen2_dir):
    from conftest import run_cli

    root, _, _, _ = grpo_run
    bad = root / "bad_rewards.py"
    bad.write_text("def fragile(completions, **kwargs):\n    return [1.0 / 0 for c in completions]\n")
    proc = run_cli("rlhf", "--rlhf_type", "grpo", "--model", str(tiny_qwen2_dir), "--dataset", f"{NUMINA}#2",
                   "--output_dir", str(root / "bad"), "--max_completion_length", "4", "--num_generations", "2",
                   "--per_device_train_batch_size", "2", "--max_steps", "1", "--external_plugins", str(bad),
                   "--reward_funcs", "fragile", "--report_to", "none")
    assert proc.returncode == 2
    assert "reward function fragile" in proc.stderr and "ZeroDivisionError" in proc.stderr
    assert "numina_tir_mini.jsonl:" in proc.stderr and "Traceback" not in proc.stderr
