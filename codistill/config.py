"""Experiment manifests: YAML parsed into typed, frozen, validated dataclasses.

Every error names the field it is about (`data.groups: must be >= 1, got 0`),
so a wrong manifest fails before any work starts. The sections every
experiment has live here; a dataset's own sections (`data.<dataset>`,
`data.synth`, the `model` kinds it trains) live with its spec in
`codistill/datasets/`, and only the chosen dataset's are parsed.
"""

from __future__ import annotations

import copy
import logging
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import fsspec
import yaml

from codistill.datasets import DATASETS, DatasetSpec, spec_for
from codistill.fields import (ConfigError, bounded, build, key_text, plain_name, require, section, tagged, to_dict,
                              validate)
from codistill.rundir import RunDir

__all__ = ["ConfigError", "DataConfig", "ExperimentConfig", "load_experiment", "parse_experiment", "to_dict"]

# The repository's manifests/, which pyproject.toml maps into the package (so a wheel carries it).
SHIPPED_MANIFESTS = "codistill.manifests"
logger = logging.getLogger(__name__)


# Bounds that keep a typo from sizing the pipeline beyond reason: shard names have five digits.
MAX_GROUPS = 1024
MAX_SHARDS = 99_999


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "criteo"  # a name in codistill.datasets.DATASETS
    output: str = "runs/data"
    input: str | None = None  # glob or URL of raw files; None means `synth`
    # The generator of `dataset` (its spec's `synth` section).
    synth: Any = tagged("dataset", lambda fields: {fields["dataset"]: spec_for(fields["dataset"]).synth},
                        sibling=True, default=None)
    groups: int = 2
    eval_fraction: float = 0.1
    shards_per_group: int = 2
    eval_shards: int = 1
    format: Literal["tfrecord", "webdataset"] = "tfrecord"
    seed: int = 0  # keys the hash that assigns records to eval/groups/shards
    block_rows: int = 1024  # most rows per stored record (TFRecord Example / WebDataset sample)
    split_bytes: int = 128 << 20  # uncompressed inputs are read in line-aligned ranges of about this size
    # `data.<dataset>`: the dataset's own options (its spec's `config`), read as `data.<dataset>` too.
    options: Any = section("dataset", lambda: {name: spec.config for name, spec in DATASETS.items()}, default=None)

    def __post_init__(self) -> None:
        if self.options is None:
            object.__setattr__(self, "options", self.spec.config())

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not fields: `data.criteo` is the options of a Criteo manifest.
        if not name.startswith("_") and name == self.__dict__.get("dataset"):
            return self.__dict__["options"]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def spec(self) -> DatasetSpec:
        return spec_for(self.dataset)

    def validate(self, name: str) -> None:
        listed = getattr(self.__dict__.get("options"), "input_list", None)  # a dataset read from a paths file
        require([self.input, listed, self.synth].count(None) == 2, name,
                "give exactly one of `input` (raw files), the dataset's `input_list` or `synth` (generated data); "
                "to read files with a manifest that generates its data, also set data.synth=null")
        require(-2**63 <= self.seed < 2**63, f"{name}.seed", f"must fit in 64 bits, got {self.seed}")
        require(self.groups >= 1, f"{name}.groups", f"must be >= 1, got {self.groups}")
        require(self.groups <= MAX_GROUPS, f"{name}.groups", f"must be <= {MAX_GROUPS}, got {self.groups}")
        require(0.0 < self.eval_fraction < 1.0, f"{name}.eval_fraction",
                f"must be in (0, 1), got {self.eval_fraction}")
        for shards in ("shards_per_group", "eval_shards"):
            count = getattr(self, shards)
            require(count >= 1, f"{name}.{shards}", f"must be >= 1, got {count}")
            require(count <= MAX_SHARDS, f"{name}.{shards}", f"must be <= {MAX_SHARDS}, got {count}")
        require(self.block_rows >= 1, f"{name}.block_rows", f"must be >= 1, got {self.block_rows}")
        require(self.split_bytes >= 1 << 16, f"{name}.split_bytes", f"must be >= 65536, got {self.split_bytes}")
        if self.synth is not None:
            validate(self.synth, f"{name}.synth")
        validate(self.options, f"{name}.{self.dataset}")

    def recorded(self) -> dict:
        """The settings a dataset is built with, as its manifest records them (`parameters`, less the input)."""
        return {k: v for k, v in to_dict(self).items() if k != "input"}

    @classmethod
    def from_recorded(cls, parameters: dict, where: str) -> "DataConfig":
        """The typed settings a dataset manifest recorded (its input list left out)."""
        return build(cls, {k: v for k, v in parameters.items() if k != "input"}, where)


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adam", "adamw", "sgd", "adagrad"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    momentum: float = 0.0  # sgd only
    # [[step, weight decay], ...], steps increasing: from each step on, that weight decay (before the first,
    # `weight_decay`). E.g. [[0, 1e-4], [30000, 1e-5], [60000, 0]] drops it at the LR decays (Sodhani et al. 2021).
    weight_decay_schedule: tuple[tuple[float, ...], ...] = ()

    def validate(self, name: str) -> None:
        require(self.lr > 0, f"{name}.lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"{name}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        previous = -1.0
        for i, entry in enumerate(self.weight_decay_schedule):
            where = f"{name}.weight_decay_schedule[{i}]"
            require(len(entry) == 2, where, f"must be [step, weight decay], got {list(entry)}")
            require(entry[0] >= 0 and entry[0] == int(entry[0]), where,
                    f"step must be an integer >= 0, got {entry[0]}")
            require(entry[1] >= 0, where, f"weight decay must be >= 0, got {entry[1]}")
            require(entry[0] > previous, where, f"steps must increase, got {entry[0]:g} after {previous:g}")
            previous = entry[0]
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{name}.betas",
                f"must be two numbers in [0, 1), got {self.betas}")


