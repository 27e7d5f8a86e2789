"""Experiment manifests (typed, frozen, validated) and the dataset manifest (written last, atomically)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math

import pytest

from codistill.config import (SNAPSHOT_WARN_BYTES_PER_STEP, ConfigError, DataConfig, ExperimentConfig,
                              apply_override, load_experiment, parse_experiment, snapshot_traffic, to_dict)
from codistill.datasets.criteo import CriteoConfig, CriteoSynthConfig
from codistill.dataset import (MANIFEST_NAME, DatasetError, DatasetManifest, ShardEntry, check_shards_present,
                               load_manifest, write_manifest)
from codistill.shards import Feature

from conftest import REPO, list_files, write_bytes

REPO_MANIFESTS = REPO / "manifests"

BASE = {"name": "exp", "data": {"input": "raw/*.txt", "output": "out"}}


def with_field(dotted: str, value) -> dict:
    raw = copy.deepcopy(BASE)
    node = raw
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return raw


def config_error(raw, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        parse_experiment(raw, overrides)
    return str(info.value)


# --- parsing into typed, frozen dataclasses ----------------------------------------------------------


def test_minimal_manifest_gets_typed_defaults():
    config = parse_experiment(BASE)
    assert isinstance(config, ExperimentConfig) and isinstance(config.data, DataConfig)
    assert isinstance(config.data.criteo, CriteoConfig)
    assert config.data.groups == 2 and config.data.eval_fraction == 0.1 and config.data.format == "tfrecord"
    assert config.data.criteo.cat_buckets == (100_000,)
    assert config.data.criteo.buckets_per_column() == (100_000,) * 26
    assert config.data.synth is None


def test_config_is_frozen():
    config = parse_experiment(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.data.groups = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.name = "other"


def test_nested_sections_and_number_coercion():
    raw = with_field("data.eval_fraction", 0.25)
    raw["data"]["criteo"] = {"dialect": "csv", "cat_buckets": list(range(2, 28)), "keep_raw": True}
    config = parse_experiment(raw)
    assert config.data.criteo.dialect == "csv"
    assert config.data.criteo.cat_buckets == tuple(range(2, 28))
    assert config.data.criteo.buckets_per_column() == tuple(range(2, 28))
    assert config.data.criteo.keep_raw is True


def test_a_single_cat_bucket_number_stands_for_a_one_item_list():
    config = parse_experiment(with_field("data.criteo.cat_buckets", 500))
    assert config.data.criteo.cat_buckets == (500,)


def test_integer_is_accepted_for_a_float_field():
    raw = with_field("data.synth", {"rows": 10})
    del raw["data"]["input"]
    raw["data"]["eval_fraction"] = 0.5
    config = parse_experiment(raw)
    assert config.data.synth == CriteoSynthConfig(rows=10)
    assert isinstance(config.data.eval_fraction, float)


# --- one clear error per wrong field ------------------------------------------------------------------


@pytest.mark.parametrize("dotted", ["nmae", "data.grups", "data.criteo.buckets", "data.synth.row"])
def test_unknown_key_is_named(dotted):
    raw = with_field(dotted, 1)
    if dotted.startswith("data.synth"):
        del raw["data"]["input"]
    message = config_error(raw)
    assert message.startswith(f"{dotted}: unknown key"), message
    assert "known:" in message


@pytest.mark.parametrize("dotted, value", [
    ("name", 5),
    ("data.groups", "two"),
    ("data.groups", True),  # bool must not pass as 1
    ("data.groups", 2.5),
    ("data.eval_fraction", "a tenth"),
    ("data.eval_fraction", True),
    ("data.format", "parquet"),
    ("data.dataset", "mnist"),
    ("data.criteo.dialect", "json"),
    ("data.criteo.keep_raw", "yes"),
    ("data.input", 5),
    ("data.output", ["a", "b"]),
    ("data.split_bytes", "128MB"),
    ("data.seed", None),
])
def test_wrong_type_is_named(dotted, value):
    message = config_error(with_field(dotted, value))
    assert message.startswith(f"{dotted}: "), message
    assert repr(value) in message or "must not be empty" in message, message


@pytest.mark.parametrize("dotted, value", [
    ("data.criteo.cat_buckets", ["a"]),
    ("data.criteo.cat_buckets", [10, "x"]),
])
def test_wrong_type_inside_a_list_names_the_item(dotted, value):
    message = config_error(with_field(dotted, value))
    index = [i for i, v in enumerate(value) if not isinstance(v, int)][0]
    assert message.startswith(f"{dotted}[{index}]: expected int"), message


@pytest.mark.parametrize("dotted, value", [("data", [1, 2]), ("data.criteo", "tsv"), ("data.synth", "big")])
def test_section_that_is_not_a_mapping_is_named(dotted, value):
    raw = with_field(dotted, value)
    message = config_error(raw)
    assert message.startswith(f"{dotted}: expected a mapping"), message


def test_manifest_that_is_not_a_mapping_is_an_error():
    assert config_error(["name"]).startswith("manifest: expected a mapping")


def test_missing_required_name():
    assert config_error({"data": BASE["data"]}).startswith("name: required field is missing")


@pytest.mark.parametrize("dotted, value", [
    ("name", ""),
    ("name", "a/b"),
    ("data.groups", 0),
    ("data.groups", -1),
    ("data.eval_fraction", 0.0),
    ("data.eval_fraction", 1.0),
    ("data.eval_fraction", 1.5),
    ("data.eval_fraction", -0.1),
    ("data.eval_fraction", math.nan),
    ("data.shards_per_group", 0),
    ("data.eval_shards", 0),
    ("data.block_rows", 0),
    ("data.split_bytes", 65535),
    ("data.criteo.cat_buckets", []),
    ("data.criteo.cat_buckets", [1]),
    ("data.criteo.cat_buckets", [2**31]),
    ("data.criteo.cat_buckets", [1000] * 25),
    ("data.criteo.cat_buckets", [1000] * 25 + [0]),
])
def test_impossible_value_is_named(dotted, value):
    message = config_error(with_field(dotted, value))
    assert message.startswith(f"{dotted}: "), message


@pytest.mark.parametrize("dotted, value", [("data.synth.rows", 0), ("data.synth.files", 0)])
def test_impossible_synth_value_is_named(dotted, value):
    raw = with_field(dotted, value)
    del raw["data"]["input"]
    assert config_error(raw).startswith(f"{dotted}: must be >= 1")


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 2**64])
def test_seed_outside_64_bits_is_a_config_error(seed):
    """The seed keys a 64-bit hash: one that does not fit must fail at parse time, naming data.seed.

    (Today it passes validation and the pipeline dies later with an OverflowError traceback.)
    """
    assert config_error(with_field("data.seed", seed)).startswith("data.seed: ")


def test_seed_extremes_that_fit_are_fine():
    for seed in (0, -1, 2**63 - 1, -(2**63)):
        assert parse_experiment(with_field("data.seed", seed)).data.seed == seed


def test_both_input_and_synth_is_an_error():
    message = config_error(with_field("data.synth", {"rows": 10}))
    assert message.startswith("data: ") and "input" in message and "synth" in message


def test_neither_input_nor_synth_is_an_error():
    raw = copy.deepcopy(BASE)
    del raw["data"]["input"]
    message = config_error(raw)
    assert message.startswith("data: ") and "input" in message and "synth" in message


# --- --set overrides ---------------------------------------------------------------------------------------


def test_overrides_are_parsed_as_yaml_values():
    config = parse_experiment(BASE, ["data.groups=3", "data.eval_fraction=0.25", "data.criteo.keep_raw=true",
                                     "data.criteo.cat_buckets=[10]", "data.format=webdataset", "name=other"])
    assert config.data.groups == 3
    assert config.data.eval_fraction == 0.25
    assert config.data.criteo.keep_raw is True
    assert config.data.criteo.cat_buckets == (10,)
    assert config.data.format == "webdataset"
    assert config.name == "other"


def test_override_with_a_glob_is_taken_as_a_string():
    config = parse_experiment(BASE, ["data.input=*.txt"])  # `*` starts a YAML alias: taken as text
    assert config.data.input == "*.txt"
    config = parse_experiment(BASE, ["data.input=gs://bucket/criteo/day_*.gz"])
    assert config.data.input == "gs://bucket/criteo/day_*.gz"


def test_override_can_swap_input_for_synth():
    config = parse_experiment(BASE, ["data.input=null", "data.synth.rows=100"])
    assert config.data.input is None and config.data.synth == CriteoSynthConfig(rows=100)


def test_override_does_not_change_the_raw_manifest():
    raw = copy.deepcopy(BASE)
    parse_experiment(raw, ["data.groups=5"])
    assert raw == BASE


@pytest.mark.parametrize("assignment, field", [
    ("data.nope=1", "data.nope"),
    ("data.criteo.nope=1", "data.criteo.nope"),
    ("nope.x=1", "nope"),
])
def test_override_of_an_unknown_field_is_an_error(assignment, field):
    message = config_error(BASE, [assignment])
    assert message.startswith(f"{field}: unknown key"), message


@pytest.mark.parametrize("assignment, field", [
    ("data.groups=three", "data.groups"),
    ("data.groups=0", "data.groups"),
    ("data.eval_fraction=2", "data.eval_fraction"),
])
def test_override_with_a_bad_value_names_the_field(assignment, field):
    assert config_error(BASE, [assignment]).startswith(f"{field}: ")


@pytest.mark.parametrize("assignment", ["data.groups", "=3"])
def test_malformed_override_is_an_error(assignment):
    message = config_error(BASE, [assignment])
    assert "section.field=value" in message


def test_override_through_a_value_that_is_not_a_section_is_an_error():
    message = config_error(BASE, ["data.output.x=1"])  # data.output is a string
    assert message.startswith("data.output.x: ") and "not a section" in message


def test_apply_override_edits_the_raw_mapping():
    raw = {}
    apply_override(raw, "data.criteo.dialect=csv")
    assert raw == {"data": {"criteo": {"dialect": "csv"}}}


# --- the repository's manifests ------------------------------------------------------------------------------


def test_tiny_manifest_loads_by_path_and_by_name():
    by_path = load_experiment(str(REPO_MANIFESTS / "criteo-tiny.yaml"))
    by_name = load_experiment("criteo-tiny")
    assert by_path == by_name
    data = by_path.data
    assert by_path.name == "criteo-tiny"
    assert data.input is None and isinstance(data.synth, CriteoSynthConfig)  # the embedded demo generates its data
    assert data.groups == 2 and data.dataset == "criteo"


KAGGLE_TRAIN_ROWS = 45_840_617


def test_full_criteo_manifest_is_a_one_pass_recipe_for_the_kaggle_data(caplog):
    with caplog.at_level(logging.WARNING, logger="codistill.config"):
        config = load_experiment("criteo")
    assert config.name == "criteo" and not caplog.records  # its store traffic is within the warning's bound
    assert config.data.input and config.data.synth is None  # the real Kaggle train.txt
    assert config.data.groups >= 2 and config.data.shards_per_group > 1
    assert config.model.kind == "criteo_dnn" and config.codistill.enabled and config.eval.every < config.schedule.steps
    group_rows = KAGGLE_TRAIN_ROWS * (1 - config.data.eval_fraction) / config.data.groups
    ds = config.deepspeed
    passes = config.schedule.steps * ds.micro_batch_size * ds.ranks_per_group * ds.grad_accum / group_rows
    assert 0.95 <= passes <= 1.05


@pytest.mark.parametrize("model", [{}, {"embedding_dim": 3, "hidden": [7]}, {"hidden": []}])
@pytest.mark.parametrize("buckets", [[50], list(range(2, 28))])
def test_criteo_parameter_count_is_the_models(model, buckets):
    from training.workloads.criteo import CriteoDNN

    raw = with_field("data.criteo.cat_buckets", buckets) | {"model": {"kind": "criteo_dnn", **model}}
    config = parse_experiment(raw)
    built = CriteoDNN(config.model, list(config.data.criteo.buckets_per_column()))
    assert config.model.parameter_count(config.data) == sum(p.numel() for p in built.parameters())


def test_snapshot_traffic_of_the_full_criteo_manifest(caplog):
    """1M buckets x 26 columns x 16 dimensions: ~1.7 GB a snapshot; every 50 steps is over the warning's bound."""
    traffic = snapshot_traffic(load_experiment("criteo"))
    assert 416e6 < traffic.parameters < 417e6 and traffic.snapshot_bytes == 4 * traffic.parameters
    assert traffic.bytes_per_step == traffic.snapshot_bytes / 100 < SNAPSHOT_WARN_BYTES_PER_STEP
    with caplog.at_level(logging.WARNING, logger="codistill.config"):
        config = load_experiment("criteo", ["codistill.exchange_every=50"])
    assert snapshot_traffic(config).bytes_per_step > SNAPSHOT_WARN_BYTES_PER_STEP
    (record,) = caplog.records
    assert record.getMessage().startswith("criteo: each snapshot is 1.67 GB (416.4M parameters x 4 bytes, fp32), one "
                                          "every 50 steps: 33.3 MB written per step by each group and 33.3 MB read")
    assert "raise codistill.exchange_every" in record.getMessage()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_snapshots_halve_the_traffic(dtype):
    fp32 = snapshot_traffic(load_experiment("criteo"))
    half = snapshot_traffic(load_experiment("criteo", [f"codistill.snapshot_dtype={dtype}"]))
    assert half.parameters == fp32.parameters and 2 * half.snapshot_bytes == fp32.snapshot_bytes
    assert half.describe().startswith(f"each snapshot is 0.83 GB (416.4M parameters x 2 bytes, {dtype}), one every "
                                      "100 steps: 8.3 MB written per step by each group and 8.3 MB read")


