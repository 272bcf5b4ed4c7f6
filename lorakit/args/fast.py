"""GPU fast paths of training (--fused_loss, --fused_lora, --packed_attention, --torch_compile, --gpu_memory_limit)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FastArgs:
    """GPU fast paths (lorakit.fast.FastOptions); each one can be turned off. CPU always runs the reference."""

    fused_loss: bool = True
    "Chunked lm_head + cross-entropy over the positions with a target only, never holding the full-vocabulary fp32 logits (CPU too). false: plain logits + CE."
    fused_lora: bool = True
    "GPU: LoRA projections in bf16 with fused GEMMs. false: PEFT's own LoRA forward."
    packed_attention: bool = True
    "GPU: per-sample attention on packed rows (varlen flash), cuDNN/flash SDPA otherwise. false: transformers SDPA."
    torch_compile: bool = True
    "GPU: torch.compile each decoder layer (fuses norms, RoPE, SwiGLU, adds). false: eager."
    gpu_memory_limit: float | None = None
    "GiB the automatic recompute plan keeps the peak under (when --gradient_checkpointing is empty). Empty: 92% of the card."
