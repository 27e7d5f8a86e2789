"""Run a preprocessing pipeline for an experiment's `data` section on any Beam runner.

Each dataset module exposes one `PIPELINE` (a `DatasetPipeline`): how to
generate its raw data, the PTransform that turns raw input into a dataset,
and the parameters recorded in (and compared against) the dataset manifest.
"""

from __future__ import annotations

import builtins
import importlib
import logging
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import fsspec
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from fsspec.implementations.local import LocalFileSystem

from codistill.config import DataConfig, ExperimentConfig, to_dict
from codistill.dataset import MANIFEST_NAME, TEMP_PREFIX, DatasetManifest, join, load_manifest
from pipelines.sinks import PIECES
from pipelines.textfiles import InputReadError, match_inputs

# Beam's DirectRunner first tries to download a Prism binary; the FnApiRunner is
# the same in-process engine without that step.
DEFAULT_RUNNER = "FnApiRunner"

PIPELINE_MODULES = {"criteo": "pipelines.criteo", "commoncrawl": "pipelines.commoncrawl",
                    "imagenet": "pipelines.imagenet"}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueCheck:
    """A rule every stored row of one column must satisfy (`codistill verify` counts the rows that break it)."""

    column: str
    ok: Callable[[np.ndarray], np.ndarray]  # a block's column -> True for each row that passes
    description: str  # e.g. "labels in {0, 1}"


@dataclass(frozen=True)
class DatasetChecks:
    """What verify recomputes for a dataset, so that it proves more than the manifest's self-consistency."""

    values: tuple[ValueCheck, ...]
    # A block's keys -> (each key's assignment hash, as the pipeline computed it; True where the key is well
    # formed and names a record of this dataset's inputs). The hash goes through `ShardLayout.assign`.
    key_hashes: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class DatasetPipeline:
    # (raw input: glob, URL or folder; data section; extra facts for the manifest) -> PTransform on the pipeline
    transform: Callable[[str, DataConfig, dict], beam.PTransform]
    # (raw output folder, data.synth) -> (the input to read from it, the generator's sidecar)
    generate: Callable[[str, Any], tuple[str, dict]]
    # (dataset manifest) -> what verify checks in every row; None: only bytes, counts, layout and disjointness
    checks: Callable[[DatasetManifest], DatasetChecks] | None = None


def dataset_pipeline(dataset: str) -> DatasetPipeline:
    return importlib.import_module(PIPELINE_MODULES[dataset]).PIPELINE


def pipeline_parameters(data: DataConfig) -> dict:
    """The data settings a dataset was built with (recorded in its manifest; input files are recorded apart;
    `synth` is the generator's settings, or None for real input).

    Only the dataset's own section is included: another dataset's defaults changing must not make a
    built dataset look stale."""
    others = set(PIPELINE_MODULES) - {data.dataset}
    return {k: v for k, v in to_dict(data).items() if k not in {"input", *others}}


class OutputExistsError(FileExistsError):
    pass


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    options = PipelineOptions(beam_args)
    standard = options.view_as(StandardOptions)
    standard.runner = standard.runner or DEFAULT_RUNNER
    return options


# What a dataset directory holds (an interrupted run leaves some of it, without the manifest).
DATASET_ENTRIES = (MANIFEST_NAME, "train", "eval", "rejected", "raw", PIECES)


def _location(url: str) -> tuple[str, str]:
    """(protocol, absolute path without a trailing slash): comparable across spellings and, locally, symlinks."""
    fs, path = fsspec.core.url_to_fs(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if isinstance(fs, LocalFileSystem):
        protocol, path = "file", os.path.realpath(path)
    return protocol, path.rstrip("/") or "/"


def is_under(url: str, root: str) -> bool:
    (protocol, path), (root_protocol, root_path) = _location(url), _location(root)
    return protocol == root_protocol and (path == root_path or path.startswith(root_path.rstrip("/") + "/"))


def prepare_output(output: str, overwrite: bool, inputs: list[str] = ()) -> None:
    """Make sure `output` is new or empty. `overwrite` deletes only a dataset directory (or what is left of
    one), never one that holds anything else or any of the `inputs`."""
    fs, path = fsspec.core.url_to_fs(output)
    if not fs.exists(path):
        return
    inside = [i for i in inputs if is_under(i, output)]
    if inside:
        raise OutputExistsError(f"input {inside[0]} is inside the output directory {output}: choose another output")
    if not fs.isdir(path):
        raise OutputExistsError(f"{output} exists and is not a directory; choose another output")
    entries = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    if not entries:
        return
    if not overwrite:
        raise OutputExistsError(f"{output} exists and is not empty; choose another output or pass --overwrite")
    foreign = [e for e in entries if e not in DATASET_ENTRIES and not e.startswith(TEMP_PREFIX)]
    if foreign:
        raise OutputExistsError(f"{output} is not a codistill dataset (it holds {', '.join(foreign[:5])}"
                                f"{', ...' if len(foreign) > 5 else ''}): --overwrite deletes only a dataset "
                                "directory; remove it yourself or choose another output")
    fs.rm(path, recursive=True)


def preprocess(config: ExperimentConfig, beam_args: list[str] = (), overwrite: bool = False) -> DatasetManifest:
    data = config.data
    pipeline = dataset_pipeline(data.dataset)
    prepare_output(data.output, overwrite, match_inputs(data.input) if data.input is not None else [])
    extra = {}
    source = data.input
    if data.synth is not None:
        source, extra["synth"] = pipeline.generate(join(data.output, "raw"), data.synth)
    logger.info("preprocessing %s into %s", source, data.output)
    try:
        with beam.Pipeline(options=pipeline_options(list(beam_args))) as p:
            _ = p | data.dataset.capitalize() >> pipeline.transform(source, data, extra)
    except BaseException as e:
        _remove_pieces(data.output)  # a failed run (a full disk, say) must not leave a copy of the data behind
        if _is_io_error(e):
            raise PipelineIOError(str(e)) from e
        raise
    return load_manifest(data.output)


class PipelineIOError(OSError):
    """The pipeline stopped on an I/O error (a full disk, an unreadable input): the message says where."""


def _is_io_error(error: BaseException) -> bool:
    """An OSError, raised here or in a worker (runners re-raise a worker's error as `RuntimeError('OSError: ...')`)."""
    if isinstance(error, (OSError, InputReadError)):
        return True
    name = str(error).split(":", 1)[0]
    return name == InputReadError.__name__ or isinstance(getattr(builtins, name, None), type) and issubclass(
        getattr(builtins, name), OSError)


def _remove_pieces(output: str) -> None:
    fs, path = fsspec.core.url_to_fs(join(output, PIECES))
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except OSError as e:
        logger.warning("could not remove %s: %s", path, e)
