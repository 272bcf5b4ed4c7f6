"""Scoring replies: pure functions on reply text, no model.

A probe reply passes when it states the new name and author and claims no base identity
(`identity_pass`); a general answer is right when it contains an accepted answer
(`retention_correct`) and leaks when it names the new identity (`leaks_identity`)."""

from __future__ import annotations

import re
from collections.abc import Sequence

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


def name_list(value: str | Sequence[str]) -> list[str]:
    """One name or several, blanks dropped."""
    values = [value] if isinstance(value, str) else list(value)
    return [v for v in values if v and v.strip()]


def mentions(text: str, names: str | Sequence[str]) -> bool:
    """True when `text` contains any of `names` (case- and whitespace-insensitive)."""
    squashed = _squash(text)
    return any(_squash(name) in squashed for name in name_list(names))


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
    new = [_squash(n) for n in name_list(name) + name_list(author)]
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
