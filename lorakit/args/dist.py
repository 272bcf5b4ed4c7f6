"""Several GPUs or machines: --deepspeed, --fsdp, --ddp_* (see lorakit.launch and lorakit.distributed)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.args.checks import check_choice
from lorakit.errors import UserError


@dataclass
class DistArgs:
    """Several GPUs / machines (start with NPROC_PER_NODE=N, or torchrun; see lorakit.distributed)."""

    deepspeed: str | None = None
    "zero0|zero1|zero2|zero3|zero2_offload|zero3_offload (ms-swift's default-zero2 ... too) or a DeepSpeed JSON: run as its PyTorch FSDP2 equivalent (printed)."
    fsdp: list[str] = field(default_factory=list)
    "FSDP2 fully_shard: full_shard (ZeRO-3), shard_grad_op (ZeRO-2), offload (optimizer states on the CPU). Empty, on several processes: DDP for LoRA, full_shard for full fine-tuning."
    ddp_timeout: int = 1800
    "Seconds any wait on the other processes (start-up rendezvous, a collective) may last before the job fails."
    ddp_backend: str | None = None
    "nccl or gloo. Empty: nccl on GPUs, gloo on the CPU."

    def __post_init__(self):
        if self.ddp_timeout <= 0:
            raise UserError(f"--ddp_timeout must be positive, got {self.ddp_timeout}.")
        if self.ddp_backend is not None:
            check_choice("ddp_backend", self.ddp_backend, ("nccl", "gloo"))
