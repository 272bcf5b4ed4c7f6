"""Where the replay anchor's GPU time goes: one DPO step with and without its anchor row (joined to the pair's
forward, as the command runs it), and the anchor's own forward + backward alone, on the 7B architecture (random
weights), with a profile of the anchor alone. Run on the H200 (2026-12-04), before the anchor rows joined the pair's
forward: the anchor alone took ~17 ms of GPU work and ~160 ms of CPU time (28 compiled layers' launches and cache
lookups), so a separate short forward leaves the GPU idle; joined, it costs only its tokens.

    TORCH_LOGS=recompiles,graph_breaks python experiments/dpo/anchor_probe.py [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from dpo_gpu import random_anchor_answers, random_pairs, synchronize  # noqa: E402

from lorakit.args import LoraArgs, RlhfGroup  # noqa: E402
from lorakit.rlhf.anchor import anchor_kl, anchor_samples  # noqa: E402
from lorakit.data.packing import collate  # noqa: E402
from lorakit.rlhf.data import attach_anchors, collate_pairs  # noqa: E402
from lorakit.rlhf.objective import make_preference_loss_fn  # noqa: E402
from lorakit.tuners import attach_tuner  # noqa: E402
from qwen_arch import QWEN25_7B, TINY, build_random_qwen2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    opts = parser.parse_args()
    device = "cpu" if opts.smoke else "cuda"
    arch, n = (dict(TINY, vocab_size=151936), 32) if opts.smoke else (QWEN25_7B, 512)
    base = build_random_qwen2(arch, torch.float32 if opts.smoke else torch.bfloat16, device, weight_std=0.02)
    model, _ = attach_tuner(base, LoraArgs(lora_rank=16, lora_alpha=32, lora_dropout=0.0))
    if not opts.smoke:
        from lorakit.fast import FastOptions, prepare_for_training
        model = prepare_for_training(model, FastOptions())
    model.train()
    pairs = random_pairs(4, n, n, arch["vocab_size"])
    for p in pairs:
        p.ref_chosen, p.ref_rejected = -1000.0, -1000.0
    attach_anchors(pairs, anchor_samples(random_anchor_answers(48, arch["vocab_size"])), every=1)
    batch = {k: v.to(device) for k, v in collate_pairs(pairs[:1], 0).items()}
    plain = {k: v.to(device) for k, v in collate_pairs(pairs[:1], 0, anchors=False).items()}
    anchor = {k: v.to(device) for k, v in collate([pairs[0].anchor], 0).items()}
    with_anchor = make_preference_loss_fn(RlhfGroup(rlhf_type="dpo", replay_kl=3.0))
    without = make_preference_loss_fn(RlhfGroup(rlhf_type="dpo", replay_kl=0.0))

    def timed(name, fn):
        for i in range(opts.reps + 2):
            synchronize(device)
            t = time.perf_counter()
            fn()
            synchronize(device)
            dt = time.perf_counter() - t
            print(f"{name} call {i}: {dt * 1000:.1f} ms", flush=True)

    one_pad = {k: v.to(device) for k, v in collate_pairs(pairs[:1], 0, anchors=False).items()}
    one_pad = {k: torch.nn.functional.pad(v, (0, 1)) if k in ("input_ids", "attention_mask") else v
               for k, v in one_pad.items()}  # one padding column: the rows go through the layers unpadded, joined
    one_pad["labels"] = torch.nn.functional.pad(one_pad["labels"], (0, 1), value=-100)
    timed("pair step, no anchor", lambda: without(model, plain).loss_sum.backward())
    timed("pair step, no anchor, joined into one row", lambda: without(model, one_pad).loss_sum.backward())
    timed("anchor alone fwd+bwd", lambda: anchor_kl(model, anchor).sum().backward())
    timed("anchor alone fwd no grad", lambda: torch.no_grad()(anchor_kl)(model, anchor))
    timed("pair step with anchor", lambda: with_anchor(model, batch).loss_sum.backward())
    if not opts.smoke:
        from torch.profiler import ProfilerActivity, profile
        for name, fn in (("pair step, no anchor", lambda: without(model, plain).loss_sum.backward()),
                         ("pair step with anchor", lambda: with_anchor(model, batch).loss_sum.backward())):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                synchronize(device)
            print(name)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))

if __name__ == "__main__":
    main()
