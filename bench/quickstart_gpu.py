"""Time `lorakit quickstart` on a GPU with the 7B architecture (random weights saved as safetensors).

Not a test: run on the lent GPU. Builds Qwen2.5-7B-Instruct's architecture with random bf16
weights and the Qwen2.5 tokenizer fixture into a local folder (so the real loading path is
timed), then runs the quickstart flow on it and prints the per-stage times. Random weights never
end an answer (every replay answer is cut at its length) and learn no identity: this measures
time, not quality. `--replay 320` is quickstart's default (all 310 built-in prompts).
Also runs the flow unchanged on a tiny random Qwen2 first (the same code path, seconds).

    python bench/quickstart_gpu.py --out /tmp/qs-gpu [--skip_7b]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"

QWEN7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
              rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
              pad_token_id=151643)
TINY = dict(QWEN7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=151936)


def build(folder: Path, settings: dict) -> float:
    """Random-weight Qwen2 saved as bf16 safetensors with the tokenizer; returns seconds."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    started = time.perf_counter()
    if (folder / "config.json").is_file():
        return 0.0
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**settings), dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    for f in TOKENIZER.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, folder / f.name)
    del model
    torch.cuda.empty_cache()
    return time.perf_counter() - started


def run(folder: Path, out: Path, replay: int) -> dict:
    from lorakit.args import DataArgs, ModelArgs, QuickstartArgs, RecipeArgs, TrainArgs
    from lorakit.quickstart import quickstart

    started = time.perf_counter()
    report = quickstart(QuickstartArgs(model=ModelArgs(model=str(folder)),
                                       data=DataArgs(model_name=["Lumen"], model_author=["Acme Labs"]),
                                       recipe=RecipeArgs(replay=replay), train=TrainArgs(output_dir=str(out))))
    return {"wall_s": time.perf_counter() - started, "timings": report.timings, "after": report.after,
            "recipe": report.recipe, "max_memory_gb": torch.cuda.max_memory_allocated() / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/qs-gpu")
    parser.add_argument("--replay", type=int, default=64)
    parser.add_argument("--skip_7b", action="store_true")
    opts = parser.parse_args()
    out = Path(opts.out)
    results = {}
    tiny = out / "tiny-qwen2"
    build(tiny, TINY)
    results["tiny"] = run(tiny, out / "runs", opts.replay)
    if not opts.skip_7b:
        big = out / "qwen2.5-7b-random"
        results["build_7b_s"] = build(big, QWEN7B)
        results["7b"] = run(big, out / "runs", opts.replay)
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
