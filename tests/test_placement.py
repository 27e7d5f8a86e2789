"""Where `codistill train` puts each group: a disjoint slice of the host's GPUs (read back by DeepSpeed's own
launcher parsing), or on CPU a share of the cores; and what it refuses before starting any rank."""

from __future__ import annotations

import base64
import json
import os
import shlex

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import REPO
from deepspeed.launcher import runner as ds_runner
from lm_data import TOKENIZER, write_lm_dataset

from codistill.cli import main
from codistill.config import load_experiment, parse_experiment
from codistill.run import RunError, launch_plan
from training.launch import PlacementError, visible_accelerators

EIGHT_GPUS = list(range(8))  # a pretend 8-GPU host: the ids `visible_accelerators` would give


def _deepspeed_slots(argv: list[str]) -> list[int]:
    """The GPUs DeepSpeed's per-node launcher gives a group for this command: the ids of its world on this host,
    which it makes the ranks' CUDA_VISIBLE_DEVICES (decoded as deepspeed/launcher/launch.py decodes them)."""
    assert argv[argv.index("-m") + 1] == "deepspeed.launcher.launch", argv
    world_info = next(a.split("=", 1)[1] for a in argv if a.startswith("--world_info="))
    world = json.loads(base64.urlsafe_b64decode(world_info))
    assert list(world) == ["localhost"], world
    return world["localhost"]


@pytest.mark.parametrize("groups, ranks", [(1, 8), (2, 4), (4, 2), (4, 1)])
def test_groups_get_disjoint_gpu_slices(groups, ranks):
    config = load_experiment("criteo-tiny", [f"data.groups={groups}", f"deepspeed.ranks_per_group={ranks}"])
    placement, commands = launch_plan(config, "criteo-tiny", [], False, accelerators=EIGHT_GPUS)
    slots = {c.group: _deepspeed_slots(c.argv) for c in commands}
    assert sorted(slots) == list(range(groups))
    assert all(len(s) == ranks for s in slots.values())
    used = [gpu for s in slots.values() for gpu in s]
    assert len(set(used)) == len(used) == groups * ranks  # no GPU shared by two groups
    groups_text, ranks_text = f"{groups} group{'s' if groups > 1 else ''}", f"{ranks} rank{'s' if ranks > 1 else ''}"
    assert placement.summary.startswith(f"placement: {groups_text} x {ranks_text} on {groups * ranks} of 8 GPUs")
    assert all(f"group {g} on GPU{'s' if ranks > 1 else ''} {','.join(map(str, s))}" in placement.summary
               for g, s in slots.items())
    assert ("idle" in placement.summary) == (groups * ranks < 8)


def _pretend_gpus(monkeypatch, count: int, visible: str | None) -> None:
    """A host where torch sees `count` CUDA devices (none here: torch.cuda is the one part stood in for)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


def test_the_slices_are_of_the_gpus_this_process_may_use(monkeypatch):
    """CUDA_VISIBLE_DEVICES=4,5,6,7: the groups go to those ids (DeepSpeed's launcher resets the variable)."""
    _pretend_gpus(monkeypatch, 4, "4,5,6,7")
    assert visible_accelerators() == [4, 5, 6, 7]
    config = load_experiment("criteo-tiny", ["data.groups=2", "deepspeed.ranks_per_group=2"])
    _, commands = launch_plan(config, "criteo-tiny", [], False, accelerators=visible_accelerators())
    assert [_deepspeed_slots(c.argv) for c in commands] == [[4, 5], [6, 7]]
    _pretend_gpus(monkeypatch, 8, None)
    assert visible_accelerators() == EIGHT_GPUS


def test_gpu_uuids_in_cuda_visible_devices_are_refused(monkeypatch):
    _pretend_gpus(monkeypatch, 2, "GPU-8f2a1c3e,GPU-77b0d9aa")
    with pytest.raises(PlacementError, match="give GPU indices"):
        visible_accelerators()


def test_more_ranks_than_gpus_is_refused_with_what_to_change():
    config = load_experiment("criteo-tiny", ["data.groups=4", "deepspeed.ranks_per_group=4"])
    with pytest.raises(RunError, match=r"4 groups x 4 ranks_per_group need 16 GPUs, this host \(8 visible: "
                                       r"0,1,2,3,4,5,6,7\) has 8: lower deepspeed.ranks_per_group"):
        launch_plan(config, "criteo-tiny", [], False, accelerators=EIGHT_GPUS)


def test_cpu_keeps_its_core_split(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    config = load_experiment("criteo-tiny", ["data.groups=2", "deepspeed.ranks_per_group=2"])
    placement, commands = launch_plan(config, "criteo-tiny", [], False, accelerators=[])
    assert placement.env == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 4))}
    assert [_deepspeed_slots(c.argv) for c in commands] == [[0, 1], [0, 1]]  # ranks, not GPUs: 2 per group


