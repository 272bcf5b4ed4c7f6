"""Continuous batching on a tiny random Qwen2: sequences that join a running batch at any step, or
leave it early, get exactly the greedy tokens they get alone, with both decoders; generate() refills
finished rows and still equals one-at-a-time generation."""

from __future__ import annotations

import pytest
import torch

from lorakit.infer import fast_decode
from lorakit.infer.engine import Engine, SamplingParams
from tests.test_engine import _model, model, one_thread  # noqa: F401  (fixtures: the tiny model, one thread)

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=20)
DECODERS = {"reference": dict(fast=False), "static": dict(fast=True, compile=False, cuda_graphs=False)}


@pytest.fixture(scope="module")
def prompts(qwen_tokenizer):
    from lorakit.data.render import render_prompt

    questions = ["Who are you?", "Write a long poem about the sea, the wind and the old lighthouse keeper.", "2+2?",
                 "Name three colours.", "What is the capital of France, and why is it famous?", "Hi",
                 "Explain continuous batching to a five year old in two sentences."]
    return [render_prompt(qwen_tokenizer, [{"role": "user", "content": q}]) for q in questions]


def engine_for(model, tokenizer, decoder: str, **kw) -> Engine:
    engine = Engine(model, tokenizer, **DECODERS[decoder], **kw)
    engine.stop_ids = set()  # random weights: every reply runs to its budget, so the rows overlap
    return engine


