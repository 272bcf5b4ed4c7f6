"""The in-kernel LoRA dropout (fast/lora_dropout.py) against PEFT's math on the same mask.

The Triton kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1 must be set before the
kernels are defined, so the checks run in one child process). fp32 inputs are compared exactly (up to
summation order); bf16 within a few bf16 steps, since the interpreter casts fp32 to bf16 by truncation
where a GPU rounds to nearest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECKS = r"""
import json, torch
import torch.nn.functional as F
from lorakit.fast import lora_dropout as ld

def reference(x, a, keep, p):
    # PEFT: lora_A(dropout(x)) with the given keep-mask
    return F.linear(torch.where(keep, x * (1 / (1 - p)), torch.zeros((), dtype=x.dtype)), a.to(x.dtype))

def rel(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()

out = {}
for name, rows, cols, rank, p, dtype in [("fp32 r8 ragged", 70, 96, 8, 0.3, torch.float32),
                                         ("fp32 r20 split rows", 600, 96, 20, 0.05, torch.float32),
                                         ("fp32 wide", 33, 300, 16, 0.1, torch.float32),
                                         ("bf16", 130, 200, 16, 0.05, torch.bfloat16)]:
    torch.manual_seed(0)
    x = torch.randn(rows, cols, dtype=dtype, requires_grad=True)
    a = (torch.randn(rank, cols) * 0.1).requires_grad_()
    grad = torch.randn(rows, rank, dtype=dtype)
    torch.manual_seed(7)
    got = ld.lora_a_through_dropout(x, a, p)
    got.backward(grad)
    torch.manual_seed(7)
    seed = int(ld.new_seed(torch.device("cpu")))
    keep = ld.keep_mask(seed, rows, cols, p)
    x2 = x.detach().clone().requires_grad_()
    a2 = a.detach().clone().requires_grad_()
    ref = reference(x2, a2, keep, p)
    ref.backward(grad)
    out[name] = {"keep_share": keep.float().mean().item(), "out": rel(got, ref), "dx": rel(x.grad, x2.grad),
                 "da": rel(a.grad, a2.grad), "da_dtype": str(a.grad.dtype), "out_dtype": str(got.dtype),
                 "dropped_grad_zero": bool((x.grad[~keep] == 0).all())}
# the same seed gives the same mask in forward and backward, another seed another mask
x = torch.randn(64, 64)
a = torch.randn(16, 64)
s1, s2 = torch.tensor([1], dtype=torch.int32), torch.tensor([2], dtype=torch.int32)
out["same_seed_same_output"] = bool(torch.equal(ld.dropped_lora_a(x, a, s1, 0.5), ld.dropped_lora_a(x, a, s1, 0.5)))
out["other_seed_other_output"] = not torch.equal(ld.dropped_lora_a(x, a, s1, 0.5), ld.dropped_lora_a(x, a, s2, 0.5))
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def checked():
    pytest.importorskip("triton", reason="Triton (a test dependency: pip install -e .[test]) runs the kernels")
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.parametrize("case", ["fp32 r8 ragged", "fp32 r20 split rows", "fp32 wide"])
def test_kernels_equal_peft_math_on_the_same_mask_fp32(checked, case):
    got = checked[case]
    assert got["out"] < 1e-6 and got["dx"] < 1e-6 and got["da"] < 1e-6, got
    assert got["da_dtype"] == "torch.float32" and got["out_dtype"] == "torch.float32"
    assert got["dropped_grad_zero"]


def test_kernels_in_bf16_keep_the_adapter_gradient_in_fp32(checked):
    got = checked["bf16"]
    assert got["out"] < 1e-2 and got["dx"] < 1e-2 and got["da"] < 1e-2, got
    assert got["out_dtype"] == "torch.bfloat16" and got["da_dtype"] == "torch.float32"


def test_mask_keeps_one_minus_p_and_follows_the_seed(checked):
    assert abs(checked["fp32 r20 split rows"]["keep_share"] - 0.95) < 0.005
    assert abs(checked["fp32 r8 ragged"]["keep_share"] - 0.7) < 0.02
    assert checked["same_seed_same_output"] and checked["other_seed_other_output"]


def test_keep_mask_is_the_murmur3_finalizer_of_the_index():
    from lorakit.fast.lora_dropout import GOLDEN, keep_mask, threshold

    def fmix32(h):  # MurmurHash3's finalizer, as published
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    mask = keep_mask(99, 3, 5, 0.4)
    expected = [[fmix32((i * 5 + j) * GOLDEN + 99 & 0xFFFFFFFF) >= threshold(0.4) for j in range(5)] for i in range(3)]
    assert mask.tolist() == expected
    assert threshold(0.0) == 0 and threshold(0.5) == 2**31


def test_kernels_refuse_inputs_whose_offsets_overflow_int32(monkeypatch):
    import torch

    from lorakit.fast import lora_dropout

    monkeypatch.setattr(lora_dropout, "available", lambda: True)
    assert lora_dropout.fits(torch.empty(4, 8))
    assert not lora_dropout.fits(torch.empty(2**16, 2**15, device="meta"))
