"""Per-sequence log-probs equal a plain transformers forward; the chunked head's gradients equal the reference's;
the reference policy is the starting policy, recovered without a second copy of the base."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit.args import LoraArgs
from lorakit.data.render import Rendered
from lorakit.rlhf.data import RenderedPair, collate_pairs
from lorakit.rlhf.logps import chunked_token_logps, reference_token_logps, token_logps
from lorakit.rlhf.reference import ReferencePolicy, sequence_logps
from lorakit.tuners import attach_tuner

IGNORE = -100


@pytest.fixture(scope="module")
def model(tiny_qwen2_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float64).eval()


def _pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> RenderedPair:
    def side(answer):
        return Rendered(input_ids=prompt + answer, labels=[IGNORE] * len(prompt) + answer)
    return RenderedPair(side(chosen), side(rejected), "test:1")


PAIRS = [_pair([9, 8, 7, 6, 5, 4, 3], [100, 200, 300], [400, 500]),
         _pair([9, 8, 7, 6, 5, 4, 11, 12], [600], [700, 800, 900, 1000])]


def plain_sequence_logps(model, ids: list[int], labels: list[int]) -> float:
    """sum of log p(label_t | ids_<t) from the model's own logits."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[t - 1, labels[t]]) for t in range(1, len(ids)) if labels[t] != IGNORE)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_sequence_logps_equal_a_plain_forward(model, fused, shared_prefix):
    for pairs in ([PAIRS[0]], PAIRS):
        batch = collate_pairs(pairs, 0, shared_prefix=shared_prefix)
        assert ("prefix_ids" in batch) == shared_prefix
        got = sequence_logps(model, batch, fused=fused)
        rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        expected = [plain_sequence_logps(model, r.input_ids, r.labels) for r in rows]
        torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_token_logps_counts_answer_tokens(model):
    out = token_logps(model, collate_pairs(PAIRS, 0), fused=True)
    assert out.count().tolist() == [3, 1, 2, 4]


def test_chunked_head_values_and_gradients_equal_reference():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    upstream = torch.randn(37, dtype=torch.float64)
    ref = reference_token_logps(hidden, weight, targets, bias)
    grads_ref = torch.autograd.grad((ref.double() * upstream).sum(), (hidden, weight, bias))
    got = chunked_token_logps(hidden, weight, targets, bias, chunk_size=8)
    grads = torch.autograd.grad((got.double() * upstream).sum(), (hidden, weight, bias))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_reference_policy_restores_the_starting_adapter(tiny_qwen2_dir):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    peft_model, _ = attach_tuner(base, LoraArgs(lora_rank=4, lora_dropout=0.0))
    batch = collate_pairs(PAIRS, 0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():  # a "loaded SFT adapter": non-zero B
            if "lora_B" in name:
                p.normal_(0, 0.5)
    start = sequence_logps(peft_model, batch)
    reference = ReferencePolicy(peft_model)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():  # training moved the adapter
            if "lora_" in name:
                p.add_(0.3)
    moved = sequence_logps(peft_model, batch)
    assert not torch.allclose(moved, start, atol=1e-3)
    peft_model.train()
    with reference.active():
        torch.testing.assert_close(sequence_logps(peft_model, batch), start, rtol=1e-6, atol=1e-6)
    assert peft_model.training
    torch.testing.assert_close(sequence_logps(peft_model, batch), moved)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    kept = sum(t.numel() for t in reference.initial)
    assert kept == sum(p.numel() for p in trainable) < sum(p.numel() for p in peft_model.parameters()) / 10
