"""The generation engine on a tiny random Qwen2: fast path == reference == HF generate, stopping,
streaming, sampling rules, bad input."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import UserError
from lorakit.infer.engine import (Engine, SamplingParams, TextStream, apply_repetition_penalty,
                                  end_of_turn_ids, filter_top_k_top_p)
from lorakit.infer.fast_decode import unsupported_reason
from tests.conftest import tiny_qwen2_config

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)


def _model(**overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_qwen2_config(**overrides), dtype=torch.float32)
    # Larger weights than the init default make the logits peaked, so greedy picks are far from ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices on a shared 2-core machine: one thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def prompts(qwen_tokenizer):
    from lorakit.data.render import render_prompt

    questions = ["Who are you?", "Write a long poem about the sea, the wind and the old lighthouse keeper.", "2+2?"]
    return [render_prompt(qwen_tokenizer, [{"role": "user", "content": q}]) for q in questions]


def test_fast_path_matches_reference_and_hf_generate(model, qwen_tokenizer, prompts):
    reference = Engine(model, qwen_tokenizer, fast=False).generate(prompts, GREEDY)
    fast_engine = Engine(model, qwen_tokenizer, fast=True)
    assert fast_engine.uses_fast_path
    fast = fast_engine.generate(prompts, GREEDY)
    assert [g.token_ids for g in fast] == [g.token_ids for g in reference]
    for prompt, gen in zip(prompts, reference):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                             eos_token_id=sorted(end_of_turn_ids(qwen_tokenizer, model)), pad_token_id=0)
        hf = out[0, len(prompt):].tolist()
        assert gen.token_ids == [t for t in hf if t not in end_of_turn_ids(qwen_tokenizer, model)]
    assert len(set(tuple(g.token_ids) for g in reference)) == 3  # the prompts really differ


def test_batched_equals_one_by_one_with_left_padding(model, qwen_tokenizer, prompts):
    for fast in (False, True):
        engine = Engine(model, qwen_tokenizer, fast=fast)
        batched = engine.generate(prompts, GREEDY)
        single = [engine.generate([p], GREEDY)[0] for p in prompts]
        assert [g.token_ids for g in batched] == [g.token_ids for g in single]
        assert [g.prompt_tokens for g in batched] == [len(p) for p in prompts]


def test_greedy_is_deterministic_and_sampling_follows_the_seed(model, qwen_tokenizer, prompts):
    engine = Engine(model, qwen_tokenizer, fast=False)
    assert engine.generate(prompts, GREEDY)[1].token_ids == engine.generate(prompts, GREEDY)[1].token_ids
    hot = SamplingParams(temperature=1.5, top_p=0.95, top_k=50, max_new_tokens=16, seed=7)
    first, again = (engine.generate(prompts[:1], hot)[0].token_ids for _ in range(2))
    other = engine.generate(prompts[:1], SamplingParams(**{**hot.__dict__, "seed": 8}))[0].token_ids
    assert first == again and first != other
    assert first != engine.generate(prompts[:1], GREEDY)[0].token_ids[:16]


def test_stop_tokens_end_each_sequence_on_its_own(model, qwen_tokenizer, prompts):
    engine = Engine(model, qwen_tokenizer, fast=False)
    free = engine.generate(prompts, GREEDY)
    stop_token = free[1].token_ids[5]  # the sixth token of the second reply becomes a stop token
    cut = free[1].token_ids.index(stop_token)
    for fast in (False, True):
        stopped = Engine(model, qwen_tokenizer, fast=fast).generate(
            prompts, SamplingParams(max_new_tokens=24, stop_token_ids=(stop_token,)))
        assert stopped[1].token_ids == free[1].token_ids[:cut]
        assert stopped[1].finish_reason == "stop" and stopped[1].completion_tokens == cut + 1
        for k in (0, 2):  # the other rows are unaffected unless they emit the same token
            expect = free[k].token_ids
            if stop_token in expect:
                expect = expect[:expect.index(stop_token)]
            assert stopped[k].token_ids == expect
    assert free[0].finish_reason == "length" and len(free[0].token_ids) == 24 == free[0].completion_tokens


def test_end_of_turn_token_stops_and_is_never_printed(model, qwen_tokenizer, prompts):
    """Bias the head so the model says '<|im_end|>' after a few tokens: the reply stops there."""
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in end_of_turn_ids(qwen_tokenizer, model)
    free = Engine(model, qwen_tokenizer, fast=False).generate(prompts[:1], GREEDY)[0]
    third = free.token_ids[2]
    saved = model.lm_head.weight[im_end].clone()
    try:
        with torch.no_grad():  # make <|im_end|> win wherever the third token would
            model.lm_head.weight[im_end] = model.lm_head.weight[third] * 1.5
        for fast in (False, True):
            gen = Engine(model, qwen_tokenizer, fast=fast).generate(prompts[:1], GREEDY)[0]
            assert gen.finish_reason == "stop" and im_end not in gen.token_ids
            assert gen.token_ids == free.token_ids[:free.token_ids.index(third)]
            assert "<|im_end|>" not in gen.text
            # ignore_eos (vLLM's flag; benchmarks force full-length replies with it): <|im_end|> is a token like any
            ignored = Engine(model, qwen_tokenizer, fast=fast).generate(
                prompts[:1], SamplingParams(max_new_tokens=24, ignore_eos=True))[0]
            assert ignored.finish_reason == "length" and len(ignored.token_ids) == 24 and im_end in ignored.token_ids
            assert ignored.token_ids[:len(gen.token_ids)] == gen.token_ids
    finally:
        with torch.no_grad():
            model.lm_head.weight[im_end] = saved


def test_stream_yields_incremental_pieces_that_add_up(model, qwen_tokenizer, prompts):
    for fast in (False, True):
        engine = Engine(model, qwen_tokenizer, fast=fast)
        whole = engine.generate(prompts[1:2], GREEDY)[0]
        pieces = list(engine.stream(prompts[1], GREEDY))
        assert len(pieces) > 5 and all(pieces)
        assert "".join(pieces) == whole.text
        assert engine.last_generation.token_ids == whole.token_ids


def test_text_stream_never_splits_characters_or_prints_special_tokens(qwen_tokenizer):
    text = "Hi 你好 🙂 café"
    ids = qwen_tokenizer.encode(text, add_special_tokens=False)
    ids = ids[:3] + [qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")] + ids[3:]
    stream = TextStream(qwen_tokenizer)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p or "<|" in p for p in pieces)
    assert sum(1 for p in pieces if p) >= 4


def test_max_new_tokens_marks_length(model, qwen_tokenizer, prompts):
    gen = Engine(model, qwen_tokenizer).generate(prompts[:1], SamplingParams(max_new_tokens=3))[0]
    assert gen.finish_reason == "length" and len(gen.token_ids) == 3


def test_prompt_longer_than_context_is_a_clear_error_and_generation_stops_at_the_context(model, qwen_tokenizer):
    for fast in (False, True):
        engine = Engine(model, qwen_tokenizer, fast=fast)
        engine.context = 40
        with pytest.raises(UserError, match="prompt has 45 tokens but the model's context is 40"):
            engine.generate([list(range(100, 145))], GREEDY)
        gen = engine.generate([list(range(100, 130))], SamplingParams(max_new_tokens=50))[0]
        assert gen.completion_tokens <= 10


def test_sampling_filters_are_exact():
    logits = torch.tensor([[3.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.5, -4.0, 1.0, 0.5]]
    assert filter_top_k_top_p(logits, 2, 1.0).isinf().tolist() == [[False, True, False, True]]
    # probs ~ [0.80, 0.005, 0.11, 0.07]: top_p 0.85 keeps tokens 0 and 2 (0.80 < 0.85 <= 0.91)
    assert filter_top_k_top_p(logits, 0, 0.85).isinf().tolist() == [[False, True, False, True]]
    assert filter_top_k_top_p(logits, 0, 0.5).isinf().tolist() == [[False, True, True, True]]


def _splitmix64_python(x: int) -> int:
    """SplitMix64's output function on Python ints modulo 2**64 (the published algorithm, unsigned)."""
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_splitmix64_on_int64_tensors_equals_the_unsigned_algorithm():
    from lorakit.infer.sampling import splitmix64

    inputs = [0, 1, 2, 12345, -1, -(1 << 63), (1 << 63) - 1, 0x7F4A7C15, -987654321987]
    got = splitmix64(torch.tensor(inputs, dtype=torch.int64)).tolist()
    assert [g & ((1 << 64) - 1) for g in got] == [_splitmix64_python(x & ((1 << 64) - 1)) for x in inputs]
    assert _splitmix64_python(0) == 0xE220A8397B1DCDAF  # the first output of SplitMix64 seeded with 0


