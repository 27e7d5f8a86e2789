"""The `codistill` command line."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shlex
import sys
import types
import typing

import click

from codistill.config import ConfigError, parse_experiment, read_manifest_yaml, resolve_manifest, set_field
from codistill.datasets import DATASETS, DatasetSpec, Flag
from codistill.rundir import RunDir

# Only this module's imports load for `codistill --help`: no torch, Beam or numpy (tests/test_packaging.py).


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors a user can fix. Imported once something failed (the command that raised has loaded them)."""
    from codistill.dataset import DatasetError
    from codistill.run import RunError
    from pipelines.errors import InputReadError

    # OSError: a missing, unreadable or special input, a full disk: the message says what and where.
    return ConfigError, DatasetError, OSError, ValueError, InputReadError, RunError


def _fail_cleanly(func):
    """Turn the errors a user can fix into one clear line and a non-zero exit, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as e:
            if isinstance(e, ImportError):  # an optional dependency (gs:// without gcsfs...): the extra to install
                from codistill.extras import missing_extra

                message = missing_extra(e)
                if message is not None:
                    raise click.ClickException(message) from None
            if not isinstance(e, _user_errors()):
                raise
            raise click.ClickException(str(e)) from None

    return wrapper


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Codistillation: Beam preprocessing, DeepSpeed training, fsspec snapshot exchange."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


class DatasetCommands(click.Group):
    """A group with one command per registered dataset (`codistill.datasets.DATASETS`), made when asked for."""

    def __init__(self, make, **kwargs):
        super().__init__(**kwargs)
        self.make = make

    def list_commands(self, ctx) -> list[str]:
        return sorted(DATASETS)

    def get_command(self, ctx, name: str) -> click.Command | None:
        return self.make(DATASETS[name]) if name in DATASETS else None


def _flag_option(section: type, flag: Flag, default=None, **kwargs) -> click.Option:
    """The click option of a spec's flag: its type and choices (or --x/--no-x for a boolean) from the field."""
    kind = typing.get_type_hints(section)[flag.field]
    if isinstance(kind, types.UnionType):  # `str | None`: the flag gives a str
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is tuple:  # one number on the command line stands for a one-item list
        kind = typing.get_args(kind)[0]
    if kind is bool:
        decls = [f"{flag.option}/--no-{flag.option[2:]}", flag.field]
    else:
        decls = [flag.option, flag.field]
        kwargs["type"] = click.Choice(typing.get_args(kind)) if typing.get_origin(kind) is typing.Literal else kind
    return click.Option(decls, default=default, help=flag.help, **kwargs)


def _flag_error(error: ConfigError, section: str, flags: tuple[Flag, ...], given: dict) -> Exception:
    """A field error of one of the flags given as a usage error that names the flag (exit code 2)."""
    field, _, message = str(error).partition(": ")
    flag = next((f for f in flags if field.split("[")[0] == f"{section}.{f.field}" and given.get(f.field) is not None),
                None)
    return click.BadParameter(message, param_hint=f"'{flag.option}'") if flag else error


def _synth_command(spec: DatasetSpec) -> click.Command:
    def run(out: str, **values) -> None:
        from pipelines.run import dataset_pipeline

        raw = {"name": f"{spec.name}-synth", "data": {"dataset": spec.name, "synth": values}}
        try:
            settings = parse_experiment(raw).data.synth
        except ConfigError as e:
            raise _flag_error(e, "data.synth", spec.synth_flags, values) from None
        pipeline = dataset_pipeline(spec.name)
        _, sidecar = pipeline.generate(out, settings)
        click.echo(pipeline.describe_synth(sidecar, out))

    defaults = spec.synth()
    options = [click.Option(["--out"], required=True, help="Output directory (local path or fsspec URL).")]
    options += [_flag_option(spec.synth, flag, required=True) if flag.required else
                _flag_option(spec.synth, flag, getattr(defaults, flag.field), show_default=True)
                for flag in spec.synth_flags]
    return click.Command(spec.name, callback=_fail_cleanly(run), params=options,
                         help=f"Generate {spec.summary}, with what was planted in synth.json.")


