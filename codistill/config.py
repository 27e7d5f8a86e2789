"""Experiment manifests: YAML parsed into typed, frozen, validated dataclasses.

Every error names the field it is about (`data.groups: must be >= 1, got 0`),
so a wrong manifest fails before any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
import yaml

REPO_MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"


class ConfigError(ValueError):
    """A manifest field is missing, unknown, of the wrong type or impossible."""


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def tagged(tag: str, choices: dict[str, type], *, sibling: bool = False, **kwargs: Any) -> Any:
    """A field whose dataclass is chosen by a tag: `model.kind` inside the section itself, or
    (sibling=True) another field of the same section, as `data.dataset` chooses `data.synth`."""
    return field(metadata={"tag": tag, "choices": choices, "sibling": sibling}, **kwargs)


@dataclass(frozen=True)
class SynthConfig:
    """Generate raw Criteo-format input instead of reading `data.input`."""

    rows: int = 20_000
    files: int = 2
    seed: int = 0
    gzip: bool = False

    def validate(self, name: str) -> None:
        _require(self.rows >= 1, f"{name}.rows", f"must be >= 1, got {self.rows}")
        _require(self.files >= 1, f"{name}.files", f"must be >= 1, got {self.files}")


@dataclass(frozen=True)
class CriteoConfig:
    # "tsv": Kaggle train.txt (40 tab-separated fields, no header).
    # "csv": the header CSV export seen in the wild (label,I1..I13,C1..C26; ints may be "260.0").
    dialect: Literal["tsv", "csv"] = "tsv"
    # Hash buckets per categorical column: one number for all 26, or a list of 26.
    cat_buckets: tuple[int, ...] = (100_000,)
    keep_raw: bool = False

    def validate(self, name: str) -> None:
        _require(len(self.cat_buckets) in (1, 26), f"{name}.cat_buckets",
                 f"must hold 1 or 26 numbers, got {len(self.cat_buckets)}")
        for b in self.cat_buckets:
            _require(2 <= b <= 2**31 - 1, f"{name}.cat_buckets", f"each must be in [2, 2^31), got {b}")

    def buckets_per_column(self) -> tuple[int, ...]:
        return self.cat_buckets * 26 if len(self.cat_buckets) == 1 else self.cat_buckets


@dataclass(frozen=True)
class CommonCrawlSynthConfig:
    """Generate WET files of a planted language instead of reading `data.input`."""

    docs: int = 2_000
    files: int = 2
    seed: int = 0

    def validate(self, name: str) -> None:
        _require(self.docs >= 1, f"{name}.docs", f"must be >= 1, got {self.docs}")
        _require(self.files >= 1, f"{name}.files", f"must be >= 1, got {self.files}")


@dataclass(frozen=True)
class CleaningConfig:
    """Language filter and C4/Gopher-style line and page rules (`data.commoncrawl.clean`)."""

    def validate(self, name: str) -> None:
        pass


@dataclass(frozen=True)
class DedupConfig:
    """Whole-data-set deduplication before group assignment (`data.commoncrawl.dedup`)."""

    def validate(self, name: str) -> None:
        pass


@dataclass(frozen=True)
class CommonCrawlConfig:
    """Reading, cleaning, deduplicating and tokenising web text (`data.dataset: commoncrawl`)."""

    clean: CleaningConfig = field(default_factory=CleaningConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)

    def validate(self, name: str) -> None:
        self.clean.validate(f"{name}.clean")
        self.dedup.validate(f"{name}.dedup")


@dataclass(frozen=True)
class ImageNetSynthConfig:
    """Generate an ILSVRC-layout folder of images instead of reading `data.input`."""

    classes: int = 10
    per_class: int = 100
    seed: int = 0

    def validate(self, name: str) -> None:
        _require(self.classes >= 1, f"{name}.classes", f"must be >= 1, got {self.classes}")
        _require(self.per_class >= 1, f"{name}.per_class", f"must be >= 1, got {self.per_class}")


@dataclass(frozen=True)
class ImageNetConfig:
    """Labels, repairs and resizing of ILSVRC-layout JPEG folders (`data.dataset: imagenet`)."""

    def validate(self, name: str) -> None:
        pass


SYNTH_CONFIGS = {"criteo": SynthConfig, "commoncrawl": CommonCrawlSynthConfig, "imagenet": ImageNetSynthConfig}


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["criteo", "commoncrawl", "imagenet"] = "criteo"
    output: str = "runs/data"
    input: str | None = None  # glob or URL of raw files; None means `synth`
    # The generator of `dataset` (fields differ per dataset).
    synth: SynthConfig | CommonCrawlSynthConfig | ImageNetSynthConfig | None = tagged(
        "dataset", SYNTH_CONFIGS, sibling=True, default=None)
    groups: int = 2
    eval_fraction: float = 0.1
    shards_per_group: int = 2
    eval_shards: int = 1
    format: Literal["tfrecord", "webdataset"] = "tfrecord"
    seed: int = 0  # keys the hash that assigns records to eval/groups/shards
    block_rows: int = 1024  # most rows per stored record (TFRecord Example / WebDataset sample)
    split_bytes: int = 128 << 20  # uncompressed inputs are read in line-aligned ranges of about this size
    criteo: CriteoConfig = field(default_factory=CriteoConfig)
    commoncrawl: CommonCrawlConfig = field(default_factory=CommonCrawlConfig)
    imagenet: ImageNetConfig = field(default_factory=ImageNetConfig)

    def validate(self, name: str) -> None:
        _require((self.input is None) != (self.synth is None), name,
                 "give exactly one of `input` (raw files) or `synth` (generated data); to read files with a "
                 "manifest that generates its data, also set data.synth=null")
        _require(-2**63 <= self.seed < 2**63, f"{name}.seed", f"must fit in 64 bits, got {self.seed}")
        _require(self.groups >= 1, f"{name}.groups", f"must be >= 1, got {self.groups}")
        _require(0.0 < self.eval_fraction < 1.0, f"{name}.eval_fraction",
                 f"must be in (0, 1), got {self.eval_fraction}")
        _require(self.shards_per_group >= 1, f"{name}.shards_per_group",
                 f"must be >= 1, got {self.shards_per_group}")
        _require(self.eval_shards >= 1, f"{name}.eval_shards", f"must be >= 1, got {self.eval_shards}")
        _require(self.block_rows >= 1, f"{name}.block_rows", f"must be >= 1, got {self.block_rows}")
        _require(self.split_bytes >= 1 << 16, f"{name}.split_bytes", f"must be >= 65536, got {self.split_bytes}")
        if self.synth is not None:
            self.synth.validate(f"{name}.synth")
        self.criteo.validate(f"{name}.criteo")
        self.commoncrawl.validate(f"{name}.commoncrawl")
        self.imagenet.validate(f"{name}.imagenet")


@dataclass(frozen=True)
class CriteoDNNConfig:
    kind: Literal["criteo_dnn"] = "criteo_dnn"
    embedding_dim: int = 16
    hidden: tuple[int, ...] = (256, 128)
    dropout: float = 0.0

    def validate(self, name: str) -> None:
        _require(self.embedding_dim >= 1, f"{name}.embedding_dim", f"must be >= 1, got {self.embedding_dim}")
        _require(all(h >= 1 for h in self.hidden), f"{name}.hidden", f"sizes must be >= 1, got {self.hidden}")
        _require(0.0 <= self.dropout < 1.0, f"{name}.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class LSTMConfig:
    """The language model: embedding, stacked LSTM, softmax over the tokenizer's vocabulary."""

    kind: Literal["lstm"] = "lstm"

    def validate(self, name: str) -> None:
        pass


