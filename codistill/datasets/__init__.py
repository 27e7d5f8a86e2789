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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from codistill.fields import ConfigError, bounded


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one field of a section: `--cat-buckets` sets `data.criteo.cat_buckets`.

    Its type, choices and default come from the field's annotation."""

    field: str
    help: str = ""
    required: bool = False

    @property
    def option(self) -> str:
        return "--" + self.field.replace("_", "-")


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # `data.dataset`; the manifest section `data.<name>`; the dataset manifest's `dataset`
    summary: str  # what its raw data is, for command help ("Criteo click logs (TSV or CSV, plain or gzip)")
    config: type  # the `data.<name>` section
    synth: type  # the `data.synth` section: the generator's settings
    models: tuple[type, ...]  # the `model` sections the workload trains, by `kind`; the first is the default
    pipeline: str  # module whose `PIPELINE` builds the dataset
    workload: str  # module whose `WORKLOAD` trains on it
    flags: tuple[Flag, ...] = ()  # `codistill preprocess <name>` flags, fields of `config`
    synth_flags: tuple[Flag, ...] = ()  # `codistill synth <name>` flags, fields of `synth`
    resumable: bool = False  # the pipeline keeps per-input completion markers: `preprocess --resume` works
    # Entries its dataset directory may hold besides the shared ones (`--overwrite` deletes only datasets).
    entries: tuple[str, ...] = ()
    # Rules across sections (e.g. the model's batch layout and the loader); raises ConfigError.
    check: Callable[[Any], None] | None = None

    def model_choices(self) -> dict[str, type]:
        return {model.__dataclass_fields__["kind"].default: model for model in self.models}


def _specs(*modules: str) -> dict[str, DatasetSpec]:
    specs = [importlib.import_module(f"codistill.datasets.{m}").SPEC for m in modules]
    return {spec.name: spec for spec in specs}


DATASETS: dict[str, DatasetSpec] = _specs("criteo", "commoncrawl", "imagenet")


def spec_for(name: str, where: str = "data.dataset") -> DatasetSpec:
    if name not in DATASETS:
        raise ConfigError(f"{where}: must be one of {list(DATASETS)}, got {bounded(name)}")
    return DATASETS[name]
