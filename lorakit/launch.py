"""Start a run on several processes: the strategy the flags ask for, and the torchrun command line.

`NPROC_PER_NODE=N lorakit sft ...` re-executes itself through torchrun with ms-swift's variables
(NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT); `torchrun ... -m lorakit sft ...` needs nothing
from here. torchrun owns the processes: one failing ends the others, and it forwards Ctrl-C.
Pure functions of the flags and the environment (no torch import: the CLI calls them before the
re-launch, so a bad flag costs no process start-up).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import UserError

DEFAULT_MASTER_PORT = "29500"  # torchrun's own default
# --deepspeed name -> (FSDP2 reshard_after_forward, CPU offload); stage 0 is plain data parallel (DDP)
DEEPSPEED_STAGES = {0: None, 1: False, 2: False, 3: True}
DEEPSPEED_NAMES = {"zero0": (0, False), "zero1": (1, False), "zero2": (2, False), "zero3": (3, False),
                   "zero2_offload": (2, True), "zero3_offload": (3, True)}
FSDP_WORDS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")


# ---------------------------------------------------------------- strategy


@dataclass(frozen=True)
class Strategy:
    """How the model is spread over the processes."""

    kind: str = "single"  # "single" (one process, no group), "ddp" or "fsdp"
    reshard_after_forward: bool = True
    "FSDP2: free gathered parameters after forward (ZeRO-3, full_shard) or keep them to backward (ZeRO-1/2)."
    offload: bool = False
    "FSDP2: sharded parameters, gradients and optimizer states live on the CPU (the optimizer steps there)."
    asked: str = ""
    "The flag that chose it, for the one-line mapping."

    def describe(self) -> str:
        """'DDP' / 'FSDP2 fully_shard (...)' in words."""
        if self.kind == "ddp":
            return "DDP (replicated weights, gradients all-reduced)"
        if self.kind == "fsdp":
            kept = "resharded after forward" if self.reshard_after_forward else "kept whole from forward to backward"
            where = "; parameters, gradients and optimizer states offloaded to the CPU" if self.offload else ""
            return f"FSDP2 fully_shard per decoder layer (weights, gradients, optimizer states sharded; weights {kept}{where})"
        return "one process"


def normalize_deepspeed(value: str) -> str:
    """ms-swift's spellings (default-zero2, zero3-offload, ...) -> zero2, zero3_offload, ..."""
    name = value.strip().lower().removeprefix("default-").replace("-", "_")
    return name


def deepspeed_stage(value: str) -> tuple[int, bool]:
    """(ZeRO stage, CPU offload) of --deepspeed NAME or --deepspeed FILE.json."""
    name = normalize_deepspeed(value)
    if name in DEEPSPEED_NAMES:
        return DEEPSPEED_NAMES[name]
    path = Path(value).expanduser()
    if path.suffix != ".json":
        raise UserError(f"--deepspeed {value!r}: expected one of {', '.join(DEEPSPEED_NAMES)} (or ms-swift's "
                        f"default-zero2 ... spellings), or a DeepSpeed JSON config file.")
    if not path.is_file():
        raise UserError(f"--deepspeed {value}: no such file ({path.resolve()}).")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"--deepspeed {path.resolve()}:{exc.lineno}: not valid JSON ({exc.msg}).") from None
    zero = config.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    if stage not in DEEPSPEED_STAGES:
        raise UserError(f"--deepspeed {path.resolve()}: zero_optimization.stage {stage} is not 0, 1, 2 or 3.")
    offload = any(str((zero.get(k) or {}).get("device", "none")).lower() == "cpu"
                  for k in ("offload_optimizer", "offload_param"))
    return stage, offload


