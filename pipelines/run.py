"""Run a preprocessing pipeline for an experiment's `data` section on any Beam runner.

Each dataset's pipeline module (named by its spec in `codistill.datasets`)
exposes one `PIPELINE` (a `DatasetPipeline`): how to generate its raw data,
the PTransform that turns raw input into a dataset, what verify checks and
how a built dataset is summarised.

DoFns that touch storage or report progress derive from
`pipelines.worker.WorkerDoFn`, which brings the driver's storage rules and
progress address to the workers.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import logging
import os
import posixpath
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from fsspec.implementations.local import LocalFileSystem

from codistill import storage
from codistill.config import ConfigError, DataConfig, ExperimentConfig
from codistill.datasets import DATASETS
from codistill.extras import missing_extra
from codistill.dataset import MANIFEST_NAME, DatasetManifest, join, load_manifest
from pipelines import progress
from pipelines.sinks import PIECES
from pipelines.textfiles import InputReadError, match_inputs

# Beam's DirectRunner first tries to download a Prism binary; the FnApiRunner is
# the same in-process engine without that step.
DEFAULT_RUNNER = "FnApiRunner"
# Beam's own DaskRunner mixes the outputs of multi-output ParDos (see pipelines/dask_runner.py):
# both names run the fixed one.
DASK_RUNNER = "pipelines.dask_runner.DaskRunner"
RUNNER_NAMES = {"DaskRunner": DASK_RUNNER, "apache_beam.runners.dask.dask_runner.DaskRunner": DASK_RUNNER}

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
    # formed and names a record of this dataset's inputs).
    key_hashes: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    # (keys, their hashes, layout) -> each key's destination; by default `ShardLayout.assign` (a dataset whose
    # eval split comes from elsewhere, as ImageNet's val/ folder, says how instead).
    destinations: Callable[[np.ndarray, np.ndarray, Any], np.ndarray] | None = None
    # Columns whose values may not repeat anywhere in the dataset (ImageNet's image bytes: no picture twice).
    distinct: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetPipeline:
    # (raw input: glob, URL or folder; data section; extra facts for the manifest) -> PTransform on the pipeline
    transform: Callable[[str, DataConfig, dict], beam.PTransform]
    # (raw output folder, data.synth) -> (the input to read from it, the generator's sidecar)
    generate: Callable[[str, Any], tuple[str, dict]]
    # (generator's sidecar, where it wrote) -> one line saying what was generated
    describe_synth: Callable[[dict, str], str]
    # (dataset manifest) -> lines for the summary after a build, beyond counts and shards (e.g. its floor)
    describe: Callable[[DatasetManifest], list[str]]
    # (dataset manifest) -> what verify checks in every row; None: only bytes, counts, layout and disjointness
    checks: Callable[[DatasetManifest], DatasetChecks] | None = None


def dataset_pipeline(dataset: str) -> DatasetPipeline:
    try:
        return importlib.import_module(DATASETS[dataset].pipeline).PIPELINE
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] in {"codistill", "pipelines", "training", "tokenizer"}:
            raise
        # A built-in dataset's libraries come with its extra (pyproject.toml); a plugin's with its own package.
        raise ConfigError(f"the {dataset} pipeline: " + (missing_extra(e) or f"no module {e.name!r}: install the "
                                                         f"package that provides {dataset}")) from None


def summarize_dataset(dataset: DatasetManifest, where: str) -> str:
    rejected = sum(dataset.rejected.values())
    reasons = ", ".join(f"{k}: {v}" for k, v in dataset.rejected.items())
    # Rows are input records, or (`kept` set) packed sequences of the documents kept.
    read, written = ("rows", f"{dataset.written_rows} written") if dataset.kept is None else (
        "documents", f"{dataset.kept} kept, packed into {dataset.written_rows} rows")
    lines = [f"{dataset.dataset} ({dataset.format}) at {where}: {dataset.input_rows} {read} read, "
             f"{written}, {rejected} rejected" + (f" ({reasons})" if reasons else ""),
             f"{'split':<6} {'group':>5} {'shards':>6} {'rows':>10} {'bytes':>12}"]
    parts = [("eval", None)] + [("train", g) for g in range(dataset.groups)]
    for split, group in parts:
        shards = dataset.shards_of(split, group)
        lines.append(f"{split:<6} {'-' if group is None else group:>5} {len(shards):>6} "
                     f"{sum(s.records for s in shards):>10} {sum(s.bytes for s in shards):>12}")
    return "\n".join(lines + dataset_pipeline(dataset.dataset).describe(dataset))


class OutputExistsError(FileExistsError):
    pass


def pipeline_options(beam_args: list[str], check_installed: bool = True) -> PipelineOptions:
    """Beam's options from `beam_args` as Beam parses them (`--name value` or `--name=value`), with the
    runner resolved (`RUNNER_NAMES`, default `DEFAULT_RUNNER`) and, with `check_installed`, the Python
    libraries it needs checked before anything runs (not for a dry run: the options are the same). An
    argument that no option takes (a word after a boolean flag, a single-dash flag) is an error here, where
    Beam would drop it with a warning."""
    runner = PipelineOptions(beam_args).view_as(StandardOptions).runner
    runner = RUNNER_NAMES.get(runner, runner or DEFAULT_RUNNER)
    if runner == DASK_RUNNER:
        try:
            from apache_beam.runners.dask.dask_runner import DaskOptions  # noqa: F401  (registers the --dask_* flags)
        except ImportError as e:
            raise ImportError(f"{runner} needs dask.distributed") from e
        if not any(a.startswith(("--dask_npartitions", "--dask_partition_size")) for a in beam_args):
            # Each work item (an input range, a shard) is heavy: one per dask partition, so they spread
            # over the workers (Beam's default packs up to 128 into one partition).
            beam_args = [*beam_args, "--dask_partition_size=1"]
    elif check_installed and runner.rsplit(".", 1)[-1].lower() in ("dataflowrunner", "testdataflowrunner"):
        try:  # what Beam imports only once the job is submitted, after the pipeline was built
            from apache_beam.runners.dataflow.internal import apiclient  # noqa: F401
        except ImportError as e:
            raise ImportError(f"{runner} needs Google Cloud's client libraries (apache-beam[gcp])") from e
    options = PipelineOptions(beam_args)
    options.view_as(StandardOptions).runner = runner
    unused = _unused_args(options, beam_args)
    if unused:
        raise ValueError(f"unexpected argument {unused[0]!r}: no pipeline option takes it (Beam options are "
                         "--name value or --name=value)")
    return options


def _unused_args(options: PipelineOptions, beam_args: list[str]) -> list[str]:
    """The arguments Beam's own parser leaves over (it keeps unknown `--name value` options for the runner)."""
    parsers = []
    options.get_all_options(retain_unknown_options=True, add_extra_args_fn=parsers.append)
    _, unused = parsers[0].parse_known_args(beam_args)
    return [a for a in unused if a != "--"]


