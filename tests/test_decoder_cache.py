"""The reference decoder's in-place KV buffers pick exactly the greedy tokens of its DynamicCache path
(`in_place=False`), on a tiny random Qwen2 and on the real SmolLM2: ragged batches, rows joining
mid-run (wider than the filled columns, more than the hinted rows), rows leaving, buffers that grow;
steps write in place; a sliding-window model keeps the DynamicCache path."""

from __future__ import annotations

import functools

import pytest
import torch

from lorakit.infer import engine as engine_module
from lorakit.infer.engine import MIN_SHARED_PREFIX, Engine, ReferenceDecoder, RunningBatch, SamplingParams
from tests.test_engine import _model, one_thread  # noqa: F401  (fixture: one thread)

QUESTIONS = ["Who are you?", "Write a long poem about the sea, the wind and the old lighthouse keeper.", "2+2?",
             "Name three colours.", "What is the capital of France, and why is it famous?", "Hi",
             "Explain continuous batching to a five year old in two sentences."]


def render(tokenizer) -> list[list[int]]:
    from lorakit.data.render import render_prompt

    return [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def tiny(qwen_tokenizer):
    engine = Engine(_model(), qwen_tokenizer, fast=False)
    engine.stop_ids = set()  # random weights: every reply runs to its budget
    return engine, render(qwen_tokenizer)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from lorakit.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    engine = Engine(load_model(smollm2_dir, torch_dtype="float32"), tokenizer, fast=False)
    return engine, render(tokenizer)


def running_batch(engine: Engine, in_place: bool, capacity: int, hint: tuple[int, int | None]) -> RunningBatch:
    """What Engine.batch builds, with the decoder path chosen and a (rows, length) hint of our own."""
    decoder = ReferenceDecoder(engine.model, in_place=in_place)
    decoder.reset(*hint)
    decoder.owner = RunningBatch(engine, decoder, capacity)
    return decoder.owner


def scenario(engine: Engine, prompts: list[list[int]], in_place: bool) -> tuple[list[list[int]], ReferenceDecoder]:
    """Rows join (wider than the filled columns; more rows than hinted) and leave (finished or removed)."""
    batch = running_batch(engine, in_place, capacity=8, hint=(2, 12))
    budget = functools.partial(SamplingParams, temperature=0.0)
    seqs = [batch.add(prompts[2], budget(max_new_tokens=30)), batch.add(prompts[5], budget(max_new_tokens=4))]
    for _ in range(3):
        batch.step()
    seqs.append(batch.add(prompts[1], budget(max_new_tokens=30)))  # the longest prompt joins short rows
    for _ in range(3):
        batch.step()  # the 4-token row has left
    seqs += [batch.add(prompts[i], budget(max_new_tokens=12)) for i in (3, 4, 6)]  # 5 rows: over the hint
    for _ in range(2):
        batch.step()
    batch.remove(seqs[0])  # a first row leaves mid-run
    while len(batch):
        batch.step()
    return [s.tokens for s in seqs], batch.decoder


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_joining_leaving_and_growing_pick_the_dynamic_cache_tokens(name, request):
    engine, prompts = request.getfixturevalue(name)
    new, decoder = scenario(engine, prompts, in_place=True)
    old, reference = scenario(engine, prompts, in_place=False)
    assert new == old
    assert reference.buffers is None and decoder.buffers is not None
    assert len(decoder.prefix[0]) >= MIN_SHARED_PREFIX  # the system prompt was prefilled once, then reused
    rows, columns = decoder.buffers.capacity
    assert rows >= 5 and rows >= 2 * 2  # grew from the hinted 2 rows, by doubling
    width = len(prompts[2])
    assert columns >= 2 * (width + 30)  # grew when the longest prompt joined with 30 new tokens
    assert len(new[0]) < 30 and len(new[1]) <= 4 and all(len(t) > 0 for t in new)


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_generate_with_refilled_rows_picks_the_dynamic_cache_tokens(name, request, monkeypatch):
    engine, prompts = request.getfixturevalue(name)
    params = [SamplingParams(temperature=0.0, max_new_tokens=n) for n in (9, 20, 5, 14, 20, 7, 11)]
    small = Engine(engine.model, engine.tokenizer, fast=False, max_batch_size=3)
    small.stop_ids = engine.stop_ids
    new = [g.token_ids for g in small.generate(prompts, params)]
    monkeypatch.setattr(engine_module, "ReferenceDecoder", functools.partial(ReferenceDecoder, in_place=False))
    old = [g.token_ids for g in small.generate(prompts, params)]
    assert new == old
    if name == "tiny":  # no stop tokens: every reply runs to its own budget, so rows leave at different steps
        assert [len(t) for t in new] == [9, 20, 5, 14, 20, 7, 11]


def test_steps_write_into_the_same_buffers_and_a_leaving_row_frees_its_slot(tiny):
    engine, prompts = tiny
    batch = engine.batch(4, length=80)
    seqs = [batch.add(prompts[i], SamplingParams(max_new_tokens=20)) for i in (0, 2, 3)]
    batch.step()
    buffers = batch.decoder.buffers
    keys, end = buffers.keys[0].data_ptr(), buffers.end
    for _ in range(5):
        batch.step()
    assert buffers.keys[0].data_ptr() == keys and buffers.end == end + 5  # written in place, no new cache
    batch.remove(seqs[0])
    assert buffers.slots == [1, 0]  # the last row moved into the freed slot; the middle one stayed
    before = [list(s.tokens) for s in seqs[1:]]
    batch.step()
    assert [len(s.tokens) for s in seqs[1:]] == [len(t) + 1 for t in before]
    while len(batch):
        batch.step()
    old = running_batch(engine, False, 4, (4, 80))
    again = [old.add(prompts[i], SamplingParams(max_new_tokens=20)) for i in (0, 2, 3)]
    for _ in range(6):
        old.step()
    old.remove(again[0])
    while len(old):
        old.step()
    assert [s.tokens for s in seqs[1:]] == [s.tokens for s in again[1:]]


def test_prompts_without_a_common_prefix_are_prefilled_whole(tiny):
    engine, prompts = tiny
    cut = [p[i:] for i, p in enumerate(prompts[:4])]  # every prompt starts at a different token
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    new = running_batch(engine, True, 4, (4, None))
    seqs = [new.add(p, params) for p in cut]
    old = running_batch(engine, False, 4, (4, None))
    again = [old.add(p, params) for p in cut]
    for batch in (new, old):
        while len(batch):
            batch.step()
    assert new.decoder.prefix is None and new.decoder.buffers is not None
    assert [s.tokens for s in seqs] == [s.tokens for s in again]


def test_a_sliding_window_model_keeps_the_dynamic_cache_path(qwen_tokenizer):
    model = _model(use_sliding_window=True, sliding_window=6, max_window_layers=1)
    engine = Engine(model, qwen_tokenizer, fast=False)
    engine.stop_ids = set()
    prompts = render(qwen_tokenizer)[:3]
    batch = engine.batch(3)
    seqs = [batch.add(p, SamplingParams(max_new_tokens=10)) for p in prompts]
    batch.step()
    assert batch.decoder.buffers is None
    assert any("Sliding" in type(layer).__name__ for layer in batch.decoder.cache.layers)
    while len(batch):
        batch.step()
    old = running_batch(engine, False, 3, (3, None))
    again = [old.add(p, SamplingParams(max_new_tokens=10)) for p in prompts]
    while len(old):
        old.step()
    assert [s.tokens for s in seqs] == [s.tokens for s in again]