def test_an_unknown_snapshot_dtype_is_refused():
    with pytest.raises(ConfigError, match="snapshot_dtype"):
        load_experiment("criteo-tiny", ["codistill.snapshot_dtype=int8"])


def test_no_snapshot_traffic_without_codistillation(caplog):
    with caplog.at_level(logging.WARNING, logger="codistill.config"):
        assert snapshot_traffic(load_experiment("criteo", ["codistill.enabled=false",
                                                           "codistill.exchange_every=1"])) is None
        small = snapshot_traffic(load_experiment("criteo-tiny", ["codistill.exchange_every=1"]))
    assert not caplog.records and small.bytes_per_step < SNAPSHOT_WARN_BYTES_PER_STEP


@pytest.mark.parametrize("path", sorted(REPO_MANIFESTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_manifest_parses(path):
    assert load_experiment(str(path)).name == path.stem


def test_stateful_lm_layout_takes_at_most_one_loader_worker():
    raw = {"name": "lm", "data": {"dataset": "commoncrawl", "input": "x", "output": "out"},
           "model": {"kind": "lstm", "layout": "stateful"}, "loader": {"workers": 2}}
    assert config_error(raw) == "loader.workers: must be 0 or 1 with model.layout: stateful, got 2"
    assert parse_experiment(raw, ["loader.workers=1"]).loader.workers == 1
    assert parse_experiment(raw, ["model.layout=packed"]).loader.workers == 2  # packed rows split over workers


def test_load_experiment_applies_overrides_and_names_the_file_in_errors():
    config = load_experiment("criteo-tiny", ["data.groups=4"])
    assert config.data.groups == 4
    with pytest.raises(ConfigError) as info:
        load_experiment("criteo-tiny", ["data.groups=0"])
    assert "criteo-tiny.yaml" in str(info.value) and "data.groups: must be >= 1, got 0" in str(info.value)


def test_manifest_from_memory_url(memory_root):
    url = f"{memory_root}/m.yaml"
    write_bytes(url, b"name: mem\ndata:\n  input: x.txt\n  groups: 3\n")
    assert load_experiment(url).data.groups == 3


def test_missing_manifest_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="manifest not found"):
        load_experiment(str(tmp_path / "nope.yaml"))


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(str(path))


@pytest.mark.parametrize("text", ["", "# only a comment\n", "name: x\ndata: {input: a.txt, groups: 2"],
                         ids=["empty", "comment_only", "truncated"])
def test_empty_or_truncated_manifest_file_is_a_config_error(tmp_path, text):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="m.yaml: "):
        load_experiment(str(path))


