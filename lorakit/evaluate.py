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

PROBE_MAX_NEW_TOKENS = 48
# A small model's answer often comes after a sentence of preamble: SmolLM2-135M's 44 correct answers state
# it by token 32 at the latest (median 7); 48 leaves room, and the identity leak is looked for in 48 tokens.
RETENTION_MAX_NEW_TOKENS = 48
DRIFT_QUESTIONS = 32  # drift is measured on every third retention question: two forwards each, on CPU it adds up


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
    "Wall seconds per part of the eval (probes, base answers, teacher-forced pass, decoding on)."
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


def identity_probe_results(model, tokenizer, *, name, author, system, batch_size: int | None,
                           max_new_tokens: int = PROBE_MAX_NEW_TOKENS, cache_dir: Path | None = None,
                           per_lang: int | None = None) -> list[ProbeResult]:
    """Ask the held-out identity probes (all, or the first `per_lang` of each language) and score the
    replies (`cache_dir`: cache a base model's replies)."""
    probes = load_probes()
    if per_lang is not None:
        probes = [p for lang in ("en", "zh") for p in [q for q in probes if q["lang"] == lang][:per_lang]]
    replies = cached_replies(model, tokenizer, [p["query"] for p in probes], system=system, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, cache_dir=cache_dir, desc="eval: identity probes")
    return [ProbeResult(p["query"], p["lang"], r.text, identity_pass(r.text, name, author))
            for p, r in zip(probes, replies)]


def cached_replies(model, tokenizer, questions: list[str], *, system, batch_size: int | None, max_new_tokens: int,
                   cache_dir: Path | None, desc: str) -> list:
    """Greedy replies; with `cache_dir`, cached under the model's fingerprint (for base models only)."""
    from lorakit.replay import Reply, generate_replies, model_fingerprint

    path = None
    if cache_dir is not None:
        key = json.dumps({"model": model_fingerprint(model), "template": getattr(tokenizer, "chat_template", None),
                          "system": system, "questions": questions, "max_new_tokens": max_new_tokens}, sort_keys=True)
        path = Path(cache_dir) / f"base-replies-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        if path.is_file():
            return [Reply(**r) for r in json.loads(path.read_text(encoding="utf-8"))]
    replies = generate_replies(model, tokenizer, _prompts(tokenizer, questions, system),
                               max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([asdict(r) for r in replies], ensure_ascii=False), encoding="utf-8")
    return replies


def base_answers(model, tokenizer, *, system, batch_size: int | None, cache_dir: Path | None,
                 max_new_tokens: int = RETENTION_MAX_NEW_TOKENS) -> list:
    """The base model's greedy replies to the retention questions (adapter off), cached per base model."""
    questions = [q["question"] for q in load_retention_questions()]
    with adapter_off(model):  # model_fingerprint of a PEFT model is its base's: the cache key is the base
        return cached_replies(model, tokenizer, questions, system=system,
                              batch_size=batch_size, max_new_tokens=max_new_tokens, cache_dir=cache_dir,
                              desc="eval: base answers")


@dataclass
class TeacherForced:
    """One teacher-forced pass of the model over prompt + reply rows."""

    predicted: list[list[int]]
    "Per row, the model's greedy pick at each reply position and one past it (len(reply) + 1 ids)."
    kl_sum: float = 0.0
    "Summed per-token KL(base || model) over the reply tokens of the `kl_rows`."
    kl_tokens: int = 0


