"""GRPO prompts (NuminaMath-TIR, GSM8K, messages/prompt rows with extra columns) and the round plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.data.render import render_prompt
from lorakit.errors import UserError
from lorakit.rlhf.grpo_data import build_prompt_set, load_prompt_rows, prompt_messages
from lorakit.rlhf.grpo_plan import plan_grpo

NUMINA = Path(__file__).parent / "fixtures" / "grpo" / "numina_tir_mini.jsonl"


def test_numina_rows_prompt_is_the_problem_and_columns_reach_rewards():
    rows = load_prompt_rows([f"{NUMINA}#5"], seed=1, use_hf=True)
    assert len(rows) == 5
    first = rows[0]
    assert first.messages == [{"role": "user", "content": first.columns["problem"]}]
    assert "\\boxed{" in first.columns["solution"] and "messages" in first.columns
    assert first.source.startswith(str(NUMINA) + ":")
    again = load_prompt_rows([f"{NUMINA}#5"], seed=1, use_hf=True)
    assert [r.source for r in again] == [r.source for r in rows]  # #N sampling is seeded


@pytest.mark.parametrize("row, expected", [
    ({"question": "Q?", "answer": "48/2 = 24\n#### 72"}, [{"role": "user", "content": "Q?"}]),
    ({"prompt": "Say hi", "city": "Paris"}, [{"role": "user", "content": "Say hi"}]),
    ({"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]},
     [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
     [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]),
    ({"problem": "P", "solution": "\\boxed{1}"}, [{"role": "user", "content": "P"}]),
    ({"query": "q", "system": "be brief"}, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]),
])
def test_prompt_shapes(row, expected):
    assert prompt_messages(row, "f.jsonl:1") == expected


def test_row_without_a_prompt_names_its_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"solution": "5"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        load_prompt_rows([str(data)], seed=0, use_hf=True)


def test_prompt_set_renders_like_inference_and_drops_long_prompts(qwen_tokenizer):
    rows = load_prompt_rows([str(NUMINA)], seed=0, use_hf=True)[:3]
    rows[1].messages = [{"role": "user", "content": "word " * 300}]
    ps = build_prompt_set(rows, qwen_tokenizer, system="Be exact.", max_length=120)
    assert ps.dropped_too_long == 1 and len(ps.rows) == 2
    assert ps.prompt_ids[0] == render_prompt(qwen_tokenizer, rows[0].messages, system="Be exact.")
    assert ps.columns == ["messages", "problem", "solution"]


def test_plan_counts_completions_as_trl():
    plan = plan_grpo(100, batch_size=8, grad_accum=1, steps_per_generation=None, num_generations=4,
                     num_iterations=1, epochs=1, max_steps=-1, seed=0)
    assert (plan.prompts_per_round, plan.steps_per_round, plan.total_steps) == (2, 1, 50)
    plan = plan_grpo(100, batch_size=4, grad_accum=2, steps_per_generation=4, num_generations=8,
                     num_iterations=2, epochs=1, max_steps=7, seed=0)
    assert (plan.prompts_per_round, plan.steps_per_round, plan.total_steps, plan.total_rounds) == (2, 4, 7, 2)


def test_plan_raises_steps_per_generation_to_whole_groups_and_says_so():
    said = []
    plan = plan_grpo(10, batch_size=1, grad_accum=1, steps_per_generation=None, num_generations=8,
                     num_iterations=1, epochs=1, max_steps=-1, seed=0, log=said.append)
    assert plan.steps_per_generation == 8 and plan.prompts_per_round == 1 and plan.total_steps == 80
    assert "counts completions" in said[0]
    with pytest.raises(UserError, match="not a multiple of --num_generations 8"):
        plan_grpo(10, batch_size=3, grad_accum=1, steps_per_generation=2, num_generations=8, num_iterations=1,
                  epochs=1, max_steps=-1, seed=0)


def test_round_prompts_cover_each_epoch_once_and_are_a_pure_function():
    plan = plan_grpo(6, batch_size=8, grad_accum=1, steps_per_generation=None, num_generations=4,
                     num_iterations=1, epochs=2, max_steps=-1, seed=3)
    rounds = [plan.round_prompts(r) for r in range(plan.total_rounds)]
    first_epoch = [i for r in rounds[:3] for i in r]
    assert sorted(first_epoch) == list(range(6))
    assert rounds == [plan.round_prompts(r) for r in range(plan.total_rounds)]
