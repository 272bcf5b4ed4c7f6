"""THE one place a conversation becomes token ids: training renders and inference prompts.

The tokenizer's own chat template (jinja, via transformers) is the source of truth. Training
labels are found by rendering prefixes of the conversation with the same template: the text
between "messages[:i] + generation prompt" and "messages[:i+1]" is assistant turn i, and it is
learned up to and including its end-of-turn token (e.g. ``<|im_end|>``) but not the whitespace
the template puts after it. The prompt part of a training render is token-identical to
``render_prompt`` on the same messages, so training and inference cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import UserError

IGNORE_INDEX = -100

# Plain ChatML, for tokenizers that ship no chat template (`--template chatml`).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_DEFAULT_TEMPLATE_NAMES = (None, "", "default", "auto")


@dataclass
class Rendered:
    """Token ids of one conversation and their labels (IGNORE_INDEX where there is no loss)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_loss_tokens(self) -> int:
        """How many tokens carry loss."""
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def set_chat_template(tokenizer, template: str | None) -> None:
    """Apply `--template`: keep the tokenizer's own, use built-in ChatML, or read a .jinja file."""
    if template in _DEFAULT_TEMPLATE_NAMES:
        _require_template(tokenizer)
        return
    if template == "chatml":
        _ensure_chatml_tokens(tokenizer)
        tokenizer.chat_template = CHATML_TEMPLATE
        return
    path = Path(template).expanduser()
    if path.is_file():
        tokenizer.chat_template = path.read_text(encoding="utf-8")
        return
    raise UserError(
        f"--template {template}: unknown template. lorakit renders with the tokenizer's own chat template; "
        f"accepted values are 'default', 'chatml' (built-in fallback) or a path to a jinja file "
        f"(not found: {path.resolve()})."
    )


def render_prompt(tokenizer, messages: list[dict[str, str]], *, system: str | None = None) -> list[int]:
    """Token ids of `messages` followed by the assistant generation prompt (what inference feeds the model)."""
    messages = with_system(messages, system)
    text = _apply(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_conversation(
    tokenizer, messages: list[dict[str, str]], *, system: str | None = None, loss_on_prompt: bool = False
) -> Rendered:
    """Token ids and labels of a whole conversation; loss on every assistant turn plus its end-of-turn token."""
    messages = with_system(messages, system)
    text = _apply(tokenizer, messages, add_generation_prompt=False)
    spans = assistant_spans(tokenizer, messages, text)
    if not spans:
        raise UserError("conversation has no assistant turn, so there is nothing to learn from it")
    ids, labels = _tokenize_with_spans(tokenizer, text, spans)
    if loss_on_prompt:
        labels = list(ids)
    return Rendered(input_ids=ids, labels=labels)


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """Apply system precedence: a system turn in `messages` > `system` > the template's default."""
    if system is None or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system}] + list(messages)


def assistant_spans(tokenizer, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Character spans of `text` (the full render) that are assistant turns, end-of-turn token included."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _apply(tokenizer, messages[:i], add_generation_prompt=True)
        upto = text if i == len(messages) - 1 else _apply(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not upto.startswith(prompt) or not text.startswith(upto):
            raise UserError(
                f"the chat template renders turn {i + 1} differently depending on what follows it, so the "
                "assistant text cannot be located for the loss mask. Use --template chatml or a jinja file "
                "whose renders of a conversation's prefixes are prefixes of the full render."
            )
        # Learn the answer and its end-of-turn token, not the newline the template adds after it.
        end = len(upto.rstrip())
        if end > len(prompt):
            spans.append((len(prompt), end))
    return spans


def _tokenize_with_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Tokenize once with offsets; fall back to piecewise tokenization if a token straddles a span edge."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    starts = [a for a, _ in offsets]
    ends = [b for _, b in offsets]
    cuts = [c for span in spans for c in span]
    if all(_is_token_boundary(starts, ends, c, len(text)) for c in cuts):
        labels = [IGNORE_INDEX] * len(ids)
        for k, (a, b) in enumerate(offsets):
            if any(s <= a and b <= e and b > a for s, e in spans):
                labels[k] = ids[k]
        return list(ids), labels
    return _tokenize_piecewise(tokenizer, text, spans)


def _is_token_boundary(starts: list[int], ends: list[int], cut: int, n: int) -> bool:
    if cut >= n:
        return True
    # Some token starts exactly at `cut` and no token spans across it.
    return cut in set(starts) and not any(a < cut < b for a, b in zip(starts, ends))


def _tokenize_piecewise(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for start, end in spans + [(len(text), len(text))]:
        for piece, learn in ((text[pos:start], False), (text[start:end], True)):
            if not piece:
                continue
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids += piece_ids
            labels += piece_ids if learn else [IGNORE_INDEX] * len(piece_ids)
        pos = end
    return ids, labels


def _apply(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    _require_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _require_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(
            f"the tokenizer of {name} has no chat template, so lorakit cannot tell where turns begin and end. "
            "Pass --template chatml to use the built-in ChatML template (or a path to a jinja file)."
        )


def _ensure_chatml_tokens(tokenizer) -> None:
    """ChatML needs <|im_start|>/<|im_end|> as single special tokens; refuse silently splitting them."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in vocab]
    if missing:
        raise UserError(
            f"--template chatml: the tokenizer has no {', '.join(missing)} token(s), so ChatML turns would be "
            "split into ordinary text. Use a model whose tokenizer ships a chat template, or a jinja file."
        )
