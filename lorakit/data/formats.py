"""Detect the shape of one dataset row and normalise it to a Conversation.

Accepted shapes (checked per row, first match wins):

- messages:        {"messages": [{"role", "content"}, ...]}            (OpenAI)
- sharegpt:        {"conversations": [{"from", "value"}, ...], "system"?}
- alpaca:          {"instruction", "input"?, "output", "system"?, "history"?}
- query-response:  {"query", "response", "system"?, "history"?}
- prompt-response: {"prompt", "response", "system"?}
- prompt-completion: {"prompt", "completion"}
- question-answer: {"question", "answer"}

Any shape may also carry "loss_scale": a number >= 0 that multiplies the loss of every answer token of
the row (default 1; ms-swift's name for it; 2 teaches the row as hard as two copies of it would).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorakit.errors import UserError

ACCEPTED_SHAPES = (
    "messages: [{role, content}, ...] (OpenAI); "
    "conversations: [{from, value}, ...] (+system) (ShareGPT); "
    "instruction/input/output (+system, history) (Alpaca); "
    "query/response (+system, history); prompt/response (+system); "
    "prompt/completion; question/answer"
)

# Keys that must all be present for a shape, in detection order.
_SHAPES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("query-response", ("query", "response")),
    ("prompt-response", ("prompt", "response")),
    ("prompt-completion", ("prompt", "completion")),
    ("question-answer", ("question", "answer")),
)

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    """One training example: chat messages plus where it came from (for error messages)."""

    messages: list[dict[str, str]]
    source: str
    loss_scale: float = 1.0
    "What every answer token's loss is multiplied by (the row's \"loss_scale\"; 1 when it has none)."


def detect_format(row: dict, *, require_answer: bool = True) -> str | None:
    """Name of the row's shape (see module docstring), or None if it matches none.

    require_answer=False also accepts prompt-only rows (e.g. {"query": ...}) for inference.
    """
    if not isinstance(row, dict):
        return None
    for name, keys in _SHAPES:
        if all(row.get(k) is not None for k in keys):
            return name
    if not require_answer:
        for name, keys in _SHAPES:
            if row.get(keys[0]) is not None:
                return name
    return None


def normalise_row(row: dict, source: str, *, require_answer: bool = True) -> Conversation:
    """Turn one row of any accepted shape into a validated Conversation, or raise UserError.

    require_answer=False (inference rows) allows a conversation that ends with a user turn.
    """
    if not isinstance(row, dict):
        raise UserError(
            f"{source}: expected a JSON object per row, got {type(row).__name__}. "
            f"Accepted shapes: {ACCEPTED_SHAPES}."
        )
    shape = detect_format(row, require_answer=require_answer)
    if shape is None:
        keys = ", ".join(sorted(map(str, row))) or "(none)"
        raise UserError(
            f"{source}: row has no known shape; keys found: {keys}. "
            f"Accepted shapes: {ACCEPTED_SHAPES}."
        )
    if shape == "messages":
        messages = _from_messages(row["messages"], source)
    elif shape == "sharegpt":
        messages = _from_sharegpt(row["conversations"], source)
        messages = _with_system(messages, row, source)
    elif shape == "alpaca":
        query = _text(row, "instruction", source)
        extra = _optional_text(row, "input", source)
        if extra:
            query = f"{query}\n{extra}"
        messages = _history(row, source) + _pair(query, _answer(row, "output", source))
        messages = _with_system(messages, row, source)
    else:
        q_key, a_key = dict(_SHAPES)[shape]
        messages = _history(row, source) + _pair(_text(row, q_key, source), _answer(row, a_key, source))
        messages = _with_system(messages, row, source)
    _validate(messages, source, require_answer=require_answer)
    return Conversation(messages=messages, source=source, loss_scale=_loss_scale(row, source))


def _loss_scale(row: dict, source: str) -> float:
    """The row's "loss_scale": a finite number >= 0 (a CSV cell's text is read as one); 1.0 when absent."""
    value = row.get("loss_scale")
    if value is None:
        return 1.0
    number = value
    if isinstance(value, str):  # CSV cells are text
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number < 0:
        raise UserError(f"{source}: 'loss_scale' must be a finite number >= 0 (1 = a normal row, 2 = twice its loss, "
                        f"0 = no loss), got {value!r:.80}")
    return float(number)


def _pair(query: str, answer: str | None) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": query}]
    return turns if answer is None else turns + [{"role": "assistant", "content": answer}]


def _answer(row: dict, key: str, source: str) -> str | None:
    """The answer text; None only when the key is absent (prompt-only rows)."""
    return None if row.get(key) is None else _text(row, key, source)


def _text(row: dict, key: str, source: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise UserError(f"{source}: '{key}' must be a string, got {type(value).__name__}: {value!r:.80}")
    if not value.strip():
        raise UserError(f"{source}: '{key}' is empty; every turn needs text")
    return value


def _optional_text(row: dict, key: str, source: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"{source}: '{key}' must be a string, got {type(value).__name__}: {value!r:.80}")
    return value


def _with_system(messages: list[dict[str, str]], row: dict, source: str) -> list[dict[str, str]]:
    system = _optional_text(row, "system", source)
    if not system or not system.strip():
        return messages
    if messages and messages[0]["role"] == "system":
        raise UserError(f"{source}: row has both a 'system' key and a system turn; keep one")
    return [{"role": "system", "content": system}] + messages


def _history(row: dict, source: str) -> list[dict[str, str]]:
    history = row.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise UserError(f"{source}: 'history' must be a list of [query, response] pairs, got {type(history).__name__}")
    messages: list[dict[str, str]] = []
    for i, pair in enumerate(history):
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        if not ok:
            raise UserError(f"{source}: history[{i}] must be a [query, response] pair of strings, got {pair!r:.80}")
        messages += _pair(pair[0], pair[1])
    return messages


def _from_messages(turns: object, source: str) -> list[dict[str, str]]:
    if not isinstance(turns, list):
        raise UserError(f"{source}: 'messages' must be a list of {{role, content}} objects, got {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise UserError(f"{source}: messages[{i}] must be an object with 'role' and 'content', got {turn!r:.80}")
        role, content = turn["role"], turn["content"]
        if role not in _ROLES:
            raise UserError(f"{source}: messages[{i}] has role {role!r}; use one of {', '.join(_ROLES)}")
        if not isinstance(content, str):
            raise UserError(
                f"{source}: messages[{i}].content must be a string, got {type(content).__name__}: {content!r:.80}"
            )
        messages.append({"role": role, "content": content})
    return messages


def _from_sharegpt(turns: object, source: str) -> list[dict[str, str]]:
    if not isinstance(turns, list):
        raise UserError(
            f"{source}: 'conversations' must be a list of {{from, value}} objects, got {type(turns).__name__}"
        )
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise UserError(f"{source}: conversations[{i}] must be an object with 'from' and 'value', got {turn!r:.80}")
        role = _SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise UserError(
                f"{source}: conversations[{i}] has from={turn['from']!r}; use one of {', '.join(_SHAREGPT_ROLES)}"
            )
        if not isinstance(turn["value"], str):
            raise UserError(f"{source}: conversations[{i}].value must be a string, got {type(turn['value']).__name__}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _validate(messages: list[dict[str, str]], source: str, *, require_answer: bool = True) -> None:
    """Check the turn order a chat template can render and a trainer can learn from."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise UserError(f"{source}: row has no user or assistant turns")
    for i, message in enumerate(messages):
        if message["role"] == "system" and i > 0:
            raise UserError(f"{source}: turn {i + 1} is a system turn; only the first turn may be a system prompt")
        if message["role"] != "system" and not message["content"].strip():
            raise UserError(f"{source}: turn {i + 1} ({message['role']}) has empty content")
    if require_answer and not any(m["role"] == "assistant" for m in body):
        raise UserError(f"{source}: row has no assistant turn, so there is nothing to learn from it")
    if body[0]["role"] != "user":
        raise UserError(f"{source}: the first turn after the system prompt must be a user turn, got {body[0]['role']}")
    for prev, cur in zip(body, body[1:]):
        if prev["role"] == cur["role"]:
            raise UserError(f"{source}: two {cur['role']} turns in a row; user and assistant turns must alternate")
    if require_answer and body[-1]["role"] != "assistant":
        raise UserError(f"{source}: the last turn is a user turn with no answer; end each row with an assistant turn")