def test_uniform_draws_stay_strictly_inside_zero_one_at_the_extreme_bit_patterns():
    from lorakit.infer.sampling import uniform_from_bits

    extremes = torch.tensor([0, -1, (1 << 63) - 1, -(1 << 63), -(1 << 41), (1 << 41) - 1], dtype=torch.int64)
    u = uniform_from_bits(extremes)
    assert bool(((u > 0) & (u < 1)).all()) and bool(torch.isfinite(torch.log(-torch.log(u))).all())
    assert u.max().item() == 1 - 2 ** -24 and u.min().item() == 2 ** -24


@pytest.mark.parametrize("settings", [
    [(0.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 40, 0.9)],  # mixed
    [(1.0, 0, 1.0)] * 5,  # one group (GRPO's rollouts): no per-group indexing
    [(0.0, 0, 1.0)] * 3,  # greedy only
])
def test_batched_sampling_picks_what_each_row_picks_alone(settings):
    """sample_tokens (groups batched) == each row computed on its own, draw after draw: a row's picks do
    not depend on what shares its batch."""
    from lorakit.infer.sampling import check_picks, sample_tokens, sample_tokens_reference

    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in settings]
    seeds = torch.tensor([100 + i for i in range(len(settings))])
    g = torch.Generator().manual_seed(0)
    picks = []
    for draw in range(12):
        draws = torch.full((len(params),), draw)
        logits = torch.randn(len(params), 997, generator=g) * 2
        got = sample_tokens(logits.clone(), params, seeds, draws)
        assert got.tolist() == sample_tokens_reference(logits.clone(), params, seeds, draws).tolist()
        picks.append(got.tolist())
    sampled = [i for i, (t, _, _) in enumerate(settings) if t > 0]
    assert all(len({draw[i] for draw in picks}) > 1 for i in sampled)  # real draws, not an argmax
    if sampled:
        broken = torch.randn(len(params), 997, generator=g)
        broken[sampled[0], 3] = float("nan")
        marked = sample_tokens(broken, params, seeds, torch.zeros(len(params), dtype=torch.long)).tolist()
        assert marked[sampled[0]] == -1 and all(t >= 0 for i, t in enumerate(marked) if i != sampled[0])
        with pytest.raises(ValueError, match="NaN or inf"):
            check_picks(marked)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (6, 1.0), (0, 0.7)])
