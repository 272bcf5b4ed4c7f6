"""How a GRPO run is cut into generation rounds and optimizer steps, as pure functions of the flags.

TRL's and ms-swift's batch semantics: --per_device_train_batch_size B counts completions per
micro-batch; an optimizer step is --gradient_accumulation_steps GA micro-batches; one generation
round samples --num_generations G completions for each of B x S / G prompts, S = --steps_per_generation
micro-batches (default GA); each round's completions are used for --num_iterations mu passes, so a round
is mu x S / GA optimizer steps. Which prompts a round gets is a pure function of (seed, round): exact
resumption needs only the step.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from lorakit.errors import UserError


@dataclass
class GrpoPlan:
    n_prompts: int
    batch_size: int  # completions per micro-batch (B)
    grad_accum: int  # micro-batches per optimizer step (GA)
    steps_per_generation: int  # micro-batches per round (S)
    num_generations: int  # G
    num_iterations: int  # mu
    total_steps: int  # optimizer steps
    seed: int

    @property
    def prompts_per_round(self) -> int:
        return self.batch_size * self.steps_per_generation // self.num_generations

    @property
    def steps_per_round(self) -> int:
        return self.num_iterations * self.steps_per_generation // self.grad_accum

    @property
    def total_rounds(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_round)

    def epoch_of(self, step: int) -> float:
        """Passes over the prompts after `step` optimizer steps."""
        return step / self.steps_per_round * self.prompts_per_round / self.n_prompts

    def round_prompts(self, round_index: int) -> list[int]:
        """Prompt indices of a round: the prompts in a fresh seeded order each epoch, taken in turn."""
        k, n = self.prompts_per_round, self.n_prompts
        out = []
        for position in range(round_index * k, (round_index + 1) * k):
            epoch, within = divmod(position, n)
            out.append(_epoch_order(self.seed, epoch, n)[within])
        return out

    def data_order(self) -> dict:
        """What fixes the order (saved in checkpoints and compared on resume)."""
        return asdict(self)


def _epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def plan_grpo(n_prompts: int, *, batch_size: int, grad_accum: int, steps_per_generation: int | None,
              num_generations: int, num_iterations: int, epochs: float, max_steps: int, seed: int,
              log=print) -> GrpoPlan:
    """The plan; S defaults to GA and is raised to the next multiple of GA that holds whole groups (said so)."""
    s = steps_per_generation or grad_accum
    if s % grad_accum:
        raise UserError(f"--steps_per_generation {s} must be a multiple of --gradient_accumulation_steps "
                        f"{grad_accum} (a round is whole optimizer steps).")
    if (batch_size * s) % num_generations:
        if steps_per_generation:
            raise UserError(
                f"--per_device_train_batch_size {batch_size} x --steps_per_generation {s} = {batch_size * s} "
                f"completions per round, not a multiple of --num_generations {num_generations}: a round must hold "
                f"whole groups. E.g. --per_device_train_batch_size {num_generations}.")
        while (batch_size * s) % num_generations:
            s += grad_accum
        log(f"--per_device_train_batch_size {batch_size} counts completions (as in TRL/ms-swift): one round of "
            f"{batch_size * s // num_generations} prompt(s) x {num_generations} generations spans {s} micro-batches "
            f"(--steps_per_generation {s}). For one prompt per optimizer step: --per_device_train_batch_size "
            f"{num_generations}.")
    plan = GrpoPlan(n_prompts, batch_size, grad_accum, s, num_generations, num_iterations, 0, seed)
    if max_steps > 0:
        plan.total_steps = max_steps
    else:
        rounds = max(1, math.ceil(epochs * n_prompts / plan.prompts_per_round))
        plan.total_steps = rounds * plan.steps_per_round
    return plan
