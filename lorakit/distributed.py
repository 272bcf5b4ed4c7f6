"""Several processes, one training run, on PyTorch's own distributed package (DDP, FSDP2).

lorakit.launch starts the processes (torchrun) and picks the strategy; this module joins the
process group, wraps the model and gives the loop its few collectives.

- Exactness: every rank takes a strided share of the optimizer step's micro-batches, so N
  processes with the same global batch see the samples one process sees through gradient
  accumulation. The loop divides each micro-batch's summed loss by the loss tokens of the WHOLE
  step (an all-reduced count), and gradients are SUMMED across ranks (DDP comm hook; FSDP2 divide
  factor 1), so the gradient is the one-process gradient up to float reduction order.
  Every rank runs the same number of micro-batches (FSDP2's all-gathers and DDP's all-reduce are
  collective): a rank short of one repeats a micro-batch with loss weight 0.
- Output: rank 0 alone prints, logs and writes checkpoints (gathered from FSDP2 shards into the
  same files one process writes); other ranks print only their own error.
- Failure: every wait is bounded by --ddp_timeout; torchrun ends all processes when one exits.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from lorakit.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_weights_into
from lorakit.errors import UserError
from lorakit.fast import decoder_layers
from lorakit.launch import Strategy, resolve_strategy, under_launcher
from lorakit.loss import LossOutput, MetricSums
from lorakit.model import pick_device

# Test hook: "RANK:STEP" makes that rank raise at that optimizer step (1-based), to show the job ends with its error.
_FAIL_ENV = "LORAKIT_TEST_FAIL_RANK"


# ---------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False  # a process group is up
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: Strategy = field(default_factory=Strategy)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(strategy: Strategy, device: torch.device, *, timeout_s: int, backend: str | None = None) -> DistEnv:
    """Join the process group (every wait bounded by timeout_s); the device becomes cuda:LOCAL_RANK on GPUs.

    Outside a launcher an FSDP2 strategy still gets a group of one (so sharding code and CPU offload
    run the same way); DDP and plain runs get no group.
    """
    if strategy.kind == "single":
        return DistEnv(device=device, strategy=strategy)
    launched = under_launcher()
    rank = int(os.environ.get("RANK", 0)) if launched else 0
    world = int(os.environ.get("WORLD_SIZE", 1)) if launched else 1
    local = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"process {rank} wants GPU {local}, but {torch.cuda.device_count()} are visible: one "
                            f"process per GPU (check --nproc_per_node / NPROC_PER_NODE and CUDA_VISIBLE_DEVICES).")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    kwargs: dict[str, Any] = dict(backend=backend, timeout=timedelta(seconds=timeout_s))
    if device.type == "cuda":
        kwargs["device_id"] = device
    if not launched:
        kwargs.update(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if not dist.is_initialized():
        dist.init_process_group(**kwargs)
    return DistEnv(rank=rank, world_size=world, local_rank=local, active=True, device=device, strategy=strategy)


def start(dist_args, *, train_type: str, device: str | None) -> DistEnv:
    """Resolve the strategy from the flags, join the group and print (rank 0) one line saying how the run is spread."""
    launched = under_launcher()
    strategy = resolve_strategy(deepspeed=dist_args.deepspeed, fsdp=dist_args.fsdp, train_type=train_type,
                                launched=launched)
    env = init(strategy, pick_device(device), timeout_s=dist_args.ddp_timeout, backend=dist_args.ddp_backend)
    if env.is_main and (env.active or strategy.asked):
        nodes = int(os.environ.get("WORLD_SIZE", 1)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        where = f"{env.world_size} process(es) on {nodes} node(s), {dist.get_backend() if env.active else 'no group'}"
        deepspeed = " (DeepSpeed itself is not used)" if dist_args.deepspeed else ""
        print(f"distributed: {strategy.asked} -> {strategy.describe()}{deepspeed}; {where}", file=sys.stderr)
    return env


@contextlib.contextmanager
def processes(dist_args, *, train_type: str, device: str | None) -> Iterator[DistEnv]:
    """A training command's whole life among its processes: start (join the group), rank-0 output, leave.

    `with distributed.processes(args.dist, train_type=..., device=...) as env: train(args, env=env)`;
    one process without --fsdp/--deepspeed: a plain DistEnv and no group."""
    env = start(dist_args, train_type=train_type, device=device)
    try:
        with rank0_output(env):
            yield env
    finally:
        shutdown(env)


def shutdown(env: DistEnv) -> None:
    """Leave the process group (every rank calls it at the end)."""
    if env.active and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(env: DistEnv, values: list[float]) -> list[float]:
    """Element-wise sum of `values` over every rank (one small all-reduce); itself without a group."""
    if not env.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def reduce_metrics(env: DistEnv, metrics: MetricSums) -> MetricSums:
    """Every rank's metric sums added up (keys can differ: a KTO batch may hold only chosen answers)."""
    if not env.active:
        return metrics
    names: list[list[str]] = [[] for _ in range(env.world_size)]
    dist.all_gather_object(names, sorted(metrics.sums))
    keys = sorted(set().union(*names))
    local = [metrics.sums.get(k, (0.0, 0)) for k in keys]
    summed = all_sum(env, [float(x) for total, count in local for x in (total, count)])
    out = MetricSums()
    out.sums = {k: (summed[2 * i], summed[2 * i + 1]) for i, k in enumerate(keys)}
    return out


