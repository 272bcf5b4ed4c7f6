"""Single-digit sums in GSM8K's shape (question / answer '#### N'), scored by the built-in `accuracy` reward.

SmolLM2-135M-Instruct gets about half right greedily but under a fifth when sampling at the rollouts'
temperature: it often 'adds' by looking for a common multiple. Held-out pairs never appear in training."""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

if __name__ == "__main__":
    pairs = [(a, b) for a in range(2, 10) for b in range(2, 10)]
    random.Random(0).shuffle(pairs)
    for name, group in (("sums_heldout.jsonl", pairs[:16]), ("sums_train.jsonl", pairs[16:])):
        with open(HERE / name, "w") as f:
            for a, b in group:
                f.write(json.dumps({"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n")
