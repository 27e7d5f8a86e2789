"""Starting a training run: its dataset (built first if missing), its run directory (a new run starts afresh,
and `--overwrite` deletes only what a run directory holds), the lock, the run's nonce, then every group.

Every refusal is a `RunError` whose message says what to do; the CLI prints it as one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
from collections.abc import Callable

from codistill import storage
from codistill.config import ExperimentConfig, SnapshotTraffic, load_experiment, resolve_manifest
from codistill.dataset import DatasetError, DatasetManifest, load_manifest
from codistill.rundir import RunDir


class RunError(Exception):
    """A run cannot start (or did not end well): the message says why and what to do."""


def train(manifest: str, sets: list[str], resume: bool, overwrite: bool = False, echo: Callable[[str], None] = print,
          progress: Callable[[str], None] | None = None,
          groups: list[int] | None = None, hostfile: str | None = None,
          master_port: int | None = None) -> tuple[ExperimentConfig, DatasetManifest]:
    """Start every group of a run (one deepspeed launch each, here or on the slots of `hostfile`), or only
    `groups` (the others started apart, e.g. on other machines, sharing the store), and wait for them; returns
    the config and dataset; `master_port`: a hostfile run's (`launch_plan`). `echo` takes what is said on the
    way (building the dataset first, where the groups go); `progress` the pipeline's progress lines."""
    from training.launch import GroupFailed, RunLocked, agree_run_nonce, group_commands
    from training.launch import run_identity, run_groups
    from training.workloads import workload_for

    config = load_experiment(manifest, sets)
    _check_master_port(master_port, hostfile)
    groups = list(dict.fromkeys(groups or []))  # `--group 0 --group 0` is group 0 once
    if groups and not set(groups) <= set(config.trained_groups):
        raise RunError(f"--group {','.join(map(str, groups))}: this run trains groups {list(config.trained_groups)}")
    if groups and overwrite:
        raise RunError(f"--overwrite with --group: the other groups share the run; to start it over, delete "
                       f"{config.store}/{config.run_id} and each group's {config.run_dir}/group-<g>")
    storage.configure(config.storage)
    if groups:  # every group's task would build a missing dataset at once, into the same data.output
        try:
            load_manifest(config.data.output)
        except DatasetError:
            raise RunError(f"no dataset at {config.data.output}: with --group, build it first (once, not in "
                           f"every group's task): `{preprocess_command(config, manifest, sets)}`") from None
    dataset = dataset_for(config, echo, progress)
    try:
        workload_for(dataset.dataset).check_dataset(config, dataset)  # refused here, not in every rank after launch
    except DatasetError as e:
        raise RunError(str(e)) from None
    placement, chosen = place(config, groups=groups, hostfile=hostfile)
    echo(placement.summary)
    if config.codistill.enabled:
        echo(f"snapshots: {published_traffic(config, dataset).describe()}")
    try:
        with locked_run(config.run_dir, chosen if groups else None):  # held until every group has ended
            if not groups and not resume:
                start_afresh(config, overwrite)
            # One nonce for the run in both modes: a plain run resumed group by group, or the reverse, is one run.
            try:
                with storage.explained(config.store):
                    nonce = agree_run_nonce(config.run_dir, config.store, config.run_id, run_identity(config))
            except (ValueError, storage.StoreError) as e:
                raise RunError(str(e)) from None
            if groups and not resume:
                _refuse_started_groups(config, groups)
            commands = group_commands(resolve_manifest(manifest), chosen, config.deepspeed.ranks_per_group, sets,
                                      resume, placement, run_nonce=nonce, master_port=master_port)
            run_groups(commands, placement.env)
    except (GroupFailed, RunLocked) as e:
        raise RunError(str(e)) from None
    return config, dataset


def published_traffic(config: ExperimentConfig, dataset: DatasetManifest) -> SnapshotTraffic:
    """What each group's snapshots weigh and ask of the store: counted on the model built on torch's meta device
    (shapes only: no memory, no initialisation, instant even at a billion parameters), every float it holds."""
    import torch
    from training.workloads import workload_for

    with torch.device("meta"):
        state = workload_for(dataset.dataset).build_model(config.model, dataset).state_dict()
    values = sum(t.numel() for t in state.values() if t.is_floating_point())
    return SnapshotTraffic(values, config.codistill.snapshot_dtype, config.codistill.exchange_every,
                           len(config.trained_groups) - 1)


@contextlib.contextmanager
def locked_run(run_dir: str, groups: list[int] | None = None):
    """Hold the run directory for a launcher: all of it (a plain `codistill train`: exclusive, so nothing else
    runs while `--overwrite` deletes), or `groups` of it (`--group`: the run shared with the other groups'
    launchers, each group's directory exclusive); RunLocked if another launcher holds what we need."""
    from training.launch import locked_run_dir

    with contextlib.ExitStack() as held:
        held.enter_context(locked_run_dir(run_dir, shared=bool(groups)))
        for group in groups or []:
            held.enter_context(locked_run_dir(RunDir(run_dir).group(group).path))
        yield


def _refuse_started_groups(config: ExperimentConfig, groups: list[int]) -> None:
    store_fs, store_root = storage.url_to_fs(config.store)
    for group in groups:
        here = RunDir(config.run_dir).group(group)
        snapshots = f"{store_root.rstrip('/')}/{config.run_id}/group-{group}"
        if here.metrics.exists() or store_fs.exists(snapshots):
            raise RunError(f"group {group} of this run has started before ({here.path} or {config.store}/"
                           f"{config.run_id}/group-{group}): continue it with --resume")


