"""Replay: prompt choice, batched greedy answers with their distributions, distillation samples, the per-model cache."""

from __future__ import annotations


import pytest
import torch

from lorakit.errors import UserError
from lorakit.replay import (answer_from_generation, generate_replies, load_general_prompts, pick_prompts,
                            replay_answers, replay_cache_path, target_distribution)


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


def test_cache_key_depends_on_model_system_prompts_length_and_k(tiny, tmp_path):
    model, tok = tiny
    base = replay_cache_path(model, tok, ["a"], system=None, max_new_tokens=8, cache_dir=tmp_path)
    assert base == replay_cache_path(model, tok, ["a"], system=None, max_new_tokens=8, cache_dir=tmp_path)
    assert base != replay_cache_path(model, tok, ["b"], system=None, max_new_tokens=8, cache_dir=tmp_path)
    assert base != replay_cache_path(model, tok, ["a"], system="Be brief.", max_new_tokens=8, cache_dir=tmp_path)
    assert base != replay_cache_path(model, tok, ["a"], system=None, max_new_tokens=9, cache_dir=tmp_path)
    assert base != replay_cache_path(model, tok, ["a"], system=None, max_new_tokens=8, cache_dir=tmp_path, top_k=5)
    saved = model.name_or_path
    model.name_or_path = "/elsewhere/model"
    try:
        assert base != replay_cache_path(model, tok, ["a"], system=None, max_new_tokens=8, cache_dir=tmp_path)
    finally:
        model.name_or_path = saved


def test_logprobs_are_the_models_distribution_at_each_generated_token(tiny):
    """The engine's top-k log-probabilities equal a teacher-forced forward over prompt + reply."""
    model, tok = tiny
    from lorakit.data.render import render_prompt

    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in ("Hi", "What is 2 + 2? Say it.")]
    gens = generate_replies(model, tok, prompts, max_new_tokens=5, batch_size=2, logprobs=4)
    for ids, gen in zip(prompts, gens):
        assert len(gen.logprobs) == gen.completion_tokens and all(len(t[0]) == 4 for t in gen.logprobs)
        with torch.no_grad():
            logp = model(torch.tensor([ids + gen.token_ids])).logits[0].float().log_softmax(-1)
        for j, (top_ids, top_lp) in enumerate(gen.logprobs[:len(gen.token_ids)]):
            assert top_ids[0] == gen.token_ids[j]  # greedy: the pick is the most likely token
            values, expected = logp[len(ids) - 1 + j].topk(4)
            assert top_ids == expected.tolist()
            torch.testing.assert_close(torch.tensor(top_lp), values, rtol=0, atol=1e-4)


def test_target_distribution_mixes_the_pick_and_the_top_k():
    ids, probs = target_distribution(7, [7, 3, 9], [0.4, 0.3, 0.1], 0.5)
    assert ids == [7, 3, 9]
    assert probs == pytest.approx([0.5 + 0.25, 0.1875, 0.0625]) and sum(probs) == pytest.approx(1.0)
    ids, probs = target_distribution(5, [7, 3], [0.5, 0.5], 0.5)  # a tie broken towards a token outside the list
    assert ids == [7, 3, 5] and probs == pytest.approx([0.25, 0.25, 0.5])


def test_answer_from_generation_keeps_the_end_of_turn_only_when_the_reply_ended():
    from lorakit.infer.engine import Generation

    steps = [([11, 12], [-0.1, -2.5]), ([13, 14], [-0.3, -1.4]), ([2, 15], [-0.05, -3.0])]
    ended = answer_from_generation("q", [1, 1], Generation([11, 13], "x y", "stop", 2, 3, logprobs=steps))
    assert ended.answer_ids == [11, 13, 2] and len(ended.top_ids) == 3
    cut = answer_from_generation("q", [1, 1], Generation([11, 13], "x y", "length", 2, 2, logprobs=steps[:2]))
    assert cut.answer_ids == [11, 13] and len(cut.top_probs) == 2
    assert cut.top_probs[0][0] == pytest.approx(0.904837, abs=1e-6)
    sample = ended.sample(pick_weight=0.5)
    assert sample.input_ids == [1, 1, 11, 13, 2] and sample.labels == [-100, -100, 11, 13, 2]
    assert sorted(sample.teacher) == [2, 3, 4]
    ids, probs = sample.teacher[4]
    assert ids[0] == 2 and probs[0] > 0.5 and sum(probs) == pytest.approx(1.0)
    weighted = ended.sample(pick_weight=0.5, weight=0.25)  # --replay_weight: the sample's loss_scale, same targets
    assert sample.loss_scale == 1.0 and weighted.loss_scale == 0.25 and weighted.teacher == sample.teacher


