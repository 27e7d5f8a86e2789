"""The `codistill` command line."""

from __future__ import annotations

import functools
import json
import logging
import sys

import click
import numpy as np

from codistill.config import ConfigError, parse_experiment, read_manifest_yaml, resolve_manifest, set_field
from codistill.dataset import DatasetError, DatasetManifest

USER_ERRORS = (ConfigError, DatasetError, FileNotFoundError, FileExistsError, ValueError)


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


@main.group()
def preprocess() -> None:
    """Run a Beam pipeline: raw files -> disjoint per-group shards + manifest.json."""


@preprocess.command("criteo", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("-m", "--manifest", help="Experiment manifest (path or name in manifests/); flags override it.")
@click.option("--input", "input_glob", help="Raw files: glob or URL, comma-separated for several.")
@click.option("--output", help="Dataset directory (local path or fsspec URL).")
@click.option("--groups", type=int)
@click.option("--eval-fraction", type=float)
@click.option("--format", "fmt", type=click.Choice(["tfrecord", "webdataset"]))
@click.option("--dialect", type=click.Choice(["tsv", "csv"]),
              help="tsv: Kaggle train.txt; csv: the header CSV export (label,I1..,C26).")
@click.option("--cat-buckets", type=click.IntRange(min=2), help="Hash buckets for every categorical column.")
@click.option("--keep-raw/--no-keep-raw", default=None, help="Also store the raw integer and categorical values.")
@click.option("--runner", help="Beam runner (default FnApiRunner, in-process); e.g. DaskRunner (with "
              "--dask_client_address HOST:PORT), DataflowRunner, FlinkRunner.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a manifest field.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.pass_context
@_fail_cleanly
def preprocess_criteo(ctx, manifest, input_glob, output, groups, eval_fraction, fmt, dialect, cat_buckets, keep_raw,
                      runner, sets, overwrite) -> None:
    """Criteo TSV (or gzip) files -> shards. Unknown options go to Beam (e.g. --direct_num_workers=2)."""
    from pipelines.run import preprocess as run_preprocess

    raw = read_manifest_yaml(manifest) if manifest else {"name": "criteo-cli", "data": {"dataset": "criteo"}}
    flags = {"data.input": input_glob, "data.output": output, "data.groups": groups,
             "data.eval_fraction": eval_fraction, "data.format": fmt, "data.criteo.dialect": dialect,
             "data.criteo.cat_buckets": cat_buckets, "data.criteo.keep_raw": keep_raw}
    for dotted, value in flags.items():
        if value is not None:
            set_field(raw, dotted, value)
    if input_glob is not None:
        raw["data"].pop("synth", None)
    stray = [a for a in ctx.args if not a.startswith("-")]
    if stray:
        raise click.UsageError(f"unexpected argument {stray[0]!r}: quote a glob given to --input "
                               "(--input 'dir/*.txt') so the shell does not expand it")
    config = parse_experiment(raw, sets)
    beam_args = (["--runner", runner] if runner else []) + list(ctx.args)
    dataset = run_preprocess(config, beam_args, overwrite=overwrite, show_progress=_echo_progress)
    click.echo(summarize(dataset, config.data.output))


def _echo_progress(line: str) -> None:
    click.echo(line, err=True)


def summarize(dataset: DatasetManifest, where: str) -> str:
    rejected = sum(dataset.rejected.values())
    reasons = ", ".join(f"{k}: {v}" for k, v in dataset.rejected.items())
    lines = [f"{dataset.dataset} ({dataset.format}) at {where}: {dataset.input_rows} rows read, "
             f"{dataset.written_rows} written, {rejected} rejected" + (f" ({reasons})" if reasons else ""),
             f"{'split':<6} {'group':>5} {'shards':>6} {'rows':>10} {'bytes':>12}"]
    parts = [("eval", None)] + [("train", g) for g in range(dataset.groups)]
    for split, group in parts:
        shards = dataset.shards_of(split, group)
        lines.append(f"{split:<6} {'-' if group is None else group:>5} {len(shards):>6} "
                     f"{sum(s.records for s in shards):>10} {sum(s.bytes for s in shards):>12}")
    synth = dataset.extra.get("synth")
    if synth:
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
        click.echo(summarize(dataset, config.data.output))
        return dataset
    wanted = json.loads(json.dumps(pipeline_parameters(config.data)))  # as stored: tuples become lists
    # (`output` may differ: a dataset can be copied or moved.)
    changed = sorted(k for k, v in wanted.items() if k != "output" and dataset.parameters.get(k) != v)
    synth, built = config.data.synth, dataset.extra.get("synth", {})
    if synth is not None and (synth.rows, synth.seed, synth.files) != (built.get("rows"), built.get("seed"),
                                                                       built.get("num_files")):
        changed.append("synth")
    if changed:
        raise click.ClickException(
            f"the dataset at {config.data.output} was built with other data settings ({', '.join(changed)}); "
            "rebuild it with `codistill preprocess criteo -m <manifest> --overwrite` or point data.output elsewhere")
    return dataset


def _start_afresh(config, overwrite: bool) -> None:
    """A new run must not inherit an earlier one's checkpoints, metrics or snapshots: its groups
    would adopt the old peers' weights as if they were fresh."""
    import shutil
    from pathlib import Path

    from codistill import storage

    run_dir = Path(config.run_dir)
    store_fs, store_root = storage.url_to_fs(config.store)
    old_snapshots = f"{store_root.rstrip('/')}/{config.run_id}"
    if (run_dir.exists() and any(run_dir.iterdir())) or store_fs.exists(old_snapshots):
        if not overwrite:
            raise click.ClickException(f"{run_dir} (or {config.store}/{config.run_id}) holds an earlier run: "
                                       "continue it with --resume, or start over with --overwrite")
        shutil.rmtree(run_dir, ignore_errors=True)
        if store_fs.exists(old_snapshots):
            store_fs.rm(old_snapshots, recursive=True)


def _train(manifest: str, sets: list[str], resume: bool, overwrite: bool = False):
    """Start every group of a run (one deepspeed launch each); returns the config."""
    from codistill import storage
    from codistill.config import load_experiment
    from training.launch import GroupFailed, group_commands, run_groups

    config = load_experiment(manifest, sets)
    storage.configure(config.storage)
    dataset = _dataset_for(config)
    if not resume:
        _start_afresh(config, overwrite)
    commands = group_commands(resolve_manifest(manifest), dataset.groups, config.deepspeed.ranks_per_group, sets,
                              resume)
    try:
        run_groups(commands, config.deepspeed.ranks_per_group)
    except GroupFailed as e:
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

    sets = list(sets) + ([f"train.run_dir={run_dir}"] if run_dir else [])
    config, dataset = _train(manifest, sets, resume, overwrite)
    for group in range(dataset.groups):
        m = final_eval(config.run_dir, group)
        click.echo(f"group {group}: step {m['step']} eval log loss {m['log_loss']:.4f} AUC {m['auc']:.4f} "
                   f"calibration {m['calibration']:.3f}")


@main.command()
@click.argument("run_a")
@click.argument("run_b")
@click.option("--group", type=int, default=0, show_default=True, help="Which group's model to compare.")
@click.option("--threshold", type=float, default=0.5, show_default=True)
@_fail_cleanly
def churn(run_a: str, run_b: str, group: int, threshold: float) -> None:
    """Prediction churn between two trained runs on the eval split."""
    from training.report import run_churn

    c = run_churn(run_a, run_b, group, threshold)
    click.echo(f"churn over {c['rows']} eval examples: mean |p_a - p_b| = {c['mean_abs_diff']:.4f}, "
               f"thresholded at {threshold}: {100 * c['disagreement']:.2f}% differ")


@main.command()
@click.option("--manifest", "-m", default="criteo-tiny", show_default=True)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE")
@click.option("--out", default="runs/demo", show_default=True, help="Where the four runs and the plot go.")
@_fail_cleanly
def demo(manifest: str, sets: tuple[str, ...], out: str) -> None:
    """The embedded default, end to end: data, Beam, DeepSpeed baseline vs codistillation, table and plot."""
    from codistill.config import load_experiment
    from codistill.verify import verify_dataset
    from pipelines.run import preprocess as run_preprocess
    from training.report import final_eval, plot_eval_loss, run_churn

    config = load_experiment(manifest, sets)
    click.echo("== 1. generate Criteo-format data and shard it into groups with Beam")
    dataset = run_preprocess(config, overwrite=True, show_progress=_echo_progress)
    click.echo(summarize(dataset, config.data.output))
    report = verify_dataset(config.data.output)
    if not report.ok:
        raise click.ClickException("verify failed: " + "; ".join(report.problems))
    click.echo(f"verify: OK ({report.rows} rows, no key in two places)")

    runs = {}
    for mode in ("baseline", "codistill"):
        for seed in (0, 1):
            name = f"{mode}-seed{seed}"
            click.echo(f"== 2. train {name}: {dataset.groups} groups with DeepSpeed")
            runs[name] = f"{out}/{name}"
            _train(manifest, list(sets) + [f"codistill.enabled={mode == 'codistill'}", f"train.seed={seed}",
                                           f"train.run_dir={runs[name]}"], resume=False, overwrite=True)

    floor = dataset.extra.get("synth", {}).get("bayes_log_loss")
    click.echo("== 3. results on the shared eval split (mean over groups; churn between the two seeds, group 0)")
    click.echo(f"{'run':<10} {'eval log loss':>13} {'AUC':>7} {'gap to Bayes':>12} {'churn |dp|':>10} "
               f"{'churn flips':>11}")
    for mode in ("baseline", "codistill"):
        finals = [final_eval(runs[f"{mode}-seed{s}"], g) for s in (0, 1) for g in range(dataset.groups)]
        loss, auc = np.mean([f["log_loss"] for f in finals]), np.mean([f["auc"] for f in finals])
        c = run_churn(runs[f"{mode}-seed0"], runs[f"{mode}-seed1"], group=0)
        gap = f"{loss - floor:+.4f}" if floor is not None else "n/a"
        click.echo(f"{mode:<10} {loss:>13.4f} {auc:>7.4f} {gap:>12} {c['mean_abs_diff']:>10.4f} "
                   f"{100 * c['disagreement']:>10.2f}%")
    if floor is not None:
        click.echo(f"Bayes-optimal eval log loss of the generated data: {floor:.4f}")
    plot = f"{out}/eval_loss.png"
    plot_eval_loss({"baseline": runs["baseline-seed0"], "codistill": runs["codistill-seed0"]}, plot, floor)
    click.echo(f"plot: {plot}")
