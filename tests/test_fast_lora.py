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


def test_unfuse_restores_peft_forward():
    model = peft_model()
    fuse_lora_layers(model)
    unfuse_lora_layers(model)
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("impl", ["function", "ops"])
def test_fused_lora_dropout_equals_peft_with_the_same_mask(impl):
    """PEFT drops the LoRA branch's input only; the fused path draws the same mask from the same seed."""
    x = torch.randn(3, 7, 12)
    results = []
    for fuse in (False, True):
        model = peft_model(dropout=0.3)
        assert all(can_fuse(m) for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))
        if fuse:
            assert fuse_lora_layers(model, impl) == 2
        torch.manual_seed(123)
        y = model(x)
        (y * torch.linspace(-1, 1, 12)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((y.detach(), grads))
    (y_ref, g_ref), (y, g) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-6, msg=name)
    undropped = peft_model(dropout=0.0)(x)
    assert not torch.allclose(y, undropped, atol=1e-3)  # the mask really dropped something


def test_fused_lora_dropout_input_gradient_passes_the_mask():
    torch.manual_seed(1)
    x = torch.randn(4, 12, requires_grad=True)
    w, a, b = torch.randn(20, 12), torch.randn(4, 12, requires_grad=True), torch.randn(20, 4, requires_grad=True)
    torch.manual_seed(7)
    got = lora_linear(x, w, None, a, b, 2.0, dropout_p=0.5)
    torch.manual_seed(7)
    keep = torch.empty_like(x).bernoulli_(0.5)
    ref = x @ w.t() + 2.0 * ((x * keep / 0.5) @ a.t()) @ b.t()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(ref)
    for u, v in zip(torch.autograd.grad(got, (x, a, b), dy), torch.autograd.grad(ref, (x, a, b), dy)):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_eval_mode_fused_lora_applies_no_dropout():
    x = torch.randn(3, 7, 12)
    model = peft_model(dropout=0.5).eval()
    ref = model(x)
    fuse_lora_layers(model)
    torch.testing.assert_close(model(x), ref)


def test_fast_path_line_names_what_is_off_and_why():
    from lorakit.fast import FastOptions, describe_fast_paths

    model = peft_model(dropout=0.1)
    line = describe_fast_paths(model, FastOptions(), torch.device("cuda"))
    assert "fused LoRA on 2/2 layers" in line and "torch.compile on" in line
    model.base_model.model.up.base_layer.weight.requires_grad_(True)
    line = describe_fast_paths(model, FastOptions(torch_compile=False), torch.device("cuda"))
    assert "fused LoRA on 1/2 layers (not fused: 1 with trainable base weights)" in line
    assert "torch.compile off (--torch_compile false)" in line
    assert "off on cpu" in describe_fast_paths(model, None, torch.device("cpu"))


def test_fast_path_line_says_when_lora_dropout_cannot_use_its_kernels(monkeypatch):
    from lorakit.fast import FastOptions, describe_fast_paths, lora_dropout

    monkeypatch.setattr(lora_dropout, "available", lambda: False)
    line = describe_fast_paths(peft_model(dropout=0.1), FastOptions(), torch.device("cuda"))
    assert "(LoRA dropout through torch ops, which store its mask: Triton is not installed)" in line
    assert "Triton" not in describe_fast_paths(peft_model(dropout=0.0), FastOptions(), torch.device("cuda"))
    monkeypatch.setattr(lora_dropout, "available", lambda: True)
    assert "Triton" not in describe_fast_paths(peft_model(dropout=0.1), FastOptions(), torch.device("cuda"))
