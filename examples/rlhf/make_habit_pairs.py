"""Build the `habit` preference set: the base model's own answers, preferred when they open with a fixed phrase.

chosen   = HABIT + the base model's greedy answer
rejected = the same answer without it
So the pair differs in one visible habit only, and the answers stay the model's own (DPO then moves
little else). Prompts: the English built-in general prompts (lorakit/data/builtin/general_prompts.jsonl),
every fourth one held out for testing.

    python examples/rlhf/make_habit_pairs.py [--model PATH] [--out examples/rlhf]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HABIT = "Quick take: "
MAX_NEW_TOKENS = 48


def trim(text: str) -> str:
    """The answer up to its last complete sentence (greedy answers are cut at MAX_NEW_TOKENS)."""
    text = text.strip()
    ends = [m.end() for m in re.finditer(r"[.!?](\s|$)", text)]
    return text[:ends[-1]].strip() if ends and ends[-1] > 20 else text


def main() -> None:
    from lorakit.data.render import render_prompt
    from lorakit.infer.engine import Engine, SamplingParams
    from lorakit.model import load_model, load_tokenizer, resolve_model_path

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=str(ROOT / "examples" / "rlhf"))
    opts = parser.parse_args()
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "lorakit/data/builtin/general_prompts.jsonl").open()
               if json.loads(line)["lang"] == "en"]
    path = resolve_model_path(opts.model)
    tokenizer, model = load_tokenizer(path), load_model(path, torch_dtype="float32", device="cpu")
    engine = Engine(model, tokenizer)
    ids = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    answers = [trim(g.text) for g in engine.generate(ids, SamplingParams(max_new_tokens=MAX_NEW_TOKENS))]
    out = Path(opts.out)
    with open(out / "habit_train.jsonl", "w") as train, open(out / "habit_test.jsonl", "w") as test:
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            row = {"prompt": prompt, "chosen": HABIT + answer, "rejected": answer}
            (test if i % 4 == 3 else train).write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
