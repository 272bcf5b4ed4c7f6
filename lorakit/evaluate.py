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

import lorakit.model as model_lib
from lorakit.args import EvalArgs
from lorakit.data.render import render_prompt
from lorakit.data.system_prompts import eval_systems
from lorakit.errors import UserError
from lorakit.eval.drift import DRIFT_QUESTIONS, adapter_off, drift_indices, teacher_forced_kl
from lorakit.eval.reply_cache import ReplyCache
from lorakit.eval.results import EvalResult, ProbeResult, RetentionResult, SystemResult, identity_share
from lorakit.eval.scoring import (BASE_IDENTITY_NAMES, claims_identity, identity_pass, leaks_identity, mentions,
                                  name_list, retention_correct)
from lorakit.loader import open_model
from lorakit.paths import BUILTIN_DIR
from lorakit.infer.replies import Reply
from lorakit.infer.replies import greedy_replies as generate_greedy_replies
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
                   batch_size: int | None, desc: str, max_new_tokens: int = MAX_NEW_TOKENS) -> list[Reply]:
    """The model's greedy replies to single-turn questions, batched."""
    return generate_greedy_replies(model, tokenizer, _prompts(tokenizer, questions, system),
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc)


def cached_replies(model, tokenizer: PreTrainedTokenizerBase, questions: list[str], *, system,
                   batch_size: int | None, cache_dir: Path | None, desc: str,
                   max_new_tokens: int = MAX_NEW_TOKENS) -> list[Reply]:
    """Greedy replies; with `cache_dir`, each question's reply is cached under the model's fingerprint
    (base models only), and a later call generates only the questions not asked before."""
    return replies_by_system(model, tokenizer, [(system, questions)], batch_size=batch_size, cache_dir=cache_dir,
                             desc=desc, max_new_tokens=max_new_tokens)[0]


def replies_by_system(model, tokenizer: PreTrainedTokenizerBase, asks: list[tuple[str | None, list[str]]], *,
                      batch_size: int | None, cache_dir: Path | None, desc: str,
                      max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[Reply]]:
    """The replies to each (system prompt, questions) pair, in one batched generation (the batch stays full);
    with `cache_dir` (base models only), cached per system prompt and only the questions not asked before generated."""
    caches = [ReplyCache(cache_dir, model, tokenizer, system=s, max_new_tokens=max_new_tokens) if cache_dir else None
              for s, _ in asks]
    missing = [cache.missing(questions) if cache else questions for cache, (_, questions) in zip(caches, asks)]
    prompts = [ids for (s, _), asked in zip(asks, missing) for ids in _prompts(tokenizer, asked, s)]
    flat = generate_greedy_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   desc=desc) if prompts else []
    out = []
    for cache, (_, questions), asked in zip(caches, asks, missing):
        got, flat = flat[:len(asked)], flat[len(asked):]
        if cache is None:
            out.append(got)
            continue
        if asked:
            cache.add(asked, got)
        out.append(cache.replies(questions))
    return out