def test_train_dry_run_prints_every_group_and_starts_nothing(tmp_path):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(REPO / "manifests/criteo-tiny.yaml"), "--run-dir", str(run_dir),
                                       "--set", f"data.output={tmp_path / 'data'}", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("placement: 2 groups x 2 ranks on CPU (")
    assert [line.split(":")[0] for line in lines[1:]] == ["group 0", "group 1"]
    assert all("DS_ACCELERATOR=cpu" in line and "-m deepspeed.launcher.launch" in line for line in lines[1:])
    argv = shlex.split(lines[1].split(": ", 1)[1])
    assert argv[argv.index("--set") + 1] == f"data.output={tmp_path / 'data'}"
    assert not run_dir.exists() and not (tmp_path / "data").exists()


def test_a_tokenizer_changed_since_preprocessing_is_refused_before_any_rank_starts(tmp_path):
    raw = {"name": "lm-tok", "data": {"dataset": "commoncrawl", "input": "tests/lm_data.py",
                                      "output": str(tmp_path / "data"), "groups": 2},
           "model": {"kind": "lstm", "embedding_dim": 16, "hidden": 32},
           "train": {"run_dir": str(tmp_path / "run")}}
    config = parse_experiment(raw)
    write_lm_dataset(str(tmp_path / "data"), parameters=json.loads(json.dumps(config.data.recorded())))
    (tmp_path / "data" / "tokenizer" / "spm.model").write_bytes(TOKENIZER + b" retrained")
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["train", str(tmp_path / "lm.yaml")])
    assert result.exit_code == 1
    assert "the dataset was tokenized with sentencepiece model sha256" in result.output
    assert "placement:" not in result.output and not (tmp_path / "run").exists()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_run_says_what_its_snapshots_ask_of_the_store(tmp_path, dtype):
    """Counted on the meta device, for every workload (this LM has no `parameter_count`): the same floats as the
    real model, in the configured snapshot dtype."""
    import torch

    from codistill.dataset import load_manifest
    from codistill.run import published_traffic
    from training.workloads import workload_for

    raw = {"name": "lm-traffic", "data": {"dataset": "commoncrawl", "input": "tests/lm_data.py",
                                          "output": str(tmp_path / "data"), "groups": 3},
           "model": {"kind": "lstm", "embedding_dim": 16, "hidden": 32},
           "codistill": {"exchange_every": 10, "snapshot_dtype": dtype}}
    config = parse_experiment(raw)
    write_lm_dataset(str(tmp_path / "data"), groups=3, parameters=json.loads(json.dumps(config.data.recorded())))
    dataset = load_manifest(str(tmp_path / "data"))
    model = workload_for("commoncrawl").build_model(config.model, dataset)
    floats = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    traffic = published_traffic(config, dataset)
    width = {"fp32": 4, "bf16": 2}[dtype]
    assert (traffic.parameters, traffic.snapshot_bytes, traffic.peers) == (floats, width * floats, 2)
    assert traffic.describe() == (f"each snapshot is 0.00 GB ({floats / 1e6:.1f}M parameters x {width} bytes, "
                                  f"{dtype}), one every 10 steps: {width * floats / 10 / 1e6:.1f} MB written per "
                                  f"step by each group and {2 * width * floats / 10 / 1e6:.1f} MB read "
                                  f"({width * floats / 1e6:.0f} MB/s written at 10 steps/s)")
    assert all(p.device.type == "cpu" for p in model.parameters()) and torch.get_default_device().type == "cpu"


