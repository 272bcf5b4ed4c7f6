"""`lorakit eval`: identity on held-out probes, retention of general answers, identity leak, and drift.

`evaluate` runs the model (batched greedy generation) and the base model (the same weights with
the adapter switched off) over the built-in probe and question sets and returns an `EvalResult`;
`main` is the command. The parts live in lorakit/eval/: scoring (pure functions on reply text),
results, drift and the base replies' cache; the advice for a missed target is report.missed_targets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lorakit.checkpoint import load_checkpoint
from lorakit.data.render import render_prompt, set_chat_template
from lorakit.errors import UserError
from lorakit.eval.drift import DRIFT_QUESTIONS, adapter_off, drift_indices, teacher_forced_kl
from lorakit.eval.reply_cache import ReplyCache
from lorakit.eval.results import EvalResult, ProbeResult, RetentionResult
from lorakit.eval.scoring import (BASE_IDENTITY_NAMES, claims_identity, identity_pass, leaks_identity, mentions,
                                  name_list, retention_correct)
from lorakit.model import CACHE_DIR, load_model, load_tokenizer, resolve_model_path
from lorakit.paths import BUILTIN_DIR
from lorakit.replay import Reply, generate_replies
from lorakit.report import figures_table, missed_targets, print_missed

__all__ = [  # the eval's parts, importable from here as before they moved to lorakit/eval/ and report.py
    "BASE_IDENTITY_NAMES", "DRIFT_QUESTIONS", "EvalResult", "ProbeResult", "RetentionResult", "adapter_off",
    "cached_replies", "claims_identity", "drift_indices", "evaluate", "greedy_replies", "identity_pass",
    "leaks_identity", "load_probes", "load_retention_questions", "main", "mentions", "missed_targets",
    "read_jsonl", "retention_correct", "teacher_forced_kl",
]

# A small model's answer often comes after a sentence of preamble: SmolLM2-135M's 44 correct answers state
# it by token 32 at the latest (median 7); 48 leaves room, and the identity leak is looked for in 48 tokens.
# Probes get the same budget, so one batched generation answers probes and general questions together.
MAX_NEW_TOKENS = 48


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a built-in JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_probes() -> list[dict]:
    """Held-out identity probes: {"query", "lang"}."""
    return read_jsonl(BUILTIN_DIR / "identity_probes.jsonl")


def load_retention_questions() -> list[dict]:
    """General questions with checkable answers: {"question", "answers", "lang"}."""
    return read_jsonl(BUILTIN_DIR / "retention_questions.jsonl")


def _prompts(tokenizer: PreTrainedTokenizerBase, questions: list[str], system: str | None) -> list[list[int]]:
    return [render_prompt(tokenizer, [{"role": "user", "content": q}], system=system) for q in questions]


def selected_probes(per_lang: int | None = None) -> list[dict]:
    """The held-out probes: all, or the first `per_lang` of each language."""
    probes = load_probes()
    if per_lang is None:
        return probes
    return [p for lang in ("en", "zh") for p in [q for q in probes if q["lang"] == lang][:per_lang]]


def greedy_replies(model, tokenizer: PreTrainedTokenizerBase, questions: list[str], *, system,
                   batch_size: int | None, desc: str) -> list[Reply]:
    """The model's greedy replies to single-turn questions, batched."""
    return generate_replies(model, tokenizer, _prompts(tokenizer, questions, system), max_new_tokens=MAX_NEW_TOKENS,
                            batch_size=batch_size, desc=desc)


def cached_replies(model, tokenizer: PreTrainedTokenizerBase, questions: list[str], *, system,
                   batch_size: int | None, cache_dir: Path | None, desc: str) -> list[Reply]:
    """Greedy replies; with `cache_dir`, each question's reply is cached under the model's fingerprint
    (base models only), and a later call generates only the questions not asked before."""
    if cache_dir is None:
        return greedy_replies(model, tokenizer, questions, system=system, batch_size=batch_size, desc=desc)
    cache = ReplyCache(cache_dir, model, tokenizer, system=system, max_new_tokens=MAX_NEW_TOKENS)
    missing = cache.missing(questions)
    if missing:
        cache.add(missing, greedy_replies(model, tokenizer, missing, system=system, batch_size=batch_size, desc=desc))
    return cache.replies(questions)