def test_sampled_tokens_follow_the_filtered_distribution(top_k, top_p):
    """4000 draws of one row (seed fixed, draw number 0..3999): each token's frequency is its probability
    after temperature, top-k and top-p (as torch.multinomial's would be), and no filtered token appears."""
    from lorakit.infer.sampling import sample_tokens

    n, temperature = 4000, 1.3
    logits = torch.linspace(2.0, -2.0, 12)
    expected = filter_top_k_top_p(logits[None] / temperature, top_k, top_p).softmax(-1)[0]
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * n
    picks = sample_tokens(logits.expand(n, -1).clone(), params, torch.full((n,), 7), torch.arange(n))
    frequency = torch.bincount(picks, minlength=12).float() / n
    assert frequency[expected == 0].sum() == 0
    assert (frequency - expected).abs().max() < 0.03  # binomial std <= 0.008 at n = 4000
    other_seed = sample_tokens(logits.expand(n, -1).clone(), params, torch.full((n,), 8), torch.arange(n))
    assert (other_seed != picks).float().mean() > 0.3  # another seed, other draws


def test_unmerged_lora_falls_back_to_the_reference(qwen_tokenizer):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert "merge_lora" in unsupported_reason(peft_model)
    assert not Engine(peft_model, qwen_tokenizer).uses_fast_path
    merged = peft_model.merge_and_unload()
    assert unsupported_reason(merged) is None


