"""The system prompts identity is trained under (built-in self-cognition rows, replay rows) and evaluated under."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lorakit.args import DataArgs
from lorakit.data.loading import build_datasets, load_conversations
from lorakit.data.render import render_conversation
from lorakit.data.system_prompts import (HELD_OUT_SYSTEMS, TRAINING_SYSTEMS, EvalSystem, eval_systems, system_mix,
                                         training_system)
from lorakit.paths import BUILTIN_DIR

HELPFUL = "You are a helpful assistant."
HONEST = "You are a helpful, respectful and honest assistant."


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


def builtin_rows() -> list[dict]:
    return [json.loads(line) for line in (BUILTIN_DIR / "self_cognition.jsonl").read_text("utf-8").splitlines()]


def self_cognition(**kw):
    return load_conversations(["self-cognition"], model_name=["小乐", "Lele"], model_author=["乐团", "LeTeam"],
                              **kw)[0].conversations


def test_the_mix_cycles_the_training_prompts_and_keeps_the_eval_prompts_out():
    assert TRAINING_SYSTEMS.count(None) == 3 and len(TRAINING_SYSTEMS) == 8
    assert [training_system(i) for i in (0, 1, 2, 3, 8, 9)] == [None, HONEST, None, "你是一个人工智能助手。", None, HONEST]
    assert system_mix(4, "Be brief.") == ["Be brief.", HONEST, "Be brief.", "你是一个人工智能助手。"]
    assert system_mix(2, None) == [None, HONEST]
    assert not set(HELD_OUT_SYSTEMS) & set(TRAINING_SYSTEMS)
    assert HELPFUL in HELD_OUT_SYSTEMS  # the prompt of the failing case is a held-out one


def test_builtin_self_cognition_rows_carry_the_mix_exactly():
    conversations, rows = self_cognition(), builtin_rows()
    assert len(conversations) == len(rows) == 256
    first, second = conversations[0].messages, conversations[1].messages
    assert first == [{"role": "user", "content": "Who are you?"},
                     {"role": "assistant", "content": "I am Lele, an AI assistant developed by LeTeam. How can I help "
                                                      "you today?"}]
    assert second == [{"role": "system", "content": HONEST}, {"role": "user", "content": "What is your name?"},
                      {"role": "assistant", "content": "I am Lele, an AI assistant developed by LeTeam."}]
    systems = [c.messages[0]["content"] if c.messages[0]["role"] == "system" else None for c in conversations]
    assert systems == [training_system(i) for i in range(256)]
    assert Counter(systems)[None] == 96  # 3 in 8 rows keep the run's own system prompt
    for lang in ("en", "zh"):  # every prompt reaches both languages' identity rows
        used = {s for s, row in zip(systems, rows) if row["lang"] == lang and row["kind"] == "identity"}
        assert used == set(TRAINING_SYSTEMS)
    assert not set(systems) & set(HELD_OUT_SYSTEMS)
    sampled = load_conversations(["self-cognition#40"], model_name=["Bob"], model_author=["Ann"], seed=3)[0]
    by_query = {c.messages[-2]["content"]: c.messages[0] for c in self_cognition()}
    for c in sampled.conversations:  # #N sampling keeps each row's own system prompt
        assert (c.messages[0]["role"] == "system") == (by_query[c.messages[-2]["content"]]["role"] == "system")


def test_rows_without_their_own_prompt_render_under_system_the_others_under_theirs(qwen_tokenizer):
    data = build_datasets(DataArgs(dataset=["self-cognition#256"], model_name=["Bob"], model_author=["Ann"],
                                   system="Be brief.", seed=1, split_dataset_ratio=0.0), qwen_tokenizer)
    expected = set()
    for c in load_conversations(["self-cognition"], model_name=["Bob"], model_author=["Ann"])[0].conversations:
        own = c.messages[0]["role"] == "system"
        ids = render_conversation(qwen_tokenizer, c.messages, system=None if own else "Be brief.").input_ids
        expected.add(tuple(ids))
    assert {tuple(s.input_ids) for s in data.train} == expected
    assert data.reports[0].rows_with_own_system == 160


def test_eval_asks_under_the_runs_prompt_the_template_default_and_held_out_prompts():
    assert eval_systems(None) == [EvalSystem(None, "training"), EvalSystem(HELPFUL, "held out"),
                                  EvalSystem("你是一个有用的助手。", "held out")]
    tutorial = eval_systems(HELPFUL)  # ms-swift's tutorial trains under the held-out prompt itself
    assert tutorial == [EvalSystem(HELPFUL, "training"), EvalSystem(None, "template default"),
                        EvalSystem("你是一个有用的助手。", "held out")]
    assert [s.seen_in_training for s in tutorial] == [True, False, False]
    assert EvalSystem(HONEST, "other").seen_in_training and not EvalSystem(None, "template default").seen_in_training