def teacher_forced(model, tokenizer, prompts: list[list[int]], replies: list[list[int]], *,
                   kl_rows: Sequence[int] = (), batch_size: int = 16) -> TeacherForced:
    """The model's greedy picks along each reply, and KL(base || model) on `kl_rows` (adapter off for the base).

    Row i is prompt + reply; position t's hidden state predicts token t+1, so the reply's tokens are
    predicted at positions len(prompt)-1 .. len(prompt)+len(reply)-2 and the token after the reply at
    len(prompt)+len(reply)-1. Only those positions go through the output head.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out, wanted = TeacherForced(predicted=[[] for _ in prompts]), set(kl_rows)
    for start in range(0, len(prompts), batch_size):
        rows = list(range(start, min(start + batch_size, len(prompts))))
        seqs = [prompts[i] + replies[i] for i in rows]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        at_rows = torch.cat([torch.full((len(replies[i]) + 1,), k) for k, i in enumerate(rows)]).to(device)
        at_cols = torch.cat([torch.arange(len(prompts[i]) - 1, len(prompts[i]) + len(replies[i]))
                             for i in rows]).to(device)
        with torch.inference_mode():
            tuned = _logits_at(model, ids, mask, at_rows, at_cols)
            picks = tuned.argmax(-1).tolist()
            offset = 0
            for i in rows:
                out.predicted[i] = picks[offset:offset + len(replies[i]) + 1]
                offset += len(replies[i]) + 1
            drift = [k for k, i in enumerate(rows) if i in wanted and replies[i]]
            if drift:  # the reply positions of those rows (not the one past the end)
                keep = torch.cat([torch.arange(len(replies[rows[k]])) + sum(len(replies[i]) + 1 for i in rows[:k])
                                  for k in drift]).to(device)
                tuned_lp = tuned[keep].float().log_softmax(-1)
                with adapter_off(model):
                    base_lp = _logits_at(model, ids, mask, at_rows[keep], at_cols[keep]).float().log_softmax(-1)
                out.kl_sum += (base_lp.exp() * (base_lp - tuned_lp)).sum().item()
                out.kl_tokens += len(keep)
    return out


def teacher_forced_kl(model, tokenizer, prompts: list[list[int]], replies: list[list[int]], *,
                      batch_size: int = 16) -> float:
    """Mean per-token KL(base || model) over the reply tokens, with the adapter off for the base."""
    tf = teacher_forced(model, tokenizer, prompts, replies, kl_rows=range(len(prompts)), batch_size=batch_size)
    return tf.kl_sum / max(tf.kl_tokens, 1)


def greedy_after_drafts(model, tokenizer, prompts: list[list[int]], drafts: list, *, max_new_tokens: int,
                        predicted: list[list[int]], batch_size: int | None, desc: str) -> list:
    """The model's greedy replies, starting from drafts it is known to agree with.

    `drafts` are other replies to the same prompts (the base model's, as `Reply`), `predicted` the
    model's own greedy picks along them (`teacher_forced`). The model's reply follows a draft as long
    as its picks equal the draft's tokens; at the first difference it takes its own pick, and only
    replies that are not finished by then are decoded on from there. After a fine-tune that kept
    general answers, most replies are the draft itself, and eval costs one forward instead of a
    decode per token. The result is the model's plain greedy reply (up to float rounding between a
    full-sequence forward and step-by-step decoding, as between any two batch shapes).
    """
    from lorakit.infer.engine import end_of_turn_ids
    from lorakit.replay import Reply, generate_replies

    stop = end_of_turn_ids(tokenizer, model)
    replies: list = [None] * len(prompts)
    resume: dict[int, list[int]] = {}
    for i, (draft, picks) in enumerate(zip(drafts, predicted)):
        tokens = draft.token_ids
        j = next((k for k, (a, b) in enumerate(zip(tokens, picks)) if a != b), len(tokens))
        if j >= max_new_tokens or (j == len(tokens) and not draft.finished):  # followed it to the length cut
            replies[i] = Reply(_decode(tokenizer, tokens[:j]), tokens[:j], False)
        elif picks[j] in stop:
            replies[i] = Reply(_decode(tokenizer, tokens[:j]), tokens[:j], True)
        elif j + 1 >= max_new_tokens:
            replies[i] = Reply(_decode(tokenizer, tokens[:j] + [picks[j]]), tokens[:j] + [picks[j]], False)
        else:
            resume[i] = tokens[:j] + [picks[j]]
    if resume:
        order = sorted(resume)
        tails = generate_replies(model, tokenizer, [prompts[i] + resume[i] for i in order],
                                 max_new_tokens=[max_new_tokens - len(resume[i]) for i in order],
                                 batch_size=batch_size, desc=desc)
        for i, tail in zip(order, tails):
            tokens = resume[i] + tail.token_ids
            replies[i] = Reply(_decode(tokenizer, tokens), tokens, tail.finished)
    return replies


def _decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


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
    probes = identity_probe_results(model, tokenizer, name=name, author=author, system=system, batch_size=batch_size,
                                    cache_dir=cache_dir if is_base else None, per_lang=probes_per_lang)
    lap("identity probes")
    identity = {lang: _share([p.passed for p in probes if p.lang == lang]) for lang in ("en", "zh")}
    questions = load_retention_questions()
    base = base_answers(model, tokenizer, system=system, batch_size=batch_size, cache_dir=cache_dir)
    lap("base answers")
    drift = 0.0
    if is_base:
        replies = base
    else:  # the base's replies are drafts: one forward finds where the model still says the same
        prompts = _prompts(tokenizer, [q["question"] for q in questions], system)
        tf = teacher_forced(model, tokenizer, prompts, [b.token_ids for b in base],
                            kl_rows=drift_indices(len(questions)))
        lap("teacher-forced pass")
        replies = greedy_after_drafts(model, tokenizer, prompts, base, max_new_tokens=RETENTION_MAX_NEW_TOKENS,
                                      predicted=tf.predicted, batch_size=batch_size, desc="eval: general questions")
        drift = tf.kl_sum / max(tf.kl_tokens, 1)
        lap("general answers")
    rows = [RetentionResult(q["question"], q["lang"], b.text, r.text, retention_correct(b.text, q["answers"]),
                            retention_correct(r.text, q["answers"]), leaks_identity(r.text, name, author))
            for q, b, r in zip(questions, base, replies)]
    base_ok = [row for row in rows if row.base_correct]
    kept = sum(row.correct for row in base_ok)
    return EvalResult(identity=identity, retention=kept / len(base_ok) if base_ok else None,
                      base_correct=len(base_ok), kept_correct=kept, leak=_share([r.leaked for r in rows]),
                      drift_kl=drift, name=name, author=author, seconds=time.perf_counter() - started,
                      stage_seconds=stages,
                      probes=probes, retention_rows=rows)


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


# ---------------------------------------------------------------- `lorakit eval`

def print_result(result: EvalResult) -> None:
    """The figures table and a few replies."""
    from lorakit.report import figures_table

    for lang in ("en", "zh"):
        for p in [p for p in result.probes if p.lang == lang][:2]:
            print(f"  Q: {p.query}\n  A: {p.reply[:200]!s}  [{'pass' if p.passed else 'fail'}]")
    print(figures_table(None, result.figures()))
    print(f"identity: {sum(p.passed for p in result.probes)}/{len(result.probes)} probes; retention: "
          f"{result.kept_correct}/{result.base_correct} of the questions the base answered correctly; "
          f"{result.seconds:.0f} s")


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
