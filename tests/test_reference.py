"""docs/reference.md is what the config classes say today (regenerate: python -m codistill.reference)."""

from __future__ import annotations

import dataclasses

from codistill import config
from codistill.datasets import DATASETS
from codistill.reference import field_comments, reference

from conftest import REPO


def test_the_field_reference_is_not_stale():
    assert (REPO / "docs" / "reference.md").read_text() == reference(), \
        "docs/reference.md is stale: python -m codistill.reference > docs/reference.md"


def test_every_field_of_every_section_is_in_the_reference():
    text = reference()
    sections = [config.DataConfig, config.OptimizerConfig, config.ScheduleConfig, config.DeepSpeedConfig,
                config.LoaderConfig, config.CodistillConfig, config.EvalConfig, config.TrainConfig,
                config.StorageConfig]
    sections += [s for spec in DATASETS.values() for s in (spec.config, spec.synth, *spec.models)]
    for section in sections:
        for f in dataclasses.fields(section):
            if f.name not in ("synth", "options"):
                assert f"| `{f.name}` |" in text, (section.__name__, f.name)


def test_comments_beside_and_above_a_field_are_its_description():
    assert field_comments(config.DataConfig)["seed"] == "keys the hash that assigns records to eval/groups/shards"
    assert field_comments(config.DataConfig)["options"].startswith("`data.<dataset>`: the dataset's own options")