@pytest.fixture(scope="module")
def alone(model, qwen_tokenizer, prompts):
    """Each prompt's greedy reply, generated on its own by the reference decoder."""
    engine = engine_for(model, qwen_tokenizer, "reference")
    replies = [engine.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert len(set(map(tuple, replies))) == len(prompts)  # the prompts really differ
    return replies


def run_to_end(batch, seqs) -> None:
    while len(batch):
        batch.step()
    assert all(s.finish_reason == "length" for s in seqs)


@pytest.mark.parametrize("decoder", DECODERS)
def test_sequences_joining_at_different_steps_get_their_solo_tokens(model, qwen_tokenizer, prompts, alone, decoder):
    engine = engine_for(model, qwen_tokenizer, decoder)
    batch = engine.batch(4)
    seqs = {0: batch.add(prompts[0], GREEDY)}
    for _ in range(3):
        batch.step()
    seqs[1] = batch.add(prompts[1], GREEDY)  # the longest prompt joins a short running one
    for _ in range(5):
        batch.step()
    assert len(seqs[0].tokens) == 8 and len(seqs[1].tokens) == 5
    seqs[2] = batch.add(prompts[2], GREEDY)  # two join together: one left-padded prefill
    seqs[3] = batch.add(prompts[4], GREEDY)
    assert len(batch) == 4
    with pytest.raises(ValueError, match="full"):
        batch.add(prompts[5], GREEDY)
    run_to_end(batch, seqs.values())
    for k, i in zip(seqs, (0, 1, 2, 4)):
        assert seqs[k].tokens == alone[i], (decoder, k)


@pytest.mark.parametrize("decoder", DECODERS)
def test_removing_a_sequence_mid_run_leaves_the_others_unchanged(model, qwen_tokenizer, prompts, alone, decoder):
    engine = engine_for(model, qwen_tokenizer, decoder)
    batch = engine.batch(4)
    kept = [batch.add(prompts[i], GREEDY) for i in (1, 0)]
    dropped = batch.add(prompts[6], GREEDY)
    for _ in range(6):
        batch.step()
    batch.remove(dropped)  # a middle row of the decoder leaves
    assert len(batch) == 2 and dropped.finish_reason is None and len(dropped.tokens) == 6
    never = batch.add(prompts[3], GREEDY)
    batch.remove(never)  # removed before its prefill: never runs
    batch.step()
    batch.remove(kept[0])  # the longest prompt leaves: the reference cache loses its padding columns
    late = batch.add(prompts[5], GREEDY)
    run_to_end(batch, [kept[1], late])
    assert not never.tokens and len(kept[0].tokens) == 7
    assert kept[0].tokens == alone[1][:7] and dropped.tokens == alone[6][:6]
    assert kept[1].tokens == alone[0] and late.tokens == alone[5]


@pytest.mark.parametrize("decoder", DECODERS)
def test_generate_refills_finished_rows_and_equals_one_at_a_time(model, qwen_tokenizer, prompts, decoder):
    engine = Engine(model, qwen_tokenizer, **DECODERS[decoder], max_batch_size=3)
    free = engine.generate(prompts, GREEDY)
    stops = tuple(free[i].token_ids[k] for i, k in ((1, 14), (6, 7), (5, 2)))  # replies stop at various steps
    params = SamplingParams(max_new_tokens=20, stop_token_ids=stops)
    one_by_one = [engine.generate([p], params)[0] for p in prompts]
    assert len({len(g.token_ids) for g in one_by_one}) > 3  # rows finish at different steps
    decoder_obj = engine._fast or None
    added, done = [], []
    if decoder_obj is not None:
        add = decoder_obj.add
        decoder_obj.add = lambda batch, n: (added.append(len(batch.input_ids)), add(batch, n))[1]
    batched = engine.generate(prompts, params, progress=done.append)
    assert [g.token_ids for g in batched] == [g.token_ids for g in one_by_one]
    assert [g.finish_reason for g in batched] == [g.finish_reason for g in one_by_one]
    assert sum(done) == len(prompts)
    if decoder_obj is not None:  # 3 prompts first, then the others join as rows finish
        assert added[0] == 3 and sum(added) == len(prompts) and len(added) > 2


def test_per_row_sampling_parameters(model, qwen_tokenizer, prompts, alone):
    """Greedy rows stay exact beside sampling rows; a seeded row samples as it does alone."""
    engine = engine_for(model, qwen_tokenizer, "reference")
    hot = SamplingParams(temperature=1.0, top_k=40, max_new_tokens=20, seed=3)
    solo = engine.generate([prompts[2]], hot)[0].token_ids
    batch = engine.batch(3)
    seqs = [batch.add(prompts[0], GREEDY), batch.add(prompts[2], hot),
            batch.add(prompts[1], SamplingParams(max_new_tokens=6))]
    run_to_end(batch, seqs)
    assert seqs[0].tokens == alone[0] and seqs[1].tokens == solo and seqs[2].tokens == alone[1][:6]
    assert solo != alone[2]


def test_static_cache_grows_when_a_joining_row_needs_more_columns(model, qwen_tokenizer, prompts, alone,
                                                                  monkeypatch):
    monkeypatch.setattr(fast_decode, "LENGTH_BUCKET", 16)
    engine = engine_for(model, qwen_tokenizer, "static")
    batch = engine.batch(2, length=len(prompts[2]) + 20)
    first = batch.add(prompts[2], GREEDY)
    for _ in range(4):
        batch.step()
    length = engine._fast.state.length
    second = batch.add(prompts[1], GREEDY)  # its prompt alone is longer than the cache
    assert len(prompts[1]) + 20 > length
    run_to_end(batch, [first, second])
    assert engine._fast.state.length == max(-(-(len(prompts[1]) + 20) // 16) * 16, 2 * length)  # at least doubled
    assert first.tokens == alone[2] and second.tokens == alone[1]


def test_a_second_running_batch_takes_the_fast_decoder_over(model, qwen_tokenizer, prompts):
    """The static cache is the engine's: an older batch refuses to step instead of decoding garbage."""
    engine = engine_for(model, qwen_tokenizer, "static")
    old = engine.batch(2)
    old.add(prompts[0], GREEDY)
    old.step()
    engine.generate(prompts[1:2], SamplingParams(max_new_tokens=2))
    with pytest.raises(RuntimeError, match="one running batch per engine"):
        old.step()


def test_a_sliding_window_cache_takes_new_rows_only_when_empty(qwen_tokenizer):
    """Sliding-window layers cannot be merged: rows still leave at once, newcomers wait for an empty batch."""
    model = _model(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    engine = Engine(model, qwen_tokenizer, fast=False)
    engine.stop_ids = set()
    prompts = [list(range(100, 112)), [5, 6, 7], list(range(200, 217))]
    alone = [engine.generate([p], GREEDY)[0].token_ids for p in prompts]
    batch = engine.batch(2)
    first, dropped = batch.add(prompts[0], GREEDY), batch.add(prompts[1], GREEDY)
    for _ in range(3):
        batch.step()
    assert not batch.decoder.can_join
    batch.remove(dropped)
    late = batch.add(prompts[2], GREEDY)
    batch.step()
    assert not late.tokens and len(first.tokens) == 4  # waits while `first` runs
    run_to_end(batch, [first, late])
    assert first.tokens == alone[0] and late.tokens == alone[2] and dropped.tokens == alone[1][:3]


def test_each_step_attends_only_the_cache_columns_in_use(model, qwen_tokenizer, prompts, alone, monkeypatch):
    """The static decoder attends over the smallest bucket width that covers every running row's columns
    (a short reply never reads the whole cache), and the tokens stay the reference's."""
    monkeypatch.setattr(fast_decode, "LENGTH_BUCKET", 16)
    assert [fast_decode.attended_width(c, 96) for c in (1, 16, 17, 33, 64, 65, 96)] == [16, 16, 32, 64, 64, 96, 96]
    engine = engine_for(model, qwen_tokenizer, "static")
    decoder = engine._fast
    widths = []
    step = decoder.decode_step
    decoder.decode_step = lambda state, width: (widths.append((width, max(state.fill[r] for r in decoder.slots))),
                                                step(state, width))[1]
    batch = engine.batch(2, length=len(prompts[1]) + 20 + 64)
    first = batch.add(prompts[2], GREEDY)
    for _ in range(6):
        batch.step()
    second = batch.add(prompts[1], GREEDY)  # a longer prompt joins: the width grows to cover it
    run_to_end(batch, [first, second])
    assert first.tokens == alone[2] and second.tokens == alone[1]
    assert all(used <= width for width, used in widths)  # each step's columns (after its write) are attended
    assert len({w for w, _ in widths}) >= 2 and min(w for w, _ in widths) < decoder.state.length
