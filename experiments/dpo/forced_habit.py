"""The retention a habit costs by itself: the base model with every answer forced to open with the habit.

`lorakit eval`'s retention (of the built-in general questions the base answers correctly, the share still
answered correctly) of a model that is the base plus nothing but the habit: each reply is the base's greedy
continuation of its prompt with the habit already written. A trained model beats this only by learning to
answer after the habit as the base answers without it. Also lists the questions whose accepted answer is in
the question itself (a reply that repeats the question counts as correct).

    python experiments/dpo/forced_habit.py [--habit "Quick take:"]
"""

from __future__ import annotations

import argparse
import json

from lorakit.data.render import render_prompt
from lorakit.eval.scoring import retention_correct
from lorakit.evaluate import MAX_NEW_TOKENS, load_retention_questions
from lorakit.infer.engine import Engine, SamplingParams
from lorakit.model import load_model, load_tokenizer, resolve_model_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--habit", default="Quick take:")
    parser.add_argument("--model", default=None)
    opts = parser.parse_args()
    path = resolve_model_path(opts.model)
    tokenizer, model = load_tokenizer(path), load_model(path, torch_dtype="float32", device="cpu")
    questions = load_retention_questions()
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q["question"]}]) for q in questions]
    habit_ids = tokenizer.encode(opts.habit, add_special_tokens=False)
    engine = Engine(model, tokenizer)
    base = [g.text for g in engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW_TOKENS))]
    forced = [opts.habit + g.text for g in engine.generate(
        [p + habit_ids for p in prompts], SamplingParams(max_new_tokens=MAX_NEW_TOKENS - len(habit_ids)))]
    rows = []
    for q, b, f in zip(questions, base, forced):
        rows.append({"question": q["question"], "base_correct": retention_correct(b, q["answers"]),
                     "forced_correct": retention_correct(f, q["answers"]),
                     "answer_in_question": retention_correct(q["question"], q["answers"]), "base": b, "forced": f})
    base_correct = [r for r in rows if r["base_correct"]]
    kept = sum(r["forced_correct"] for r in base_correct)
    print(json.dumps({"habit": opts.habit, "base_correct": len(base_correct), "kept_with_forced_habit": kept,
                      "retention": round(kept / max(len(base_correct), 1), 4),
                      "lost": [r for r in base_correct if not r["forced_correct"]],
                      "answer_in_question": [r["question"] for r in rows if r["answer_in_question"]]},
                     ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
