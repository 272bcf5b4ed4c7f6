"""Replay against forgetting: distillation from the base model on its own answers to general prompts.

Mixing these samples into an identity fine-tune is self-distillation: on everything that is not
identity the target is what the model already says, so training has no reason to change it. Each
answer position carries the base's whole next-token distribution (its top-k), not only the token it
picked: a drifting model is pulled back on every plausible token, which holds the model in place
with short answers (a cut answer also teaches no early stop: it has no end-of-turn target).
Answers are generated once per (model, template, system, prompts, length, k) and cached as JSONL,
token ids included, so training sees exactly the tokens whose distributions were recorded.

The rows are spread over the same mix of system prompts as the built-in identity rows
(data/system_prompts.py): training the identity under a generic system prompt with no general answer
under it would teach the model to introduce itself whenever that prompt is set. Their targets are the
base's answers under the run's own system prompt, whatever prompt the row is rendered under (context
distillation): the base answers best under its own prompt, and under others, Chinese ones above all, a
small base echoes the system prompt or the question (SmolLM2-135M answered '端午节有哪些习俗？' under
'你是一个人工智能助手。' with '你是一个人工智能助手？...'). Distilling those echoes taught the tuned model to
repeat an unseen Chinese system prompt instead of introducing itself (held-out Chinese identity 75%,
96.9% with these targets; experiments/quickstart-recipe.md). So the general answers, like the identity,
are taught not to depend on the system prompt.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from lorakit.data.cache import write_text_atomic
from lorakit.data.render import IGNORE_INDEX, Rendered, render_prompt
from lorakit.data.system_prompts import system_mix
from lorakit.errors import UserError
from lorakit.infer.replies import Reply, generate_replies, generation_batch_size  # noqa: F401  (were here)
from lorakit.paths import BUILTIN_DIR

REPLAY_MAX_NEW_TOKENS = 24
REPLAY_TOP_K = 20  # the base's most likely tokens kept per answer position
# Each answer token's target: this share on the token the base picked, the rest spread as the base's top-k.
# Measured on SmolLM2-135M (lr 7e-4, experiments/results/kl-sweep-*.json): the distribution alone (0) keeps the
# model closest to the base (drift KL 0.06 vs 0.47 for plain replay) but lets the new identity leak into
# Chinese answers (5-8%), where the base is unsure (top-20 mass ~50%) and so holds nothing in place;
# 0.5 brings the leak to 2-4% and keeps drift at 0.13-0.16; 0.8 loses retention (86-89%).
REPLAY_PICK_WEIGHT = 0.5


def load_general_prompts() -> list[dict]:
    """The built-in general prompts: {"prompt", "category", "lang"} (facts, math, code, writing, ...)."""
    with open(BUILTIN_DIR / "general_prompts.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pick_prompts(n: int, *, seed: int = 0) -> list[str]:
    """N general prompts in a fixed shuffled order (so N=64 mixes every category and both languages)."""
    rows = load_general_prompts()
    if n > len(rows):
        print(f"notice: replay {n}: the built-in set has {len(rows)} prompts; using all of them.", file=sys.stderr)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i]["prompt"] for i in order[:n]]


def model_fingerprint(model) -> str:
    """What identifies a (base) model's weights on disk: folder, config, weight-file sizes and times.

    A PEFT model gives its base model's fingerprint: use it only for replies made with the adapter off.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    path = Path(str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")))
    parts = [str(path.resolve()) if path.exists() else str(path)]
    if path.is_dir():
        config = path / "config.json"
        parts.append(config.read_text(encoding="utf-8") if config.is_file() else "")
        for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            stat = weights.stat()
            parts.append(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "\n".join(parts)


def replay_cache_path(model, tokenizer, prompts: list[str], *, system: str | None | list[str | None],
                      max_new_tokens: int, cache_dir: Path, top_k: int = REPLAY_TOP_K) -> Path:
    """Cache file for these answers, keyed by model, chat template, system prompt(s) (one, or one per prompt),
    prompts, length and k."""
    key = json.dumps({
        "model": model_fingerprint(model), "template": getattr(tokenizer, "chat_template", None),
        "system": system, "prompts": prompts, "max_new_tokens": max_new_tokens, "top_k": top_k, "format": 3,
    }, ensure_ascii=False, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return Path(cache_dir) / f"replay-{len(prompts)}-{digest}.jsonl"


@dataclass
class ReplayAnswer:
    """The base's greedy answer to one prompt, with its next-token distribution at every answer position."""

    prompt: str
    prompt_ids: list[int]
    answer_ids: list[int]
    "The generated tokens, the end-of-turn token included when the answer ended on its own."
    top_ids: list[list[int]]
    top_probs: list[list[float]]
    "Per answer token: the base's top-k tokens and probabilities (before that token was picked)."
    text: str = ""
    system: str | None = None
    "The system prompt of prompt_ids (None: the template's default); the answer is the base's under the run's own."

    def sample(self, pick_weight: float = REPLAY_PICK_WEIGHT, weight: float = 1.0) -> Rendered:
        """Prompt (no loss) + answer; every answer token's target is `pick_weight` on the token the base
        picked plus (1 - pick_weight) times the base's top-k distribution (renormalised); the sample's
        loss_scale is `weight` (relative to a labelled token's 1)."""
        start = len(self.prompt_ids)
        teacher = {}
        for j, (token, ids, probs) in enumerate(zip(self.answer_ids, self.top_ids, self.top_probs)):
            teacher[start + j] = target_distribution(token, ids, probs, pick_weight)
        return Rendered(input_ids=self.prompt_ids + self.answer_ids,
                        labels=[IGNORE_INDEX] * start + self.answer_ids, teacher=teacher, loss_scale=weight)


def target_distribution(token: int, ids: list[int], probs: list[float], pick_weight: float) -> tuple[list[int], list[float]]:
    """(ids, probs) summing to 1: pick_weight on `token`, the rest as `probs` renormalised over `ids`."""
    total = sum(probs) or 1.0
    mixed = [(1.0 - pick_weight) * p / total for p in probs]
    if token in ids:
        mixed[ids.index(token)] += pick_weight
    else:  # a tie broken the other way: the picked token joins the list
        ids, mixed = [*ids, token], [*mixed, pick_weight]
    return list(ids), mixed


def answer_from_generation(prompt: str, prompt_ids: list[int], gen, system: str | None = None) -> ReplayAnswer:
    """A ReplayAnswer from an engine Generation made with logprobs (greedy: each step's top-1 is its token)."""
    steps = gen.logprobs or []
    answer = list(gen.token_ids)
    if gen.finish_reason == "stop":
        answer.append(steps[-1][0][0])  # the end-of-turn token greedy picked
    steps = steps[:len(answer)]
    probs = [[round(math.exp(lp), 6) for lp in lps] for _, lps in steps]
    return ReplayAnswer(prompt=prompt, prompt_ids=list(prompt_ids), answer_ids=answer,
                        top_ids=[list(ids) for ids, _ in steps], top_probs=probs, text=gen.text.strip(), system=system)


def read_answers(path: Path) -> list[ReplayAnswer]:
    with open(path, encoding="utf-8") as f:
        return [ReplayAnswer(**json.loads(line)) for line in f if line.strip()]


def write_answers(path: Path, answers: list[ReplayAnswer]) -> None:
    """Atomically: a killed run leaves either the whole cache file or none."""
    write_text_atomic(path, "".join(json.dumps(asdict(answer), ensure_ascii=False) + "\n" for answer in answers))


def replay_answers(model, tokenizer, n: int, *, system: str | None, cache_dir: Path,
                   max_new_tokens: int = REPLAY_MAX_NEW_TOKENS, top_k: int = REPLAY_TOP_K,
                   batch_size: int | None = None) -> list[ReplayAnswer]:
    """The base model's greedy answers to N built-in prompts with its top-k distributions (cached per model),
    each row rendered under system_mix's prompts (`under_system_mix`).

    The answers are generated under `system` (the run's own) only. Generated once; a later call with the same
    model, template, system, N, length and k reads the cache. `model` must be the base model (no adapter):
    its answers are the targets.
    """
    if n <= 0:
        raise UserError(f"--replay must be positive to build replay rows, got {n}.")
    prompts = pick_prompts(n)
    path = replay_cache_path(model, tokenizer, prompts, system=system, max_new_tokens=max_new_tokens,
                             cache_dir=cache_dir, top_k=top_k)
    if path.is_file():
        print(f"replay: reusing {path}", file=sys.stderr)
        return under_system_mix(read_answers(path), tokenizer, system)
    ids = [render_prompt(tokenizer, [{"role": "user", "content": p}], system=system) for p in prompts]
    gens = generate_replies(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            desc="replay: base answers", logprobs=top_k)
    answers = [answer_from_generation(p, i, g, system) for p, i, g in zip(prompts, ids, gens)]
    write_answers(path, answers)
    ended = sum(g.finish_reason == "stop" for g in gens)
    print(f"replay: {len(answers)} base answers ({ended} ended within {max_new_tokens} tokens; the others are "
          f"learned up to the cut, with no end-of-turn) -> {path}", file=sys.stderr)
    return under_system_mix(answers, tokenizer, system)


def under_system_mix(answers: list[ReplayAnswer], tokenizer, run_system: str | None) -> list[ReplayAnswer]:
    """Answer i with its prompt rendered under system_mix's i-th system prompt; the answer tokens and their
    targets stay the base's under `run_system` (the module docstring says why)."""
    out = []
    for answer, system in zip(answers, system_mix(len(answers), run_system)):
        if system != answer.system:
            ids = render_prompt(tokenizer, [{"role": "user", "content": answer.prompt}], system=system)
            answer = replace(answer, prompt_ids=ids, system=system)
        out.append(answer)
    return out


def replay_samples(model, tokenizer, n: int, *, weight: float = 1.0, weight_zh: float | None = None,
                   **kwargs) -> list[Rendered]:
    """Training samples (with distillation targets) from `replay_answers`: loss `weight` each, `weight_zh`
    for the answers to Chinese prompts (default: `weight`)."""
    return answers_to_samples(replay_answers(model, tokenizer, n, **kwargs), weight=weight, weight_zh=weight_zh)


def answers_to_samples(answers: list[ReplayAnswer], *, weight: float = 1.0,
                       weight_zh: float | None = None) -> list[Rendered]:
    """Training samples from replay answers: loss `weight` each, `weight_zh` for the answers to Chinese prompts."""
    zh = {row["prompt"] for row in load_general_prompts() if row["lang"] == "zh"}
    return [answer.sample(weight=weight_zh if weight_zh is not None and answer.prompt in zh else weight)
            for answer in answers]
