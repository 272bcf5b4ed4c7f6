"""Packed attention: segment boundaries, and the masked reference equals per-sample SDPA."""

import torch
import torch.nn.functional as F

from lorakit.fast.attention import masked_attention, packed_attention_forward, packed_boundaries


def test_packed_boundaries_from_positions_rows_and_padding():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert packed_boundaries(pos, (2, 6)).tolist() == [0, 3, 5, 6, 12]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    assert packed_boundaries(pos, (2, 6), mask).tolist() == [0, 3, 5, 6, 10, 12]
    assert packed_boundaries(None, (2, 3)).tolist() == [0, 3, 6]


def test_masked_attention_equals_each_sample_alone_with_gqa():
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    n, hq, hkv, d = sum(lengths), 4, 2, 8
    q, k, v = torch.randn(n, hq, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    got = masked_attention(q, k, v, cu, scale=0.3)
    start = 0
    for length in lengths:
        sl = slice(start, start + length)
        qs = q[sl].transpose(0, 1)[None]
        ks = k[sl].repeat_interleave(2, 1).transpose(0, 1)[None]
        vs = v[sl].repeat_interleave(2, 1).transpose(0, 1)[None]
        ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=0.3)[0].transpose(0, 1)
        torch.testing.assert_close(got[sl], ref, rtol=1e-5, atol=1e-6)
        start += length


def test_interface_shapes_and_default_rows():
    torch.manual_seed(0)
    b, hq, hkv, t, d = 2, 4, 2, 6, 8
    q, k, v = torch.randn(b, hq, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    out, weights = packed_attention_forward(None, q, k, v, None, scaling=0.5)
    assert weights is None and out.shape == (b, t, hq, d)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
