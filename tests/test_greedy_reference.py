"""The engine's greedy replies equal the plainest generator's (the whole sequence through the model at
every step, no cache) token for token: batching, left padding, the shared prefix, the in-place and
the DynamicCache caches, rows refilled mid-batch and the fast decoder all leave the argmax unchanged."""

from __future__ import annotations

import functools

import pytest

from lorakit.infer import engine as engine_module
from lorakit.infer.engine import Engine, ReferenceDecoder, SamplingParams
from lorakit.infer.greedy_reference import greedy_generate
from tests.test_engine import model, one_thread, prompts  # noqa: F401  (fixtures: tiny model, one thread, prompts)

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=20)


@pytest.fixture(scope="module")
def expected(model, qwen_tokenizer, prompts):  # noqa: F811
    stop_ids = Engine(model, qwen_tokenizer, fast=False).stop_ids
    return [greedy_generate(model, p, max_new_tokens=GREEDY.max_new_tokens, stop_ids=stop_ids) for p in prompts]


@pytest.mark.parametrize("fast", [False, True])
def test_engine_greedy_equals_the_plain_loop(model, qwen_tokenizer, prompts, expected, fast):  # noqa: F811
    engine = Engine(model, qwen_tokenizer, fast=fast, max_batch_size=2)  # the third prompt takes a freed row
    assert [g.token_ids for g in engine.generate(prompts, GREEDY)] == expected
    assert len(set(map(tuple, expected))) == 3 and all(len(e) > 5 for e in expected)


def test_dynamic_cache_path_equals_the_plain_loop(model, qwen_tokenizer, prompts, expected, monkeypatch):  # noqa: F811
    monkeypatch.setattr(engine_module, "ReferenceDecoder", functools.partial(ReferenceDecoder, in_place=False))
    engine = Engine(model, qwen_tokenizer, fast=False)
    assert [g.token_ids for g in engine.generate(prompts, GREEDY)] == expected