def broadcast(env: DistEnv, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint)."""
    if env.active:
        dist.barrier()


@contextlib.contextmanager
def rank0_output(env: DistEnv) -> Iterator[None]:
    """Silence stdout/stderr on ranks other than 0; an error still reaches the terminal, naming its rank."""
    if env.is_main:
        yield
        return
    out, err = sys.stdout, sys.stderr
    devnull = open(os.devnull, "w")
    sys.stdout = sys.stderr = devnull
    try:
        yield
    except UserError as exc:
        sys.stdout, sys.stderr = out, err
        raise UserError(f"rank {env.rank} of {env.world_size}: {exc}") from exc
    except KeyboardInterrupt:  # Ctrl-C reaches every rank; rank 0 says where the run stopped
        raise
    except BaseException:
        sys.stdout, sys.stderr = out, err
        print(f"\nrank {env.rank} of {env.world_size} failed:", file=sys.stderr, flush=True)
        raise
    finally:
        sys.stdout, sys.stderr = out, err
        devnull.close()


# ---------------------------------------------------------------- wrapping


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], Any]  # (model, batch) -> lorakit.loss.LossOutput


class LossModule(nn.Module):
    """The model and its loss as one module, so DDP/FSDP2 see the loss's forward.

    causal_lm_loss runs the decoder body and lm_head itself (never model.forward); DDP arms its
    gradient hooks and FSDP2 gathers the root's weights (embeddings, final norm, lm_head) in the
    wrapper's forward, so the loss must run inside one.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], loss_fn: LossFn, weight: float):
        out = loss_fn(self.model, batch)
        metrics = out.metrics if weight else None  # a zero-weight repeat reports nothing
        return (out.loss_sum * weight if weight != 1.0 else out.loss_sum), out.n_tokens, metrics


def _sum_allreduce_hook(process_group, bucket):
    """DDP comm hook: SUM the gradients (DDP's default averages); the loop already divides by the step's tokens."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _shard_fsdp(model: nn.Module, wrapper: LossModule, strategy: Strategy, env: DistEnv) -> None:
    """fully_shard every decoder layer, then the wrapper (root: embeddings, norm, lm_head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    offload = CPUOffloadPolicy(pin_memory=env.device.type == "cuda") if strategy.offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=strategy.reshard_after_forward, offload_policy=offload)
    fully_shard(wrapper, mesh=mesh, reshard_after_forward=strategy.reshard_after_forward, offload_policy=offload)
    for module in wrapper.modules():
        if isinstance(module, FSDPModule):  # sum over ranks, as one process would (plain SUM: gloo has no PREMUL_SUM)
            module.set_gradient_divide_factor(1.0)
            if hasattr(module, "set_force_sum_reduction_for_comms"):  # torch >= 2.8
                module.set_force_sum_reduction_for_comms(True)


