"""LoRA's low-rank input product through dropout, with the mask made inside the kernels (GPU, Triton).

PEFT computes `lora_A(dropout(x))`: the dropped copy of x and its mask are written out in the forward and
read again in the backward, about 12 bytes of memory traffic per element of x where the product itself
needs 4 (x read once forward, once backward). Here the keep-mask is a hash of (seed, element index), so each
kernel makes the mask it needs in registers and nothing of x's size is stored:

    forward   xa = (x * keep / (1 - p)) A^T                                   [rows, r]
    backward  dA = dxa^T (x * keep / (1 - p))                                 [r, in]
              dx = (dxa A) * keep / (1 - p)   (the low-rank branch's share of x's gradient)

The hash is MurmurHash3's 32-bit finalizer of (element index * golden ratio + seed); an element is kept when
its hash is at least p * 2^32. `keep_mask` computes the same mask with torch ops: the reference the tests
compare the kernels with (on the CPU through Triton's interpreter). Each call draws its seed from torch's
generator on x's device, so runs are reproducible under torch.manual_seed and exact resume.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs; `available()` says so
    triton = None

GOLDEN = 0x9E3779B1
MIX1, MIX2 = 0x85EBCA6B, 0xC2B2AE35
MASK32 = 0xFFFFFFFF
# (rows, columns, warps) of each kernel's block: the fastest of bench/lora_dropout_gpu.py --sweep's shapes on an H200
# at 3584 and 18944 columns (2026-12-03: the three kernels 61.5 / 267 us per call, from 70.1 / 319 us)
BLOCKS = {"product": (32, 128, 4), "grad_x": (64, 128, 4), "grad_a": (32, 256, 8)}


def available() -> bool:
    return triton is not None


def fits(x: Tensor) -> bool:
    """The kernels can take x: Triton is here and its element offsets fit the kernels' int32 arithmetic
    (beyond that, a rare batch of over 2^31 activations per projection, the torch ops run instead)."""
    return available() and x.numel() < 2**31


def threshold(p: float) -> int:
    """Hashes below this are dropped: p of the 2^32 values."""
    return min(int(round(p * 2**32)), MASK32)


def keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> Tensor:
    """The kernels' keep-mask [rows, cols] computed with torch ops (int64 arithmetic kept to 32 bits)."""
    h = (torch.arange(rows * cols, dtype=torch.int64, device=device) * GOLDEN + seed) & MASK32
    h ^= h >> 16
    h = (h * MIX1) & MASK32
    h ^= h >> 13
    h = (h * MIX2) & MASK32
    h ^= h >> 16
    return (h >= threshold(p)).view(rows, cols)


