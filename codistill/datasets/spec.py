"""What a dataset plugin declares (`codistill.datasets`): its sections, modules, flags and directory entries."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one field of a section: `--cat-buckets` sets `data.criteo.cat_buckets`.

    Its type, choices and default come from the field's annotation."""

    field: str
    help: str = ""
    required: bool = False
    source: bool = False  # names the raw data instead of --input (a paths file): replaces data.input and synth

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
