"""GRPO's flags on `lorakit rlhf`: ms-swift's names and defaults, validation, and refusal where they do not apply."""

from __future__ import annotations

import pytest

from lorakit.cli import build_args, parse_argv
from lorakit.errors import UserError


def args_of(*argv: str):
    return build_args(__import__("lorakit.args", fromlist=["RlhfArgs"]).RlhfArgs, parse_argv("rlhf", list(argv)))


def test_defaults_are_ms_swifts():
    a = args_of("--rlhf_type", "grpo")
    g = a.grpo
    assert (a.rlhf.beta, a.rlhf.loss_type) == (0.04, "grpo")
    assert (g.num_generations, g.max_completion_length, g.epsilon, g.epsilon_high, g.scale_rewards) == (8, 512, 0.2, None, "group")
    assert (g.temperature, g.top_p, g.top_k, g.repetition_penalty, g.num_iterations) == (0.9, 0.9, 50, 1.0, 1)


def test_seed_command_flags_parse():
    a = args_of("--rlhf_type", "grpo", "--model", "m", "--adapters", "output/v0/checkpoint-873", "--dataset",
                "AI-MO/NuminaMath-TIR#1000", "--train_type", "lora", "--use_vllm", "true")
    assert a.grpo.use_vllm and a.rlhf.adapters == ["output/v0/checkpoint-873"]


@pytest.mark.parametrize("argv, message", [
    (("--rlhf_type", "grpo", "--loss_type", "sigmoid"), "does not apply to --rlhf_type grpo"),
    (("--rlhf_type", "grpo", "--num_generations", "1"), "at least 2"),
    (("--rlhf_type", "grpo", "--temperature", "0"), "must be > 0"),
    (("--rlhf_type", "grpo", "--scale_rewards", "maybe"), "--scale_rewards 'maybe' is not one of"),
    (("--rlhf_type", "grpo", "--reward_funcs", "a", "b", "--reward_weights", "1"), "one weight per function"),
    (("--rlhf_type", "grpo", "--rpo_alpha", "0.5"), "--rpo_alpha: preference-loss flags"),
    (("--rlhf_type", "dpo", "--num_generations", "4"), "--num_generations: GRPO flags"),
    (("--rlhf_type", "dpo", "--beta", "0"), "--beta must be positive"),
])
def test_bad_or_misplaced_flags_are_refused(argv, message):
    with pytest.raises(UserError, match=message):
        args_of(*argv)


def test_beta_zero_and_boolean_scale_rewards_are_accepted_for_grpo():
    a = args_of("--rlhf_type", "grpo", "--beta", "0", "--scale_rewards", "false", "--loss_type", "dr_grpo")
    assert (a.rlhf.beta, a.grpo.scale_rewards, a.rlhf.loss_type) == (0.0, "none", "dr_grpo")
