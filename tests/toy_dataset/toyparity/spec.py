"""The toy dataset's spec: its sections, its model, its modules and flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from codistill.datasets.spec import DatasetSpec, Flag
from codistill.fields import require

BITS = 8


@dataclass(frozen=True)
class ToyParitySynthConfig:
    rows: int = 2000
    files: int = 2
    seed: int = 0

    def validate(self, name: str) -> None:
        require(self.rows >= 1 and self.files >= 1, name, "rows and files must be >= 1")


@dataclass(frozen=True)
class ToyParityConfig:
    flip: bool = False  # store the bits inverted: a dataset option that the manifest records


@dataclass(frozen=True)
class ToyParityMLPConfig:
    kind: Literal["toy_mlp"] = "toy_mlp"
    hidden: int = 16


SPEC = DatasetSpec(
    name="toyparity", summary="lines of 8 bits, labelled by the XOR of the first two",
    config=ToyParityConfig, synth=ToyParitySynthConfig, models=(ToyParityMLPConfig,),
    pipeline="toyparity.pipeline", workload="toyparity.workload",
    flags=(Flag("flip", "Store the bits inverted."),), synth_flags=(Flag("rows", "Lines in all files."),))
