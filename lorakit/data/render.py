"""THE one place a conversation becomes token ids: training renders and inference prompts.

The tokenizer's own chat template (jinja, via transformers) is the source of truth. Training
labels are found by rendering prefixes of the conversation with the same template: the text
between "messages[:i] + generation prompt" and "messages[:i+1]" is assistant turn i, and it is
learned up to and including its end-of-turn token (e.g. ``<|im_end|>``) but not the whitespace
the template puts after it. The prompt part of a training render is token-identical to
``render_prompt`` on the same messages, so training and inference cannot drift apart.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

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
    teacher: dict[int, tuple[list[int], list[float]]] | None = None
    "Distillation targets: token position -> the teacher's top-k (ids, probs) for that token (replaces its label)."
    loss_scale: float = 1.0
    "What the loss of each of its tokens is multiplied by (the row's loss_scale; replay: --replay_weight)."

    @property
    def num_loss_tokens(self) -> int:
        """How many tokens carry loss."""
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


def set_chat_template(tokenizer: PreTrainedTokenizerBase, template: str | None) -> None:
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


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *,
                  system: str | None = None) -> list[int]:
    """Token ids of `messages` followed by the assistant generation prompt (what inference feeds the model)."""
    messages = with_system(messages, system)
    text = _apply(tokenizer, messages, add_generation_prompt=True)
    # Earlier assistant turns are cut exactly where training cuts them, so the ids match token for token.
    spans = assistant_spans(tokenizer, messages, text, text_is_conversation=False)
    return _tokenize(tokenizer, text, spans)[0]


def render_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, system: str | None = None,
    loss_on_prompt: bool = False,
) -> Rendered:
    """Token ids and labels of a whole conversation; loss on every assistant turn plus its end-of-turn token."""
    return render_conversations(tokenizer, [messages], system=system, loss_on_prompt=loss_on_prompt)[0]


def render_conversations(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    *,
    system: str | None = None,
    loss_on_prompt: bool = False,
    sources: list[str] | None = None,
) -> list[Rendered]:
    """render_conversation for many conversations, tokenized in one batch call (errors name `sources`)."""
    texts, all_spans = [], []
    for k, messages in enumerate(conversations):
        try:
            messages = with_system(messages, system)
            text = _apply(tokenizer, messages, add_generation_prompt=False)
            spans = assistant_spans(tokenizer, messages, text)
            if not spans:
                raise UserError("conversation has no assistant turn, so there is nothing to learn from it")
        except UserError as e:
            raise UserError(f"{sources[k]}: {e}" if sources else str(e)) from None
        texts.append(text)
        all_spans.append(spans)
    if not texts:
        return []
    encodings = _encode_batch(tokenizer, texts) or [None] * len(texts)
    out = []
    for text, spans, encoding in zip(texts, all_spans, encodings):
        ids, labels = _tokenize(tokenizer, text, spans, encoding)
        out.append(Rendered(input_ids=ids, labels=list(ids) if loss_on_prompt else labels))
    return out


def _encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list | None:
    """Rust `tokenizers.Encoding`s (ids + character offsets); None for slow tokenizers, which have no offsets."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        return None
    return backend.encode_batch(texts, add_special_tokens=False)


