"""causal_lm_loss: reference equals HF's own loss; the chunked path equals the reference."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

import lorakit.loss
from lorakit.data.packing import collate, pack_sequences
from lorakit.data.render import Rendered
from lorakit.loss import (causal_lm_loss, ce_chunk_grad, chunked_linear_ce, reference_linear_ce, shift_targets,
                          soft_ce_chunk_grad, soft_targets)

VOCAB = 1000


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=VOCAB, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(cfg).float().eval()


def random_batch(b: int = 2, t: int = 24, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[0, 10:13] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(t).expand(b, t)}


def test_shift_targets_masks_sample_starts():
    labels = torch.tensor([[10, 11, 12, 20, 21, 22]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert shift_targets(labels, pos).tolist() == [[11, 12, -100, 21, 22, -100]]
    assert shift_targets(labels).tolist() == [[11, 12, 20, 21, 22, -100]]


def test_reference_loss_matches_hf_loss():
    model, batch = tiny_model(), random_batch()
    out = causal_lm_loss(model, batch)
    hf = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert out.n_tokens.item() == (batch["labels"][:, 1:] != -100).sum().item()
    torch.testing.assert_close(out.loss_sum / out.n_tokens, hf, rtol=1e-6, atol=1e-6)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(batch, fused, chunk_size):
    """(loss, loss tokens, gradients) of a fresh tiny model on `batch`."""
    model = tiny_model()
    out = causal_lm_loss(model, batch, fused=fused, chunk_size=chunk_size)
    (out.loss_sum * 0.37).backward()  # a non-unit upstream gradient must be applied too
    return out.loss_sum.detach(), out.n_tokens, _grads(model)


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_fused_loss_and_grads_equal_reference(chunk_size):
    (ref_loss, ref_n, ref_g), (loss, n, g) = [_loss_and_grads(random_batch(), fused, chunk_size) for fused in (False, True)]
    assert n.item() == ref_n.item()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    assert ref_g.keys() == g.keys() and "lm_head.weight" in g
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_linear_ce_with_bias_and_all_ignored():
    torch.manual_seed(0)
    h = torch.randn(9, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    t = torch.randint(0, 50, (9,))
    t[3] = -100
    ref = reference_linear_ce(h, w, t, b)
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    got = chunked_linear_ce(h, w, t, b, chunk_size=4)
    got_grads = torch.autograd.grad(got, (h, w, b))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    for a, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    none = chunked_linear_ce(h, w, torch.full((9,), -100), b)
    assert none.item() == 0.0
    none.backward()
    assert h.grad.abs().sum().item() == 0.0


def test_ce_chunk_grad_is_softmax_minus_onehot():
    logits = torch.randn(4, 10)
    targets = torch.tensor([1, -100, 9, 0])
    loss, grad = ce_chunk_grad(logits, targets)
    expected = torch.softmax(logits, -1) - torch.nn.functional.one_hot(targets.clamp_min(0), 10)
    expected[1] = 0
    torch.testing.assert_close(grad, expected)
    ref = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss, ref)


def test_packed_batch_loss_equals_separate_samples():
    """Packing two samples in one row (position_ids restarting) gives each its own loss."""
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, VOCAB, (1, 9), generator=g), torch.randint(0, VOCAB, (1, 14), generator=g)
    separate = sum(
        causal_lm_loss(model, {"input_ids": x, "labels": x, "position_ids": torch.arange(x.shape[1])[None]}).loss_sum
        for x in (a, b)
    )
    ids = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(9), torch.arange(14)])[None]
    for fused in (False, True):
        packed = causal_lm_loss(model, {"input_ids": ids, "labels": ids, "position_ids": pos}, fused=fused)
        assert packed.n_tokens.item() == 8 + 13
        torch.testing.assert_close(packed.loss_sum, separate, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- distillation targets (replay)


def teacher_batch(b: int = 2, t: int = 24, k: int = 5, seed: int = 4) -> dict:
    """random_batch plus top-k teacher distributions on some labelled positions of each row."""
    batch = random_batch(b, t)
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.stack([torch.randperm(VOCAB, generator=g)[:k] for _ in range(t)]) for _ in range(b)])
    probs = torch.rand(b, t, k, generator=g)
    probs = probs / probs.sum(-1, keepdim=True)
    probs[:, :14] = 0.0  # positions before 14 keep their one-hot labels
    probs[1, 20, 3:] = 0.0  # a position with fewer than k entries (padding)
    return batch | {"teacher_ids": ids, "teacher_probs": probs}


def test_soft_targets_take_the_teacher_where_given_and_the_label_elsewhere():
    targets = torch.tensor([5, -100, 7, 9])
    ids = torch.tensor([[1, 2], [1, 2], [3, 4], [0, 0]])
    probs = torch.tensor([[0.2, 0.6], [0.5, 0.5], [0.0, 0.0], [0.0, 0.0]])
    got_ids, got_w = soft_targets(targets, (ids, probs))
    assert got_ids.tolist() == [[1, 2], [0, 0], [7, 0], [9, 0]]
    torch.testing.assert_close(got_w, torch.tensor([[0.2, 0.6], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))  # as given: a weight


@pytest.mark.parametrize("chunk_size", [3, 4096])
def test_teacher_loss_fused_equals_reference_and_one_hot_teacher_equals_plain_ce(chunk_size):
    (ref_loss, _, ref_g), (loss, _, g) = [_loss_and_grads(teacher_batch(), fused, chunk_size) for fused in (False, True)]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-5, atol=1e-6, msg=name)
    # A teacher that puts all its mass on the label is the label: same loss as without a teacher.
    plain = random_batch()
    one_hot = plain | {"teacher_ids": plain["labels"].clamp_min(0).unsqueeze(-1),
                       "teacher_probs": (plain["labels"] != -100).float().unsqueeze(-1)}
    model = tiny_model()
    for fused in (False, True):
        torch.testing.assert_close(causal_lm_loss(model, one_hot, fused=fused, chunk_size=chunk_size).loss_sum,
                                   causal_lm_loss(model, plain).loss_sum, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(ref_loss, causal_lm_loss(model, plain).loss_sum)  # the teacher did change the loss
    half = plain | {"teacher_ids": one_hot["teacher_ids"], "teacher_probs": one_hot["teacher_probs"] * 0.5}
    torch.testing.assert_close(causal_lm_loss(model, half, fused=True, chunk_size=chunk_size).loss_sum,
                               0.5 * causal_lm_loss(model, plain).loss_sum, rtol=1e-6, atol=1e-5)  # a sample weight


def test_soft_ce_chunk_grad_is_the_gradient_of_its_loss():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 40, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 40, (6, 3), generator=g)
    weights = torch.rand(6, 3, generator=g, dtype=torch.float64)
    weights = weights / weights.sum(1, keepdim=True)
    weights[2] = 0.0  # a row without loss
    loss, grad = soft_ce_chunk_grad(logits, ids, weights)  # computes in fp32, as training does
    expected = -(torch.log_softmax(logits, -1).gather(1, ids) * weights).sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, logits)[0], rtol=1e-5, atol=1e-6)
    assert grad[2].abs().max() == 0


def test_packed_teacher_batch_equals_separate_samples():
    """A teacher position keeps its target when samples are packed (collate + _join offsets)."""
    from lorakit.data.packing import collate, pack_sequences
    from lorakit.data.render import Rendered

    g = torch.Generator().manual_seed(6)
    samples = []
    for n in (9, 14):
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        labels = [-100] * 4 + ids[4:]
        teacher = {t: (torch.randperm(VOCAB, generator=g)[:3].tolist(), [0.5, 0.3, 0.2]) for t in range(5, n)}
        samples.append(Rendered(ids, labels, teacher))
    model = tiny_model()
    separate = sum(causal_lm_loss(model, collate([s], 0)).loss_sum for s in samples)
    packed = collate(pack_sequences(samples, 64), 0)
    assert packed["teacher_ids"].shape == (1, 23, 3)
    for fused in (False, True):
        torch.testing.assert_close(causal_lm_loss(model, packed, fused=fused).loss_sum, separate, rtol=1e-5, atol=1e-4)


def test_shared_prefix_batch_gives_the_same_loss_and_gradients():
    """collate(shared_prefix=True) runs the common start (the system prompt) once for all rows: same numbers."""
    from peft import LoraConfig, get_peft_model

    from lorakit.data.packing import collate, shared_prefix_length
    from lorakit.data.render import Rendered

    g = torch.Generator().manual_seed(7)
    system = torch.randint(0, VOCAB, (10,), generator=g).tolist()
    samples = []
    for n in (7, 12, 5):
        ids = system + torch.randint(0, VOCAB, (n,), generator=g).tolist()
        labels = [-100] * (len(system) + 2) + ids[len(system) + 2:]
        samples.append(Rendered(ids, labels, {len(system) + 3: ([1, 2, 3], [0.5, 0.3, 0.2])}))
    assert shared_prefix_length(samples) == 10
    assert shared_prefix_length(samples[:1]) == 0
    early = Rendered(samples[0].input_ids, [-100] * 5 + samples[0].input_ids[5:])
    assert shared_prefix_length([early, samples[1]]) == 4  # stops before the first learned token's predictor
    batch = collate(samples, 0, shared_prefix=True)
    assert batch["prefix_ids"].tolist() == [system] and batch["input_ids"].shape == (3, 12)
    for fused in (False, True):
        results = []
        for shared in (False, True):
            torch.manual_seed(0)
            model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                            init_lora_weights=False))
            out = causal_lm_loss(model, collate(samples, 0, shared_prefix=shared), fused=fused)
            out.loss_sum.backward()
            results.append((out.loss_sum.detach(), out.n_tokens, _grads(model)))
        (ref, ref_n, ref_g), (got, n, g_) = results
        assert n == ref_n
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert ref_g.keys() == g_.keys() and any("lora" in k for k in ref_g)
        for name in ref_g:
            torch.testing.assert_close(g_[name], ref_g[name], rtol=1e-4, atol=1e-6, msg=name)


def _weighted_samples():
    """Three samples (prompt without loss, then an answer) with loss_scale 2, 1 and 0.5."""
    g = torch.Generator().manual_seed(11)
    samples = []
    for n, prompt, scale in ((9, 3, 2.0), (14, 6, 1.0), (7, 2, 0.5)):
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        samples.append(Rendered(ids, [-100] * prompt + ids[prompt:], loss_scale=scale))
    return samples


def _hand_weighted_loss(model, samples):
    """sum over samples of loss_scale x the summed next-token CE of its answer, from a plain transformers
    forward of each sample alone; and its gradients."""
    model.zero_grad()
    total = 0.0
    for s in samples:
        logits = model(input_ids=torch.tensor([s.input_ids])).logits[0].float()
        targets = torch.tensor(s.labels[1:])
        total = total + s.loss_scale * F.cross_entropy(logits[:-1], targets, ignore_index=-100, reduction="sum")
    (total * 0.37).backward()
    return total.detach(), _grads(model)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk_size", [4, 4096])
def test_loss_scale_weighs_each_samples_tokens_like_a_hand_computation(packed, chunk_size):
    samples = _weighted_samples()
    batch = collate(pack_sequences(samples, 64) if packed else samples, 0)
    want, want_g = _hand_weighted_loss(tiny_model(), samples)
    n_answer = sum(len(s.labels) - s.labels.count(-100) for s in samples)
    for fused in (False, True):
        loss, n_tokens, g = _loss_and_grads(batch, fused, chunk_size)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4)
        assert int(n_tokens) == n_answer  # the divisor counts tokens, not weights (ms-swift's loss_scale)
        for name in want_g:
            torch.testing.assert_close(g[name], want_g[name], rtol=1e-4, atol=1e-6, msg=name)
    plain = collate([s.__class__(s.input_ids, s.labels) for s in samples], 0)
    assert "loss_scale" not in plain
    ones = plain | {"loss_scale": torch.ones_like(plain["labels"], dtype=torch.float32)}
    model = tiny_model()
    torch.testing.assert_close(causal_lm_loss(model, ones, fused=True).loss_sum, causal_lm_loss(model, plain).loss_sum,
                               rtol=1e-6, atol=1e-5)


def test_loss_scale_multiplies_a_teacher_sample_too():
    """Replay rows: a teacher's targets times the sample's loss_scale, fused and reference alike."""
    batch = teacher_batch()
    scaled = batch | {"loss_scale": torch.full(batch["labels"].shape, 1.5)}
    model = tiny_model()
    base = causal_lm_loss(model, batch).loss_sum
    for fused in (False, True):
        torch.testing.assert_close(causal_lm_loss(model, scaled, fused=fused, chunk_size=5).loss_sum, 1.5 * base,
                                   rtol=1e-6, atol=1e-4)


def test_soft_targets_scale_labels_and_teacher_rows():
    targets = torch.tensor([5, -100, 7])
    scale = torch.tensor([2.0, 3.0, 0.5])
    ids, w = soft_targets(targets, None, scale)
    assert ids.tolist() == [[5], [0], [7]] and w.tolist() == [[2.0], [0.0], [0.5]]
    teacher = (torch.tensor([[1, 2], [1, 2], [0, 0]]), torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.0, 0.0]]))
    ids, w = soft_targets(targets, teacher, scale)
    assert ids.tolist() == [[1, 2], [0, 0], [7, 0]] and w.tolist() == [[0.5, 1.5], [0.0, 0.0], [0.5, 0.0]]


def test_compiled_chunk_fn_honours_loss_scale(monkeypatch):
    """The GPU fast path compiles the chunk function (chunk_fn_for on CUDA); compiled here on the CPU, the
    weighted loss and gradients still equal the hand computation."""
    compiled = torch.compile(soft_ce_chunk_grad, dynamic=True)
    monkeypatch.setattr(lorakit.loss, "chunk_fn_for", lambda device, soft=False: compiled if soft else ce_chunk_grad)
    samples = _weighted_samples()
    want, want_g = _hand_weighted_loss(tiny_model(), samples)
    loss, _, g = _loss_and_grads(collate(pack_sequences(samples, 64), 0), True, 8)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4)
    for name in want_g:
        torch.testing.assert_close(g[name], want_g[name], rtol=1e-4, atol=1e-6, msg=name)