def test_top_level_list_is_a_config_error(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_experiment(str(path))


def test_to_dict_round_trips_through_parse():
    config = load_experiment("criteo-tiny")
    assert parse_experiment(to_dict(config)) == config


# --- the dataset manifest -------------------------------------------------------------------------------------

FEATURES = {"key": Feature("bytes"), "dense": Feature("float32", (13,)), "cat": Feature("int32", (26,))}


def small_manifest(rows_read=10, rejected=None) -> DatasetManifest:
    shards = (ShardEntry("eval/criteo-00000-of-00001.tfrecord", "eval", None, 2, 100, "a" * 64),
              ShardEntry("train/0/criteo-00000-of-00001.tfrecord", "train", 0, 4, 200, "b" * 64),
              ShardEntry("train/1/criteo-00000-of-00001.tfrecord", "train", 1, 3, 150, "c" * 64))
    return DatasetManifest(dataset="criteo", format="tfrecord", features=FEATURES, groups=2, shards=shards,
                           inputs=({"source": "a.txt", "rows": rows_read},),
                           rejected=rejected if rejected is not None else {"field_count": 1},
                           parameters={"groups": 2, "seed": 3}, extra={"note": "x"})


def test_dataset_manifest_round_trips_through_json():
    manifest = small_manifest()
    text = manifest.to_json()
    back = DatasetManifest.from_json(text, "test")
    assert back == manifest
    assert back.to_json() == text
    assert back.written_rows == 9 and back.input_rows == 10
    assert back.shards_of("train", 1) == [manifest.shards[2]]
    assert back.shards_of("eval") == [manifest.shards[0]]


@pytest.mark.parametrize("root_kind", ["local", "memory"])
def test_manifest_is_written_atomically_without_leftovers(root_kind, tmp_path, memory_root):
    root = str(tmp_path / "ds") if root_kind == "local" else memory_root
    write_manifest(root, small_manifest())
    assert list_files(root) == [MANIFEST_NAME]
    assert load_manifest(root) == small_manifest()
    write_manifest(root, small_manifest(rows_read=11, rejected={"field_count": 2}))  # replaces, no leftovers
    assert list_files(root) == [MANIFEST_NAME]
    assert load_manifest(root).input_rows == 11


def test_manifest_that_loses_rows_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="records were lost"):
        write_manifest(str(tmp_path), small_manifest(rows_read=12))
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_missing_dataset_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no manifest.json"):
        load_manifest(str(tmp_path))