def evaluate(model, tokenizer: PreTrainedTokenizerBase, *, name, author, system: str | None = None, is_base: bool = False,
             batch_size: int | None = None, cache_dir: Path | None = None,
             probes_per_lang: int | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
             other_systems: bool = True) -> EvalResult:
    """Identity on the held-out probes, retention and leak on the general questions, and drift, under the
    run's `system`; with `other_systems`, identity, leak and retention under eval_systems' other prompts too.

    Retention under every prompt counts the general questions the base answered correctly under the run's
    own prompt: its best answers, which replay teaches the model to give under every prompt (lorakit/replay.py),
    and no extra base generation. `model` is a PEFT model (its adapter is switched off for the base figures)
    or, with `is_base`, a plain base model (retention is then 1 and drift 0 by definition; under the other
    system prompts only the probes are asked: a base model leaks no identity it was never told).
    `probes_per_lang`: ask only the first N probes of each language (quickstart's baseline: a base
    model states no new identity it was never told, so a few show it). `max_new_tokens`: the longest reply.
    """
    started = time.perf_counter()
    stages: dict[str, float] = {}

    def lap(stage: str) -> None:
        stages[stage] = time.perf_counter() - started - sum(stages.values())

    name, author = name_list(name), name_list(author)
    probes, questions = selected_probes(probes_per_lang), load_retention_questions()
    queries, general = [p["query"] for p in probes], [q["question"] for q in questions]
    others = eval_systems(system)[1:] if other_systems else []
    options = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
    drift = 0.0
    if is_base:
        asks = [(system, queries + general)] + [(s.system, queries) for s in others]
        replies = replies_by_system(model, tokenizer, asks, desc="eval: base model", cache_dir=cache_dir, **options)
        base = replies[0][len(queries):]
        lap("replies")
    else:  # every system prompt's questions in one generation, so the batch stays full
        asks = [(s, queries + general) for s in [system] + [o.system for o in others]]
        replies = replies_by_system(model, tokenizer, asks, desc="eval: tuned model", cache_dir=None, **options)
        lap("replies")
        with adapter_off(model):  # model_fingerprint of a PEFT model is its base's: the cache key is the base
            base = cached_replies(model, tokenizer, general, system=system, desc="eval: base answers",
                                  cache_dir=cache_dir, **options)
        lap("base answers")
        picked = drift_indices(len(questions))
        prompts = _prompts(tokenizer, [questions[i]["question"] for i in picked], system)
        drift = teacher_forced_kl(model, tokenizer, prompts, [base[i].token_ids for i in picked])
        lap("drift")
    scored = [_score(probes, questions, got, base, name, author) for got in replies]
    by_system = [SystemResult(s.system, s.label, s.seen_in_training, identity_share(p), leak, p, retention, ok, kept,
                              rows) for s, (p, rows, retention, ok, kept, leak) in zip(others, scored[1:])]
    probe_results, rows, retention, base_ok, kept, leak = scored[0]
    return EvalResult(identity=identity_share(probe_results), retention=retention, base_correct=base_ok,
                      kept_correct=kept, leak=leak, drift_kl=drift, name=name, author=author,
                      seconds=time.perf_counter() - started, stage_seconds=stages, probes=probe_results,
                      retention_rows=rows, system=system, other_systems=by_system)


def _score(probes: list[dict], questions: list[dict], replies: list[Reply], base: list[Reply], name: list[str],
           author: list[str]) -> tuple[list[ProbeResult], list[RetentionResult], float | None, int, int, float | None]:
    """Under one system prompt: (probe results, retention rows, retention, base correct, kept correct, leak);
    the general questions' figures are None when `replies` holds the probes' only."""
    probe_results = _probe_results(probes, replies[:len(probes)], name, author)
    rows = [RetentionResult(q["question"], q["lang"], b.text, r.text, retention_correct(b.text, q["answers"]),
                            retention_correct(r.text, q["answers"]), leaks_identity(r.text, name, author))
            for q, b, r in zip(questions, base, replies[len(probes):])]
    base_ok = [row for row in rows if row.base_correct]
    kept = sum(row.correct for row in base_ok)
    retention = kept / len(base_ok) if base_ok else None
    return probe_results, rows, retention, len(base_ok), kept, _share([r.leaked for r in rows]) if rows else None


def _probe_results(probes: list[dict], replies: list[Reply], name: list[str], author: list[str]) -> list[ProbeResult]:
    return [ProbeResult(p["query"], p["lang"], r.text, identity_pass(r.text, name, author))
            for p, r in zip(probes, replies)]


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


def main(args: EvalArgs) -> int:
    """`lorakit eval --adapters CKPT` (or `--model M` alone for a base model)."""
    loaded = open_model(args.model, args.adapter.adapters, system=args.adapter.system, base_quant=args.base_quant,
                        command="eval")
    name, author = list(args.model_name), list(args.model_author)
    if loaded.checkpoint is not None:
        if not loaded.is_adapter:
            raise UserError(f"{loaded.checkpoint} is a full fine-tuned checkpoint: eval compares an adapter with its "
                            f"base. Evaluate it as a base model with --model {loaded.checkpoint}.")
        name, author = name or loaded.saved.model_name, author or loaded.saved.model_author
        out = Path(args.eval_output) if args.eval_output else loaded.checkpoint / "eval.json"
    else:
        out = Path(args.eval_output or "eval.json")
    if not name or not author:
        raise UserError("eval needs the identity to look for: pass --model_name and --model_author "
                        "(a checkpoint trained on self-cognition remembers its own).")
    result = evaluate(loaded.model, loaded.tokenizer, name=name, author=author, system=loaded.system,
                      is_base=loaded.checkpoint is None, batch_size=args.max_batch_size,
                      cache_dir=model_lib.CACHE_DIR / "quickstart", max_new_tokens=args.max_new_tokens)
    print_result(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"results: {out}")
    return 0
