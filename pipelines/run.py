"""Run a preprocessing pipeline for an experiment's `data` section on any Beam runner."""

from __future__ import annotations

import logging

import apache_beam as beam
import fsspec
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from codistill.config import ExperimentConfig
from codistill.dataset import DatasetManifest, join, load_manifest
from pipelines.criteo import CriteoToShards
from pipelines.textfiles import expand_inputs

# Beam's DirectRunner first tries to download a Prism binary; the FnApiRunner is
# the same in-process engine without that step.
DEFAULT_RUNNER = "FnApiRunner"

logger = logging.getLogger(__name__)


class OutputExistsError(FileExistsError):
    pass


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    options = PipelineOptions(beam_args)
    standard = options.view_as(StandardOptions)
    standard.runner = standard.runner or DEFAULT_RUNNER
    return options


def prepare_output(output: str, overwrite: bool) -> None:
    fs, path = fsspec.core.url_to_fs(output)
    if fs.exists(path) and fs.ls(path):
        if not overwrite:
            raise OutputExistsError(f"{output} exists and is not empty; choose another output or pass --overwrite")
        fs.rm(path, recursive=True)


def preprocess(config: ExperimentConfig, beam_args: list[str] = (), overwrite: bool = False) -> DatasetManifest:
    data = config.data
    prepare_output(data.output, overwrite)
    extra = {}
    pattern = data.input
    if data.synth is not None:
        from pipelines.synth_criteo import generate_criteo

        raw = join(data.output, "raw")
        synth = data.synth
        extra["synth"] = generate_criteo(raw, synth.rows, files=synth.files, seed=synth.seed, gzip=synth.gzip)
        pattern = join(raw, "train-*")
    paths = expand_inputs(pattern)
    logger.info("preprocessing %d file(s) into %s", len(paths), data.output)
    with beam.Pipeline(options=pipeline_options(list(beam_args))) as pipeline:
        _ = pipeline | "Criteo" >> CriteoToShards(paths, data, extra)
    return load_manifest(data.output)
