"""Fused LoRA linear equals PEFT's LoRA forward (values and gradients, fp32 on CPU)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lorakit.fast.lora import can_fuse, fuse_lora_layers, lora_linear, unfuse_lora_layers


class TwoLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(12, 20, bias=True)
        self.down = torch.nn.Linear(20, 12, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def peft_model(dropout: float = 0.0):
    torch.manual_seed(0)
    model = get_peft_model(TwoLinear(), LoraConfig(r=4, lora_alpha=12, target_modules=["up", "down"], lora_dropout=dropout))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would hide a wrong B path
            torch.nn.init.normal_(p, std=0.3)
    return model


def test_lora_linear_matches_formula():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 12, requires_grad=True)
    w, bias = torch.randn(20, 12), torch.randn(20)
    a = torch.randn(4, 12, requires_grad=True)
    b = torch.randn(20, 4, requires_grad=True)
    got = lora_linear(x, w, bias, a, b, 2.5)
    ref = x @ w.t() + bias + 2.5 * (x @ a.t()) @ b.t()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(ref)
    g_got = torch.autograd.grad(got, (x, a, b), dy)
    g_ref = torch.autograd.grad(ref, (x, a, b), dy)
    for u, v in zip(g_got, g_ref):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["function", "ops"])
def test_fused_peft_model_equals_peft_forward_and_grads(impl):
    x = torch.randn(3, 7, 12)
    results = []
    for fuse in (False, True):
        model = peft_model()
        if fuse:
            assert fuse_lora_layers(model, impl) == 2
        y = model(x)
        (y * torch.linspace(-1, 1, 12)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((y.detach(), grads))
    (y_ref, g_ref), (y, g) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert g.keys() == g_ref.keys() and len(g) == 4
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_unfuse_restores_peft_forward_and_dropout_is_not_fused():
    model = peft_model()
    fuse_lora_layers(model)
    unfuse_lora_layers(model)
    assert all("forward" not in vars(m) for m in model.modules())
    with_dropout = peft_model(dropout=0.1)
    assert not any(can_fuse(m) for m in with_dropout.modules())
    assert fuse_lora_layers(with_dropout) == 0