# What the dry run shows for the nonce: a new run's is drawn at launch (`training.launch.agree_run_nonce`).
NONCE_AT_LAUNCH = "<the-run-nonce-agreed-at-launch>"


def place(config: ExperimentConfig, accelerators=None, groups: list[int] | None = None,
          hostfile: str | None = None):
    """(where the groups go, the groups): on the slots of `hostfile`, or on this host's `accelerators` (default:
    the GPUs visible here) or its cores; `groups`: these only (default: every group the run trains)."""
    from training.launch import PlacementError, place_groups, place_on_hosts, visible_accelerators

    chosen = list(dict.fromkeys(groups or config.trained_groups))
    ranks = config.deepspeed.ranks_per_group
    try:
        placement = (place_on_hosts(chosen, ranks, hostfile) if hostfile else
                     place_groups(chosen, ranks, visible_accelerators() if accelerators is None else accelerators,
                                  os.cpu_count() or 1))
    except PlacementError as e:
        raise RunError(str(e)) from None
    return placement, chosen


def launch_plan(config: ExperimentConfig, manifest: str, sets: list[str], resume: bool, accelerators=None,
                groups: list[int] | None = None, hostfile: str | None = None, run_nonce: str = NONCE_AT_LAUNCH,
                master_port: int | None = None):
    """(where the groups go, every group's deepspeed command as `train` starts it), starting nothing (see
    `place`); `master_port`: a hostfile run's group 0 meets there on its first host, group g on + g (default
    `training.launch.MASTER_PORT`)."""
    from training.launch import group_commands

    _check_master_port(master_port, hostfile)
    placement, chosen = place(config, accelerators, groups, hostfile)
    return placement, group_commands(resolve_manifest(manifest), chosen, config.deepspeed.ranks_per_group, sets,
                                     resume, placement, run_nonce=run_nonce, master_port=master_port)


def _check_master_port(master_port: int | None, hostfile: str | None) -> None:
    if master_port is not None and not hostfile:
        raise RunError(f"--master-port {master_port}: only for --hostfile runs (on this host each group takes a "
                       "port free here)")


def preprocess_command(config: ExperimentConfig, manifest: str, sets: list[str]) -> str:
    """The command that builds this run's dataset."""
    return shlex.join(["codistill", "preprocess", config.data.dataset, "-m", manifest,
                       *[a for assignment in sets for a in ("--set", assignment)]])


def dataset_for(config: ExperimentConfig, echo: Callable[[str], None] = print,
                progress: Callable[[str], None] | None = None) -> DatasetManifest:
    """The run's dataset, built first (in-process Beam) if it is not there yet."""
    from pipelines.run import preprocess, summarize_dataset

    try:
        dataset = load_manifest(config.data.output)
    except DatasetError:
        echo(f"no dataset at {config.data.output}: preprocessing it first")
        dataset = preprocess(config, show_progress=progress)
        echo(summarize_dataset(dataset, config.data.output))
        return dataset
    # (`output` may differ: a dataset can be copied or moved.)
    built, wanted = dataset.settings, config.data
    changed = [f.name for f in dataclasses.fields(wanted) if f.name not in ("input", "output")
               and getattr(built, f.name) != getattr(wanted, f.name)]
    if changed:
        raise RunError(
            f"the dataset at {config.data.output} was built with other data settings ({', '.join(changed)}); "
            f"rebuild it with `codistill preprocess {config.data.dataset} -m <manifest> --overwrite` or point "
            "data.output elsewhere")
    return dataset


def _foreign_entries(names: list[str], allowed: Callable[[str], bool]) -> str:
    foreign = sorted(n for n in names if not allowed(n))
    return ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")


def start_afresh(config: ExperimentConfig, overwrite: bool) -> None:
    """A new run must not inherit an earlier one's checkpoints, metrics or snapshots: its groups
    would adopt the old peers' weights as if they were fresh. Called with the run directory locked
    (the lock file stays: it is what keeps another `codistill train` out while we delete)."""
    run = RunDir(config.run_dir)
    if run.path.exists() and not run.path.is_dir():
        raise RunError(f"run directory {run.path} exists and is not a directory")
    store_fs, store_root = storage.url_to_fs(config.store)
    old_snapshots = f"{store_root.rstrip('/')}/{config.run_id}"
    earlier = [p for p in run.path.iterdir() if p.name != RunDir.LOCK] if run.path.exists() else []
    if earlier or store_fs.exists(old_snapshots):
        if not overwrite:
            raise RunError(f"{run.path} (or {config.store}/{config.run_id}) holds an earlier run: "
                           "continue it with --resume, or start over with --overwrite")
        foreign = _foreign_entries([p.name for p in earlier], RunDir.is_entry)
        if foreign:
            raise RunError(f"{run.path} is not a codistill run directory (it holds {foreign}): "
                           "--overwrite deletes only a run directory; remove it yourself or choose "
                           "another train.run_dir")
        if store_fs.exists(old_snapshots):
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in store_fs.ls(old_snapshots, detail=False)]
            foreign = _foreign_entries(names, lambda n: RunDir.GROUP.fullmatch(n) or n == RunDir.RUN_FILE)
            if foreign:
                raise RunError(f"{config.store}/{config.run_id} is not this run's snapshots (it holds "
                               f"{foreign}); remove it yourself or choose another train.store")
        for path in earlier:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        if store_fs.exists(old_snapshots):
            store_fs.rm(old_snapshots, recursive=True)