HOSTFILE = "node1 slots=4\nnode2 slots=4\n"


@pytest.mark.parametrize("groups, ranks", [(2, 4), (4, 2), (1, 8), (2, 3)])
def test_one_hostfile_is_split_into_one_deepspeed_job_per_group(tmp_path, groups, ranks):
    """`codistill train M --hostfile H`: each group's job gets its own slots of H's hosts, read back by
    DeepSpeed's own hostfile and --include parsing (a group may span hosts)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(HOSTFILE)
    config = load_experiment("criteo-tiny", [f"data.groups={groups}", f"deepspeed.ranks_per_group={ranks}"])
    placement, commands = launch_plan(config, "criteo-tiny", [], False, hostfile=str(hostfile))
    used = []
    for command in commands:
        args = ds_runner.parse_args(command.argv[command.argv.index("deepspeed.launcher.runner") + 1:])
        assert args.hostfile == str(hostfile) and args.num_nodes < 0 and args.num_gpus < 0
        active = ds_runner.parse_inclusion_exclusion(ds_runner.fetch_hostfile(args.hostfile), args.include,
                                                     args.exclude)
        slots = [(host, slot) for host, ids in active.items() for slot in ids]
        assert len(slots) == ranks
        used += slots
    assert len(set(used)) == len(used) == groups * ranks
    assert f"on the hosts of {hostfile}" in placement.summary


def test_a_hostfile_run_gives_each_group_its_own_fixed_rendezvous_port(tmp_path):
    """Each group's master is its first host, not this machine: a port free here says nothing about it. Group
    g takes --master-port + g (29500 + g by default), the same from every launcher (`--group` runs too)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(HOSTFILE)
    config = load_experiment("criteo-tiny", ["data.groups=4", "deepspeed.ranks_per_group=2"])

    def ports(**options) -> list[int]:
        _, commands = launch_plan(config, "criteo-tiny", [], False, hostfile=str(hostfile), **options)
        return [ds_runner.parse_args(c.argv[c.argv.index("deepspeed.launcher.runner") + 1:]).master_port
                for c in commands]

    assert ports() == [29500, 29501, 29502, 29503]
    assert ports(master_port=31000) == [31000, 31001, 31002, 31003]
    assert ports(groups=[2]) == [29502]
    with pytest.raises(RunError, match=r"--master-port 31000: only for --hostfile runs"):
        launch_plan(config, "criteo-tiny", [], False, accelerators=[], master_port=31000)


def test_a_hostfile_too_small_for_the_run_is_refused(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(HOSTFILE)
    config = load_experiment("criteo-tiny", ["data.groups=2", "deepspeed.ranks_per_group=8"])
    with pytest.raises(RunError, match=r"2 groups x 8 ranks_per_group need 16 GPUs, .*hostfile \(8 slots on 2 "
                                       r"hosts\) has 8"):
        launch_plan(config, "criteo-tiny", [], False, hostfile=str(hostfile))
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(RunError, match="Hostfile is empty or not formatted correctly"):
        launch_plan(config, "criteo-tiny", [], False, hostfile=str(tmp_path / "empty"))


def test_train_hostfile_dry_run_prints_a_job_per_group(tmp_path, monkeypatch):
    (tmp_path / "hostfile").write_text(HOSTFILE)
    monkeypatch.chdir(tmp_path)  # the README's command, with its relative hostfile
    result = CliRunner().invoke(main, ["train", str(REPO / "manifests/criteo.yaml"), "--hostfile", "hostfile",
                                       "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "placement: 2 groups x 1 rank on the hosts of hostfile: group 0 on node1:0; group 1 on node1:1"
    assert ["--hostfile hostfile --include node1:0" in lines[1], "--include node1:1" in lines[2]] == [True, True]
    result = CliRunner().invoke(main, ["train", str(REPO / "manifests/criteo.yaml"), "--hostfile", "hostfile",
                                       "--master-port", "31000", "--dry-run"])
    assert ["--master_port 31000" in result.stdout, "--master_port 31001" in result.stdout] == [True, True]
