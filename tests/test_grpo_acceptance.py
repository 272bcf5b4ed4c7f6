"""GRPO on the real SmolLM2-135M-Instruct raises the mean reward on held-out prompts (slow).

Capital-city questions that ask for the city name alone; the reward (tests/fixtures/grpo/concise_rewards.py)
is the right city's share of the reply's words. The base model knows the cities but answers in full
sentences ("The capital of Portugal is Lisbon.": 0.17); the held-out reward is the greedy reply's, before
and after, on countries the run never sees. Default learning rate, beta, temperature and num_generations.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "grpo"
STEPS = 8


@pytest.mark.slow
def test_grpo_raises_held_out_reward(smollm2_dir, tmp_path):
    from conftest import run_cli

    out = tmp_path / "run"
    proc = run_cli("rlhf", "--rlhf_type", "grpo", "--model", str(smollm2_dir),
                   "--dataset", str(FIXTURES / "capitals_train.jsonl"),
                   "--val_dataset", str(FIXTURES / "capitals_heldout.jsonl"),
                   "--external_plugins", str(FIXTURES / "concise_rewards.py"), "--reward_funcs", "concise_answer",
                   "--max_completion_length", "32", "--per_device_train_batch_size", "16", "--max_steps", str(STEPS),
                   "--eval_steps", str(STEPS), "--save_steps", str(STEPS), "--logging_steps", "1",
                   "--output_dir", str(out), "--add_version", "false", "--report_to", "none",
                   env={"OMP_NUM_THREADS": "1"}, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    held = [r["eval_reward"] for r in records if "eval_reward" in r]
    assert len(held) == 2
    assert held[1] >= held[0] + 0.1, held