@pytest.mark.parametrize("text, match", [
    ("not json", "not a valid dataset manifest"),
    ("{}", "schema_version"),
    ('{"schema_version": 99}', "schema_version 99"),
    ('{"schema_version": 1}', "not a valid dataset manifest"),
    ('[1, 2]', "not a valid dataset manifest"),
    ('{"schema_version": 1, "features": [], "shards": []}', "not a valid dataset manifest"),
])
def test_malformed_dataset_manifest_is_a_clear_error(text, match):
    with pytest.raises(DatasetError, match=match):
        DatasetManifest.from_json(text, "somewhere/manifest.json")


def test_truncated_dataset_manifest_is_a_clear_error():
    text = small_manifest().to_json()
    for cut in (0, 1, len(text) // 2, len(text) - 3):
        with pytest.raises(DatasetError, match="not a valid dataset manifest"):
            DatasetManifest.from_json(text[:cut], "m")


def test_malformed_shard_entry_is_a_clear_error():
    raw = small_manifest().to_json().replace('"records"', '"rows"')
    with pytest.raises(DatasetError, match="not a valid dataset manifest"):
        DatasetManifest.from_json(raw, "m")


def test_check_shards_present_names_missing_and_wrong_size_shards(tmp_path):
    manifest = small_manifest()
    root = str(tmp_path)
    (tmp_path / "train" / "0").mkdir(parents=True)
    (tmp_path / "train" / "0" / "criteo-00000-of-00001.tfrecord").write_bytes(b"x" * 200)
    (tmp_path / "train" / "1").mkdir(parents=True)
    (tmp_path / "train" / "1" / "criteo-00000-of-00001.tfrecord").write_bytes(b"x" * 149)
    with pytest.raises(DatasetError) as info:
        check_shards_present(root, manifest)
    message = str(info.value)
    assert "missing shard eval/criteo-00000-of-00001.tfrecord" in message
    assert "train/1/criteo-00000-of-00001.tfrecord has 149 bytes, manifest says 150" in message
    assert "train/0" not in message
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "criteo-00000-of-00001.tfrecord").write_bytes(b"x" * 100)
    (tmp_path / "train" / "1" / "criteo-00000-of-00001.tfrecord").write_bytes(b"x" * 150)
    check_shards_present(root, manifest)


