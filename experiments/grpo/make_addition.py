"""Two-digit addition prompts in GSM8K's shape (question / answer ending '#### N') for the GRPO acceptance run.

The base SmolLM2-135M-Instruct answers about one in ten of these right (greedy): it often 'adds' by looking for
a common multiple and runs out of tokens. Train and held-out sets are drawn with different seeds, no overlap.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def rows(seed: int, n: int, avoid: set) -> list[dict]:
    rng, out = random.Random(seed), []
    while len(out) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if (a, b) in avoid:
            continue
        avoid.add((a, b))
        out.append({"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return out


if __name__ == "__main__":
    seen: set = set()
    for name, seed, n in (("addition_train.jsonl", 0, 400), ("addition_heldout.jsonl", 1, 48)):
        with open(HERE / name, "w") as f:
            for row in rows(seed, n, seen):
                f.write(json.dumps(row) + "\n")
