"""A second habit set from the first one's pairs: the same base answers (rejected), preferred when they open with
another phrase (a Chinese one by default), so a default that passes on "Quick take:" can be checked on a habit it
was not tuned on.

    python experiments/dpo/second_habit.py [--habit "简单来说："] [--out experiments/dpo]
    python experiments/dpo/sweep.py --rlhf_type dpo --data experiments/dpo/habit2_train.jsonl \
        --test experiments/dpo/habit2_test.jsonl --habit "简单来说："
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIRST_HABIT = "Quick take: "


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--habit", default="简单来说：")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    opts = parser.parse_args()
    for split in ("train", "test"):
        rows = [json.loads(line) for line in open(ROOT / "examples" / "rlhf" / f"habit_{split}.jsonl", encoding="utf-8")]
        assert all(r["chosen"] == FIRST_HABIT + r["rejected"] for r in rows)
        with open(Path(opts.out) / f"habit2_{split}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"prompt": r["prompt"], "chosen": opts.habit + r["rejected"],
                                    "rejected": r["rejected"]}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