# What every dataset directory may hold (an interrupted run leaves some of it, without the manifest): with
# `indexes`, the sink also writes `idx/` (DALI indexes) and `*.wids.json`. Each spec adds its own `entries`.
DATASET_ENTRIES = (MANIFEST_NAME, "train", "eval", "rejected", "raw", PIECES, "idx")


def _location(url: str) -> tuple[str, str]:
    """(protocol, absolute path without a trailing slash): comparable across spellings and, locally, symlinks."""
    fs, path = storage.url_to_fs(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if isinstance(fs, LocalFileSystem):
        protocol, path = "file", os.path.realpath(path)
    return protocol, path.rstrip("/") or "/"


def is_under(url: str, root: str) -> bool:
    (protocol, path), (root_protocol, root_path) = _location(url), _location(root)
    return protocol == root_protocol and (path == root_path or path.startswith(root_path.rstrip("/") + "/"))


def prepare_output(output: str, overwrite: bool, inputs: list[str] = (), resume: bool = False,
                   own_entries: tuple[str, ...] = ()) -> None:
    """Make sure `output` is new or empty. `overwrite` deletes only a dataset directory (or what is left of
    one: the shared entries and the dataset's `own_entries`), never one that holds anything else or any of
    the `inputs`; `resume` continues an interrupted run's output (no manifest yet)."""
    if resume and overwrite:
        raise ValueError("--resume continues an interrupted run, --overwrite starts afresh: give one of them")
    fs, path = storage.url_to_fs(output)
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
    if resume:
        if MANIFEST_NAME in entries:
            raise OutputExistsError(f"{output} holds a complete dataset (it has a {MANIFEST_NAME}); nothing to resume")
        return
    if not overwrite:
        raise OutputExistsError(f"{output} exists and is not empty; choose another output, pass --overwrite, "
                                "or --resume an interrupted run")
    known = DATASET_ENTRIES + own_entries
    foreign = [e for e in entries if e not in known and not storage.is_temp(e) and not e.endswith(".wids.json")]
    if foreign:
        raise OutputExistsError(f"{output} is not a codistill dataset (it holds {', '.join(foreign[:5])}"
                                f"{', ...' if len(foreign) > 5 else ''}): --overwrite deletes only a dataset "
                                "directory; remove it yourself or choose another output")
    fs.rm(path, recursive=True)


def preprocess(config: ExperimentConfig, beam_args: list[str] = (), overwrite: bool = False,
               resume: bool = False, show_progress: Callable[[str], None] | None = None) -> DatasetManifest:
    """Build the dataset of `config.data`. `resume` continues an interrupted run in the same output: pipelines
    that keep per-input completion markers (Common Crawl) skip the inputs already done. With `show_progress`,
    a progress line goes to it every few seconds."""
    data = config.data
    storage.configure(config.storage)
    pipeline = dataset_pipeline(data.dataset)
    options = pipeline_options(list(beam_args))  # a bad option or a missing library: before the output is touched
    prepare_output(data.output, overwrite, match_inputs(data.input) if data.input is not None else [], resume,
                   data.spec.entries)
    extra = {}
    source = data.input
    if data.synth is not None:
        source, extra["synth"] = pipeline.generate(join(data.output, "raw"), data.synth)
    logger.info("preprocessing %s into %s", source, data.output)
    try:
        with (progress.ProgressMonitor(write=show_progress) if show_progress else contextlib.nullcontext() as monitor,
              new_pipeline(options) as p):
            _ = p | data.dataset.capitalize() >> pipeline.transform(source, data, extra)
            # Run and wait apart (not `with Pipeline`), so that the monitor reads the result's metrics meanwhile.
            result = p.run()
            if monitor is not None:
                monitor.follow(result)
            result.wait_until_finish()
    except BaseException as e:
        _remove_pieces(data.output)  # a failed run (a full disk, say) must not leave a copy of the data behind
        if _is_io_error(e):
            raise PipelineIOError(str(e)) from e
        raise
    return load_manifest(data.output)


@contextlib.contextmanager
def new_pipeline(options: PipelineOptions) -> Iterator[beam.Pipeline]:
    """A Beam pipeline whose local temp directory goes when the block ends. Beam removes it only at the end of
    `run()`, which a block that raises while the pipeline is built (an input refused on the driver, a
    tokenizer that cannot be trained) never reaches: each refusal left a /tmp/beam-pipeline-temp* behind."""
    p = beam.Pipeline(options=options)
    try:
        yield p
    finally:
        shutil.rmtree(p.local_tempdir, ignore_errors=True)


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
    fs, path = storage.url_to_fs(join(output, PIECES))
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except OSError as e:
        logger.warning("could not remove %s: %s", path, e)