@dataclass(frozen=True)
class ResNetConfig:
    """ResNet-18/34/50 for the image workload."""

    kind: Literal["resnet"] = "resnet"

    def validate(self, name: str) -> None:
        pass


MODEL_CONFIGS = {"criteo_dnn": CriteoDNNConfig, "lstm": LSTMConfig, "resnet": ResNetConfig}
ModelConfig = CriteoDNNConfig | LSTMConfig | ResNetConfig


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adam", "adamw", "sgd", "adagrad"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    momentum: float = 0.0  # sgd only

    def validate(self, name: str) -> None:
        _require(self.lr > 0, f"{name}.lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"{name}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{name}.betas",
                 f"must be two numbers in [0, 1), got {self.betas}")


@dataclass(frozen=True)
class ScheduleConfig:
    steps: int = 1000  # optimizer steps per group
    warmup_steps: int = 0
    decay: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0  # where cosine/linear decay ends, as a fraction of lr

    def validate(self, name: str) -> None:
        _require(self.steps >= 1, f"{name}.steps", f"must be >= 1, got {self.steps}")
        _require(0 <= self.warmup_steps <= self.steps, f"{name}.warmup_steps",
                 f"must be in [0, steps], got {self.warmup_steps}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"{name}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class DeepSpeedConfig:
    ranks_per_group: int = 1
    zero_stage: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp32 on CPU: bf16 is ~40x slower there
    micro_batch_size: int = 256  # per rank
    grad_accum: int = 1
    gradient_clipping: float = 0.0  # 0 = off

    def validate(self, name: str) -> None:
        _require(self.ranks_per_group >= 1, f"{name}.ranks_per_group", f"must be >= 1, got {self.ranks_per_group}")
        _require(self.zero_stage in (0, 1, 2, 3), f"{name}.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _require(self.micro_batch_size >= 1, f"{name}.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        _require(self.grad_accum >= 1, f"{name}.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _require(self.gradient_clipping >= 0, f"{name}.gradient_clipping",
                 f"must be >= 0, got {self.gradient_clipping}")


@dataclass(frozen=True)
class LoaderConfig:
    shuffle_buffer: int = 10_000  # rows
    workers: int = 0  # DataLoader worker processes per rank

    def validate(self, name: str) -> None:
        _require(self.shuffle_buffer >= 1, f"{name}.shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        _require(self.workers >= 0, f"{name}.workers", f"must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class CodistillConfig:
    enabled: bool = True  # false: the plain baseline, same code path
    weight: float = 1.0
    burn_in_steps: int = 0
    ramp_steps: int = 0
    exchange_every: int = 50
    temperature: float = 1.0
    distance: Literal["ce", "kl", "mse_logits"] = "ce"
    max_staleness: int | None = None  # in steps; None = any age
    keep_snapshots: int = 3
    poll_seconds: float = 1.0

    def validate(self, name: str) -> None:
        _require(self.weight >= 0, f"{name}.weight", f"must be >= 0, got {self.weight}")
        _require(self.burn_in_steps >= 0, f"{name}.burn_in_steps", f"must be >= 0, got {self.burn_in_steps}")
        _require(self.ramp_steps >= 0, f"{name}.ramp_steps", f"must be >= 0, got {self.ramp_steps}")
        _require(self.exchange_every >= 1, f"{name}.exchange_every", f"must be >= 1, got {self.exchange_every}")
        _require(self.temperature > 0, f"{name}.temperature", f"must be > 0, got {self.temperature}")
        _require(self.max_staleness is None or self.max_staleness >= 0, f"{name}.max_staleness",
                 f"must be >= 0 or null, got {self.max_staleness}")
        _require(self.keep_snapshots >= 1, f"{name}.keep_snapshots", f"must be >= 1, got {self.keep_snapshots}")
        _require(self.poll_seconds > 0, f"{name}.poll_seconds", f"must be > 0, got {self.poll_seconds}")


@dataclass(frozen=True)
class EvalConfig:
    every: int = 200  # steps
    batch_size: int = 4096
    max_rows: int | None = None  # None = the whole eval split

    def validate(self, name: str) -> None:
        _require(self.every >= 1, f"{name}.every", f"must be >= 1, got {self.every}")
        _require(self.batch_size >= 1, f"{name}.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    run_dir: str | None = None  # default runs/<name>
    store: str | None = None  # snapshot store URL; default <run_dir>/store
    log_every: int = 50
    checkpoint_every: int = 500
    # Also write training and eval metrics as TensorBoard events (DeepSpeed's monitor; the `tensorboard`
    # extra) to <run_dir>/group-<g>/tensorboard.
    tensorboard: bool = False

    def validate(self, name: str) -> None:
        _require(0 <= self.seed < 2**31, f"{name}.seed", f"must be in [0, 2^31), got {self.seed}")
        _require(self.log_every >= 1, f"{name}.log_every", f"must be >= 1, got {self.log_every}")
        _require(self.checkpoint_every >= 1, f"{name}.checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")


@dataclass(frozen=True)
class StorageConfig:
    """fsspec options for every URL under `prefix` (the longest matching prefix wins), e.g. an S3 endpoint.

    `options` go to the file system as they are (s3fs: `endpoint_url`, `profile`, `anon`, `client_kwargs`...;
    gcsfs: `project`, `token`...). `env` names environment variables read where the file system is made (on
    each worker), so secrets never sit in a manifest: `{key: MY_S3_KEY, secret: MY_S3_SECRET}`. URLs no rule
    matches get only fsspec's own configuration (`FSSPEC_S3_*`, `AWS_*`, ~/.aws, ...).
    """

    prefix: str
    options: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def validate(self, name: str) -> None:
        protocol, sep, rest = self.prefix.partition("://")
        _require(bool(sep) and bool(protocol) and bool(rest), f"{name}.prefix",
                 f"must be a URL with a protocol and a location, e.g. s3://bucket/data, got {self.prefix!r}")
        _require(protocol in fsspec.available_protocols(), f"{name}.prefix",
                 f"unknown fsspec protocol {protocol!r} in {self.prefix!r}")
        both = sorted(set(self.options) & set(self.env))
        _require(not both, f"{name}.env", f"sets {both} that options already sets")
        for option, variable in self.env.items():
            _require(bool(variable), f"{name}.env.{option}", "must name an environment variable")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = tagged("kind", MODEL_CONFIGS, default_factory=CriteoDNNConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    codistill: CodistillConfig = field(default_factory=CodistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    storage: tuple[StorageConfig, ...] = ()

    def validate(self) -> None:
        _require(bool(self.name) and "/" not in self.name, "name",
                 f"must be a non-empty name without '/', got {self.name!r}")
        for section in ("data", "model", "optimizer", "schedule", "deepspeed", "loader", "codistill", "eval", "train"):
            getattr(self, section).validate(section)
        prefixes = [rule.prefix.rstrip("/") for rule in self.storage]
        for i, rule in enumerate(self.storage):
            rule.validate(f"storage[{i}]")
            _require(prefixes.index(prefixes[i]) == i, f"storage[{i}].prefix", f"{rule.prefix!r} is given twice")

    @property
    def run_dir(self) -> str:
        return self.train.run_dir or f"runs/{self.name}"

    @property
    def store(self) -> str:
        return self.train.store or f"{self.run_dir}/store"

    @property
    def run_id(self) -> str:
        """Names the run in the snapshot store: `<store>/<run_id>/group-<g>/`."""
        return Path(self.run_dir).name


# --- parsing ---------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            _require(type(None) in options, name, "must not be empty")
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        _require(value in typing.get_args(tp), name,
                 f"must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        _require(isinstance(value, dict), name, f"expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k, key_tp, name): _coerce(v, value_tp, f"{name}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]  # a single number stands for a one-item list
        return tuple(_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
        except ValueError:
            pass
    # bool is an int subclass: `groups: true` must not pass as 1.
    ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
    _require(ok, name, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "manifest"
    _require(isinstance(raw, dict), where, f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        _require(key in known, f"{prefix}.{key}" if prefix else str(key),
                 f"unknown key (known: {', '.join(known)})")
    kwargs = {}
    for key, f in known.items():
        name = f"{prefix}.{key}" if prefix else key
        if key in raw and "choices" in f.metadata:
            defaults = {k: d.default for k, d in known.items() if d.default is not dataclasses.MISSING}
            kwargs[key] = _coerce_tagged(raw[key], f, defaults | kwargs, name)
        elif key in raw:
            kwargs[key] = _coerce(raw[key], hints[key], name)
        else:
            _require(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING,
                     name, "required field is missing")
    return cls(**kwargs)


def _coerce_tagged(value: Any, f: dataclasses.Field, siblings: dict, name: str) -> Any:
    """Build the dataclass that the field's tag chooses (siblings are the fields already built)."""
    tag, choices = f.metadata["tag"], f.metadata["choices"]
    if value is None:
        _require(f.default is None, name, "must not be empty")
        return None
    if f.metadata["sibling"]:
        chosen, where = siblings.get(tag), f"{name.rsplit('.', 1)[0]}.{tag}" if "." in name else tag
    else:
        _require(isinstance(value, dict), name, f"expected a mapping, got {type(value).__name__}")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        chosen, where = value.get(tag, getattr(default, tag, None)), f"{name}.{tag}"
    _require(chosen in choices, where, f"must be one of {list(choices)}, got {chosen!r}")
    return _build(choices[chosen], value, name)


def set_field(raw: dict, dotted: str, value: Any) -> None:
    """Set `a.b` in the raw manifest (validation happens when it is parsed)."""
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        _require(isinstance(node, dict), dotted, f"{key} is not a section")
    node[keys[-1]] = value


def apply_override(raw: dict, assignment: str) -> None:
    """Apply `a.b=c` to the raw manifest; the value is parsed as YAML (`50`, `true`, `[1, 2]`)."""
    path, sep, text = assignment.partition("=")
    _require(bool(sep) and bool(path), assignment, "override must look like section.field=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text  # e.g. a glob like *.txt: take it as a string
    set_field(raw, path, value)


def parse_experiment(raw: Any, overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    raw = copy.deepcopy(raw or {})
    _require(isinstance(raw, dict), "manifest", f"expected a mapping, got {type(raw).__name__}")
    for assignment in overrides:
        apply_override(raw, assignment)
    config = _build(ExperimentConfig, raw, "")
    config.validate()
    return config


def resolve_manifest(name_or_path: str) -> str:
    """A path or URL as given, or a bare name like `criteo-tiny` from the repo's manifests/."""
    if "/" in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return name_or_path
    return str(REPO_MANIFESTS / f"{name_or_path}.yaml")


def read_manifest_yaml(name_or_path: str) -> dict:
    path = resolve_manifest(name_or_path)
    try:
        with fsspec.open(path, "r") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: manifest not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    _require(isinstance(raw, dict), path, f"expected a mapping at the top, got {type(raw).__name__}")
    return raw


def load_experiment(name_or_path: str, overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    raw = read_manifest_yaml(name_or_path)
    try:
        return parse_experiment(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"{resolve_manifest(name_or_path)}: {e}") from None


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
