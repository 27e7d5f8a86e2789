"""The dataset registry: one `DatasetSpec` per dataset, each in its own module here.

A spec holds what the rest of the system needs to know of a dataset and
nothing it does: the dataclasses of its manifest sections (`data.<name>`,
`data.synth`, the `model` kinds its workload trains), the modules of its Beam
pipeline (`PIPELINE`, a `pipelines.run.DatasetPipeline`) and of its training
workload (`WORKLOAD`, a `training.workloads.Workload`), named as strings so
this ground layer imports neither, its command-line flags and the entries its
dataset directory may hold. Adding a dataset is three new files (spec,
pipeline, workload) and one registry line: in `BUILT_IN` here, or, for a
dataset in a package of its own, an entry point of the group
`codistill.datasets` naming its spec module (docs/extending.md).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from codistill.datasets.spec import DatasetSpec, Flag
from codistill.fields import ConfigError, bounded

__all__ = ["DATASETS", "DatasetSpec", "Flag", "spec_for"]


BUILT_IN = ("codistill.datasets.criteo", "codistill.datasets.commoncrawl", "codistill.datasets.imagenet")
PLUGIN_GROUP = "codistill.datasets"  # entry points naming the spec modules of installed dataset packages


def _specs() -> dict[str, DatasetSpec]:
    # One module named twice (a package installed twice, editable and not) registers once.
    modules = dict.fromkeys([*BUILT_IN, *(point.value for point in entry_points(group=PLUGIN_GROUP))])
    specs: dict[str, DatasetSpec] = {}
    owners: dict[str, str] = {}
    for module in modules:
        spec = importlib.import_module(module).SPEC
        if spec.name in specs:  # a plugin must not silently replace a dataset (or another plugin)
            raise ImportError(f"dataset {spec.name!r} of {module} is already registered by {owners[spec.name]}")
        specs[spec.name], owners[spec.name] = spec, module
    return specs


DATASETS: dict[str, DatasetSpec] = _specs()


def spec_for(name: str, where: str = "data.dataset") -> DatasetSpec:
    if name not in DATASETS:
        raise ConfigError(f"{where}: must be one of {list(DATASETS)}, got {bounded(name)}")
    return DATASETS[name]
