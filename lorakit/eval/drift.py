"""Drift: how far the tuned model's next-token distributions moved from the base's, measured
teacher-forced on the base's own answers (the adapter switched off gives the base)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import PreTrainedTokenizerBase

DRIFT_QUESTIONS = 16  # drift is measured on every sixth retention question: two forwards each, on CPU it adds up


@contextmanager
def adapter_off(model):
    """The base model's behaviour: the same PEFT model with its adapter switched off."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def teacher_forced_kl(model, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], replies: list[list[int]], *,
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
