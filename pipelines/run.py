"""Run a preprocessing pipeline for an experiment's `data` section on any Beam runner.

Each dataset module exposes one `PIPELINE` (a `DatasetPipeline`): how to
generate its raw data, the PTransform that turns raw input into a dataset,
and the parameters recorded in (and compared against) the dataset manifest.

DoFns that touch storage or report progress derive from `WorkerDoFn`: it
carries the driver's storage rules and progress address to whichever worker
process runs it (a multi_processing FnApiRunner worker, a Dask worker, a
Dataflow VM) and installs them in `setup()`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from codistill import storage
from codistill.config import DataConfig, ExperimentConfig, to_dict
from codistill.dataset import DatasetManifest, join, load_manifest
from pipelines import progress

# Beam's DirectRunner first tries to download a Prism binary; the FnApiRunner is
# the same in-process engine without that step.
DEFAULT_RUNNER = "FnApiRunner"
# Beam's own DaskRunner mixes the outputs of multi-output ParDos (see pipelines/dask_runner.py):
# both names run the fixed one.
DASK_RUNNER = "pipelines.dask_runner.DaskRunner"
RUNNER_NAMES = {"DaskRunner": DASK_RUNNER, "apache_beam.runners.dask.dask_runner.DaskRunner": DASK_RUNNER}

PIPELINE_MODULES = {"criteo": "pipelines.criteo", "commoncrawl": "pipelines.commoncrawl",
                    "imagenet": "pipelines.imagenet"}

logger = logging.getLogger(__name__)


class WorkerDoFn(beam.DoFn):
    """A DoFn that brings the run's storage rules and progress address (as set on the driver when the
    pipeline is built) to the worker that runs it. Subclasses that define `setup` call `super().setup()`."""

    def __init__(self):
        super().__init__()
        self._storage_rules = storage.rules()
        self._progress_address = progress.address()

    def setup(self):
        storage.configure(self._storage_rules)
        progress.connect(self._progress_address)


@dataclass(frozen=True)
class DatasetPipeline:
    # (raw input: glob, URL or folder; data section; extra facts for the manifest) -> PTransform on the pipeline
    transform: Callable[[str, DataConfig, dict], beam.PTransform]
    # (raw output folder, data.synth) -> (the input to read from it, the generator's sidecar)
    generate: Callable[[str, Any], tuple[str, dict]]


def dataset_pipeline(dataset: str) -> DatasetPipeline:
    return importlib.import_module(PIPELINE_MODULES[dataset]).PIPELINE


def pipeline_parameters(data: DataConfig) -> dict:
    """The data settings a dataset was built with (recorded in its manifest; inputs are recorded apart)."""
    return {k: v for k, v in to_dict(data).items() if k not in ("input", "synth")}


class OutputExistsError(FileExistsError):
    pass


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    runner = PipelineOptions(beam_args).view_as(StandardOptions).runner
    runner = RUNNER_NAMES.get(runner, runner or DEFAULT_RUNNER)
    if runner == DASK_RUNNER:
        from apache_beam.runners.dask.dask_runner import DaskOptions  # noqa: F401  (registers the --dask_* flags)

        if not any(a.startswith(("--dask_npartitions", "--dask_partition_size")) for a in beam_args):
            # Each work item (an input range, a shard) is heavy: one per dask partition, so they spread
            # over the workers (Beam's default packs up to 128 into one partition).
            beam_args = [*beam_args, "--dask_partition_size=1"]
    options = PipelineOptions(beam_args)
    options.view_as(StandardOptions).runner = runner
    return options


def prepare_output(output: str, overwrite: bool) -> None:
    fs, path = storage.url_to_fs(output)
    if fs.exists(path) and fs.ls(path):
        if not overwrite:
            raise OutputExistsError(f"{output} exists and is not empty; choose another output or pass --overwrite")
        fs.rm(path, recursive=True)


def preprocess(config: ExperimentConfig, beam_args: list[str] = (), overwrite: bool = False,
               show_progress: Callable[[str], None] | None = None) -> DatasetManifest:
    """Build the dataset of `config.data`; with `show_progress`, a progress line goes to it every few seconds."""
    data = config.data
    storage.configure(config.storage)
    pipeline = dataset_pipeline(data.dataset)
    prepare_output(data.output, overwrite)
    extra = {}
    source = data.input
    if data.synth is not None:
        source, extra["synth"] = pipeline.generate(join(data.output, "raw"), data.synth)
    logger.info("preprocessing %s into %s", source, data.output)
    with progress.ProgressMonitor(write=show_progress) if show_progress else contextlib.nullcontext():
        with beam.Pipeline(options=pipeline_options(list(beam_args))) as p:
            _ = p | data.dataset.capitalize() >> pipeline.transform(source, data, extra)
    return load_manifest(data.output)