# --- storage rules ---------------------------------------------------------------------------------


def test_storage_rules_parse_with_options_and_environment_names():
    raw = BASE | {"storage": [{"prefix": "s3://data/criteo", "options": {"endpoint_url": "http://minio:9000",
                                                                         "client_kwargs": {"region_name": "x"}},
                               "env": {"key": "MINIO_KEY", "secret": "MINIO_SECRET"}},
                              {"prefix": "gs://snapshots", "options": {"project": "p"}}]}
    rules = parse_experiment(raw).storage
    assert [r.prefix for r in rules] == ["s3://data/criteo", "gs://snapshots"]
    assert rules[0].options["client_kwargs"] == {"region_name": "x"} and rules[0].env["secret"] == "MINIO_SECRET"
    assert parse_experiment(BASE).storage == ()


@pytest.mark.parametrize("rules, message", [
    ([{"prefix": "bucket/data"}], "storage[0].prefix: must be a URL with a protocol and a location"),
    ([{"prefix": "s3://"}], "storage[0].prefix: must be a URL with a protocol and a location"),
    ([{"prefix": "nosuchfs://b"}], "storage[0].prefix: unknown fsspec protocol 'nosuchfs'"),
    ([{"options": {"anon": True}}], "storage[0].prefix: required field is missing"),
    ([{"prefix": "s3://b", "options": ["anon"]}], "storage[0].options: expected a mapping"),
    ([{"prefix": "s3://b", "env": {"key": 7}}], "storage[0].env.key: expected str, got int 7"),
    ([{"prefix": "s3://b", "env": {"key": ""}}], "storage[0].env.key: must name an environment variable"),
    ([{"prefix": "s3://b", "options": {"key": "k"}, "env": {"key": "K"}}], "storage[0].env: sets ['key']"),
    ([{"prefix": "s3://b"}, {"prefix": "s3://b/"}], "storage[1].prefix: 's3://b/' is given twice"),
    ([{"prefix": "s3://b", "endpoint": "x"}], "storage[0].endpoint: unknown key"),
    ("s3://b", "storage[0]: expected a mapping, got str"),
])
def test_bad_storage_rules_name_the_field(rules, message):
    assert message in config_error(BASE | {"storage": rules})
