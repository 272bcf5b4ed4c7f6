"""pack_sequences (best-fit decreasing) and collate; the packed loss equals the unpacked loss."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from lorakit.data.packing import Packed, collate, pack_sequences
from lorakit.data.render import IGNORE_INDEX, Rendered

X = IGNORE_INDEX


def make_samples(lengths, seed=0, vocab=500):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(vocab) for _ in range(n)]
        prompt = rng.randrange(1, n)  # first `prompt` tokens carry no loss
        out.append(Rendered(input_ids=ids, labels=[X] * prompt + ids[prompt:]))
    return out


def test_best_fit_decreasing_bins():
    samples = make_samples([7, 5, 4, 3, 3, 2])
    packed = pack_sequences(samples, 10)
    # 7 -> bin0 (3 left); 5 -> bin1 (5 left); 4 -> bin1 (1 left); 3 -> bin0 (0 left); 3 -> bin2; 2 -> bin2.
    assert [p.lengths for p in packed] == [[7, 3], [5, 4], [3, 2]]
    assert packed[0].position_ids == list(range(7)) + list(range(3))
    assert packed[0].input_ids == samples[0].input_ids + samples[3].input_ids
    # Each sample's first label is masked; the rest are the sample's own labels.
    assert packed[0].labels == [X] + samples[0].labels[1:] + [X] + samples[3].labels[1:]
    # Every sample lands in exactly one bin and no bin overflows.
    assert sorted(n for p in packed for n in p.lengths) == sorted(len(s.input_ids) for s in samples)
    assert all(len(p.input_ids) <= 10 for p in packed)


def test_sample_longer_than_max_length_is_refused():
    with pytest.raises(ValueError, match="more than max_length"):
        pack_sequences(make_samples([12]), 10)


def test_collate_unpacked_and_packed():
    samples = make_samples([4, 2])
    batch = collate(samples, pad_token_id=0)
    assert batch["input_ids"].tolist()[1] == samples[1].input_ids + [0, 0]
    assert batch["labels"].tolist()[1] == samples[1].labels + [X, X]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert "position_ids" not in batch
    packed = [Packed(input_ids=[5, 6, 7], labels=[X, 6, 7], position_ids=[0, 1, 0], lengths=[2, 1]),
              Packed(input_ids=[8], labels=[X], position_ids=[0], lengths=[1])]
    batch = collate(packed, pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert batch["labels"].tolist() == [[X, 6, 7], [X, X, X]]
    assert "attention_mask" not in batch


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256,
    )
    return Qwen2ForCausalLM(config).float().eval()


def summed_loss(model, batch, **kwargs):
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False, **kwargs).logits
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=X)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=X, reduction="sum")
    return loss, int((targets != X).sum())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tiny_model, attn):
    tiny_model.config._attn_implementation = attn
    samples = make_samples([30, 17, 25, 9, 40, 12, 5], seed=1)
    with torch.no_grad():
        total, count = 0.0, 0
        for s in samples:
            loss, n = summed_loss(tiny_model, collate([s], pad_token_id=0))
            total, count = total + loss.item(), count + n
        unpacked = total / count

        packed_rows = pack_sequences(samples, 64)
        assert len(packed_rows) < len(samples)
        loss, n = summed_loss(tiny_model, collate(packed_rows, pad_token_id=0))
        assert n == count
        assert abs(loss.item() / n - unpacked) < 1e-5

        # The same rows without restarting positions leak attention across samples: the check can fail.
        leaky = collate(packed_rows, pad_token_id=0)
        leaky.pop("position_ids")
        loss, _ = summed_loss(tiny_model, leaky)
        assert abs(loss.item() / n - unpacked) > 1e-3


def test_packed_rows_padded_to_a_fixed_width_keep_the_loss(tiny_model):
    """collate(width=...) (packed rows on a GPU: one compiled shape): same loss and loss tokens, padding unlabelled."""
    tiny_model.config._attn_implementation = "sdpa"
    rows = pack_sequences(make_samples([30, 17, 25, 9, 40, 12, 5], seed=2), 64)
    natural, fixed = collate(rows, pad_token_id=0), collate(rows, pad_token_id=0, width=80)
    assert natural["input_ids"].shape[1] < 80 and fixed["input_ids"].shape == (len(rows), 80)
    w = natural["input_ids"].shape[1]
    assert fixed["labels"][:, w:].eq(X).all() and fixed["input_ids"][:, w:].eq(0).all()
    n = len(rows[0].input_ids)
    assert fixed["position_ids"][0, n:].tolist() == list(range(80 - n))  # the padding is a segment of its own
    with torch.no_grad():
        (a, n), (b, m) = summed_loss(tiny_model, natural), summed_loss(tiny_model, fixed)
    assert n == m and abs(a.item() - b.item()) < 1e-4 * n
    assert collate(rows, pad_token_id=0, width=8)["input_ids"].shape == natural["input_ids"].shape  # never cuts


def test_collate_carries_each_samples_loss_scale_token_by_token():
    a, b, c = make_samples([4, 2, 3])
    a.loss_scale, c.loss_scale = 2.0, 0.5
    assert "loss_scale" not in collate([b], 0)  # every scale 1: no tensor, the plain loss
    batch = collate([a, b], pad_token_id=0)
    assert batch["loss_scale"].dtype == torch.float32
    assert batch["loss_scale"].tolist() == [[2.0] * 4, [1.0] * 4]  # 1 on padding
    (row,) = pack_sequences([a, b, c], 16)
    assert row.lengths == [4, 3, 2] and row.loss_scales == [2.0, 0.5, 1.0]
    assert collate([row], 0, width=11)["loss_scale"].tolist() == [[2.0] * 4 + [0.5] * 3 + [1.0] * 2 + [1.0] * 2]
    assert pack_sequences([b], 16)[0].loss_scales is None


def test_shared_prefix_keeps_the_loss_scale():
    prefix = [7, 8, 9, 10, 11]
    a = Rendered(prefix + [1, 2], [X] * 5 + [1, 2], loss_scale=3.0)
    b = Rendered(prefix + [3, 4, 5], [X] * 5 + [3, 4, 5])
    batch = collate([a, b], 0, shared_prefix=True)
    assert batch["prefix_ids"].tolist() == [prefix[:4]]
    assert batch["loss_scale"].tolist() == [[3.0, 3.0, 3.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
