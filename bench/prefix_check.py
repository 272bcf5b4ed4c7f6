"""A shared prefix run once in the packed row (rlhf's pair layout) against each row run whole, on the GPU path.

`lorakit rlhf` runs a pair's prompt once for both answers: prompt, chosen answer, rejected answer (and a replay
anchor row, which does not continue the prompt) as one packed row whose attention gathers the prompt's keys for
each answer (lorakit.fast.joined_prefix_hidden; varlen flash attention with its causal mask aligned at each
segment's end). This checks, with the layers as training runs them (fused LoRA, compiled, bf16), that every row's
hidden states and the LoRA gradients equal those of the rows run whole, one by one, and times the two. The CPU
test (tests/test_fast_prepare.py) checks the same against a plain transformers forward in fp32, through the
masked reference attention.

    python bench/prefix_check.py            # GPU: Qwen2.5-7B widths, 4 layers, 512-token prompt, 512/300 answers
    python bench/prefix_check.py --tiny     # CPU: the tiny twin
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lorakit.args import LoraArgs  # noqa: E402
from lorakit.fast import FastOptions, prepare_for_training  # noqa: E402
from lorakit.loss import hidden_states  # noqa: E402
from lorakit.tuners import attach_tuner, trainable_parameters  # noqa: E402
from qwen_arch import QWEN25_7B, TINY, build_random_qwen2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--answers", type=int, nargs=2, default=[512, 300])
    parser.add_argument("--anchor", type=int, default=64)
    opts = parser.parse_args()
    device = "cpu" if opts.tiny else "cuda"
    dtype = torch.float32 if opts.tiny else torch.bfloat16
    arch = TINY if opts.tiny else dict(QWEN25_7B, num_hidden_layers=opts.layers)
    torch.manual_seed(0)
    base = build_random_qwen2(arch, dtype, device, weight_std=0.02)
    model, _ = attach_tuner(base, LoraArgs(lora_rank=16, lora_alpha=32, lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # a trained-looking adapter: its gradients reach lora_A too
    model = prepare_for_training(model, FastOptions(torch_compile=not opts.tiny, gradient_checkpointing=False)).train()
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(100, arch["vocab_size"] - 100, (n,), generator=g)  # noqa: E731
    prompt, answers, anchor = rand(opts.prompt), [rand(n) for n in opts.answers], rand(opts.anchor)
    width = max(opts.answers + [opts.anchor])
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for r, row in enumerate(answers + [anchor]):
        ids[r, :row.numel()], mask[r, :row.numel()] = row, 1
    batch = {k: v.to(device) for k, v in {"prefix_ids": prompt[None], "input_ids": ids, "attention_mask": mask,
                                          "prefix_rows": torch.tensor([True, True, False])}.items()}
    weights = torch.randn(3, width, arch["hidden_size"], generator=g).to(device, dtype)
    params = trainable_parameters(model)

    def joined():
        hidden = hidden_states(model, batch)
        return [hidden[r, :n] for r, n in enumerate(opts.answers + [opts.anchor])]

    def whole():
        out = []
        for r, row in enumerate(answers + [anchor]):
            full = torch.cat([prompt, row]) if r < 2 else row
            hidden = hidden_states(model, {"input_ids": full[None].to(device)})[0]
            out.append(hidden[-row.numel():])
        return out

    def together():  # the rows whole, packed side by side (no prefix): the same sums in another order
        rows = [torch.cat([prompt, a]) for a in answers] + [anchor]
        ids = torch.zeros(3, max(r.numel() for r in rows), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, :row.numel()], mask[r, :row.numel()] = row, 1
        hidden = hidden_states(model, {"input_ids": ids.to(device), "attention_mask": mask.to(device)})
        return [hidden[r, row.numel() - k: row.numel()] for r, (row, k) in
                enumerate(zip(rows, opts.answers + [opts.anchor]))]

    results = {}
    for name, fn in (("joined", joined), ("whole", whole), ("together", together)):
        for _ in range(3):  # compile, then steady
            model.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            rows = fn()
            sum((h.float() * weights[r, :h.shape[0]].float()).sum() for r, h in enumerate(rows)).backward()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
        results[name] = ([h.detach().float() for h in rows], [p.grad.float().clone() for p in params], seconds)
    (hj, gj, tj), (hw, gw, tw) = results["joined"], results["whole"]
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp(min=1e-12)).item()  # noqa: E731
    per_row = [rel(a, b) for a, b in zip(hj, hw)]
    hidden_err = max(per_row)
    grad_err = rel(torch.cat([x.flatten() for x in gj]), torch.cat([x.flatten() for x in gw]))
    tokens = opts.prompt + sum(opts.answers) + opts.anchor
    print(f"rows: prompt {opts.prompt} + answers {opts.answers} (continuing it) + anchor {opts.anchor} (not); "
          f"{arch['num_hidden_layers']} layers, {dtype}, {device}")
    print(f"hidden states, relative error per row (answer, answer, anchor): "
          f"{', '.join(f'{e:.2e}' for e in per_row)}; LoRA gradients: {grad_err:.2e}")
    floor = [rel(a, b) for a, b in zip(results["together"][0], hw)]
    floor_grad = rel(torch.cat([x.flatten() for x in results["together"][1]]), torch.cat([x.flatten() for x in gw]))
    print(f"floor (the whole rows packed together, no prefix, vs one by one): {', '.join(f'{e:.2e}' for e in floor)}; "
          f"LoRA gradients: {floor_grad:.2e}")
    print(f"forward + backward: joined {tj * 1e3:.1f} ms ({tokens} tokens), rows whole {tw * 1e3:.1f} ms "
          f"({tokens + opts.prompt} tokens): {tw / tj:.2f}x")
    limit = 1e-5 if opts.tiny else 2 * max(floor + [floor_grad, 5e-3])  # bf16: within twice the floor
    ok = hidden_err < limit and grad_err < limit
    print(("PASS" if ok else "FAIL") + f" (limit {limit:g})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
