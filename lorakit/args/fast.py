"""Speed and memory of training: the GPU fast paths and activation recompute (lorakit.fast applies them)."""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.errors import UserError

# --gradient_checkpointing -> the recompute mode lorakit.fast plans with
CHECKPOINTING = {None: "auto", True: "full", False: "none"}


@dataclass
class FastOptions:
    """GPU fast paths, each one switchable off, and activation recompute. CPU always runs the reference.

    The flags and the settings `lorakit.fast.prepare_for_training` reads are this one object.
    """

    fused_loss: bool = True
    "Chunked lm_head + cross-entropy over the positions with a target only, never holding the full-vocabulary fp32 logits (CPU too). false: plain logits + CE."
    fused_lora: bool = True
    "GPU: LoRA projections in bf16 with fused GEMMs. false: PEFT's own LoRA forward."
    packed_attention: bool = True
    "GPU: per-sample attention on packed rows (varlen flash), cuDNN/flash SDPA otherwise. false: transformers SDPA."
    torch_compile: bool = True
    "GPU: torch.compile each decoder layer (fuses norms, RoPE, SwiGLU, adds). false: eager."
    gradient_checkpointing: bool | None = None
    "Recompute activations in the backward pass to save memory. Empty: on for GPU, off for CPU."
    gpu_memory_limit: float | None = None
    "GiB the automatic recompute plan keeps the peak under (when --gradient_checkpointing is empty). Empty: 92% of the card."

    def __post_init__(self):
        if self.gradient_checkpointing not in CHECKPOINTING:
            raise UserError(f"--gradient_checkpointing takes true, false or nothing (the automatic plan), got "
                            f"{self.gradient_checkpointing!r}.")
        if self.gpu_memory_limit is not None and not self.gpu_memory_limit > 0:
            raise UserError(f"--gpu_memory_limit must be a positive number of GiB, got {self.gpu_memory_limit}.")

    @property
    def checkpointing(self) -> str:
        """'auto': on a GPU, recompute only as many layers as the memory limit needs; 'full': every layer; 'none'."""
        return CHECKPOINTING[self.gradient_checkpointing]

    @classmethod
    def for_device(cls, device) -> FastOptions:
        """Everything on for CUDA; the plain reference path elsewhere (device: a torch.device or its name)."""
        kind = getattr(device, "type", None) or str(device).split(":")[0]
        return cls() if kind == "cuda" else cls.reference()

    @classmethod
    def reference(cls, gradient_checkpointing: bool | None = False) -> FastOptions:
        """Every fast path off (the plain transformers + PEFT computation)."""
        return cls(fused_loss=False, fused_lora=False, packed_attention=False, torch_compile=False,
                   gradient_checkpointing=gradient_checkpointing)