if triton is not None:
    # what the kernels see (jit code reads only constexpr globals)
    _GOLDEN, _MIX1, _MIX2 = tl.constexpr(GOLDEN), tl.constexpr(MIX1), tl.constexpr(MIX2)

    @triton.jit
    def _keep(rows, cols, n_cols, seed, thr):
        h = (rows[:, None] * n_cols + cols[None, :]).to(tl.uint32) * _GOLDEN + seed
        h ^= h >> 16
        h *= _MIX1
        h ^= h >> 13
        h *= _MIX2
        h ^= h >> 16
        return h >= thr

    @triton.jit
    def _dot(a, b, EXACT: tl.constexpr):
        # Triton's CPU interpreter multiplies bf16 as raw bits: there (EXACT) the operands go in as fp32
        if EXACT:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _product_kernel(x_ptr, a_ptr, out_ptr, seed_ptr, n_rows, n_cols, rank, thr, scale,
                        BR: tl.constexpr, BC: tl.constexpr, RP: tl.constexpr, EXACT: tl.constexpr):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        ranks = tl.arange(0, RP)
        seed = tl.load(seed_ptr).to(tl.uint32)
        acc = tl.zeros((BR, RP), dtype=tl.float32)
        for c0 in range(0, n_cols, BC):
            cols = c0 + tl.arange(0, BC)
            inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
            x = tl.load(x_ptr + rows[:, None] * n_cols + cols[None, :], mask=inside, other=0.0)
            dropped = tl.where(_keep(rows, cols, n_cols, seed, thr), x.to(tl.float32) * scale, 0.0).to(x.dtype)
            a_t = tl.load(a_ptr + ranks[None, :] * n_cols + cols[:, None],
                          mask=(ranks[None, :] < rank) & (cols[:, None] < n_cols), other=0.0).to(x.dtype)
            acc += _dot(dropped, a_t, EXACT)
        tl.store(out_ptr + rows[:, None] * rank + ranks[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank))

    @triton.jit
    def _grad_a_kernel(dxa_ptr, x_ptr, ga_ptr, seed_ptr, n_rows, n_cols, rank, thr, scale, rows_per_split,
                       BR: tl.constexpr, BC: tl.constexpr, RP: tl.constexpr, EXACT: tl.constexpr):
        cols = tl.program_id(0) * BC + tl.arange(0, BC)
        first = tl.program_id(1) * rows_per_split
        last = tl.minimum(first + rows_per_split, n_rows)
        ranks = tl.arange(0, RP)
        seed = tl.load(seed_ptr).to(tl.uint32)
        acc = tl.zeros((RP, BC), dtype=tl.float32)
        for r0 in range(first, last, BR):
            rows = r0 + tl.arange(0, BR)
            inside = (rows[:, None] < last) & (cols[None, :] < n_cols)
            x = tl.load(x_ptr + rows[:, None] * n_cols + cols[None, :], mask=inside, other=0.0)
            dropped = tl.where(_keep(rows, cols, n_cols, seed, thr), x.to(tl.float32) * scale, 0.0).to(x.dtype)
            g_t = tl.load(dxa_ptr + rows[None, :] * rank + ranks[:, None],
                          mask=(ranks[:, None] < rank) & (rows[None, :] < last), other=0.0).to(x.dtype)
            acc += _dot(g_t, dropped, EXACT)
        tl.atomic_add(ga_ptr + ranks[:, None] * n_cols + cols[None, :], acc,
                      mask=(ranks[:, None] < rank) & (cols[None, :] < n_cols))

    @triton.jit
    def _grad_x_kernel(dxa_ptr, a_ptr, dx_ptr, seed_ptr, n_rows, n_cols, rank, thr, scale,
                       BR: tl.constexpr, BC: tl.constexpr, RP: tl.constexpr, EXACT: tl.constexpr):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        ranks = tl.arange(0, RP)
        seed = tl.load(seed_ptr).to(tl.uint32)
        g = tl.load(dxa_ptr + rows[:, None] * rank + ranks[None, :],
                    mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank), other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * n_cols + cols[None, :],
                    mask=(ranks[:, None] < rank) & (cols[None, :] < n_cols), other=0.0).to(g.dtype)
        d = _dot(g, a, EXACT)
        out = tl.where(_keep(rows, cols, n_cols, seed, thr), d * scale, 0.0)
        tl.store(dx_ptr + rows[:, None] * n_cols + cols[None, :], out.to(dx_ptr.dtype.element_ty),
                 mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


@torch.library.custom_op("lorakit::dropped_lora_a", mutates_args=())
def dropped_lora_a(x2: Tensor, lora_a: Tensor, seed: Tensor, p: float) -> Tensor:
    """(x2 * keep / (1 - p)) @ lora_a^T in x2's dtype; x2 [rows, in], lora_a [r, in] (any float dtype)."""
    x2, lora_a = x2.contiguous(), lora_a.contiguous()
    rows, cols = x2.shape
    rank = lora_a.shape[0]
    out = x2.new_empty(rows, rank)
    br, bc, warps = BLOCKS["product"]
    _product_kernel[(triton.cdiv(rows, br),)](x2, lora_a, out, seed, rows, cols, rank, threshold(p), 1.0 / (1.0 - p),
                                              BR=br, BC=bc, RP=_rank_block(rank), EXACT=_interpreted(), num_warps=warps)
    return out


@dropped_lora_a.register_fake
def _(x2, lora_a, seed, p):
    return x2.new_empty(x2.shape[0], lora_a.shape[0])


@torch.library.custom_op("lorakit::dropped_lora_a_backward", mutates_args=())
def dropped_lora_a_backward(dxa: Tensor, x2: Tensor, lora_a: Tensor, seed: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(dx2, d lora_a) of dropped_lora_a: dx2 in x2's dtype, d lora_a in lora_a's (accumulated in fp32)."""
    dxa, x2, lora_a = dxa.contiguous(), x2.contiguous(), lora_a.contiguous()
    rows, cols = x2.shape
    rank = lora_a.shape[0]
    thr, scale, rp = threshold(p), 1.0 / (1.0 - p), _rank_block(rank)
    dx = torch.empty_like(x2)
    br, bc, warps = BLOCKS["grad_x"]
    _grad_x_kernel[(triton.cdiv(rows, br), triton.cdiv(cols, bc))](dxa, lora_a, dx, seed, rows, cols, rank, thr, scale,
                                                                   BR=br, BC=bc, RP=rp, EXACT=_interpreted(),
                                                                   num_warps=warps)
    grad_a = torch.zeros(rank, cols, dtype=torch.float32, device=x2.device)
    br, bc, warps = BLOCKS["grad_a"]
    splits = max(1, min(triton.cdiv(rows, 256), 4 * _sm_count(x2.device) // triton.cdiv(cols, bc)))
    per_split = triton.cdiv(triton.cdiv(rows, splits), br) * br
    _grad_a_kernel[(triton.cdiv(cols, bc), triton.cdiv(rows, per_split))](
        dxa, x2, grad_a, seed, rows, cols, rank, thr, scale, per_split, BR=br, BC=bc, RP=rp, EXACT=_interpreted(),
        num_warps=warps)
    return dx, grad_a.to(lora_a.dtype)


@dropped_lora_a_backward.register_fake
def _(dxa, x2, lora_a, seed, p):
    return torch.empty_like(x2), torch.empty_like(lora_a)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _setup(ctx, inputs, output):
    x2, lora_a, seed, p = inputs
    ctx.save_for_backward(x2, lora_a, seed)
    ctx.p = p


def _backward(ctx, dxa):
    x2, lora_a, seed = ctx.saved_tensors
    dx, grad_a = dropped_lora_a_backward(dxa, x2, lora_a, seed, ctx.p)
    return dx, grad_a, None, None


dropped_lora_a.register_autograd(_backward, setup_context=_setup)


def new_seed(device: torch.device) -> Tensor:
    """A fresh mask seed drawn from torch's generator on `device` (one int32 tensor)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int32)


def lora_a_through_dropout(x: Tensor, lora_a: Tensor, p: float) -> Tensor:
    """lora_A(dropout(x)) with PEFT's meaning, as one kernel each way: x [..., in] -> [..., r]."""
    x2 = x.reshape(-1, x.shape[-1])
    return dropped_lora_a(x2, lora_a, new_seed(x.device), p).view(*x.shape[:-1], lora_a.shape[0])