main.add_command(DatasetCommands(_synth_command, name="synth", help="Generate raw data sets in the real formats."))


class InputOption(click.Option):
    """`--input`: one glob, URL or folder (several comma-separated). The words after its value up to the next
    option are its values too (these commands take no arguments): more than one is a glob the shell expanded,
    refused with the fix, where click would pass the rest on as stray arguments (to Beam)."""

    def add_to_parser(self, parser, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        parsed = parser._long_opt[self.opts[0]]  # click's parser has no public hook for an option's values
        store = parsed.process

        def process(value: str, state) -> None:
            more = []
            while state.rargs and not state.rargs[0].startswith("-"):
                more.append(state.rargs.pop(0))
            if more:
                raise click.BadParameter(
                    f"got {1 + len(more)} paths ({value!r}, {more[0]!r}, ...): the shell expanded a glob; quote it "
                    "(--input 'dir/*.gz'), or join several inputs with commas", ctx=ctx, param=self)
            store(value, state)

        for name in self.opts:
            parser._long_opt[name].process = process


def _common_preprocess_options() -> list[click.Option]:
    """The options every `preprocess <dataset>` command has (each dataset adds its spec's flags)."""
    return [
        click.Option(["-m", "--manifest"], help="Experiment manifest (path or name in manifests/); flags override it."),
        InputOption(["--input", "input_glob"], help="Raw input: glob, URL or folder (comma-separated for several)."),
        click.Option(["--output"], help="Dataset directory (local path or fsspec URL)."),
        click.Option(["--groups"], type=int),
        click.Option(["--eval-fraction"], type=float),
        click.Option(["--format", "fmt"], type=click.Choice(["tfrecord", "webdataset"])),
        click.Option(["--runner"], help="Beam runner (default FnApiRunner, in-process), e.g. DaskRunner (with "
                     "--dask_client_address HOST:PORT), DataflowRunner, FlinkRunner."),
        click.Option(["--set", "sets"], multiple=True, metavar="KEY=VALUE", help="Override a manifest field."),
        click.Option(["--overwrite"], is_flag=True, help="Replace an existing output directory."),
        click.Option(["--dry-run"], is_flag=True, help="Print the dataset's input and output and the Beam pipeline "
                     "options as JSON, and stop (nothing is read, written or checked to be installed)."),
    ]


def _preprocess_command(spec: DatasetSpec) -> click.Command:
    @click.pass_context
    @_fail_cleanly
    def run(ctx, manifest, input_glob, output, groups, eval_fraction, fmt, runner, sets, overwrite, dry_run,
            resume=False, **values) -> None:
        from pipelines.run import pipeline_options, summarize_dataset
        from pipelines.run import preprocess as run_preprocess

        flags = {"data.output": output, "data.groups": groups, "data.eval_fraction": eval_fraction,
                 "data.format": fmt, **{f"data.{spec.name}.{k}": v for k, v in values.items()}}
        try:
            sources = [f"data.{spec.name}.{f.field}" for f in spec.flags if f.source]
            config = parse_experiment(_raw_manifest(spec.name, manifest, input_glob, flags, sources), sets)
        except ConfigError as e:
            raise _flag_error(e, f"data.{spec.name}", spec.flags, values) from None
        if dry_run:
            options = pipeline_options(_beam_args(ctx, runner), check_installed=False)
            section = {f.field: getattr(config.data.options, f.field) for f in spec.flags}  # e.g. an input list
            click.echo(json.dumps({"dataset": spec.name, "input": config.data.input, spec.name: section,
                                   "output": config.data.output,
                                   "pipeline_options": options.get_all_options(drop_default=True,
                                                                               retain_unknown_options=True)},
                                  indent=1))
            return
        result = run_preprocess(config, _beam_args(ctx, runner), overwrite=overwrite, resume=resume,
                                show_progress=_echo_progress)
        click.echo(summarize_dataset(result, config.data.output))
        if result.input_rows and not result.written_rows:
            raise click.ClickException(f"every one of the {result.input_rows} rows read was rejected (not "
                                       f"{spec.name} data, or the wrong options?); see {config.data.output}/rejected/")

    options = _common_preprocess_options() + [_flag_option(spec.config, flag) for flag in spec.flags]
    if spec.resumable:
        options.append(click.Option(["--resume"], is_flag=True, help="Continue an interrupted run in the same "
                                    "output: input files already staged (.done/ markers) are not read again."))
    return click.Command(spec.name, callback=run, params=options,
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                         help=f"{spec.summary} -> disjoint per-group shards. Unknown options go to Beam "
                              "(e.g. --direct_num_workers=2).")


main.add_command(DatasetCommands(_preprocess_command, name="preprocess",
                                 help="Run a Beam pipeline: raw files -> disjoint per-group shards + manifest.json."))


def _raw_manifest(dataset: str, manifest: str | None, input_glob: str | None, flags: dict,
                  sources: list[str] = ()) -> dict:
    """The manifest as YAML data with the flags given set: an --input replaces a manifest's `synth`, a source
    flag (`sources`: its dotted field, e.g. Common Crawl's --input-list) its `input` and `synth`."""
    raw = read_manifest_yaml(manifest) if manifest else {"name": f"{dataset}-cli", "data": {"dataset": dataset}}
    data = raw.get("data")
    chosen = data.get("dataset", "criteo") if isinstance(data, dict) else dataset  # (parsing names a bad one)
    if chosen != dataset:
        raise ConfigError(f"{resolve_manifest(manifest)} is a {chosen!r} manifest (data.dataset); "
                          f"`preprocess {dataset}` needs {'an' if dataset[0] in 'aeiou' else 'a'} {dataset} one")
    for dotted, value in {"data.input": input_glob, **flags}.items():
        if value is not None:
            set_field(raw, dotted, value)
    if input_glob is not None:
        raw["data"].pop("synth", None)
    if any(flags.get(dotted) is not None for dotted in sources):
        raw["data"].pop("input", None)
        raw["data"].pop("synth", None)
    return raw


def _beam_args(ctx, runner: str | None) -> list[str]:
    """The options this command does not know, for Beam to parse (`pipelines.run.pipeline_options`)."""
    return (["--runner", runner] if runner else []) + list(ctx.args)


@main.command("worker-requirements")
@click.argument("dataset", type=click.Choice(sorted(DATASETS)))
@click.option("--extra", "extras", multiple=True, help="Add an extra's requirements, e.g. gcs for gs:// URLs.")
@click.option("--out", type=click.File("w"), default="-", help="Write here instead of stdout.")
@_fail_cleanly
def worker_requirements(dataset: str, extras: tuple[str, ...], out) -> None:
    """Pinned pip requirements of DATASET's pipeline on remote Beam workers (a Dataflow --requirements_file),
    read from what its code imports; Beam itself comes with the workers' SDK container."""
    from pipelines.requirements import worker_requirements as requirements

    out.write("".join(f"{line}\n" for line in requirements(dataset, extras)))


def _echo_progress(line: str) -> None:
    click.echo(line, err=True)


@main.group()
def tokenizer() -> None:
    """sentencepiece models with an exact round trip."""


@tokenizer.command("train", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--input", "input_glob", cls=InputOption, required=True,
              help="WET/WARC files: glob or URL, comma-separated.")
@click.option("--out", required=True, help="Model URL (any fsspec URL); the sidecar goes to <out>.json.")
@click.option("--vocab-size", type=click.IntRange(min=300), required=True)
@click.option("--type", "model_type", type=click.Choice(["unigram", "bpe"]), default="unigram", show_default=True)
@click.option("--sample-docs", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="Cleaned documents to train on (the lowest keyed hashes of their WARC-Record-IDs).")
@click.option("-m", "--manifest", help="Take the cleaning rules and seed from this experiment manifest.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a manifest field.")
@click.option("--runner", help="Beam runner for the sampling pipeline (default FnApiRunner).")
@click.pass_context
@_fail_cleanly
def tokenizer_train(ctx, input_glob, out, vocab_size, model_type, sample_docs, manifest, sets, runner) -> None:
    """Train sentencepiece on a deterministic sample of the cleaned text (read and cleaned with Beam)."""
    from codistill import storage
    from pipelines.textfiles import expand_inputs
    from pipelines.commoncrawl_tokenizer import train_tokenizer

    raw = _raw_manifest("commoncrawl", manifest, input_glob, {})
    config = parse_experiment(raw, sets)
    storage.configure(config.storage)
    data = config.data
    info = train_tokenizer(expand_inputs(input_glob), out, vocab_size, model_type, sample_docs,
                           data.commoncrawl.clean, data.seed, _beam_args(ctx, runner), progress=_echo_progress)
    click.echo(f"wrote {out} ({info['type']}, {info['vocab_size']} pieces, trained on {info['trained_on_documents']} "
               f"documents), sha256 {info['sha256']}")


@main.command()
@click.argument("directory")
@click.option("-m", "--manifest", help="Experiment manifest whose `storage` rules apply (e.g. an S3 endpoint).")
@_fail_cleanly
def verify(directory: str, manifest: str | None) -> None:
    """Re-read every shard: counts, sizes, sha256 against the manifest, and key disjointness."""
    from codistill import storage
    from codistill.config import load_experiment
    from codistill.verify import verify_dataset

    if manifest:
        storage.configure(load_experiment(manifest).storage)
    report = verify_dataset(directory, progress=_echo_progress)
    if not report.ok:
        for problem in report.problems:
            click.echo(f"FAIL {problem}", err=True)
        raise click.ClickException(f"{directory}: {len(report.problems)} problem(s) found")
    click.echo(f"OK {directory}: {len(report.manifest.shards)} shards, {report.rows} rows, sha256 match, "
               f"no key in two places")


def _train(manifest: str, sets: list[str], resume: bool, overwrite: bool = False, groups: list[int] | None = None,
           hostfile: str | None = None, master_port: int | None = None):
    """`codistill.run.train`, saying what it does on the console."""
    from codistill.run import train

    return train(manifest, sets, resume, overwrite, echo=click.echo, progress=_echo_progress, groups=groups,
                 hostfile=hostfile, master_port=master_port)


def _dataset_for(config):
    """`codistill.run.dataset_for`, saying what it does on the console."""
    from codistill.run import dataset_for

    return dataset_for(config, echo=click.echo, progress=_echo_progress)


@main.command()
@click.argument("manifest")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a manifest field.")
@click.option("--run-dir", help="Where checkpoints, metrics and predictions go (default runs/<name>).")
@click.option("--resume", is_flag=True, help="Continue every group from its latest checkpoint.")
@click.option("--overwrite", is_flag=True, help="Delete an earlier run in the run directory and its snapshots first.")
@click.option("--group", "groups", type=int, multiple=True, help="Train only this group (repeatable); the others "
              "are started apart (other machines, a SLURM array, Kubernetes Jobs) with the same manifest and "
              "train.store, and join this run through the store.")
@click.option("--hostfile", help="DeepSpeed hostfile (`host slots=N` lines) for the whole run: each group gets its "
              "own slots, one DeepSpeed job per group (run_dir on a file system every host reaches).")
@click.option("--master-port", type=click.IntRange(1, 65535), help="With --hostfile: group g's rendezvous port on "
              "its first host is this + g (default 29500 + g).")
@click.option("--dry-run", is_flag=True, help="Say where the groups go and print every group's launch command; "
              "start nothing.")
@_fail_cleanly
def train(manifest: str, sets: tuple[str, ...], run_dir: str | None, resume: bool, overwrite: bool,
          groups: tuple[int, ...], hostfile: str | None, master_port: int | None, dry_run: bool) -> None:
    """Train all groups of MANIFEST locally, one DeepSpeed job per group (ranks from the manifest), each on its own
    GPUs (or share of the cores)."""
    from training.report import final_eval
    from training.workloads import workload_for

    sets = list(sets) + ([f"train.run_dir={run_dir}"] if run_dir else [])
    if dry_run:
        from codistill.config import load_experiment
        from codistill.run import launch_plan

        placement, commands = launch_plan(load_experiment(manifest, sets), manifest, sets, resume,
                                          groups=list(groups) or None, hostfile=hostfile, master_port=master_port)
        click.echo(placement.summary)
        env = [f"{name}={os.environ.get(name, value)}" for name, value in placement.env.items()]
        for command in commands:
            click.echo(f"group {command.group}: {shlex.join(env + command.argv)}")
        return
    config, dataset = _train(manifest, sets, resume, overwrite, list(groups) or None, hostfile, master_port)
    workload = workload_for(dataset.dataset)
    for group in groups or config.trained_groups:
        m = final_eval(config.run_dir, group)
        click.echo(f"group {group}: step {m['step']} eval {workload.describe(m)}")


@main.command()
@click.argument("plan")
@click.option("--report-only", is_flag=True, help="Rebuild the report from finished runs; train nothing.")
@_fail_cleanly
def experiment(plan: str, report_only: bool) -> None:
    """Run every (condition, seed) of PLAN (manifests/experiments/*.yaml) and write report.md with plots."""
    from codistill.claims import write_report
    from codistill.experiment import run_plan
    from codistill.plans import load_plan

    parsed = load_plan(resolve_manifest(plan, "experiments"))
    if not report_only:
        run_plan(parsed, _train, _dataset_for, echo=click.echo)
    report = write_report(parsed)
    click.echo(report.read_text())
    click.echo(f"report: {report}")


@main.command()
@click.argument("run_a")
@click.argument("run_b")
@click.option("--group", type=int, default=0, show_default=True, help="Which group's model to compare.")
@click.option("--threshold", type=float, default=0.5, show_default=True)
@_fail_cleanly
def churn(run_a: str, run_b: str, group: int, threshold: float) -> None:
    """Prediction churn between two trained runs on the eval split."""
    from training.report import run_churn

    workload, c = run_churn(run_a, run_b, group, threshold)
    click.echo(f"churn over {c['rows']} eval examples: {workload.describe_churn(c, threshold)}")


@main.command()
@click.option("--plan", default="demo", show_default=True, help="Experiment plan (manifests/experiments/).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a field of every run.")
@_fail_cleanly
def demo(plan: str, sets: tuple[str, ...]) -> None:
    """The embedded default, end to end: data, Beam, verify, DeepSpeed baselines vs codistillation, report."""
    from codistill.claims import console_table, load_results, write_report
    from codistill.experiment import run_plan
    from codistill.plans import load_plan
    from codistill.verify import verify_dataset

    parsed = load_plan(resolve_manifest(plan, "experiments"))
    parsed = dataclasses.replace(parsed, sets=parsed.sets + tuple(sets))
    config = parsed.config(parsed.conditions[0], parsed.seeds[0])
    click.echo(f"== 1. generate {config.data.dataset} data and shard it into groups with Beam")
    from pipelines.run import preprocess as run_preprocess
    from pipelines.run import summarize_dataset

    dataset = run_preprocess(config, overwrite=True, show_progress=_echo_progress)
    click.echo(summarize_dataset(dataset, config.data.output))
    report = verify_dataset(config.data.output)
    if not report.ok:
        raise click.ClickException("verify failed: " + "; ".join(report.problems))
    click.echo(f"verify: OK ({report.rows} rows, no key in two places)")
    click.echo(f"== 2. train every condition x seed with DeepSpeed ({len(parsed.conditions) * len(parsed.seeds)} runs)")
    for path in parsed.out.glob(f"*/{RunDir.COMPLETE}"):
        path.unlink()  # the data was just rebuilt: every run trains again
    run_plan(parsed, lambda manifest, sets, resume, overwrite: _train(manifest, sets, False, True), _dataset_for,
             echo=click.echo)
    click.echo("== 3. results: each model at its step best on validation, measured on the test half")
    results = load_results(parsed)
    path = write_report(parsed, results)
    for line in console_table(results):
        click.echo(line)
    click.echo(f"report and plots: {path}")
