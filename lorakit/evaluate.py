"""`lorakit eval`: identity on held-out probes, retention of general answers, identity leak, and drift.

Scoring is pure functions on reply text (`identity_pass`, `retention_correct`, `leaks_identity`);
`evaluate` runs the model (batched greedy generation) and the base model (the same weights with
the adapter switched off) over the built-in probe and question sets and returns an `EvalResult`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorakit.data.cache import write_text_atomic
from lorakit.errors import UserError

BUILTIN = Path(__file__).resolve().parent / "data" / "builtin"

# Identities a base chat model may claim. A reply that claims one of these (not "I am not ChatGPT")
# fails the identity probe even when it also names the new identity.
BASE_IDENTITY_NAMES = (
    "SmolLM", "Hugging Face", "HuggingFace", "Qwen", "通义", "千问", "Alibaba", "阿里", "OpenAI", "ChatGPT",
    "GPT-3", "GPT-4", "GPT4", "Anthropic", "Claude", "Llama", "Meta", "Gemini", "Gemma", "Google", "谷歌",
    "Mistral", "DeepSeek", "深度求索", "Microsoft", "微软", "ChatGLM", "智谱", "文心", "百度", "Baidu",
)

_NEGATION = re.compile(
    r"\b(?:not|no|never|neither|nor|unlike|rather than|instead of|different from)\b|n't|不是|并非|而非|不|没有|非|并不",
    re.IGNORECASE,
)
# A claim is judged per clause: sentence ends and contrast words ("..., but I am X") start a new one.
_CLAUSE_SPLIT = re.compile(r"[.!?;。！？；\n]+|\b(?:but|while|whereas|however)\b|但是|但|而是|不过", re.IGNORECASE)
_FIRST_PERSON = re.compile(r"\b(?:i|i'm|im|me|my|myself)\b|我", re.IGNORECASE)


def _squash(text: str) -> str:
    """Case- and whitespace-insensitive form for name matching ('Lora Bot' matches 'lorabot')."""
    return re.sub(r"\s+", "", text).casefold()


def _names(value: str | Sequence[str]) -> list[str]:
    values = [value] if isinstance(value, str) else list(value)
    return [v for v in values if v and v.strip()]


def mentions(text: str, names: str | Sequence[str]) -> bool:
    """True when `text` contains any of `names` (case- and whitespace-insensitive)."""
    squashed = _squash(text)
    return any(_squash(name) in squashed for name in _names(names))


def _mentions_word(text: str, name: str) -> bool:
    # ASCII names match whole words ("Meta" is not in "metabolism"); other scripts match anywhere.
    if name.isascii():
        return re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z])", text, re.IGNORECASE) is not None
    return name in text


def claims_identity(reply: str, identity_names: Sequence[str]) -> bool:
    """True when some clause speaks in the first person, names one of `identity_names`, and is not negated."""
    for clause in _CLAUSE_SPLIT.split(reply):
        if not clause or not _FIRST_PERSON.search(clause) or _NEGATION.search(clause):
            continue
        if any(_mentions_word(clause, name) for name in identity_names):
            return True
    return False


def _foreign_names(base_identity_names: Sequence[str], name, author) -> list[str]:
    # A user may legitimately call the model "Qwen helper" or be "Google": never penalise the new identity.
    new = [_squash(n) for n in _names(name) + _names(author)]
    return [b for b in base_identity_names if not any(_squash(b) in n or n in _squash(b) for n in new)]


def identity_pass(reply: str, name: str | Sequence[str], author: str | Sequence[str],
                  base_identity_names: Sequence[str] = BASE_IDENTITY_NAMES) -> bool:
    """A probe reply passes when it states the new name AND the new author and claims no base identity."""
    if not mentions(reply, name) or not mentions(reply, author):
        return False
    return not claims_identity(reply, _foreign_names(base_identity_names, name, author))


def leaks_identity(reply: str, name: str | Sequence[str], author: str | Sequence[str]) -> bool:
    """True when an answer to a general question mentions the new name or author (nobody asked)."""
    return mentions(reply, name) or mentions(reply, author)


def retention_correct(reply: str, answers: Sequence[str]) -> bool:
    """True when the reply contains one of the accepted answers.

    Numbers match whole numbers ("4" is not in "14" or "4.5"), ASCII words match whole words with
    an optional plural ("whale" in "whales", "ice" not in "nice", "ten" not in "tennis"), other
    scripts match anywhere.
    """
    for answer in answers:
        if re.fullmatch(r"\d+", answer):
            pattern = rf"(?<![\d.]){answer}(?![\d]|\.\d)"
        elif answer.isascii():
            pattern = rf"(?<![A-Za-z0-9]){re.escape(answer)}(?:s|es)?(?![A-Za-z])"
        else:
            pattern = re.escape(answer)
        if re.search(pattern, reply, re.IGNORECASE):
            return True
    return False


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a built-in JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_probes() -> list[dict]:
    """Held-out identity probes: {"query", "lang"}."""
    return read_jsonl(BUILTIN / "identity_probes.jsonl")


def load_retention_questions() -> list[dict]:
    """General questions with checkable answers: {"question", "answers", "lang"}."""
    return read_jsonl(BUILTIN / "retention_questions.jsonl")


# ---------------------------------------------------------------- running the model

# A small model's answer often comes after a sentence of preamble: SmolLM2-135M's 44 correct answers state
# it by token 32 at the latest (median 7); 48 leaves room, and the identity leak is looked for in 48 tokens.
# Probes get the same budget, so one batched generation answers probes and general questions together.
MAX_NEW_TOKENS = 48
DRIFT_QUESTIONS = 16  # drift is measured on every sixth retention question: two forwards each, on CPU it adds up


@dataclass
class ProbeResult:
    query: str
    lang: str
    reply: str
    passed: bool


@dataclass
class RetentionResult:
    question: str
    lang: str
    base_reply: str
    reply: str
    base_correct: bool
    correct: bool
    leaked: bool


@dataclass
class EvalResult:
    """Every figure of one eval, and the replies behind them."""

    identity: dict[str, float]
    "Share of held-out probes passed, per language ('en', 'zh')."
    retention: float | None
    "Of the questions the base answered correctly, the share the model still answers correctly (None: base got none)."
    base_correct: int
    kept_correct: int
    leak: float
    "Share of answers to general questions that mention the new name or author."
    drift_kl: float
    "Mean per-token KL(base || model) on the base's own answers to DRIFT_QUESTIONS general questions, teacher-forced."
    name: list[str]
    author: list[str]
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    "Wall seconds per part of the eval (replies, base answers, drift)."
    probes: list[ProbeResult] = field(default_factory=list)
    retention_rows: list[RetentionResult] = field(default_factory=list)

    def figures(self) -> dict:
        """The headline numbers only."""
        asked = {lang: [p.passed for p in self.probes if p.lang == lang] for lang in ("en", "zh")}
        return {"identity_en": self.identity.get("en"), "identity_zh": self.identity.get("zh"),
                "retention": self.retention, "leak": self.leak, "drift_kl": self.drift_kl,
                "base_correct": self.base_correct, "kept_correct": self.kept_correct,
                "probes_en": len(asked["en"]), "probes_zh": len(asked["zh"]),
                "passed_en": sum(asked["en"]), "passed_zh": sum(asked["zh"])}

    def to_json(self) -> dict:
        return asdict(self) | {"figures": self.figures()}


@contextmanager
def adapter_off(model):
    """The base model's behaviour: the same PEFT model with its adapter switched off."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def _prompts(tokenizer, questions: list[str], system: str | None) -> list[list[int]]:
    from lorakit.data.render import render_prompt

    return [render_prompt(tokenizer, [{"role": "user", "content": q}], system=system) for q in questions]


