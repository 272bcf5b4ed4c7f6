"""Did preference training teach the habit, on prompts it never saw, without breaking the answers?

For a checkpoint of `lorakit rlhf` trained on habit_train.jsonl, on the held-out habit_test.jsonl:
- reward accuracy: share of held-out pairs whose chosen answer gains more log-probability over the
  reference (the adapter switched off, i.e. the base) than the rejected one;
- habit: share of greedy answers that open with the habit phrase, for the tuned model and the base;
- answered: share of habit answers that say the phrase once and then go on with a real answer
  (three words or more, numbers counted, the phrase not repeated): the "Quick take: Quick take:" and
  "Quick take:" + nothing collapses fail it, the base's own "Half of 250 is 100." passes;
  answered_5_words is the older, stricter figure (five words of letters: it failed that answer too);
- retention: `lorakit eval`'s figure (the same evaluate(): of the built-in general questions the
  base answers correctly, the share the tuned model still answers correctly), unless --no_retention.
Prints one JSON object.

    python examples/rlhf/check_habit.py --adapters output/v0-.../checkpoint-N [--test examples/rlhf/habit_test.jsonl]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
HABIT = "Quick take:"


def answered(text: str, habit: str = HABIT, *, word: str = r"\w+", words: int = 3) -> bool:
    """The habit once, then a real answer (`words` matches of `word` or more)."""
    rest = text.strip()[len(habit):]
    return text.strip().startswith(habit) and habit not in rest and len(re.findall(word, rest)) >= words


def main() -> None:
    from lorakit.checkpoint import load_checkpoint
    from lorakit.data.render import render_prompt
    from lorakit.infer.engine import Engine, SamplingParams
    from lorakit.rlhf.data import collate_pairs, load_preference_data
    from lorakit.rlhf.reference import sequence_logps
    from lorakit.args import DataArgs
    from lorakit.evaluate import evaluate
    from lorakit.model import CACHE_DIR

    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", required=True)
    parser.add_argument("--test", default=str(HERE / "habit_test.jsonl"))
    parser.add_argument("--habit", default=HABIT)
    parser.add_argument("--max_new_tokens", type=int, default=40)
    parser.add_argument("--no_retention", action="store_true", help="skip the lorakit eval retention figure")
    opts = parser.parse_args()
    loaded = load_checkpoint(opts.adapters, torch_dtype="float32", device="cpu")
    model, tokenizer, system = loaded.model, loaded.tokenizer, loaded.args.get("system")
    pairs = load_preference_data(DataArgs(dataset=[opts.test], system=system), tokenizer, rlhf_type="dpo",
                                 batch_size=1, log=lambda m: None).train
    rows = [json.loads(line) for line in open(opts.test)]
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}], system=system) for r in rows]
    params = SamplingParams(max_new_tokens=opts.max_new_tokens)
    correct = 0
    with torch.no_grad():
        for pair in pairs:
            batch = collate_pairs([pair], tokenizer.pad_token_id or 0)
            policy = sequence_logps(model, batch)
            with model.disable_adapter():
                reference = sequence_logps(model, batch)
            margin = (policy[0] - reference[0]) - (policy[1] - reference[1])
            correct += int(margin > 0)
        tuned = [g.text for g in Engine(model, tokenizer).generate(prompts, params)]
        with model.disable_adapter():
            base = [g.text for g in Engine(model, tokenizer).generate(prompts, params)]
    habit = [t.strip().startswith(opts.habit) for t in tuned]
    retention = None
    if not opts.no_retention:  # lorakit eval's figure, its base answers cached as eval caches them
        retention = evaluate(model, tokenizer, name="-", author="-", system=system, probes_per_lang=0,
                             other_systems=False, cache_dir=CACHE_DIR / "quickstart")
    report = {
        "checkpoint": str(loaded.path), "held_out_pairs": len(pairs),
        "reward_accuracy": round(correct / max(len(pairs), 1), 4),
        "habit_tuned": round(sum(habit) / len(tuned), 4),
        "habit_base": round(sum(t.strip().startswith(opts.habit) for t in base) / len(base), 4),
        "answered_after_habit": round(sum(answered(t, opts.habit) for t in tuned) / max(sum(habit), 1), 4),
        "answered_5_words": round(sum(answered(t, opts.habit, word=r"[A-Za-z]{2,}", words=5) for t in tuned)
                                  / max(sum(habit), 1), 4),
        "retention": None if retention is None else round(retention.retention, 4),
        "retention_kept": None if retention is None else f"{retention.kept_correct}/{retention.base_correct}",
        "drift_kl": None if retention is None else round(retention.drift_kl, 4),
        "examples": tuned[:4],
        "not_answered": [t for t, h in zip(tuned, habit) if h and not answered(t, opts.habit)],
        "retention_lost": [] if retention is None else [
            {"question": r.question, "base": r.base_reply, "reply": r.reply}
            for r in retention.retention_rows if r.base_correct and not r.correct],
    }
    print(json.dumps(report, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
