"""Benchmark: render + tokenise 100,000 alpaca rows (not a timed test).

    python bench/tokenize_speed.py [--rows 100000] [--num_proc 2] [--tokenizer tests/fixtures/qwen2.5-tokenizer]

Prints seconds for a cold run (no cache) and for a re-run served from the disk cache.
Target: under 60 s for 100k rows on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the model learns to answer questions about data training language people write code "
         "a small example with numbers 42 and 7 because it is useful when you explain things clearly "
         "数据 模型 训练 问题 回答").split()


def fake_rows(n: int, seed: int = 0) -> list[dict]:
    """Alpaca rows of realistic length: ~15-word instruction, optional input, ~40-150-word output."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"instruction": text(5, 25), "input": text(0, 30) if rng.random() < 0.4 else "",
             "output": text(40, 150)} for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--tokenizer", default=str(ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"))
    opts = parser.parse_args()

    from transformers import AutoTokenizer

    from lorakit.args import DataArgs
    from lorakit.data.loading import build_datasets

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LORAKIT_CACHE"] = str(Path(tmp) / "cache")
        path = Path(tmp) / "alpaca.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for row in fake_rows(opts.rows):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tokenizer = AutoTokenizer.from_pretrained(opts.tokenizer)
        args = DataArgs(dataset=[str(path)], dataset_num_proc=opts.num_proc, split_dataset_ratio=0.0)
        quiet = lambda m: None  # noqa: E731

        t0 = time.perf_counter()
        data = build_datasets(args, tokenizer, log=quiet)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = build_datasets(args, tokenizer, log=quiet)
        warm = time.perf_counter() - t0

    assert again.reports[0].cache_hit and len(again.train) == len(data.train)
    tokens = sum(len(s.input_ids) for s in data.train)
    print(f"{opts.rows} alpaca rows, {tokens} tokens, num_proc={opts.num_proc}, cpus={os.cpu_count()}")
    print(f"cold (render + tokenise): {cold:.1f} s ({opts.rows / cold:,.0f} rows/s)")
    print(f"re-run from disk cache:   {warm:.1f} s")


if __name__ == "__main__":
    main()