def selected_probes(per_lang: int | None = None) -> list[dict]:
    """The held-out probes: all, or the first `per_lang` of each language."""
    probes = load_probes()
    if per_lang is None:
        return probes
    return [p for lang in ("en", "zh") for p in [q for q in probes if q["lang"] == lang][:per_lang]]


def greedy_replies(model, tokenizer, questions: list[str], *, system, batch_size: int | None, desc: str) -> list:
    """The model's greedy replies (`Reply`) to single-turn questions, batched."""
    from lorakit.replay import generate_replies

    return generate_replies(model, tokenizer, _prompts(tokenizer, questions, system), max_new_tokens=MAX_NEW_TOKENS,
                            batch_size=batch_size, desc=desc)


def cached_replies(model, tokenizer, questions: list[str], *, system, batch_size: int | None,
                   cache_dir: Path | None, desc: str) -> list:
    """Greedy replies; with `cache_dir`, each question's reply is cached under the model's fingerprint
    (base models only), and a later call generates only the questions not asked before."""
    from lorakit.replay import Reply, model_fingerprint

    if cache_dir is None:
        return greedy_replies(model, tokenizer, questions, system=system, batch_size=batch_size, desc=desc)
    key = json.dumps({"model": model_fingerprint(model), "template": getattr(tokenizer, "chat_template", None),
                      "system": system, "max_new_tokens": MAX_NEW_TOKENS}, sort_keys=True)
    path = Path(cache_dir) / f"base-replies-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    known = {}
    if path.is_file():
        known = {q: Reply(**r) for q, r in json.loads(path.read_text(encoding="utf-8")).items()}
    missing = [q for q in dict.fromkeys(questions) if q not in known]
    if missing:
        known.update(zip(missing, greedy_replies(model, tokenizer, missing, system=system, batch_size=batch_size,
                                                 desc=desc)))
        write_text_atomic(path, json.dumps({q: asdict(r) for q, r in known.items()}, ensure_ascii=False))
    return [known[q] for q in questions]


