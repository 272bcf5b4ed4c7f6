"""Replay rows: prompt choice, batched greedy answers, the cut-answer filter, and the per-model cache."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.errors import UserError
from lorakit.replay import (Reply, ensure_replay_file, generate_replies, load_general_prompts, pick_prompts,
                            replay_cache_path, replay_rows_from_replies)


@pytest.fixture(scope="module")
def tiny(tiny_qwen2_dir):
    from lorakit.model import load_model, load_tokenizer

    return load_model(tiny_qwen2_dir, device="cpu"), load_tokenizer(tiny_qwen2_dir)


def test_pick_prompts_is_deterministic_and_mixes_languages_and_categories():
    first, again = pick_prompts(64), pick_prompts(64)
    assert first == again and len(set(first)) == 64
    rows = {r["prompt"]: r for r in load_general_prompts()}
    assert {rows[p]["lang"] for p in first} == {"en", "zh"}
    assert len({rows[p]["category"] for p in first}) == 6
    assert pick_prompts(32) == first[:32]  # a smaller N is a prefix: caches of different N share prompts
    assert len(pick_prompts(10_000)) == len(rows)


def test_cut_answers_are_trimmed_to_whole_sentences_and_loops_stop():
    rows = replay_rows_from_replies(
        ["a?", "b?", "c?", "d?", "e?"],
        [Reply("A. Done", [1], True), Reply("B is long. And cu", [2], False), Reply("", [], True),
         Reply("no end at all", [3], False), Reply("好的！好的！好的！好", [4], False)])
    assert [r["messages"][1]["content"] for r in rows] == ["A. Done", "B is long.", "好的！"]
    assert [r["messages"][0]["content"] for r in rows] == ["a?", "b?", "e?"]
    assert rows[0]["messages"][0]["role"] == "user" and rows[0]["messages"][1]["role"] == "assistant"


def test_trim_keeps_numbered_lists_and_line_breaks():
    from lorakit.replay import trim_reply

    assert trim_reply(Reply("1. Study\n2. Rest\n\n3. Eat well and", [], False)) == "1. Study\n2. Rest"
    assert trim_reply(Reply("Paris.\n\nIt is big.", [], True)) == "Paris.\n\nIt is big."


def test_generate_replies_equals_transformers_greedy(tiny):
    model, tok = tiny
    from lorakit.data.render import render_prompt

    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in ("Hi", "What is 2 + 2?", "你好")]
    replies = generate_replies(model, tok, prompts, max_new_tokens=6, batch_size=2)
    for ids, reply in zip(prompts, replies):
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        expected = out[0, len(ids):].tolist()
        assert reply.token_ids == expected[:len(reply.token_ids)]
        assert reply.finished == (len(reply.token_ids) < 6)


def test_cache_key_depends_on_model_system_prompts_and_length(tiny, tmp_path):
    model, tok = tiny
    base = replay_cache_path(model, tok, ["a"], system=None, max_new_tokens=8, cache_dir=tmp_path)
    assert base == replay_cache_path(model, tok, ["a"], system=None, max_new_tokens=8, cache_dir=tmp_path)
    assert base != replay_cache_path(model, tok, ["b"], system=None, max_new_tokens=8, cache_dir=tmp_path)
    assert base != replay_cache_path(model, tok, ["a"], system="Be brief.", max_new_tokens=8, cache_dir=tmp_path)
    assert base != replay_cache_path(model, tok, ["a"], system=None, max_new_tokens=9, cache_dir=tmp_path)
    saved = model.name_or_path
    model.name_or_path = "/elsewhere/model"
    try:
        assert base != replay_cache_path(model, tok, ["a"], system=None, max_new_tokens=8, cache_dir=tmp_path)
    finally:
        model.name_or_path = saved


def test_a_cached_file_is_reused_and_loads_as_a_dataset(tiny, tmp_path):
    model, tok = tiny
    path = replay_cache_path(model, tok, pick_prompts(3), system=None, max_new_tokens=4, cache_dir=tmp_path)
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "cached answer"}]}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    assert ensure_replay_file(model, tok, 3, system=None, cache_dir=tmp_path, max_new_tokens=4) == path
    from lorakit.data.loading import load_conversations

    parts = load_conversations([str(path)], seed=0, use_hf=False, model_name=[], model_author=[])
    assert parts[0].conversations[0].messages[-1]["content"] == "cached answer"


def test_no_whole_sentence_is_a_clear_error(tiny, tmp_path):
    model, tok = tiny  # random weights say neither a sentence end nor the end-of-turn token within 2 tokens
    with pytest.raises(UserError, match="--replay 0"):
        ensure_replay_file(model, tok, 2, system=None, cache_dir=tmp_path, max_new_tokens=2)
    assert not list(tmp_path.iterdir())
