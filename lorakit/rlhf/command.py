"""`lorakit rlhf`: preference training (DPO, ORPO, SimPO, KTO, CPO) on the sft loop; GRPO (lorakit.rlhf.grpo).

train_preference() = the starting policy (--adapters, else a fresh LoRA on --model) -> tokenizer ->
preference data and its report (before any weights load) -> weights -> the reference log-probs of
every example, in one no-grad pass while the model still is the starting policy -> the sft loop
(lorakit.loop) with the preference loss, pair batches and pairs as the normalising unit -> one PEFT
adapter on the base model, loaded by infer/eval/export/deploy like any checkpoint.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import torch

from lorakit import distributed
from lorakit.args import RlhfArgs
from lorakit.launch import refuse_several_processes
from lorakit.loop import fit, shares_prefix, start_run
from lorakit.model import CACHE_DIR, load_model, pick_device, pick_dtype
from lorakit.rlhf.anchor import ANCHOR_EVERY_PAIRS, anchor_answers, anchor_samples, describe_anchor
from lorakit.rlhf.check import format_preference_report
from lorakit.rlhf.data import (
    PreferenceData,
    RenderedPair,
    attach_anchors,
    collate_completions,
    collate_pairs,
    count_completions,
    count_pairs,
    load_preference_data,
    sub_batch,
)
from lorakit.rlhf.grpo import train_grpo
from lorakit.rlhf.objective import make_preference_loss_fn
from lorakit.rlhf.policy import load_policy_tokenizer, prepare_policy, starting_policy
from lorakit.rlhf.reference import precompute_reference_logps, sequence_logps
from lorakit.train import print_summary, resolved_args, seed_everything

# LoRA learning rates when --learning_rate is empty (docs/rlhf.md has the measurements behind them): ms-swift's
# LoRA rlhf rate 1e-4 where an anchor holds the model: DPO (reference + its NLL term) at 1e-4 beat 5e-5 on every
# figure of the habit set (habit 100% vs 71%, retention 86% vs 75%), and ORPO (whose odds-ratio term is weighted
# by beta 0.1) took no habit in an epoch at 5e-5. CPO and SimPO have no reference: at 1e-4 alone they drifted
# 2-3x further from the base than DPO and repeated the habit at later paragraphs; with the replay anchor on (their
# default) 1e-4 kept 40/44 general answers with the habit at 100% on two seeds, where 5e-5 with the anchor let
# their openings wander (33-36/44). KTO likewise: 5e-5 with the anchor lost the habit (0%), 1e-4 with it kept 40/44
# with the habit at 100% on two seeds (without the anchor, 5e-5: 38/44).
DEFAULT_LEARNING_RATE = {"dpo": 1e-4, "orpo": 1e-4, "simpo": 1e-4, "cpo": 1e-4, "kto": 1e-4}
FULL_FT_LR_FACTOR = 0.1
NEEDS_REFERENCE = ("dpo", "kto")  # ORPO, SimPO and CPO are reference-free
REFERENCE_BATCH = 8  # pairs per no-grad reference forward (no activations kept: wider is faster)


def fill_reference(model, data: PreferenceData, *, pad_id: int, device: torch.device, batch_size: int,
                   fused: bool, shared: bool) -> float:
    """Precompute the reference log-probs of every train and val example; returns the seconds it took.
    shared: the rows of a batch run their common start once (loop.shares_prefix)."""
    started = time.perf_counter()
    items = sorted(data.train + data.val, key=lambda x: x.length)  # alike lengths batched: less padding
    if items and isinstance(items[0], RenderedPair):
        def assign(chunk, batch, m):
            logps = sequence_logps(m, batch, fused=fused).tolist()
            for pair, c, r in zip(chunk, logps[:len(chunk)], logps[len(chunk):]):
                pair.ref_chosen, pair.ref_rejected = c, r

        # several pairs per forward share only their rows' common start; one pair per forward (its prompt run
        # once) measured slower on the H200 (0.065 s a pair in its call vs 0.050 at 8 pairs in the calls around it)
        precompute_reference_logps(model, items, lambda c: collate_pairs(c, pad_id, shared_prefix=shared, anchors=False), assign,
                                   batch_size=batch_size, device=device, fused=fused)
    else:
        def assign(chunk, batch, m):
            own = sequence_logps(m, {k: v for k, v in batch.items() if not k.startswith("kl_")}, fused=fused)
            has_kl = "kl_input_ids" in batch  # else every KL row is its own completion
            kl = sequence_logps(m, sub_batch(batch, "kl_"), fused=fused) if has_kl else own
            for item, a, b in zip(chunk, own.tolist(), kl.tolist()):
                item.ref, item.ref_kl = a, b

        precompute_reference_logps(model, items, lambda c: collate_completions(c, pad_id, shared_prefix=shared, anchors=False),
                                   assign, batch_size=batch_size, device=device, fused=fused)
    return time.perf_counter() - started


def add_anchor(model, tokenizer, data: PreferenceData, args: RlhfArgs, adapter) -> None:
    """--replay_kl: the starting policy's answers to the anchor prompts, one per ANCHOR_EVERY_PAIRS training pairs
    (KTO: per twice as many completions), weighted as many times (the same total as one per pair)."""
    log = lambda m: print(m, file=sys.stderr)
    answers = anchor_answers(model, tokenizer, system=data.system, cache_dir=CACHE_DIR / "replay", adapter=adapter,
                             log=log)
    attach_anchors(data.train, anchor_samples(answers), every=ANCHOR_EVERY_PAIRS * (2 if args.rlhf.rlhf_type == "kto" else 1))
    log(describe_anchor(answers, args.rlhf.replay_kl))


def learning_rate_for(args: RlhfArgs) -> float:
    """--learning_rate, else the per-type default (a tenth of it for full fine-tuning)."""
    if args.train.learning_rate is not None:
        return args.train.learning_rate
    lr = DEFAULT_LEARNING_RATE[args.rlhf.rlhf_type]
    return lr if args.lora.train_type == "lora" else lr * FULL_FT_LR_FACTOR


def train_preference(args: RlhfArgs, env: distributed.DistEnv | None = None):
    """Preference-train as `args` says; returns the loop's TrainResult (None after --dry_run).

    `env`: this process's place among several (lorakit.distributed.processes); None: one process.
    Every process precomputes the reference log-probs of all the data; the loop shares the steps."""
    started = time.perf_counter()
    env = env or distributed.DistEnv(device=pick_device(args.model.device))
    device = env.device
    dtype = pick_dtype(args.model.torch_dtype, device)
    start = starting_policy(args)
    tokenizer = load_policy_tokenizer(start, args)
    if args.data.system is None and start.adapter_args.system:
        args.data.system = start.adapter_args.system  # the SFT run's system prompt carries over
    data = load_preference_data(args.data, tokenizer, rlhf_type=args.rlhf.rlhf_type,
                                batch_size=args.train.per_device_train_batch_size, use_hf=args.model.use_hf,
                                template=None, log=lambda m: print(m, file=sys.stderr))
    print(format_preference_report(data, tokenizer), file=sys.stderr)
    if args.train.dry_run:
        print("--dry_run: data checked, stopping before loading weights.", file=sys.stderr)
        return None
    seed_everything(args.data.seed)
    model = load_model(start.model_path, torch_dtype=str(dtype).removeprefix("torch."), device=device,
                       attn_impl=args.model.attn_impl, quant=args.quant)
    model = prepare_policy(model, start, args, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if args.rlhf.replay_kl:
        add_anchor(model, tokenizer, data, args, start.adapter)
    if args.rlhf.rlhf_type in NEEDS_REFERENCE:
        seconds = fill_reference(model, data, pad_id=pad_id, device=device, fused=args.fast.fused_loss,
                                 batch_size=max(args.train.per_device_eval_batch_size, REFERENCE_BATCH),
                                 shared=shares_prefix(device, prefix_on_gpu=args.fast.packed_attention))
        print(f"reference log-probs of {len(data.train) + len(data.val)} examples precomputed in {seconds:.1f}s",
              file=sys.stderr)
    args.train.learning_rate = learning_rate_for(args)
    saved = resolved_args(args, model_path=start.model_path, tokenizer=tokenizer, system=data.system, device=device,
                          dtype=dtype, learning_rate=args.train.learning_rate)
    saved.update(command="rlhf", rlhf_type=args.rlhf.rlhf_type, adapters_start=str(start.adapter or ""))
    kto = args.rlhf.rlhf_type == "kto"
    par = distributed.wrap(model, env)  # DDP / FSDP2 under torchrun (after the reference pass, before the optimizer)
    run = start_run(args, model, tokenizer, data, saved_args=saved, device=device,
                    loss_fn=make_preference_loss_fn(args.rlhf, fused=args.fast.fused_loss),
                    collate_fn=collate_completions if kto else collate_pairs,
                    count_fn=count_completions if kto else count_pairs, name=f"rlhf {args.rlhf.rlhf_type}",
                    prefix_on_gpu=args.fast.packed_attention,  # a pair's prompt runs once: fast.joined_prefix_hidden
                    scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None,
                    par=par)
    result = fit(run)
    return replace(result, seconds=time.perf_counter() - started)


# --rlhf_type -> the function that trains it (grpo adds its own entry)
TRAINERS = {"dpo": train_preference, "orpo": train_preference, "simpo": train_preference, "cpo": train_preference,
            "kto": train_preference, "grpo": train_grpo}


def main(args: RlhfArgs) -> int:
    """`lorakit rlhf`."""
    trainer = TRAINERS[args.rlhf.rlhf_type]
    if trainer is not train_preference:  # a loop of its own (grpo): one process
        refuse_several_processes(f"--rlhf_type {args.rlhf.rlhf_type}", args.dist)
        result = trainer(args)
        if result is not None:
            print_summary(result, args)
        return 0
    with distributed.processes(args.dist, train_type=args.lora.train_type, device=args.model.device) as env:
        result = train_preference(args, env=env)
        if result is not None:
            print_summary(result, args)
    return 0
