"""The plainest greedy generator: the whole sequence through `model(...)` at every step, no cache,
no padding, no batching. Slow on purpose; it is the ground truth the engine is tested against."""

from __future__ import annotations

import torch


@torch.inference_mode()
def greedy_generate(model, prompt: list[int], *, max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """The argmax reply to one prompt: its tokens without the stop token, at most max_new_tokens."""
    device = next(model.parameters()).device
    ids = list(prompt)
    reply: list[int] = []
    while len(reply) < max_new_tokens:
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1]
        token = int(logits.float().argmax())
        if token in stop_ids:
            break
        reply.append(token)
        ids.append(token)
    return reply
