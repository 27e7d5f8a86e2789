"""The dataset registry: one `DatasetSpec` per dataset, each in its own module here.

A spec holds what the rest of the system needs to know of a dataset and
nothing it does: the dataclasses of its manifest sections (`data.<name>`,
`data.synth`, the `model` kinds its workload trains), the modules of its Beam
pipeline (`PIPELINE`, a `pipelines.run.DatasetPipeline`) and of its training
workload (`WORKLOAD`, a `training.workloads.Workload`), named as strings so
this ground layer imports neither, its command-line flags and the entries its
dataset directory may hold. Adding a dataset is three new files (spec,
pipeline, workload) and one line in `DATASETS` (docs/extending.md).
"""

from __future__ import annotations

import importlib

from codistill.datasets.spec import DatasetSpec, Flag
from codistill.fields import ConfigError, bounded

__all__ = ["DATASETS", "DatasetSpec", "Flag", "spec_for"]


def _specs(*modules: str) -> dict[str, DatasetSpec]:
    specs = [importlib.import_module(f"codistill.datasets.{m}").SPEC for m in modules]
    return {spec.name: spec for spec in specs}


DATASETS: dict[str, DatasetSpec] = _specs("criteo", "commoncrawl", "imagenet")


def spec_for(name: str, where: str = "data.dataset") -> DatasetSpec:
    if name not in DATASETS:
        raise ConfigError(f"{where}: must be one of {list(DATASETS)}, got {bounded(name)}")
    return DATASETS[name]
