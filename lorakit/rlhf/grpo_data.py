"""GRPO's data: prompts to sample from, each with its row's other columns for the reward functions.

Accepted rows (first match wins): `prompt` (text or messages); `messages` (trailing assistant turns
dropped: NuminaMath-TIR's worked solution is not shown to the model); `problem` (NuminaMath without
messages); any shape `sft` reads, e.g. GSM8K's question/answer, its answer dropped from the prompt.
Every column but `prompt` reaches the reward functions as a keyword argument (`solution`, `answer`, ...).
Specs are sft's: PATH_OR_ID[#N], #N sampling N rows with --seed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from lorakit.data.formats import _from_messages, _validate, normalise_row
from lorakit.data.sources import _read_spec, parse_spec, sample_rows
from lorakit.data.render import render_prompt, with_system
from lorakit.errors import UserError


@dataclass
class PromptRow:
    """One prompt: its messages (ending with a user turn), its row's columns, where it came from."""

    messages: list[dict[str, str]]
    columns: dict[str, Any]
    source: str  # "file:line"


@dataclass
class PromptSet:
    """Rendered prompts ready for rollouts, and what was dropped."""

    rows: list[PromptRow]
    prompt_ids: list[list[int]]
    columns: list[str]  # union of the rows' columns (a row without one gives None)
    dropped_too_long: int


def prompt_messages(row: dict, source: str) -> list[dict[str, str]]:
    """The conversation to complete: a row's turns up to its last user turn."""
    if not isinstance(row, dict):
        raise UserError(f"{source}: expected a JSON object per row, got {type(row).__name__}.")
    if isinstance(row.get("prompt"), str):
        messages = [{"role": "user", "content": row["prompt"]}]
    elif isinstance(row.get("prompt"), list):
        messages = _from_messages(row["prompt"], source)
    elif row.get("messages") is not None:
        messages = _from_messages(row["messages"], source)
    elif isinstance(row.get("problem"), str):
        messages = [{"role": "user", "content": row["problem"]}]
    else:
        messages = normalise_row(row, source, require_answer=False).messages
    if isinstance(row.get("system"), str) and row["system"].strip() and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": row["system"]}] + messages
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise UserError(f"{source}: no user turn to answer: GRPO rows need a prompt (prompt, messages ending in a "
                        f"user turn, problem, question, query or instruction).")
    _validate(messages, source, require_answer=False)
    return messages


def load_prompt_rows(specs: list[str], *, seed: int, use_hf: bool | None) -> list[PromptRow]:
    """Every spec's rows as prompts (#N sampled with `seed`); malformed rows are errors with file:line."""
    if not specs:
        raise UserError("--dataset is required: prompts to sample completions for, e.g. --dataset math.jsonl#1000 "
                        "(rows with problem/solution, question/answer, messages or prompt).")
    out: list[PromptRow] = []
    for text in specs:
        spec = parse_spec(text)
        rows, location = _read_spec(spec.name, use_hf=use_hf, model_name=(), model_author=())
        prompts = [PromptRow(prompt_messages(row, source), {k: v for k, v in row.items() if k != "prompt"}, source)
                   for row, source in rows]
        if spec.n is not None:
            prompts = sample_rows(prompts, spec.n, seed)
        print(f"loaded {len(rows)} rows from {location}" + (f", sampled {len(prompts)}" if spec.n else ""),
              file=sys.stderr)
        out += prompts
    return out


def build_prompt_set(rows: list[PromptRow], tokenizer, *, system: str | None, max_length: int) -> PromptSet:
    """Render each prompt with the chat template (sft's render_prompt); drop prompts over --max_length."""
    kept, ids, dropped = [], [], 0
    for row in rows:
        prompt = render_prompt(tokenizer, with_system(row.messages, system))
        if len(prompt) > max_length:
            dropped += 1
            continue
        kept.append(row)
        ids.append(prompt)
    if not kept:
        raise UserError(f"every prompt is longer than --max_length {max_length} tokens: raise --max_length.")
    columns = sorted({k for row in kept for k in row.columns})
    return PromptSet(rows=kept, prompt_ids=ids, columns=columns, dropped_too_long=dropped)
