"""The `codistill` command line."""

from __future__ import annotations

import functools
import json
import logging
import re
import sys

import click

from codistill.config import (REPO_MANIFESTS, ConfigError, parse_experiment, read_manifest_yaml, resolve_manifest,
                              set_field)
from codistill.dataset import DatasetError, DatasetManifest
from pipelines.textfiles import InputReadError

REPO_EXPERIMENTS = REPO_MANIFESTS / "experiments"
# OSError: a missing, unreadable or special input, a full disk: the message says what and where.
USER_ERRORS = (ConfigError, DatasetError, OSError, ValueError, InputReadError)


def _fail_cleanly(func):
    """Turn the errors a user can fix into one clear line and a non-zero exit, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from None

    return wrapper


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Codistillation: Beam preprocessing, DeepSpeed training, fsspec snapshot exchange."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_without_gcp_client_warning)


def _without_gcp_client_warning(record: logging.LogRecord) -> bool:
    """Beam warns on every start that Google Cloud client libraries are missing: optional here (Dataflow users
    install them), so the line is only noise."""
    return "apitools not found" not in record.getMessage()


@main.group()
def synth() -> None:
    """Generate raw data sets in the real formats."""


@synth.command("criteo")
@click.option("--rows", type=click.IntRange(min=1), required=True, help="Rows in all files together.")
@click.option("--out", required=True, help="Output directory (local path or fsspec URL).")
@click.option("--files", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--gzip", is_flag=True, help="Write .txt.gz files.")
@_fail_cleanly
def synth_criteo(rows: int, out: str, files: int, seed: int, gzip: bool) -> None:
    """Raw Criteo-format files from a planted model, plus synth.json with its Bayes-optimal log loss."""
    from pipelines.synth_criteo import generate_criteo

    sidecar = generate_criteo(out, rows, files=files, seed=seed, gzip=gzip)
    click.echo(f"wrote {rows} rows in {files} file(s) to {out}: positive rate {sidecar['positive_rate']:.3f}, "
               f"Bayes-optimal log loss {sidecar['bayes_log_loss']:.4f} "
               f"(base rate {sidecar['base_rate_log_loss']:.4f})")


@synth.command("commoncrawl")
@click.option("--docs", type=click.IntRange(min=1), required=True, help="WET conversion records in all files together.")
@click.option("--out", required=True, help="Output directory (local path or fsspec URL).")
@click.option("--files", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@_fail_cleanly
def synth_commoncrawl(docs: int, out: str, files: int, seed: int) -> None:
    """WET files of a planted language with known noise, plus synth.json with the Bayes floor per document."""
    from pipelines.synth_commoncrawl import generate_commoncrawl

    sidecar = generate_commoncrawl(out, docs, files=files, seed=seed)
    kinds = ", ".join(f"{v} {k}" for k, v in sidecar["counts"]["kinds"].items())
    floor = sidecar["floor"]
    click.echo(f"wrote {docs} records in {files} file(s) to {out}: {kinds}; Bayes floor over the clean documents "
               f"{floor['value']:.4f} bits per byte ({floor['bytes']} bytes of planted text)")


@main.group()
def preprocess() -> None:
    """Run a Beam pipeline: raw files -> disjoint per-group shards + manifest.json."""


def _preprocess_options(func):
    """The options every `preprocess <dataset>` command shares (dataset-specific ones are added per command)."""
    options = [
        click.option("-m", "--manifest", help="Experiment manifest (path or name in manifests/); flags override it."),
        click.option("--input", "input_glob", help="Raw input: glob, URL or folder (comma-separated for several)."),
        click.option("--output", help="Dataset directory (local path or fsspec URL)."),
        click.option("--groups", type=int),
        click.option("--eval-fraction", type=float),
        click.option("--format", "fmt", type=click.Choice(["tfrecord", "webdataset"])),
        click.option("--runner", help="Beam runner (default FnApiRunner, in-process), e.g. DaskRunner (with "
                     "--dask_client_address HOST:PORT), DataflowRunner, FlinkRunner."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a manifest field."),
        click.option("--overwrite", is_flag=True, help="Replace an existing output directory."),
        click.pass_context,
    ]
    for option in reversed(options):
        func = option(func)
    return click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})(func)


def _raw_manifest(dataset: str, manifest: str | None, input_glob: str | None, flags: dict) -> dict:
    """The manifest as YAML data with the flags given set (an --input replaces a manifest's `synth`)."""
    raw = read_manifest_yaml(manifest) if manifest else {"name": f"{dataset}-cli", "data": {"dataset": dataset}}
    for dotted, value in {"data.input": input_glob, **flags}.items():
        if value is not None:
            set_field(raw, dotted, value)
    if input_glob is not None:
        raw["data"].pop("synth", None)
    return raw


def _beam_args(ctx, runner: str | None) -> list[str]:
    stray = [a for a in ctx.args if not a.startswith("-")]
    if stray:
        raise click.UsageError(f"unexpected argument {stray[0]!r}: quote a glob given to --input "
                               "(--input 'dir/*.txt') so the shell does not expand it")
    return (["--runner", runner] if runner else []) + list(ctx.args)


def _run_preprocess(ctx, dataset: str, dataset_flags: dict, manifest, input_glob, output, groups, eval_fraction, fmt,
                    runner, sets, overwrite, resume: bool = False) -> None:
    """Manifest (or defaults) + flags -> config, then the dataset's Beam pipeline; unknown options go to Beam."""
    from pipelines.run import preprocess as run_preprocess

    flags = {"data.output": output, "data.groups": groups, "data.eval_fraction": eval_fraction, "data.format": fmt,
             **dataset_flags}
    config = parse_experiment(_raw_manifest(dataset, manifest, input_glob, flags), sets)
    result = run_preprocess(config, _beam_args(ctx, runner), overwrite=overwrite, resume=resume,
                            show_progress=_echo_progress)
    click.echo(summarize_dataset(result, config.data.output))
    if result.input_rows and not result.written_rows:
        raise click.ClickException(f"every one of the {result.input_rows} rows read was rejected (not "
                                   f"{dataset} data, or the wrong options?); see {config.data.output}/rejected/")


def _echo_progress(line: str) -> None:
    click.echo(line, err=True)


@click.option("--dialect", type=click.Choice(["tsv", "csv"]),
              help="tsv: Kaggle train.txt; csv: the header CSV export (label,I1..,C26).")
@click.option("--cat-buckets", type=click.IntRange(min=2), help="Hash buckets for every categorical column.")
@click.option("--keep-raw/--no-keep-raw", default=None, help="Also store the raw integer and categorical values.")
@_preprocess_options
@_fail_cleanly
def preprocess_criteo(ctx, dialect, cat_buckets, keep_raw, **common) -> None:
    """Criteo TSV (or gzip) files -> shards. Unknown options go to Beam (e.g. --direct_num_workers=2)."""
    _run_preprocess(ctx, "criteo", {"data.criteo.dialect": dialect, "data.criteo.cat_buckets": cat_buckets,
                                    "data.criteo.keep_raw": keep_raw}, **common)


preprocess.add_command(preprocess_criteo, "criteo")


# --- Common Crawl ---------------------------------------------------------------------------------


@click.option("--tokenizer", help="sentencepiece model URL (with its .json sidecar); default: train one first.")
@click.option("--sequence-length", type=int, help="Tokens per packed row.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in the same output: input files already "
              "staged (.done/ markers) are not read again.")
@_preprocess_options
@_fail_cleanly
def preprocess_commoncrawl(ctx, tokenizer, sequence_length, resume, **common) -> None:
    """WET/WARC files -> cleaned, deduplicated, tokenised, packed shards. Unknown options go to Beam."""
    _run_preprocess(ctx, "commoncrawl", {"data.commoncrawl.tokenizer": tokenizer,
                                         "data.commoncrawl.sequence_length": sequence_length}, **common, resume=resume)


preprocess.add_command(preprocess_commoncrawl, "commoncrawl")


@main.group()
def tokenizer() -> None:
    """sentencepiece models with an exact round trip."""


@tokenizer.command("train", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--input", "input_glob", required=True, help="WET/WARC files: glob or URL, comma-separated.")
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
    from tokenizer.train import train_tokenizer

    raw = _raw_manifest("commoncrawl", manifest, input_glob, {})
    config = parse_experiment(raw, sets)
    storage.configure(config.storage)
    data = config.data
    info = train_tokenizer(expand_inputs(input_glob), out, vocab_size, model_type, sample_docs,
                           data.commoncrawl.clean, data.seed, _beam_args(ctx, runner))
    click.echo(f"wrote {out} ({info['type']}, {info['vocab_size']} pieces, trained on {info['trained_on_documents']} "
               f"documents), sha256 {info['sha256']}")


# --- ImageNet -------------------------------------------------------------------------------------


@synth.command("imagenet")
@click.option("--classes", type=click.IntRange(min=1), required=True)
@click.option("--per-class", type=click.IntRange(min=1), required=True, help="Train images per class.")
@click.option("--out", required=True, help="Output directory (local path or fsspec URL).")
@click.option("--val-per-class", type=click.IntRange(min=0), default=10, show_default=True,
              help="Validation images per class (flat val/ + LOC_val_solution.csv); 0 = none.")
@click.option("--val-layout", type=click.Choice(["flat", "folders"]), default="flat", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--min-size", type=click.IntRange(min=16), default=64, show_default=True)
@click.option("--max-size", type=click.IntRange(min=16), default=160, show_default=True)
@click.option("--faults", type=click.IntRange(min=0), default=1, show_default=True,
              help="Copies of each bad-input kind (zero-byte, text, truncated, corrupt, PNG, CMYK, 16-bit, gray).")
@click.option("--synsets", help="Take the wnids from this synset list (e.g. imagenet_synsets.txt).")
@_fail_cleanly
def synth_imagenet(classes, per_class, out, val_per_class, val_layout, seed, min_size, max_size, faults,
                   synsets) -> None:
    """An ILSVRC-layout folder of procedural images with bad inputs in known numbers, plus synth.json."""
    from pipelines.synth_imagenet import generate_imagenet

    sidecar = generate_imagenet(out, classes, per_class, val_per_class=val_per_class, seed=seed, min_size=min_size,
                                max_size=max_size, faults=faults, synsets=synsets, val_layout=val_layout)
    expected = sidecar["expected"]
    click.echo(f"wrote {sidecar['files']['train']} train and {sidecar['files']['val']} val files of {classes} "
               f"classes to {out} (+{len(sidecar['empty_classes'])} empty class folder); the pipeline must "
               f"quarantine {sum(expected['quarantined'].values())} and repair "
               f"{sum(len(sidecar['fault_paths'][k]) for k in ('png', 'cmyk', 'png16'))}")


@click.option("--synsets", help="Synset list, one wnid per line (0-based line = label); default: sorted folders.")
@click.option("--label-offset", type=click.IntRange(min=0), help="Added to every label (1: TF-slim convention).")
@click.option("--grayscale", type=click.Choice(["keep", "rgb"]), help="Grayscale JPEGs: keep 1-channel (default).")
@click.option("--resize-shorter", type=click.IntRange(min=8), help="Shrink the shorter side to this (never enlarge).")
@_preprocess_options
@_fail_cleanly
def preprocess_imagenet(ctx, synsets, label_offset, grayscale, resize_shorter, **common) -> None:
    """ILSVRC folders (train/<wnid>/, val/) -> image shards. Unknown options go to Beam."""
    _run_preprocess(ctx, "imagenet", {"data.imagenet.synsets": synsets, "data.imagenet.label_offset": label_offset,
                                      "data.imagenet.grayscale": grayscale,
                                      "data.imagenet.resize_shorter": resize_shorter}, **common)


preprocess.add_command(preprocess_imagenet, "imagenet")


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
    if "repairs" in dataset.extra:
        repairs = ", ".join(f"{k}: {v}" for k, v in sorted(dataset.extra["repairs"].items())) or "none"
        lines.append(f"{len(dataset.extra.get('classes', []))} classes; repaired: {repairs}; "
                     f"1-channel (grayscale): {dataset.extra.get('grayscale', 0)}")
    synth, floor = dataset.extra.get("synth"), dataset.extra.get("floor")
    if floor:
        lines.append(f"generated data: Bayes floor over the eval documents {floor['value']:.4f} {floor['metric']}")
    elif synth and "bayes_log_loss" in synth:
        lines.append(f"generated data: Bayes-optimal log loss {synth['bayes_log_loss']:.4f}, "
                     f"base-rate log loss {synth['base_rate_log_loss']:.4f}")
    return "\n".join(lines)


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
    report = verify_dataset(directory)
    if not report.ok:
        for problem in report.problems:
            click.echo(f"FAIL {problem}", err=True)
        raise click.ClickException(f"{directory}: {len(report.problems)} problem(s) found")
    click.echo(f"OK {directory}: {len(report.manifest.shards)} shards, {report.rows} rows, sha256 match, "
               f"no key in two places")


def _dataset_for(config) -> DatasetManifest:
    """The run's dataset, built first (in-process Beam) if it is not there yet."""
    from codistill.dataset import load_manifest
    from pipelines.run import pipeline_parameters
    from pipelines.run import preprocess as run_preprocess

    try:
        dataset = load_manifest(config.data.output)
    except DatasetError:
        click.echo(f"no dataset at {config.data.output}: preprocessing it first")
        dataset = run_preprocess(config, show_progress=_echo_progress)
        click.echo(summarize_dataset(dataset, config.data.output))
        return dataset
    wanted = json.loads(json.dumps(pipeline_parameters(config.data)))  # as stored: tuples become lists
    # (`output` may differ: a dataset can be copied or moved.)
    changed = sorted(k for k, v in wanted.items() if k != "output" and dataset.parameters.get(k) != v)
    if changed:
        raise click.ClickException(
            f"the dataset at {config.data.output} was built with other data settings ({', '.join(changed)}); "
            f"rebuild it with `codistill preprocess {config.data.dataset} -m <manifest> --overwrite` or point "
            "data.output elsewhere")
    return dataset


# What a run directory holds (`store` is the default snapshot store); `--overwrite` deletes nothing else.
# run.json: the run nonce; .codistill.lock: the run lock; .complete: marked by codistill experiment.
RUN_ENTRIES = re.compile(r"group-\d+|store|run\.json|\.codistill\.lock|\.complete")


def _foreign_entries(names: list[str], allowed: re.Pattern) -> str:
    foreign = sorted(n for n in names if not allowed.fullmatch(n))
    return ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")


def _start_afresh(config, overwrite: bool) -> None:
    """A new run must not inherit an earlier one's checkpoints, metrics or snapshots: its groups
    would adopt the old peers' weights as if they were fresh. Called with the run directory locked
    (the lock file stays: it is what keeps another `codistill train` out while we delete)."""
    import shutil
    from pathlib import Path

    from codistill import storage

    from training.launch import LOCK_FILE

    run_dir = Path(config.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise click.ClickException(f"run directory {run_dir} exists and is not a directory")
    store_fs, store_root = storage.url_to_fs(config.store)
    old_snapshots = f"{store_root.rstrip('/')}/{config.run_id}"
    earlier = [p for p in run_dir.iterdir() if p.name != LOCK_FILE] if run_dir.exists() else []
    if earlier or store_fs.exists(old_snapshots):
        if not overwrite:
            raise click.ClickException(f"{run_dir} (or {config.store}/{config.run_id}) holds an earlier run: "
                                       "continue it with --resume, or start over with --overwrite")
        foreign = _foreign_entries([p.name for p in earlier], RUN_ENTRIES)
        if foreign:
            raise click.ClickException(f"{run_dir} is not a codistill run directory (it holds {foreign}): "
                                       "--overwrite deletes only a run directory; remove it yourself or choose "
                                       "another train.run_dir")
        if store_fs.exists(old_snapshots):
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in store_fs.ls(old_snapshots, detail=False)]
            foreign = _foreign_entries(names, re.compile(r"group-\d+"))
            if foreign:
                raise click.ClickException(f"{config.store}/{config.run_id} is not this run's snapshots (it holds "
                                           f"{foreign}); remove it yourself or choose another train.store")
        for path in earlier:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        if store_fs.exists(old_snapshots):
            store_fs.rm(old_snapshots, recursive=True)


def _train(manifest: str, sets: list[str], resume: bool, overwrite: bool = False):
    """Start every group of a run (one deepspeed launch each); returns the config."""
    from codistill import storage
    from codistill.config import load_experiment
    from training.launch import GroupFailed, RunLocked, group_commands, locked_run_dir, read_run_nonce, run_groups

    config = load_experiment(manifest, sets)
    storage.configure(config.storage)
    dataset = _dataset_for(config)
    try:
        with locked_run_dir(config.run_dir):  # held until every group has ended
            if not resume:
                _start_afresh(config, overwrite)
            read_run_nonce(config.run_dir)  # drawn here for a new run, kept on --resume; each group reads it
            commands = group_commands(resolve_manifest(manifest), list(config.trained_groups),
                                      config.deepspeed.ranks_per_group, sets, resume)
            run_groups(commands, config.deepspeed.ranks_per_group)
    except (GroupFailed, RunLocked) as e:
        raise click.ClickException(str(e)) from None
    return config, dataset


@main.command()
@click.argument("manifest")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a manifest field.")
@click.option("--run-dir", help="Where checkpoints, metrics and predictions go (default runs/<name>).")
@click.option("--resume", is_flag=True, help="Continue every group from its latest checkpoint.")
@click.option("--overwrite", is_flag=True, help="Delete an earlier run in the run directory and its snapshots first.")
@_fail_cleanly
def train(manifest: str, sets: tuple[str, ...], run_dir: str | None, resume: bool, overwrite: bool) -> None:
    """Train all groups of MANIFEST locally, one DeepSpeed job per group (ranks from the manifest)."""
    from training.report import final_eval
    from training.workloads import workload_for

    sets = list(sets) + ([f"train.run_dir={run_dir}"] if run_dir else [])
    config, dataset = _train(manifest, sets, resume, overwrite)
    workload = workload_for(dataset.dataset)
    for group in config.trained_groups:
        m = final_eval(config.run_dir, group)
        click.echo(f"group {group}: step {m['step']} eval {workload.describe(m)}")


def _plan_path(plan: str) -> str:
    return plan if "/" in plan or plan.endswith((".yaml", ".yml")) else f"{REPO_EXPERIMENTS}/{plan}.yaml"


@main.command()
@click.argument("plan")
@click.option("--report-only", is_flag=True, help="Rebuild the report from finished runs; train nothing.")
@_fail_cleanly
def experiment(plan: str, report_only: bool) -> None:
    """Run every (condition, seed) of PLAN (manifests/experiments/*.yaml) and write report.md with plots."""
    from codistill.experiment import load_plan, run_plan, write_report

    parsed = load_plan(_plan_path(plan))
    if not report_only:
        run_plan(parsed, _train, echo=click.echo)
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
    import dataclasses

    from codistill.experiment import load_plan, run_plan, summarize, write_report
    from codistill.verify import verify_dataset

    parsed = load_plan(_plan_path(plan))
    parsed = dataclasses.replace(parsed, sets=parsed.sets + tuple(sets))
    config = parsed.config(parsed.conditions[0], parsed.seeds[0])
    click.echo("== 1. generate Criteo-format data and shard it into groups with Beam")
    from pipelines.run import preprocess as run_preprocess

    dataset = run_preprocess(config, overwrite=True, show_progress=_echo_progress)
    click.echo(summarize_dataset(dataset, config.data.output))
    report = verify_dataset(config.data.output)
    if not report.ok:
        raise click.ClickException("verify failed: " + "; ".join(report.problems))
    click.echo(f"verify: OK ({report.rows} rows, no key in two places)")
    click.echo(f"== 2. train every condition x seed with DeepSpeed ({len(parsed.conditions) * len(parsed.seeds)} runs)")
    for path in parsed.out.glob("*/.complete"):
        path.unlink()  # the data was just rebuilt: every run trains again
    run_plan(parsed, lambda manifest, sets, resume, overwrite: _train(manifest, sets, False, True), echo=click.echo)
    click.echo("== 3. results on the shared eval split")
    summaries = summarize(parsed)
    path = write_report(parsed, summaries)
    base, cod = summaries[parsed.claims.baseline], summaries[parsed.claims.codistill]
    floor = base.runs[0].floor
    click.echo(f"{'condition':<22} {'final eval loss':>17} {'gap to floor':>13} {'churn |dp|':>10} {'flips':>7}")
    for name, summary in summaries.items():
        mean, sd = summary.stat("final")
        churn = summary.churn
        click.echo(f"{name:<22} {mean + (floor or 0):>8.4f} ± {sd:.4f} {mean:>+13.4f} "
                   f"{churn.get('mean_abs_diff', float('nan')):>10.4f} {100 * churn.get('disagreement', 0):>6.2f}%")
    diff = cod.stat("final")[0] - base.stat("final")[0]
    click.echo(f"codistillation - baseline: {diff:+.4f} final eval loss; spread between seeds (sd): "
               f"baseline {base.stat('final')[1]:.4f}, codistillation {cod.stat('final')[1]:.4f}")
    if floor is not None:
        click.echo(f"floor (Bayes-optimal eval loss of the generated data): {floor:.4f}")
    click.echo(f"report and plots: {path}")
