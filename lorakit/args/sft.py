"""`lorakit sft` and `lorakit check-data`: the training groups composed."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.args.dist import DistArgs
from lorakit.args.fast import FastOptions
from lorakit.args.model import DataArgs, ModelArgs
from lorakit.args.quant import QuantArgs, refuse_quant_combinations
from lorakit.args.training import LoraArgs, TrainArgs


@dataclass
class SftArgs:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    fast: FastOptions = field(default_factory=FastOptions)
    dist: DistArgs = field(default_factory=DistArgs)
    quant: QuantArgs = field(default_factory=QuantArgs)

    def __post_init__(self):  # flags of two groups that cannot go together, refused before any weights load
        refuse_quant_combinations(self.quant, self.lora, self.dist)


@dataclass
class CheckDataArgs(SftArgs):
    """check-data takes every sft flag, so a user can run the same command line through it."""