def test_fast_path_matches_reference_on_a_tied_llama(qwen_tokenizer, prompts):
    """The Llama family (SmolLM2's): no q/k/v bias, tied embeddings, another rope base."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=2048)
    llama = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in llama.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    assert unsupported_reason(llama) is None
    reference = Engine(llama, qwen_tokenizer, fast=False).generate(prompts, GREEDY)
    fast = Engine(llama, qwen_tokenizer, fast=True).generate(prompts, GREEDY)
    assert [g.token_ids for g in fast] == [g.token_ids for g in reference]
    assert all(len(g.token_ids) > 5 for g in reference)


def test_a_failing_compiler_falls_back_to_the_uncompiled_step(model, qwen_tokenizer, prompts, monkeypatch):
    """If torch.compile breaks while the graph is captured, the decoder warns and runs uncompiled."""
    from lorakit.infer import fast_decode

    engine = Engine(model, qwen_tokenizer, fast=True, compile=False, cuda_graphs=False)
    decoder = engine._fast
    decoder.compiled, decoder.cuda_graphs = True, True

    def broken(*args, **kwargs):
        raise RuntimeError("inductor exploded")

    decoder.attention_in = broken
    captured = []
    monkeypatch.setattr(fast_decode.StaticDecoder, "_capture",
                        lambda self, s, width: captured.append(self.attention_in(None)) if self.compiled else None)
    with pytest.warns(UserWarning, match="inductor exploded"):
        out = engine.generate(prompts[:1], GREEDY)
    assert decoder.attention_in is fast_decode.attention_in and not decoder.compiled
    assert out[0].token_ids == Engine(model, qwen_tokenizer, fast=False).generate(prompts[:1], GREEDY)[0].token_ids


def test_a_failing_graph_capture_decodes_without_a_graph(model, qwen_tokenizer, prompts, monkeypatch):
    """If capturing the CUDA graph fails (uncompiled), the decoder warns and decodes each step directly."""
    from lorakit.infer import fast_decode

    engine = Engine(model, qwen_tokenizer, fast=True, compile=False, cuda_graphs=True)

    def broken(self, s, width):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(fast_decode.StaticDecoder, "_capture", broken)
    with pytest.warns(UserWarning, match="decoding without a graph"):
        out = engine.generate(prompts, GREEDY)
    assert not engine._fast.cuda_graphs and not engine._fast.state.graphs
    assert [g.token_ids for g in out] == [g.token_ids for g in Engine(model, qwen_tokenizer, fast=False).generate(
        prompts, GREEDY)]


def test_repetition_penalty_matches_hf_generate(model, qwen_tokenizer, prompts):
    """"2+2?" makes this model repeat a token within 32 steps, so the penalty changes the reply."""
    params = SamplingParams(max_new_tokens=32, repetition_penalty=1.5)
    stops = sorted(end_of_turn_ids(qwen_tokenizer, model))
    hf = model.generate(torch.tensor([prompts[2]]), max_new_tokens=32, do_sample=False, repetition_penalty=1.5,
                        eos_token_id=stops, pad_token_id=0)[0, len(prompts[2]):].tolist()
    for fast in (False, True):
        gen = Engine(model, qwen_tokenizer, fast=fast).generate(prompts[2:3], params)[0]
        assert gen.token_ids == [t for t in hf if t not in stops]
    plain = Engine(model, qwen_tokenizer).generate(prompts[2:3], SamplingParams(max_new_tokens=32))[0]
    assert gen.token_ids != plain.token_ids


@pytest.mark.parametrize("fast", [False, True])
def test_nan_logits_stop_a_sampled_generation_with_a_clear_error(qwen_tokenizer, prompts, fast):
    """A diverged model (NaN weights) makes sampling raise, with either decoder, instead of feeding a bad id on."""
    broken = _model()
    with torch.no_grad():
        broken.lm_head.weight[5, 0] = float("nan")
    engine = Engine(broken, qwen_tokenizer, fast=fast, compile=False, cuda_graphs=False)
    with pytest.raises(ValueError, match="NaN or inf"):
        engine.generate(prompts[:2], SamplingParams(temperature=1.0, max_new_tokens=4, seed=1))


def test_top_k_and_top_p_together_equal_top_k_then_the_full_vocabulary_nucleus():
    """The nucleus taken among the k candidates only (the fast path) keeps what the two filters one after the
    other keep, the second sorting the whole vocabulary."""
    g = torch.Generator().manual_seed(0)
    for top_k, top_p in [(50, 0.9), (5, 0.5), (1, 0.3), (200, 0.99)]:
        logits = torch.randn(8, 3000, generator=g) * 3
        both = filter_top_k_top_p(logits, top_k, top_p)
        assert torch.equal(both, filter_top_k_top_p(filter_top_k_top_p(logits, top_k, 1.0), 0, top_p))
        assert bool((both.isfinite().sum(-1) <= top_k).all()) and bool((both.isfinite().sum(-1) >= 1).all())


def test_a_failing_sampling_compiler_falls_back_to_the_same_eager_picks(monkeypatch):
    """On CUDA the race is compiled; if the compiler fails there, sampling warns and picks the same tokens eagerly.
    (Simulated on the CPU: the device check and the compiled function are patched.)"""
    from lorakit.infer import sampling

    def broken(*args):
        raise RuntimeError("Scalar -7046029254386353131 is out of range for type int32")

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seeds, draws = torch.tensor([1, 2, 3]), torch.tensor([0, 4, 9])
    expected = sampling._race(logits, seeds, draws, sampling.stream_steps(50, logits.device))

    class FakeCuda:
        type = "cuda"

    class OnCuda(torch.Tensor):
        @property
        def device(self):
            return FakeCuda()

    monkeypatch.setattr(sampling, "_compiled_race", broken)
    monkeypatch.setattr(sampling, "stream_steps", lambda vocab, device: torch.arange(1, vocab + 1) * sampling._GOLDEN)
    with pytest.warns(UserWarning, match="sampling uncompiled"):
        got = sampling.race(logits.as_subclass(OnCuda), seeds, draws)
    assert torch.equal(got.as_subclass(torch.Tensor), expected) and sampling._compiled_race is False