def template_default_system(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The system prompt the chat template inserts when a conversation has none (None if it inserts none)."""
    marker_sys, marker_user = "\x01SYSTEM\x01", "\x02"
    with_sys = _apply(tokenizer, [{"role": "system", "content": marker_sys}, {"role": "user", "content": marker_user}],
                      add_generation_prompt=False)
    without = _apply(tokenizer, [{"role": "user", "content": marker_user}], add_generation_prompt=False)
    if marker_sys not in with_sys or marker_user not in without:
        return None
    before, after = with_sys.split(marker_user)[0].split(marker_sys)
    head = without.split(marker_user)[0]
    if head.startswith(before) and head.endswith(after) and len(head) > len(before) + len(after):
        return head[len(before): len(head) - len(after)]
    return None


def system_markers(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str] | None:
    """The text the chat template writes before and after a system prompt: ('<|im_start|>system', '<|im_end|>')."""
    marker_sys, marker_user = "\x01SYSTEM\x01", "\x02"
    text = _apply(tokenizer, [{"role": "system", "content": marker_sys}, {"role": "user", "content": marker_user}],
                  add_generation_prompt=False)
    if marker_sys not in text:
        return None
    before, after = text.split(marker_user)[0].split(marker_sys)
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t] + \
        [str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    # Llama 3 starts every text with <|begin_of_text|>; a pasted system turn starts at the next control token.
    bos = getattr(tokenizer, "bos_token", None) or ""
    rest = before.removeprefix(bos).strip() if before.startswith(bos) else ""
    if bos and any(rest.startswith(t) for t in specials):
        before = rest
    ends = [after.find(t) + len(t) for t in specials if t in after]
    after = after[: min(ends)].strip() if ends else ""  # up to the first control token: the end of the turn
    return before.strip(), after


def strip_system_markers(tokenizer: PreTrainedTokenizerBase, system: str | None, *, flag: str = "--system",
                         log=None) -> str | None:
    """A system prompt pasted with the template's own markers, '<|im_start|>system\\nX<|im_end|>', as 'X'.

    The template writes the markers around the system prompt itself; kept, they would render twice.
    Says so on stderr (or through `log`) when it strips anything.
    """
    markers = system_markers(tokenizer) if system else None
    if markers is None:
        return system
    head, tail = markers
    text, removed = system.strip(), []
    if head and text.startswith(head):
        text, removed = text[len(head):].strip(), removed + [head]
    if tail and text.endswith(tail):
        text, removed = text[: -len(tail)].strip(), removed + [tail]
    if not removed:
        return system
    (log or _warn)(f"warning: {flag} held the chat template's own markers ({' and '.join(map(repr, removed))}); "
                   f"they were removed, since the template writes them around the system prompt itself.")
    return text


def template_with_default_system(template: str, system: str) -> str:
    """`template` with `system` as its default system prompt: a conversation without a system turn gets one.

    The same precedence as `with_system`, written in the template itself, so that every runtime that
    renders it (transformers, vLLM, llama.cpp from a GGUF) prompts the model the way lorakit does.
    """
    literal = json.dumps(system, ensure_ascii=False)  # a JSON string is a valid Jinja string literal
    head = ("{%- if not (messages and messages[0]['role'] == 'system') -%}"
            f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages -%}}"
            "{%- endif -%}\n")
    return head + template


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """Apply system precedence: a system turn in `messages` > `system` > the template's default ("" = unset)."""
    if not system or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system}] + list(messages)


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], text: str, *, text_is_conversation: bool = True
) -> list[tuple[int, int]]:
    """Character spans of `text` (a render of `messages`) that are assistant turns, end-of-turn token included.

    text_is_conversation=False: `text` also carries a generation prompt (render_prompt's text).
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _apply(tokenizer, messages[:i], add_generation_prompt=True)
        last = i == len(messages) - 1 and text_is_conversation
        upto = text if last else _apply(tokenizer, messages[: i + 1], add_generation_prompt=False)
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


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]],
              encoding=None) -> tuple[list[int], list[int]]:
    """Token ids of `text` and labels (the ids inside `spans`, IGNORE_INDEX elsewhere).

    The text is tokenized whole, except that it is split (and the pieces tokenized apart) at any
    span edge a token would straddle: the answer then starts on a token boundary, as it does when
    the model generates it. render_prompt applies the same rule to the earlier turns it contains,
    so a training prompt and an inference prompt always get the same ids.
    """
    cuts = sorted({c for span in spans for c in span if 0 < c < len(text)})
    if encoding is None:
        encoding = _encode(tokenizer, text)
    index = {c: _token_at(encoding, c) for c in cuts} if encoding is not None else {c: None for c in cuts}
    straddled = [c for c in cuts if index[c] is None]
    if not straddled:
        ids = list(encoding.ids) if encoding is not None else tokenizer(text, add_special_tokens=False)["input_ids"]
        index.update({0: 0, len(text): len(ids)})
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            labels[index[start]:index[end]] = ids[index[start]:index[end]]
        return ids, labels
    ids, labels = [], []
    bounds = [0] + straddled + [len(text)]
    for a, b in zip(bounds, bounds[1:]):
        inner = [(max(s, a) - a, min(e, b) - a) for s, e in spans if s < b and e > a]
        piece_ids, piece_labels = _tokenize(tokenizer, text[a:b], inner)
        ids += piece_ids
        labels += piece_labels
    return ids, labels


def _encode(tokenizer: PreTrainedTokenizerBase, text: str):
    """One Rust `tokenizers.Encoding` (ids + character offsets); None for a slow tokenizer."""
    encodings = _encode_batch(tokenizer, [text])
    if encodings is not None:
        return encodings[0]
    return None


def _token_at(encoding, cut: int) -> int | None:
    """Index of the token that starts exactly at character `cut`, or None if a token straddles it."""
    k = encoding.char_to_token(cut)
    if k is None or encoding.token_to_chars(k)[0] != cut:
        return None
    # The previous token must end exactly here: a gap means offsets were trimmed (a space hides in a token).
    if k > 0 and encoding.token_to_chars(k - 1)[1] != cut:
        return None
    return k


def _apply(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    _require_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _require_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(
            f"the tokenizer of {name} has no chat template, so lorakit cannot tell where turns begin and end. "
            "Pass --template chatml to use the built-in ChatML template (or a path to a jinja file)."
        )


def _ensure_chatml_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """ChatML needs <|im_start|>/<|im_end|> as single special tokens; refuse silently splitting them."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in vocab]
    if missing:
        raise UserError(
            f"--template chatml: the tokenizer has no {', '.join(missing)} token(s), so ChatML turns would be "
            "split into ordinary text. Use a model whose tokenizer ships a chat template, or a jinja file."
        )