def resolve_strategy(*, deepspeed: str | None, fsdp: list[str], train_type: str, launched: bool) -> Strategy:
    """The strategy --deepspeed / --fsdp ask for; else DDP for LoRA and FSDP2 for full fine-tuning under a launcher."""
    if deepspeed and fsdp:
        raise UserError("--deepspeed and --fsdp both choose the sharding: give one of them.")
    if deepspeed:
        stage, offload = deepspeed_stage(deepspeed)
        if stage == 0:
            return Strategy("ddp", asked=f"--deepspeed {deepspeed}")
        return Strategy("fsdp", reshard_after_forward=DEEPSPEED_STAGES[stage], offload=offload,
                        asked=f"--deepspeed {deepspeed}")
    words = [w for value in fsdp for w in value.replace(",", " ").split()]
    unknown = [w for w in words if w not in FSDP_WORDS]
    if unknown:
        raise UserError(f"--fsdp {' '.join(unknown)}: expected some of {', '.join(FSDP_WORDS)} "
                        f"(e.g. --fsdp full_shard offload).")
    if words:
        if "full_shard" in words and "shard_grad_op" in words:
            raise UserError("--fsdp: full_shard and shard_grad_op exclude each other; give one.")
        return Strategy("fsdp", reshard_after_forward="shard_grad_op" not in words, offload="offload" in words,
                        asked="--fsdp " + " ".join(words))
    if not launched:
        return Strategy()
    return Strategy("fsdp", asked="--train_type full") if train_type == "full" else Strategy("ddp", asked="--train_type lora")


def refuse_several_processes(what: str, dist_args) -> None:
    """A command with a loop of its own runs on one process: say so instead of N copies of one run."""
    several = under_launcher() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several or dist_args.deepspeed or dist_args.fsdp:
        raise UserError(f"{what} runs on one process: drop NPROC_PER_NODE / torchrun and --deepspeed / --fsdp "
                        f"(several processes train sft and the preference losses: dpo, orpo, simpo, cpo, kto).")


# ---------------------------------------------------------------- launcher


def under_launcher(environ: dict[str, str] | None = None) -> bool:
    """True inside a process torchrun (or another launcher setting RANK/WORLD_SIZE/LOCAL_RANK) started."""
    env = os.environ if environ is None else environ
    return all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _env_int(env: dict[str, str], name: str, default: int, low: int) -> int:
    text = env.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{name}={text!r}: expected a whole number.") from None
    if value < low:
        raise UserError(f"{name}={value}: must be at least {low}.")
    return value


def torchrun_argv(command: str, argv: list[str], *, environ: dict[str, str] | None = None,
                  timeout_s: int = 1800) -> list[str] | None:
    """The torchrun command line NPROC_PER_NODE asks for (ms-swift's variables), or None when not asked/already launched."""
    env = dict(os.environ if environ is None else environ)
    if not env.get("NPROC_PER_NODE") or under_launcher(env):
        return None
    nproc = _env_int(env, "NPROC_PER_NODE", 1, 1)
    nnodes = _env_int(env, "NNODES", 1, 1)
    node_rank = _env_int(env, "NODE_RANK", 0, 0)
    if node_rank >= nnodes:
        raise UserError(f"NODE_RANK={node_rank} with NNODES={nnodes}: node ranks run 0..{nnodes - 1}.")
    flags = ["--nproc_per_node", str(nproc), "--nnodes", str(nnodes)]
    if nnodes == 1 and "MASTER_ADDR" not in env and "MASTER_PORT" not in env:
        flags.append("--standalone")  # a free local port: several single-node jobs can share a machine
    else:
        if nnodes > 1 and "MASTER_ADDR" not in env:
            raise UserError(f"NNODES={nnodes}: set MASTER_ADDR to the address of the node with NODE_RANK=0 "
                            f"(and the same MASTER_PORT on every node).")
        flags += ["--node_rank", str(node_rank), "--master_addr", env.get("MASTER_ADDR", "127.0.0.1"),
                  "--master_port", env.get("MASTER_PORT", DEFAULT_MASTER_PORT),
                  "--rdzv_conf", f"timeout={timeout_s}"]  # nodes that never come end the wait
    return [sys.executable, "-m", "torch.distributed.run", *flags, "-m", "lorakit", command, *argv]


def relaunch(command: str, argv: list[str], *, timeout_s: int) -> None:
    """Replace this process with torchrun when NPROC_PER_NODE asks for several processes; else return."""
    cmd = torchrun_argv(command, argv, timeout_s=timeout_s)
    if cmd is None:
        return
    shown = " ".join(cmd[1:6] + ["..."])
    print(f"launching through torchrun: {shown}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # torchrun owns the processes: one failing or Ctrl-C ends them all
