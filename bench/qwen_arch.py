"""The Qwen2.5-7B architecture with random weights, shared by the GPU benchmarks.

Speed and memory do not depend on the weights' values, so no download is needed.
"""

import torch

QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                 max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
# The same shape in miniature: a CPU dry run of a benchmark's own logic.
TINY = dict(QWEN25_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def build_random_qwen2(settings: dict, dtype, device, weight_std: float | None = None):
    """A random Qwen2 created directly on `device` (HF init, or normal(0, weight_std) matrices)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**settings), dtype=dtype)
    if weight_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, weight_std)
    return model.eval()
