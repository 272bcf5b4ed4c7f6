"""GRPO on the real SmolLM2-135M-Instruct raises the mean reward on held-out prompts (slow).

Single-digit sums in GSM8K's shape scored by the built-in `accuracy` reward. The base model gets about
half right greedily but under a fifth when sampling at the rollouts' temperature (it often 'adds' by
looking for a common multiple); GRPO moves it to the direct answer. Held-out sums never appear in training.
Default learning rate, beta, temperature and num_generations.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "grpo"
STEPS = 3


@pytest.mark.slow
def test_grpo_raises_held_out_reward(smollm2_dir, tmp_path):
    from conftest import run_cli

    out = tmp_path / "run"
    proc = run_cli("rlhf", "--rlhf_type", "grpo", "--model", str(smollm2_dir),
                   "--dataset", str(FIXTURES / "sums_train.jsonl"), "--val_dataset", str(FIXTURES / "sums_heldout.jsonl"),
                   "--max_completion_length", "48", "--per_device_train_batch_size", "16", "--max_steps", str(STEPS),
                   "--eval_steps", str(STEPS), "--save_steps", str(STEPS), "--logging_steps", "1",
                   "--output_dir", str(out), "--add_version", "false", "--report_to", "none",
                   env={"OMP_NUM_THREADS": "1"}, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    held = [r["eval_reward"] for r in records if "eval_reward" in r]
    assert len(held) == 2
    assert held[1] >= held[0] + 0.2, held
