"""`lorakit sft` itself on the GPU: the Qwen2.5-7B architecture (random bf16 weights saved as
safetensors), packed rows of 4096 tokens, LoRA r16 on all linear layers, through the CLI.

Not a test: checks that the command a user runs gets the speed `bench/train_speed.py` measures
on the training step alone (that script calls prepare_for_training directly). Prints the
tokens/s the run logged.

    python bench/sft_gpu.py --out /tmp/sft-gpu [--steps 24]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from quickstart_gpu import QWEN7B, build  # noqa: E402


def write_rows(path: Path, n: int, words: int, seed: int = 0) -> None:
    """Question/answer rows of random English words (lengths vary, so packing has work to do)."""
    rng = random.Random(seed)
    vocab = ("model data train token answer question light river stone garden music number city "
             "learn write read small large quick slow bright dark open close start finish").split()
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            q = " ".join(rng.choice(vocab) for _ in range(rng.randint(10, 60)))
            a = " ".join(rng.choice(vocab) for _ in range(rng.randint(words // 4, words)))
            f.write(json.dumps({"query": q, "response": a}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/sft-gpu")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--lora_dropout", type=float, nargs="+", default=[0.05],
                        help="one run per value, same model and data (0.05: ms-swift's default, what tutorials leave)")
    opts = parser.parse_args()
    out = Path(opts.out)
    model = out / "qwen2.5-7b-random"
    build(model, QWEN7B)
    data = out / "rows.jsonl"
    write_rows(data, 600, 1200)
    medians = {}
    for dropout in opts.lora_dropout:
        medians[dropout] = run_sft(out, model, data, opts.steps, dropout)
    print(json.dumps({"median_tokens_per_second_by_lora_dropout": medians}))


def run_sft(out: Path, model: Path, data: Path, steps: int, dropout: float) -> float | None:
    """One `lorakit sft` run; returns the median logged tok/s after the first (compiling) window."""
    runs = out / f"runs-dropout{dropout:g}"
    command = [sys.executable, "-m", "lorakit", "sft", "--model", str(model), "--dataset", str(data), "--train_type", "lora",
               "--lora_rank", "16", "--lora_alpha", "32", "--max_length", "4096", "--packing", "true",
               "--per_device_train_batch_size", "1", "--max_steps", str(steps), "--lora_dropout", str(dropout), "--logging_steps", "4",
               "--save_steps", "100000", "--output_dir", str(runs), "--learning_rate", "1e-4"]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    log = sorted(runs.glob("v*/logging.jsonl"))[-1]
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steady = [r["tokens_per_second"] for r in records if "tokens_per_second" in r][1:]  # the first window compiles
    median = sorted(steady)[len(steady) // 2] if steady else None
    print(json.dumps({"lora_dropout": dropout, "records": records, "steady_tokens_per_second": steady,
                      "median": median}, indent=1), flush=True)
    return median


if __name__ == "__main__":
    main()
