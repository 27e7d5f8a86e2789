"""The dataset registry agrees with itself: every spec's modules import and name the same dataset, its flags
are fields of its sections, its model kinds are distinct and each dataset has its commands."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
from click.testing import CliRunner

from codistill.cli import main as cli
from codistill.datasets import BUILT_IN, DATASETS, DatasetSpec
from pipelines.run import DatasetPipeline
from training.workloads import Workload, workload_for

SPECS = sorted(DATASETS.values(), key=lambda spec: spec.name)


def test_the_built_in_datasets_are_registered():
    assert {importlib.import_module(module).SPEC.name for module in BUILT_IN} == {"criteo", "commoncrawl",
                                                                                   "imagenet"} <= set(DATASETS)


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_a_spec_names_its_own_dataset_everywhere(spec: DatasetSpec):
    assert DATASETS[spec.name] is spec
    pipeline = importlib.import_module(spec.pipeline).PIPELINE
    assert isinstance(pipeline, DatasetPipeline)
    workload = workload_for(spec.name)
    assert isinstance(workload, Workload) and workload.name == spec.name
    assert workload is importlib.import_module(spec.workload).WORKLOAD


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_a_spec_s_sections_and_flags_agree(spec: DatasetSpec):
    for section in (spec.config, spec.synth, *spec.models):
        assert dataclasses.is_dataclass(section) and all(f.default is not dataclasses.MISSING
                                                         or f.default_factory is not dataclasses.MISSING
                                                         for f in dataclasses.fields(section)), section
    for section, flags in ((spec.config, spec.flags), (spec.synth, spec.synth_flags)):
        fields = {f.name for f in dataclasses.fields(section)}
        assert {flag.field for flag in flags} <= fields, (section, flags)
    kinds = [model.__dataclass_fields__["kind"].default for model in spec.models]
    assert spec.models and len(set(kinds)) == len(kinds) and set(spec.model_choices()) == set(kinds)


@pytest.mark.parametrize("command", ["synth", "preprocess"])
def test_every_dataset_has_its_commands(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    for spec in SPECS:
        assert spec.name in result.output
        flags = CliRunner().invoke(cli, [command, spec.name, "--help"])
        assert flags.exit_code == 0, flags.output
        for flag in spec.flags if command == "preprocess" else spec.synth_flags:
            assert flag.option in flags.output, (spec.name, flag.option)

