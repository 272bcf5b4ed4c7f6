"""Preference rows -> PreferenceExample: the row shapes `lorakit rlhf` reads, each checked per row.

Accepted row shapes (checked per row, first match wins):
- {"messages": [..., {"role": "assistant", "content": CHOSEN}], "rejected_response": REJECTED}   (ms-swift)
- {"query", "response", "rejected_response", "system"?, "history"?}                              (ms-swift, older)
- {"prompt": str, "chosen": str, "rejected": str, "system"?, "history"?}                         (TRL, LLaMA-Factory)
- {"prompt": [messages], "chosen": [assistant turn], "rejected": [assistant turn]}               (TRL conversational)
- {"chosen": [messages], "rejected": [messages]} sharing every turn but the last                  (TRL implicit prompt)
- KTO: {"prompt", "completion", "label": bool} (strings or messages) or {"messages": [...], "label": bool}
Paired rows also feed KTO (the chosen side desirable, the rejected one not).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.data.files import Malformed
from lorakit.data.formats import normalise_row
from lorakit.errors import UserError

ACCEPTED_PREFERENCE_SHAPES = (
    "messages + rejected_response (ms-swift); query/response/rejected_response (+system, history); "
    "prompt/chosen/rejected as strings (+system, history) or message lists; chosen/rejected message lists "
    "that share every turn but the last; for KTO, prompt/completion/label or messages/label"
)
PREFERENCE_KEYS = ("rejected_response", "chosen", "rejected", "label")


@dataclass
class PreferenceExample:
    """One row: the conversation up to the answer, and the answers judged."""

    prompt: list[dict[str, str]]  # system/history turns included; ends with a user turn
    chosen: str | None            # paired rows (and KTO desirable completions)
    rejected: str | None          # paired rows (and KTO undesirable completions)
    source: str                   # file:line
    format: str

    @property
    def is_pair(self) -> bool:
        return self.chosen is not None and self.rejected is not None


def is_preference_row(row) -> bool:
    """A row that carries a judgement (chosen/rejected/rejected_response/label) rather than one answer."""
    return isinstance(row, dict) and any(k in row for k in PREFERENCE_KEYS)


def _need_text(row: dict, key: str, source: str) -> str:
    value = row.get(key)
    if value is None:
        raise UserError(f"{source}: row has no '{key}'. Accepted shapes: {ACCEPTED_PREFERENCE_SHAPES}.")
    if not isinstance(value, str):
        raise UserError(f"{source}: '{key}' must be a string, got {type(value).__name__}: {value!r:.80}")
    if not value.strip():
        raise UserError(f"{source}: '{key}' is empty; both sides of a pair need text")
    return value


def _prompt_messages(row: dict, prompt, answer: str, source: str) -> list[dict[str, str]]:
    """Validated prompt turns (system/history applied) from a string or a message list, via sft's normaliser."""
    if isinstance(prompt, list):
        messages = normalise_row({"messages": prompt + [{"role": "assistant", "content": answer}]}, source).messages
        if row.get("system"):
            messages = _with_system_key(messages, row, source)
    else:
        text = prompt if isinstance(prompt, str) else None
        if text is None:
            raise UserError(f"{source}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
        keep = {k: row[k] for k in ("system", "history") if row.get(k) is not None}
        messages = normalise_row({"query": text, "response": answer, **keep}, source).messages
    return messages[:-1]


def _with_system_key(messages: list[dict[str, str]], row: dict, source: str) -> list[dict[str, str]]:
    if messages[0]["role"] == "system":
        raise UserError(f"{source}: row has both a 'system' key and a system turn; keep one")
    return [{"role": "system", "content": row["system"]}] + messages


def _assistant_text(value, key: str, source: str) -> str:
    """An answer given as a string or as a message list ending with (or holding only) the assistant turn."""
    if isinstance(value, list):
        if not value or not isinstance(value[-1], dict) or value[-1].get("role") != "assistant":
            raise UserError(f"{source}: '{key}' as a message list must end with an assistant turn")
        value = value[-1].get("content")
    if not isinstance(value, str):
        raise UserError(f"{source}: '{key}' must be a string or a message list, got {type(value).__name__}")
    if not value.strip():
        raise UserError(f"{source}: '{key}' is empty; both sides of a pair need text")
    return value


def parse_preference_row(row, source: str) -> PreferenceExample:
    """Normalise one preference (or KTO) row, or raise UserError naming file:line and what is wrong."""
    if isinstance(row, Malformed):
        raise UserError(f"{source}: {row.problem}")
    if not isinstance(row, dict):
        raise UserError(f"{source}: expected a JSON object per row, got {type(row).__name__}")
    if "rejected_response" in row:
        rejected = _need_text(row, "rejected_response", source)
        rest = {k: v for k, v in row.items() if k != "rejected_response"}
        shape = "messages+rejected_response" if "messages" in row else "query/response/rejected_response"
        messages = normalise_row(rest, source).messages
        return PreferenceExample(messages[:-1], messages[-1]["content"], rejected, source, shape)
    if "chosen" in row or "rejected" in row:
        for key in ("chosen", "rejected"):
            if row.get(key) is None:
                raise UserError(f"{source}: row has '{'rejected' if key == 'chosen' else 'chosen'}' but no '{key}'; "
                                f"a preference pair needs both")
        chosen = _assistant_text(row["chosen"], "chosen", source)
        rejected = _assistant_text(row["rejected"], "rejected", source)
        if "prompt" in row:
            shape = "prompt/chosen/rejected" + (" (messages)" if isinstance(row["prompt"], list) else "")
            return PreferenceExample(_prompt_messages(row, row["prompt"], chosen, source), chosen, rejected, source, shape)
        if not isinstance(row["chosen"], list) or not isinstance(row["rejected"], list):
            raise UserError(f"{source}: 'chosen'/'rejected' strings need a 'prompt' (or give them as message lists)")
        if row["chosen"][:-1] != row["rejected"][:-1] or len(row["chosen"]) < 2:
            raise UserError(f"{source}: 'chosen' and 'rejected' message lists must share every turn but the last "
                            f"(the prompt), or give the prompt as 'prompt'")
        return PreferenceExample(_prompt_messages(row, row["chosen"][:-1], chosen, source), chosen, rejected, source,
                                 "chosen/rejected (messages)")
    if "label" in row:
        label = row["label"]
        if not isinstance(label, bool):
            raise UserError(f"{source}: 'label' must be true or false (KTO: is the completion desirable?), got {label!r}")
        if "messages" in row:
            messages = normalise_row({k: v for k, v in row.items() if k != "label"}, source).messages
            prompt, completion, shape = messages[:-1], messages[-1]["content"], "messages+label"
        else:
            completion = _assistant_text(row.get("completion"), "completion", source)
            prompt, shape = _prompt_messages(row, row.get("prompt"), completion, source), "prompt/completion/label"
        return PreferenceExample(prompt, completion if label else None, None if label else completion, source, shape)
    keys = ", ".join(sorted(map(str, row))) or "(none)"
    raise UserError(f"{source}: not a preference row; keys found: {keys}. Accepted shapes: {ACCEPTED_PREFERENCE_SHAPES}.")
