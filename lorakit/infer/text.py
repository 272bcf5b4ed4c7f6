"""Token ids <-> text while generating: incremental decoding for streaming, and the ids that end a turn."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from lorakit.data.render import IGNORE_INDEX, render_conversation


class TextStream:
    """Turns a growing list of token ids into new text pieces, never half a UTF-8 character.

    Decodes a short window (from `prefix` to the end) and emits what it adds over the window's
    already-emitted part, so word-joining spaces come out as the full decode would print them.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        done = self._decode(self.ids[self.prefix:self.read])
        full = self._decode(self.ids[self.prefix:])
        if len(full) <= len(done) or (full.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(done):]


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, model=None) -> set[int]:
    """EOS ids of the tokenizer and the generation config, plus the token the chat template ends an
    assistant turn with (the last learned token of a rendered one-turn conversation, if special)."""
    ids = set()
    for eos in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids.update(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if getattr(tokenizer, "chat_template", None):
        rendered = render_conversation(tokenizer, [{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hello"}])
        learned = [t for t in rendered.labels if t != IGNORE_INDEX]
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        if learned and learned[-1] in special:
            ids.add(learned[-1])
    return ids