def teacher_forced_kl(model, tokenizer, prompts: list[list[int]], replies: list[list[int]], *,
                      batch_size: int = 16) -> float:
    """Mean per-token KL(base || model) over the reply tokens, teacher-forced, with the adapter off for the base.

    Row i is prompt + reply; position t's hidden state predicts token t+1, so the reply's tokens are
    predicted at positions len(prompt)-1 .. len(prompt)+len(reply)-2: only those go through the output head.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    kl_sum, kl_tokens = 0.0, 0
    rows = [i for i in range(len(prompts)) if replies[i]]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        seqs = [prompts[i] + replies[i] for i in chunk]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        at_rows = torch.cat([torch.full((len(replies[i]),), k) for k, i in enumerate(chunk)]).to(device)
        at_cols = torch.cat([torch.arange(len(prompts[i]) - 1, len(prompts[i]) + len(replies[i]) - 1)
                             for i in chunk]).to(device)
        with torch.inference_mode():
            tuned = _logits_at(model, ids, mask, at_rows, at_cols).float().log_softmax(-1)
            with adapter_off(model):
                base = _logits_at(model, ids, mask, at_rows, at_cols).float().log_softmax(-1)
        kl_sum += (base.exp() * (base - tuned)).sum().item()
        kl_tokens += len(at_rows)
    return kl_sum / max(kl_tokens, 1)


def _logits_at(model, ids, mask, rows, cols) -> torch.Tensor:
    """Output-head logits at (rows, cols) only: the decoder's hidden states, then the head on N positions."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA layers stay in place
    hidden = inner.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    return inner.get_output_embeddings()(hidden[rows, cols])


def drift_indices(n: int, k: int = DRIFT_QUESTIONS) -> list[int]:
    """k indices spread evenly over n questions (both languages, every category)."""
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(min(k, n))})


def evaluate(model, tokenizer, *, name, author, system: str | None = None, is_base: bool = False,
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

    name, author = _names(name), _names(author)
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


# ---------------------------------------------------------------- `lorakit eval`

def missed_targets(result: EvalResult, examples: int = 2) -> list[str]:
    """One line per target the result misses: the figure, the replies behind it, and what to try.

    A small model lands near its bars and a different seed moves each figure by a probe or two
    (experiments/quickstart-recipe.md: about 6 runs in 10 of SmolLM2-135M pass all four), so the advice starts there.
    """
    from lorakit.report import misses, target_text

    lines = []

    def shown(rows, question, reply):
        return "; ".join(f"{question(r)!r} -> {reply(r)[:80]!r}" for r in rows[:examples])

    for lang, language in (("en", "English"), ("zh", "Chinese")):
        key, share = f"identity_{lang}", result.identity.get(lang)
        if misses(key, share):
            failed = [p for p in result.probes if p.lang == lang and not p.passed]
            lines.append(f"identity ({language}) {100 * share:.1f}% {target_text(key, missed=True)}: {len(failed)} "
                         f"probes did not state both name and author, e.g. "
                         f"{shown(failed, lambda p: p.query, lambda p: p.reply)}. Try another --seed, "
                         f"or train longer (--num_train_epochs 2) or harder (a higher --learning_rate).")
    if misses("retention", result.retention):
        lost = [r for r in result.retention_rows if r.base_correct and not r.correct]
        lines.append(f"retention {100 * result.retention:.1f}% {target_text('retention', missed=True)}: {len(lost)} "
                     f"of the {result.base_correct} general questions the base got right are now wrong, e.g. "
                     f"{shown(lost, lambda r: r.question, lambda r: r.reply)}. Try another --seed (at this model size "
                     f"the figure moves by a question or two between seeds) or a lower --learning_rate, which "
                     f"trades identity for it.")
    if misses("leak", result.leak):
        leaked = [r for r in result.retention_rows if r.leaked]
        lines.append(f"identity leak {100 * result.leak:.1f}% {target_text('leak', missed=True)}: {len(leaked)} "
                     f"general answers state the new identity, e.g. "
                     f"{shown(leaked, lambda r: r.question, lambda r: r.reply)}. Try another --seed, "
                     f"a higher --replay_weight_zh if the answers are Chinese, or add general rows of your own "
                     f"with --dataset.")
    return lines


def print_result(result: EvalResult) -> None:
    """The figures table and a few replies."""
    from lorakit.report import figures_table, print_missed

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
    from lorakit.checkpoint import load_checkpoint
    from lorakit.data.render import set_chat_template
    from lorakit.model import CACHE_DIR, load_model, load_tokenizer, resolve_model_path

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