def evaluate(model, tokenizer: PreTrainedTokenizerBase, *, name, author, system: str | None = None, is_base: bool = False,
             batch_size: int | None = None, cache_dir: Path | None = None,
             probes_per_lang: int | None = None) -> EvalResult:
    """Identity on the held-out probes, retention and leak on the general questions, and drift.

    `model` is a PEFT model (its adapter is switched off for the base figures) or, with
    `is_base`, a plain base model (retention is then 1 and drift 0 by definition).
    `probes_per_lang`: ask only the first N probes of each language (quickstart's baseline: a base
    model states no new identity it was never told, so a few show it).
    """
    started = time.perf_counter()
    stages: dict[str, float] = {}

    def lap(stage: str) -> None:
        stages[stage] = time.perf_counter() - started - sum(stages.values())

    name, author = name_list(name), name_list(author)
    probes, questions = selected_probes(probes_per_lang), load_retention_questions()
    asked = [p["query"] for p in probes] + [q["question"] for q in questions]
    # one batched generation for probes and general questions (a base model's replies are cached)
    if is_base:
        replies = cached_replies(model, tokenizer, asked, system=system, batch_size=batch_size, cache_dir=cache_dir,
                                 desc="eval: base model")
    else:
        replies = greedy_replies(model, tokenizer, asked, system=system, batch_size=batch_size, desc="eval: tuned model")
    lap("replies")
    probe_replies, replies = replies[:len(probes)], replies[len(probes):]
    probe_results = [ProbeResult(p["query"], p["lang"], r.text, identity_pass(r.text, name, author))
                     for p, r in zip(probes, probe_replies)]
    identity = {lang: _share([p.passed for p in probe_results if p.lang == lang]) for lang in ("en", "zh")}
    drift = 0.0
    if is_base:
        base = replies
    else:
        with adapter_off(model):  # model_fingerprint of a PEFT model is its base's: the cache key is the base
            base = cached_replies(model, tokenizer, [q["question"] for q in questions], system=system,
                                  batch_size=batch_size, cache_dir=cache_dir, desc="eval: base answers")
        lap("base answers")
        picked = drift_indices(len(questions))
        prompts = _prompts(tokenizer, [questions[i]["question"] for i in picked], system)
        drift = teacher_forced_kl(model, tokenizer, prompts, [base[i].token_ids for i in picked])
        lap("drift")
    rows = [RetentionResult(q["question"], q["lang"], b.text, r.text, retention_correct(b.text, q["answers"]),
                            retention_correct(r.text, q["answers"]), leaks_identity(r.text, name, author))
            for q, b, r in zip(questions, base, replies)]
    base_ok = [row for row in rows if row.base_correct]
    kept = sum(row.correct for row in base_ok)
    return EvalResult(identity=identity, retention=kept / len(base_ok) if base_ok else None,
                      base_correct=len(base_ok), kept_correct=kept, leak=_share([r.leaked for r in rows]),
                      drift_kl=drift, name=name, author=author, seconds=time.perf_counter() - started,
                      stage_seconds=stages, probes=probe_results, retention_rows=rows)


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def print_result(result: EvalResult) -> None:
    """The figures table and a few replies."""
    for lang in ("en", "zh"):
        for p in [p for p in result.probes if p.lang == lang][:2]:
            print(f"  Q: {p.query}\n  A: {p.reply[:200]!s}  [{'pass' if p.passed else 'fail'}]")
    print(figures_table(None, result.figures()))
    print(f"identity: {sum(p.passed for p in result.probes)}/{len(result.probes)} probes; retention: "
          f"{result.kept_correct}/{result.base_correct} of the questions the base answered correctly; "
          f"{result.seconds:.0f} s")
    print_missed(missed_targets(result))


def _checkpoint_identity(loaded_args: dict) -> tuple[list[str], list[str]]:
    data = loaded_args.get("data", {})
    return (loaded_args.get("model_name") or data.get("model_name") or [],
            loaded_args.get("model_author") or data.get("model_author") or [])


def main(args) -> int:
    """`lorakit eval --adapters CKPT` (or `--model M` alone for a base model)."""
    name, author, system = list(args.model_name), list(args.model_author), args.adapter.system
    if args.adapter.adapters:
        loaded = load_checkpoint(args.adapter.adapters[0], torch_dtype=args.model.torch_dtype, device=args.model.device)
        if not hasattr(loaded.model, "disable_adapter"):
            raise UserError(f"{loaded.path} is a full fine-tuned checkpoint: eval compares an adapter with its base. "
                            f"Evaluate it as a base model with --model {loaded.path}.")
        model, tokenizer, is_base = loaded.model, loaded.tokenizer, False
        saved_name, saved_author = _checkpoint_identity(loaded.args)
        name, author = name or saved_name, author or saved_author
        system = system if system is not None else loaded.args.get("system")
        out = Path(args.eval_output) if args.eval_output else loaded.path / "eval.json"
    else:
        path = resolve_model_path(args.model.model, use_hf=args.model.use_hf, gguf_file=args.model.gguf_file)
        tokenizer = load_tokenizer(path)
        set_chat_template(tokenizer, args.model.template)
        model, is_base = load_model(path, torch_dtype=args.model.torch_dtype, device=args.model.device), True
        out = Path(args.eval_output or "eval.json")
    if not name or not author:
        raise UserError("eval needs the identity to look for: pass --model_name and --model_author "
                        "(a checkpoint trained on self-cognition remembers its own).")
    result = evaluate(model, tokenizer, name=name, author=author, system=system, is_base=is_base,
                      batch_size=args.max_batch_size, cache_dir=CACHE_DIR / "quickstart")
    print_result(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"results: {out}")
    return 0