@dataclass(frozen=True)
class ScheduleConfig:
    steps: int = 1000  # optimizer steps per group
    warmup_steps: int = 0
    decay: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0  # where cosine/linear decay ends, as a fraction of lr

    def validate(self, name: str) -> None:
        require(self.steps >= 1, f"{name}.steps", f"must be >= 1, got {self.steps}")
        require(0 <= self.warmup_steps <= self.steps, f"{name}.warmup_steps",
                f"must be in [0, steps], got {self.warmup_steps}")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"{name}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class DeepSpeedConfig:
    ranks_per_group: int = 1
    zero_stage: int = 0
    # auto: bf16 where the hardware runs it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else
    # fp32 (emulated bf16 is ~12x slower); the choice is printed and recorded (training/precision.py).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    micro_batch_size: int = 256  # per rank
    grad_accum: int = 1
    gradient_clipping: float = 0.0  # 0 = off

    def validate(self, name: str) -> None:
        require(self.ranks_per_group >= 1, f"{name}.ranks_per_group", f"must be >= 1, got {self.ranks_per_group}")
        require(self.zero_stage in (0, 1, 2, 3), f"{name}.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        require(self.micro_batch_size >= 1, f"{name}.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        require(self.grad_accum >= 1, f"{name}.grad_accum", f"must be >= 1, got {self.grad_accum}")
        require(self.gradient_clipping >= 0, f"{name}.gradient_clipping",
                f"must be >= 0, got {self.gradient_clipping}")


@dataclass(frozen=True)
class LoaderConfig:
    shuffle_buffer: int = 10_000  # rows
    workers: int = 0  # DataLoader worker processes per rank
    # Samples that fail to decode are skipped and counted; more than this many in one loader worker stops training.
    max_decode_failures: int = 100

    def validate(self, name: str) -> None:
        require(self.shuffle_buffer >= 1, f"{name}.shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        require(self.workers >= 0, f"{name}.workers", f"must be >= 0, got {self.workers}")
        require(self.max_decode_failures >= 0, f"{name}.max_decode_failures",
                f"must be >= 0, got {self.max_decode_failures}")


@dataclass(frozen=True)
class CodistillConfig:
    """How strongly and in what way a group is pulled toward its peers (the loss: `training/loss.py`).

    weight, burn_in_steps, ramp_steps: w(step) is 0 during burn-in, then `weight`, reached linearly over
      `ramp_steps` (`training.loss.distill_weight`).
    temperature: for "ce"/"kl", both student and peer distributions are computed from logits / T, and the
      term is multiplied by T^2 (Hinton et al. 2015) so that its gradient keeps roughly the same size
      whatever T is.
    distance:
      "ce"          cross-entropy from the averaged peer distribution to the student's.
      "kl"          KL(target || student): the same gradient as "ce"; the value is lower by the target's
                    entropy, so it reads 0 when a group agrees with its peers.
      "mse_logits"  mean squared error between the student's logits and the mean of the peers' logits,
                    averaged over every logit entry of the real positions (temperature does not apply).
    """

    enabled: bool = True  # false: the plain baseline, same code path
    weight: float = 1.0
    burn_in_steps: int = 0
    ramp_steps: int = 0
    exchange_every: int = 50
    temperature: float = 1.0
    distance: Literal["ce", "kl", "mse_logits"] = "ce"
    max_staleness: int | None = None  # in steps; None = any age
    keep_snapshots: int = 3
    # What the weights are published in: bf16 and fp16 halve the snapshot bytes (the store's traffic and the
    # time a step spends copying them); fp16 has more mantissa, bf16 fp32's range. Every group must publish
    # in the same dtype: a peer's snapshot in another is refused. Peers run in the training precision either way.
    snapshot_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    poll_seconds: float = 1.0
    # Exact staleness: at step s a group distils from exactly its peers' snapshots of step s - (s mod
    # exchange_every), waiting for them (at most lockstep_timeout seconds, then the run stops with an error);
    # snapshots from before burn_in_steps are not used. false: peers are adopted whenever a newer snapshot
    # arrives and training never waits.
    lockstep: bool = False
    lockstep_timeout: float = 600.0
    # A group that distilled from its peers on less than this share of its steps after burn-in (a store it
    # could not write or read, peers too stale) ends its run with an error: it did not codistill.
    min_peer_coverage: float = 0.5

    def validate(self, name: str) -> None:
        require(self.weight >= 0, f"{name}.weight", f"must be >= 0, got {self.weight}")
        require(self.burn_in_steps >= 0, f"{name}.burn_in_steps", f"must be >= 0, got {self.burn_in_steps}")
        require(self.ramp_steps >= 0, f"{name}.ramp_steps", f"must be >= 0, got {self.ramp_steps}")
        require(self.exchange_every >= 1, f"{name}.exchange_every", f"must be >= 1, got {self.exchange_every}")
        require(self.temperature > 0, f"{name}.temperature", f"must be > 0, got {self.temperature}")
        require(self.max_staleness is None or self.max_staleness >= 0, f"{name}.max_staleness",
                f"must be >= 0 or null, got {self.max_staleness}")
        require(self.keep_snapshots >= 1, f"{name}.keep_snapshots", f"must be >= 1, got {self.keep_snapshots}")
        require(self.poll_seconds > 0, f"{name}.poll_seconds", f"must be > 0, got {self.poll_seconds}")
        require(0 <= self.min_peer_coverage <= 1, f"{name}.min_peer_coverage",
                f"must be in [0, 1], got {self.min_peer_coverage}")
        require(self.lockstep_timeout > 0, f"{name}.lockstep_timeout", f"must be > 0, got {self.lockstep_timeout}")
        require(not (self.lockstep and self.max_staleness is not None and self.max_staleness < self.exchange_every - 1),
                f"{name}.max_staleness", f"lockstep peers are up to exchange_every - 1 = {self.exchange_every - 1} "
                f"steps old: max_staleness {self.max_staleness} would leave them out")


@dataclass(frozen=True)
class EvalConfig:
    every: int = 200  # steps
    steps: tuple[int, ...] = ()  # evaluate at these steps too (dense early evals: steps-to-target resolution)
    batch_size: int = 4096
    max_rows: int | None = None  # None = the whole eval split

    def validate(self, name: str) -> None:
        require(self.every >= 1, f"{name}.every", f"must be >= 1, got {self.every}")
        require(all(step >= 1 for step in self.steps), f"{name}.steps", f"must be >= 1, got {list(self.steps)}")
        require(self.batch_size >= 1, f"{name}.batch_size", f"must be >= 1, got {self.batch_size}")


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
    # Which of the dataset's groups train in this run (null = all). One group alone is the plain
    # baseline or, with `reads: union` and twice the batch, the synchronous 2x-batch control.
    groups: tuple[int, ...] | None = None
    # What each training group reads: its own split (disjoint data, the paper's set-up), the split
    # of the first training group ("same": same-data codistillation), or every train split ("union").
    reads: Literal["own", "same", "union"] = "own"
    # Label smoothing of the label term (a control for codistillation's regularisation): binary targets move
    # toward the training split's base rate, multiclass targets toward uniform.
    label_smoothing: float = 0.0

    def validate(self, name: str) -> None:
        require(0 <= self.seed < 2**31, f"{name}.seed", f"must be in [0, 2^31), got {self.seed}")
        if self.groups is not None:
            require(len(self.groups) >= 1 and len(set(self.groups)) == len(self.groups), f"{name}.groups",
                    f"must list distinct groups, got {list(self.groups)}")
        require(self.log_every >= 1, f"{name}.log_every", f"must be >= 1, got {self.log_every}")
        require(self.checkpoint_every >= 1, f"{name}.checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        require(0 <= self.label_smoothing < 1, f"{name}.label_smoothing",
                f"must be in [0, 1), got {self.label_smoothing}")


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
        require(bool(sep) and bool(protocol) and bool(rest), f"{name}.prefix",
                f"must be a URL with a protocol and a location, e.g. s3://bucket/data, got {self.prefix!r}")
        require(protocol in fsspec.available_protocols(), f"{name}.prefix",
                f"unknown fsspec protocol {protocol!r} in {self.prefix!r}")
        both = sorted(set(self.options) & set(self.env))
        require(not both, f"{name}.env", f"sets {both} that options already sets")
        for option, variable in self.env.items():
            require(bool(variable), f"{name}.env.{option}", "must name an environment variable")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    data: DataConfig = field(default_factory=DataConfig)
    # One of the model kinds the dataset's workload trains (its spec's `models`; the first by default).
    model: Any = tagged("kind", lambda fields: fields["data"].spec.model_choices(), default=None)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    codistill: CodistillConfig = field(default_factory=CodistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    storage: tuple[StorageConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.model is None:
            object.__setattr__(self, "model", self.data.spec.models[0]())

    def validate(self) -> None:
        # `runs/<name>` is the default run directory, which `--overwrite` deletes: `..` would be the working
        # directory's parent.
        plain_name(self.name, "name")
        require(Path(self.run_dir).name not in ("", ".", ".."), "train.run_dir",
                f"must end in a directory name (it names the run in the store), got {bounded(self.run_dir)}")
        require(type(self.model) in self.data.spec.models, "model.kind",
                f"the {self.data.dataset} workload trains {list(self.data.spec.model_choices())}, "
                f"got {self.model.kind!r}")
        for name in ("data", "model", "optimizer", "schedule", "deepspeed", "loader", "codistill", "eval", "train"):
            validate(getattr(self, name), name)
        prefixes = [rule.prefix.rstrip("/") for rule in self.storage]
        for i, rule in enumerate(self.storage):
            rule.validate(f"storage[{i}]")
            require(prefixes.index(prefixes[i]) == i, f"storage[{i}].prefix", f"{rule.prefix!r} is given twice")
        for g in self.train.groups or ():
            require(0 <= g < self.data.groups, "train.groups",
                    f"groups must be in [0, data.groups={self.data.groups}), got {g}")
        if self.data.spec.check is not None:
            self.data.spec.check(self)

    @property
    def trained_groups(self) -> tuple[int, ...]:
        return self.train.groups if self.train.groups is not None else tuple(range(self.data.groups))

    @property
    def run_dir(self) -> str:
        return self.train.run_dir or f"runs/{self.name}"

    @property
    def store(self) -> str:
        return self.train.store or RunDir(self.run_dir).default_store

    @property
    def run_id(self) -> str:
        """Names the run in the snapshot store: `<store>/<run_id>/group-<g>/`."""
        return Path(self.run_dir).name


# --- what a manifest asks of the snapshot store ---------------------------------------------------------------

# Every group publishes its full weights every `codistill.exchange_every` steps and reads each peer's. Above
# this many bytes a step (250 MB/s per group at 10 steps/s) the store, or a group's link to it, likely falls
# behind: peers go stale, and lockstep groups wait.
SNAPSHOT_WARN_BYTES_PER_STEP = 25_000_000


# Bytes per value of each `codistill.snapshot_dtype`.
SNAPSHOT_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class SnapshotTraffic:
    parameters: int
    dtype: str  # codistill.snapshot_dtype
    exchange_every: int  # steps
    peers: int  # snapshots each group reads per exchange

    @property
    def snapshot_bytes(self) -> int:
        """As published (the few bytes of the safetensors header aside)."""
        return SNAPSHOT_DTYPE_BYTES[self.dtype] * self.parameters

    @property
    def bytes_per_step(self) -> float:
        """What one group writes to the store per training step (it reads `peers` times as much)."""
        return self.snapshot_bytes / self.exchange_every

    def describe(self) -> str:
        return (f"each snapshot is {self.snapshot_bytes / 1e9:.2f} GB ({self.parameters / 1e6:.1f}M parameters x "
                f"{SNAPSHOT_DTYPE_BYTES[self.dtype]} bytes, {self.dtype}), one every {self.exchange_every} steps: "
                f"{self.bytes_per_step / 1e6:.1f} MB written per step by each group and "
                f"{self.peers * self.bytes_per_step / 1e6:.1f} MB read "
                f"({10 * self.bytes_per_step / 1e6:.0f} MB/s written at 10 steps/s)")


def snapshot_traffic(config: "ExperimentConfig") -> SnapshotTraffic | None:
    """The snapshot size and store traffic a manifest implies; None when codistillation is off or the model
    section cannot count its parameters (a model config says so with `parameter_count(data) -> int`)."""
    count = getattr(config.model, "parameter_count", None)
    if not config.codistill.enabled or count is None:
        return None
    parameters = count(config.data)
    return SnapshotTraffic(parameters, config.codistill.snapshot_dtype, config.codistill.exchange_every,
                           len(config.trained_groups) - 1)


def warn_about_snapshot_traffic(config: "ExperimentConfig") -> None:
    traffic = snapshot_traffic(config)
    if traffic is not None and traffic.bytes_per_step > SNAPSHOT_WARN_BYTES_PER_STEP:
        logger.warning("%s: %s, above the %.0f MB a step the store is likely to keep up with; raise "
                       "codistill.exchange_every or make the model smaller", config.name, traffic.describe(),
                       SNAPSHOT_WARN_BYTES_PER_STEP / 1e6)


# --- parsing ---------------------------------------------------------------------------------


def set_field(raw: dict, dotted: str, value: Any) -> None:
    """Set `a.b` in the raw manifest (validation happens when it is parsed)."""
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        require(isinstance(node, dict), dotted, f"{key} is not a section")
    node[keys[-1]] = value


# A manifest is a few kB; with aliases, a few hundred bytes can stand for billions of nodes ("billion laughs"),
# which anything walking the result (validation, deepcopy into dicts, an error message) would expand.
MAX_MANIFEST_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


class _YAMLTooLarge(yaml.YAMLError):
    pass


def _expanded_nodes(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """Nodes of the document once every alias is expanded, stopping as soon as that passes MAX_YAML_NODES."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in active:
        raise _YAMLTooLarge("a recursive alias (a node that contains itself)")
    active.add(id(node))
    children = [] if isinstance(node, yaml.ScalarNode) else (
        node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair])
    total = 1
    for child in children:
        total += _expanded_nodes(child, memo, active)
        if total > MAX_YAML_NODES:
            raise _YAMLTooLarge(f"more than {MAX_YAML_NODES} values once its aliases are expanded (alias bomb?)")
    active.discard(id(node))
    memo[id(node)] = total
    return total


class _ManifestLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing documents whose aliases expand past MAX_YAML_NODES."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_nodes(node, {}, set())
        return node


def _load_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_ManifestLoader)
    except RecursionError:
        raise _YAMLTooLarge("nested too deeply") from None


def apply_override(raw: dict, assignment: str) -> None:
    """Apply `a.b=c` to the raw manifest; the value is parsed as YAML (`50`, `true`, `[1, 2]`)."""
    path, sep, text = assignment.partition("=")
    require(bool(sep) and bool(path), bounded(assignment), "override must look like section.field=value")
    try:
        value = _load_yaml(text)
    except _YAMLTooLarge as e:
        raise ConfigError(f"{key_text(path)}: the value is too large: {e}") from None
    except yaml.YAMLError:
        value = text  # e.g. a glob like *.txt: take it as a string
    set_field(raw, path, value)


def parse_experiment(raw: Any, overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    raw = copy.deepcopy(raw or {})
    require(isinstance(raw, dict), "manifest", f"expected a mapping, got {type(raw).__name__}")
    for assignment in overrides:
        apply_override(raw, assignment)
    config = build(ExperimentConfig, raw, "")
    config.validate()
    warn_about_snapshot_traffic(config)
    return config


def resolve_manifest(name_or_path: str, folder: str = ".") -> str:
    """A path or URL as given, or a bare name like `criteo-tiny` of a manifest shipped in the package
    (`folder="experiments"` for a plan such as `demo`)."""
    if "/" in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return name_or_path
    return str(resources.files(SHIPPED_MANIFESTS).joinpath(folder, f"{name_or_path}.yaml"))


def read_manifest_yaml(name_or_path: str) -> dict:
    path = resolve_manifest(name_or_path)
    try:
        with fsspec.open(path, "r") as f:
            text = f.read(MAX_MANIFEST_BYTES + 1)
        require(len(text) <= MAX_MANIFEST_BYTES, path, f"larger than {MAX_MANIFEST_BYTES} bytes: not a manifest")
        raw = _load_yaml(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: manifest not found") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a manifest file ({type(e).__name__})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e)[:500]}") from None
    require(isinstance(raw, dict), path, f"expected a mapping at the top, got {type(raw).__name__}")
    return raw


def load_experiment(name_or_path: str, overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    raw = read_manifest_yaml(name_or_path)
    try:
        return parse_experiment(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"{resolve_manifest(name_or_path)}: {e}") from None