@dataclass
class Parallel:
    """The model as the step runs it (DDP / FSDP2 wrapper around LossModule) and the collectives the loop needs."""

    env: DistEnv = field(default_factory=DistEnv)
    module: nn.Module | None = None  # None: one process, the loss runs on the model directly
    _pending: list[float] = field(default_factory=list)
    _steps: int = 0

    @property
    def strategy(self) -> Strategy:
        return self.env.strategy

    @property
    def sharded(self) -> bool:
        return self.strategy.kind == "fsdp" and self.module is not None

    def share(self, micro_batches: list[list[int]]) -> tuple[list[list[int]], list[float]]:
        """This rank's micro-batches of the step (strided) and their loss weights (0: a repeat that keeps ranks in step)."""
        if self.module is None:
            return micro_batches, [1.0] * len(micro_batches)
        mine = micro_batches[self.env.rank :: self.env.world_size]
        per_rank = -(-len(micro_batches) // self.env.world_size)
        weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
        return mine + [micro_batches[0]] * (per_rank - len(mine)), weights

    def loss_fn(self, loss_fn: LossFn, weights: list[float]) -> LossFn:
        """`loss_fn` run through the wrapper, one call per micro-batch in order; DDP syncs on the last call only."""
        if self.module is None:
            return loss_fn
        self._pending = list(weights)
        self._steps += 1
        if os.environ.get(_FAIL_ENV) == f"{self.env.rank}:{self._steps}":
            raise RuntimeError(f"injected failure ({_FAIL_ENV}) on rank {self.env.rank} at step {self._steps}")

        def run(_model, batch):
            weight = self._pending.pop(0)
            if self.strategy.kind == "ddp":  # no_sync() for all but the step's last micro-batch
                self.module.require_backward_grad_sync = not self._pending
            loss_sum, n_tokens, metrics = self.module(batch, loss_fn, weight)
            return LossOutput(loss_sum=loss_sum, n_tokens=n_tokens, metrics=metrics)

        return run

    def eval_loss_fn(self, loss_fn: LossFn) -> LossFn:
        """`loss_fn` for evaluation: through the FSDP2 root (it gathers the weights); DDP needs no wrapper."""
        if not self.sharded:
            return loss_fn
        def run(_model, batch):
            loss_sum, n_tokens, metrics = self.module(batch, loss_fn, 1.0)
            return LossOutput(loss_sum=loss_sum, n_tokens=n_tokens, metrics=metrics)

        return run

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        """Clip the global gradient norm (FSDP2: over every rank's shards) and return it."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def load_weights(self, model: nn.Module, checkpoint: Path) -> None:
        """A checkpoint's trainable weights into the model (FSDP2: each rank keeps its shard of the full tensors)."""
        if not self.sharded:
            load_weights_into(model, checkpoint)
            return
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        files = [checkpoint / ADAPTER_WEIGHTS] if (checkpoint / ADAPTER_CONFIG).is_file() else sorted(
            checkpoint.glob("*.safetensors"))
        saved = {k: v for f in files for k, v in load_file(f).items()}
        # PEFT saves adapter weights without the adapter's name ("lora_A.weight" for "lora_A.default.weight")
        names = {n.replace(".default.", "."): n for n, _ in model.named_parameters()}
        names.update({n: n for n, _ in model.named_parameters()})
        unknown = [k for k in saved if k not in names]
        if unknown:
            raise UserError(f"{checkpoint}: weights do not fit this model ({unknown[0]} ...): check --train_type, "
                            f"--lora_rank and --target_modules.")
        set_model_state_dict(model, {names[k]: v for k, v in saved.items()},
                             options=_options(full_state_dict=True, strict=False))


def wrap(model: nn.Module, env: DistEnv) -> Parallel:
    """Wrap the tuned model for its strategy (before the optimizer is built: FSDP2 replaces the parameters)."""
    if not env.active:
        return Parallel(env=env)
    wrapper = LossModule(model)
    if env.strategy.kind == "fsdp":
        _shard_fsdp(model, wrapper, env.strategy, env)
        return Parallel(env=env, module=wrapper)
    from torch.nn.parallel import DistributedDataParallel

    # layers compiled inside DDP: one graph per layer, not split at DDP's buckets (layer-level overlap suffices)
    torch._dynamo.config.optimize_ddp = False
    # no buffer sync in forward (RoPE tables are identical on every rank); the keyword was renamed in torch 2.13
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else {"broadcast_buffers": False})
    ddp = DistributedDataParallel(wrapper, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                  gradient_as_bucket_view=True, **no_sync)
    ddp.register_comm_hook(None, _sum_allreduce_hook)
    return Parallel(env=env, module=ddp)


# ---------------------------------------------------------------- checkpoints


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def gather_model_state(par: Parallel, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """FSDP2: the full state dict on rank 0's CPU (a collective: every rank calls it); otherwise None (save as is)."""
    if not par.sharded:
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters in optimizer order (lorakit.tuners.trainable_parameters)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def gather_optimizer_state(par: Parallel, model: nn.Module, optimizer) -> dict[str, Any]:
    """The optimizer state as one process saves it (indexed by parameter order); a collective under FSDP2."""
    if not par.sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_options(full_state_dict=True, cpu_offload=True))
    if not par.env.is_main:
        return {}
    index = {name: i for i, name in enumerate(trainable_names(model))}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in full["param_groups"]]
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(par: Parallel, model: nn.Module, optimizer, state: dict[str, Any]) -> None:
    """Load an optimizer state saved by one process or by any number of ranks (indexed by parameter order)."""
    if not par.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = trainable_names(model)
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]
    full = {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, full, options=_options(full_state_dict=True))