def test_replay_answers_are_cached_and_become_samples(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    answers = replay_answers(model, tok, 3, system=None, cache_dir=tmp_path, max_new_tokens=4, top_k=5)
    assert [a.prompt for a in answers] == pick_prompts(3)
    for a in answers:
        sample = a.sample()
        start = len(a.prompt_ids)
        assert sample.input_ids[:start] == a.prompt_ids and sample.labels[:start] == [-100] * start
        assert sample.labels[start:] == a.answer_ids and sorted(sample.teacher) == list(range(start, len(sample.labels)))
    import lorakit.replay as replay

    monkeypatch.setattr(replay, "generate_replies", lambda *a, **k: pytest.fail("the cache was not used"))
    assert replay_answers(model, tok, 3, system=None, cache_dir=tmp_path, max_new_tokens=4, top_k=5) == answers
    with pytest.raises(UserError, match="--replay"):
        replay_answers(model, tok, 0, system=None, cache_dir=tmp_path)


def test_replay_rows_take_the_mix_of_system_prompts_and_the_base_answers_under_the_runs_own(tiny, tmp_path):
    from lorakit.data.render import render_prompt
    from lorakit.data.system_prompts import TRAINING_SYSTEMS
    from lorakit.replay import generate_replies, read_answers

    model, tok = tiny
    answers = replay_answers(model, tok, 9, system="Be brief.", cache_dir=tmp_path, max_new_tokens=2, top_k=3)
    run = ["Be brief." if s is None else s for s in TRAINING_SYSTEMS]
    assert [a.system for a in answers] == run + run[:1]
    for a in answers:  # the row is rendered under its own system prompt of the mix
        assert a.prompt_ids == render_prompt(tok, [{"role": "user", "content": a.prompt}], system=a.system)
    # ... and its targets are what the base says under the run's own prompt, whichever prompt the row has
    own = [render_prompt(tok, [{"role": "user", "content": a.prompt}], system="Be brief.") for a in answers]
    direct = generate_replies(model, tok, own, max_new_tokens=2, logprobs=3)
    assert [a.answer_ids[:len(g.token_ids)] for a, g in zip(answers, direct)] == [list(g.token_ids) for g in direct]
    assert [[list(ids) for ids, _ in g.logprobs] for g in direct] == [a.top_ids[:len(g.logprobs)]
                                                                    for a, g in zip(answers, direct)]
    (cached,) = tmp_path.glob("replay-9-*.jsonl")  # one generation under the run's own prompt is cached
    assert {a.system for a in read_answers(cached)} == {"Be brief."}
    again = replay_answers(model, tok, 9, system=None, cache_dir=tmp_path, max_new_tokens=2, top_k=3)
    assert [a.system for a in again][:3] == [None, TRAINING_SYSTEMS[1], None]  # another run prompt: another cache
    assert again[0].prompt_ids != answers[0].prompt_ids and again[1].prompt_ids == answers[1].prompt_ids
    assert len(list(tmp_path.glob("replay-9-*.jsonl"))) == 2


def test_a_cache_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import os

    from lorakit.replay import ReplayAnswer, read_answers, write_answers

    path = tmp_path / "replay.jsonl"
    old = [ReplayAnswer("Hi", [1], [2, 3], [[2], [3]], [[1.0], [1.0]], "ok")]
    write_answers(path, old)
    (tmp_path / "replay.tmp").write_text("another process's half-written file")  # the old shared name: ignored
    assert read_answers(path) == old

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_answers(path, old * 2)
    assert read_answers(path) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replay.jsonl", "replay.tmp"]


def test_chinese_replay_answers_get_their_own_weight(tiny, tmp_path):
    from lorakit.replay import replay_samples

    model, tok = tiny
    n = 12  # the fixed shuffled order mixes both languages in its first 12
    langs = {row["prompt"]: row["lang"] for row in load_general_prompts()}
    kinds = [langs[p] for p in pick_prompts(n)]
    assert "zh" in kinds and "en" in kinds
    kwargs = dict(system=None, cache_dir=tmp_path, max_new_tokens=3, top_k=4)
    for weight_zh, expected in ((3.0, {"zh": 3.0, "en": 1.5}), (None, {"zh": 1.5, "en": 1.5})):
        samples = replay_samples(model, tok, n, weight=1.5, weight_zh=weight_zh, **kwargs)
        for kind, sample in zip(kinds, samples):
            assert sample.loss_scale == expected[kind]
            for _, probs in sample.teacher.values():  # each position's targets: a distribution
                assert sum(probs) == pytest.approx(1.0)
