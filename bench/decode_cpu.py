"""CPU decode benchmark: the reference decoder's in-place KV buffers against its DynamicCache path.

Real SmolLM2-135M-Instruct in float32 (as `lorakit quickstart` runs it), the built-in general prompts
rendered with the chat template and its default system prompt (~44 tokens), greedy, through
`Engine(fast=False).generate` (continuous batching: a finished row takes the next prompt). Both
decoders run in the same process, one after the other, and must pick the same tokens. Prints
tokens/s (generated tokens over wall time, prefill included) per decoder and batch size.

    python bench/decode_cpu.py                               # 300 prompts x 32 tokens, batch 64 and 128
    python bench/decode_cpu.py --prompts 310 --new 16 --batch 64 128 310 --only new
    python bench/decode_cpu.py --profile 128                 # operator breakdown of decode steps at batch 128
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorakit.infer import engine as engine_module  # noqa: E402
from lorakit.infer.engine import Engine, SamplingParams  # noqa: E402


@contextlib.contextmanager
def decoder_path(in_place: bool):
    """Make the engine build its reference decoder with (new) or without (old) the in-place buffers."""
    original = engine_module.ReferenceDecoder
    engine_module.ReferenceDecoder = functools.partial(original, in_place=in_place)
    try:
        yield
    finally:
        engine_module.ReferenceDecoder = original


def load(prompts: int):
    from lorakit.data.render import render_prompt
    from lorakit.model import default_model_path, load_model, load_tokenizer
    from lorakit.replay import pick_prompts

    path = default_model_path()
    tokenizer = load_tokenizer(path)
    model = load_model(path, torch_dtype="float32")
    texts = pick_prompts(prompts)
    ids = [render_prompt(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    return model, tokenizer, ids


def run(model, tokenizer, prompts, new_tokens: int, batch: int, in_place: bool) -> tuple[float, list[list[int]]]:
    """Seconds for one generate call, and the replies' tokens."""
    engine = Engine(model, tokenizer, fast=False, max_batch_size=batch)
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    with decoder_path(in_place):
        start = time.perf_counter()
        gens = engine.generate(prompts, params)
        seconds = time.perf_counter() - start
    return seconds, [g.token_ids for g in gens]


def profile(model, tokenizer, prompts, batch: int, in_place: bool) -> None:
    """Operator table over 8 decode steps of a full batch."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    engine = Engine(model, tokenizer, fast=False, max_batch_size=batch)
    with decoder_path(in_place):
        running = engine.batch(batch, length=max(len(p) for p in prompts[:batch]) + 40)
    for p in prompts[:batch]:
        running.add(p, SamplingParams(max_new_tokens=40, stop_token_ids=()))
    for _ in range(4):
        running.step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(8):
            running.step()
        seconds = (time.perf_counter() - start) / 8
    print(f"{'new' if in_place else 'old'} decoder, batch {len(running)}: {seconds * 1e3:.0f} ms per step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--new", type=int, default=32, help="max new tokens per prompt")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--only", choices=["old", "new"], help="time one decoder only (no token check)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--profile", type=int, default=0, metavar="BATCH", help="profile decode steps instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, prompts = load(args.prompts)
    width = sum(map(len, prompts)) / len(prompts)
    print(f"SmolLM2-135M-Instruct float32, {torch.get_num_threads()} threads, {len(prompts)} prompts "
          f"(mean {width:.1f} tokens), up to {args.new} new tokens, greedy")
    paths = {"old": [False], "new": [True]}.get(args.only, [False, True])
    if args.profile:
        for in_place in paths:
            profile(model, tokenizer, prompts, args.profile, in_place)
        return
    for batch in args.batch:
        replies = {}
        for in_place in paths:
            seconds, replies[in_place] = run(model, tokenizer, prompts, args.new, batch, in_place)
            tokens = sum(len(r) for r in replies[in_place])
            print(f"batch {batch:4d}  {'new' if in_place else 'old'}: {seconds:6.1f} s  {tokens} tokens  "
                  f"{tokens / seconds:6.1f} tok/s", flush=True)
        if len(replies) == 2:
            same = sum(a == b for a, b in zip(replies[False], replies[True]))
            print(f"batch {batch:4d}  identical replies: {same} of {len(prompts)}", flush=True)


if __name__ == "__main__":
    main()
