"""S3 through s3fs against a real endpoint (moto's server on 127.0.0.1, conftest `s3`): a Criteo dataset
written to and trained from `s3://`, `verify` on it, and the storage rules that say how to reach it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
import yaml
from conftest import REPO, RUNNER, S3_ENV, _wait_for_port, dask_args, shard_bytes

from codistill import storage
from codistill.config import ConfigError, StorageConfig, load_experiment
from codistill.dataset import load_manifest
from codistill.rundir import RunDir
from codistill.verify import verify_dataset
from pipelines.run import preprocess
from training.exchange import LATEST, PeerWatcher, model_signature, snapshot_bytes
from training.launch import free_port, group_commands
from training.workloads import workload_for

pytestmark = pytest.mark.timeout(300)

BIN = REPO / ".venv" / "bin"
TINY = ["data.synth.rows=4000", "schedule.warmup_steps=0", "model.hidden=[16]", "deepspeed.micro_batch_size=64",
        "eval.batch_size=128"]


@pytest.fixture(scope="module")
def s3_dataset(s3, dask_cluster, tmp_path_factory):
    """criteo-tiny generated into S3 and sharded there by the two worker processes of a Dask cluster, and the
    same built locally.

    The workers were started before any storage rule existed: the endpoint and the credentials reach them
    only through the manifest's storage rule, carried by the pipeline's DoFns."""
    url = s3.url("dataset")
    on_s3 = load_experiment("criteo-tiny", TINY + [f"data.output={url}", f"storage={s3.manifest_value}"])
    preprocess(on_s3, dask_args(dask_cluster))
    local = str(tmp_path_factory.mktemp("local") / "criteo")
    preprocess(load_experiment("criteo-tiny", TINY + [f"data.output={local}"]), [RUNNER])
    storage.configure(())
    return url, local


def test_dataset_written_to_s3_is_byte_identical_to_a_local_build(s3_storage, s3_dataset):
    url, local = s3_dataset
    assert load_manifest(url).shards == load_manifest(local).shards
    on_s3 = shard_bytes(url)
    assert on_s3 and on_s3 == shard_bytes(local)
    fs, path = storage.url_to_fs(url)
    assert fs.exists(f"{path}/raw/synth.json")  # the generated input went to S3 too
    assert not fs.exists(f"{path}/.pieces")


def test_verify_on_s3(s3_storage, s3_dataset):
    report = verify_dataset(s3_dataset[0])
    assert report.ok, report.problems
    assert report.rows == load_manifest(s3_dataset[0]).written_rows


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FSSPEC_", "AWS_"))}
    return env | {"AWS_EC2_METADATA_DISABLED": "true"} | extra


def test_cli_verify_with_storage_rules_from_a_manifest(s3, s3_dataset, tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"name": "m", "data": {"input": "unused"},
                                        "storage": [{"prefix": s3.rule.prefix, "options": s3.rule.options,
                                                     "env": s3.rule.env}]}))
    proc = subprocess.run([str(BIN / "codistill"), "verify", "-m", str(manifest), s3_dataset[0]], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"OK {s3_dataset[0]}")


def test_cli_verify_with_fsspec_environment_config_only(s3, s3_dataset):
    env = cli_env(FSSPEC_S3_ENDPOINT_URL=s3.endpoint, AWS_ACCESS_KEY_ID=S3_ENV["CODISTILL_TEST_S3_KEY"],
                  AWS_SECRET_ACCESS_KEY=S3_ENV["CODISTILL_TEST_S3_SECRET"])
    proc = subprocess.run([str(BIN / "codistill"), "verify", s3_dataset[0]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_longest_prefix_wins_and_secrets_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("TEST_SECRET", "s3cret")
    storage.configure([StorageConfig("s3://bkt", {"anon": True}),
                       StorageConfig("s3://bkt/private/", {"profile": "team"}, {"secret": "TEST_SECRET"})])
    try:
        assert storage.options_for("s3://bkt/a") == {"anon": True}
        assert storage.options_for("s3://bkt/private/x") == {"profile": "team", "secret": "s3cret"}
        assert storage.options_for("s3://bkt2/a") == {} and storage.options_for("/local/path") == {}
        monkeypatch.delenv("TEST_SECRET")
        with pytest.raises(ConfigError, match="TEST_SECRET"):
            storage.options_for("s3://bkt/private/x")
    finally:
        storage.configure(())


@pytest.fixture(scope="module")
def s3_training_run(s3, s3_dataset, tmp_path_factory):
    """Group 0 of criteo-tiny, 2 DeepSpeed ranks, dataset and snapshot store both on S3, TensorBoard on.

    (One launch serves the TensorBoard test too: a DeepSpeed start is the expensive part.)"""
    url, _ = s3_dataset
    store, run_dir = s3.url("store"), tmp_path_factory.mktemp("s3-train") / "run"
    sets = TINY + [f"data.output={url}", f"storage={s3.manifest_value}", f"train.store={store}",
                   "schedule.steps=6", "eval.every=3", "train.checkpoint_every=6", "codistill.exchange_every=3",
                   "train.log_every=2", "train.tensorboard=true", f"train.run_dir={run_dir}"]
    argv = group_commands("criteo-tiny", [0], 2, sets, resume=False)[0].argv
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return load_experiment("criteo-tiny", sets), proc


def test_training_reads_its_shards_from_s3_and_publishes_snapshots_there(s3_training_run):
    config, proc = s3_training_run
    assert "eval step 6:" in proc.stdout
    assert RunDir(config.run_dir).group(0).predictions.exists()
    storage.configure(config.storage)
    try:
        fs, root = storage.url_to_fs(config.store)
        assert fs.cat_file(f"{root}/{config.run_id}/group-0/{LATEST}") == b"step-00000006.json"
        model = workload_for("criteo").build_model(config.model, load_manifest(config.data.output))
        with PeerWatcher(config.store, config.run_id, 1, [0], model_signature(model.state_dict()),
                         snapshot_bytes(model.state_dict()), poll_interval=0.05,
                         run_nonce=json.loads(RunDir(config.run_dir).run_file.read_text())["run_nonce"]) as w:
            deadline = time.monotonic() + 30
            while not (updates := w.take_updates()) and time.monotonic() < deadline:
                time.sleep(0.05)
        assert updates[0][0] == 6  # the final snapshot, read back from S3 and verified
    finally:
        storage.configure(())


def test_training_writes_tensorboard_events_and_shows_time_left(s3_training_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, proc = s3_training_run
    assert re.search(r"^step 2/6 loss .* ms/step, \d+s left$", proc.stdout, re.M), proc.stdout[-2000:]
    events = EventAccumulator(str(RunDir(config.run_dir).group(0).tensorboard))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"Train/loss", "Train/label_loss", "Train/lr", "Eval/log_loss", "Eval/auc"} <= set(scalars), scalars
    logged = [json.loads(line) for line in RunDir(config.run_dir).group(0).metrics.open()]
    train = {r["step"]: r["loss"] for r in logged if r["kind"] == "train"}
    evals = {r["step"]: r["log_loss"] for r in logged if r["kind"] == "eval"}
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("Train/loss")] == list(train.items())
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("Eval/log_loss")] == [
        (3, evals[3]), (6, evals[6])]


class _DiesAfterWeights:
    """The store as seen by a publisher whose process dies right after uploading the weights."""

    def __init__(self, fs):
        self._fs = fs

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def pipe_file(self, path: str, data, **kwargs) -> None:
        if not path.endswith(".safetensors"):
            raise OSError("killed")
        self._fs.pipe_file(path, data, **kwargs)


def test_snapshot_cut_off_mid_publish_on_s3_is_never_seen(s3_storage):
    """No rename on S3: what makes a snapshot visible is the LATEST PUT, the last of the three."""
    import torch

    from training.exchange import SnapshotPublisher

    store = s3_storage.url()
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    publisher = SnapshotPublisher(store, "run", group=1)
    assert publisher.publish(1, state)
    publisher.fs = _DiesAfterWeights(publisher.fs)
    assert not publisher.publish(2, {"w": torch.zeros(2, 3)})
    fs, root = storage.url_to_fs(store)
    assert fs.exists(f"{root}/run/group-1/step-00000002.safetensors")  # the orphaned upload is there
    assert fs.cat_file(f"{root}/run/group-1/{LATEST}") == b"step-00000001.json"
    with PeerWatcher(store, "run", 0, [1], model_signature(state), snapshot_bytes(state), poll_interval=0.02) as w:
        deadline = time.monotonic() + 10
        while not (updates := w.take_updates()) and time.monotonic() < deadline:
            time.sleep(0.02)
    assert updates[1][0] == 1 and torch.equal(updates[1][1]["w"], state["w"])


# --- a missing bucket is never created ------------------------------------------------------------------------


MISSPELT = "codistill-tset"  # not the fixture's bucket: a typo of it


def test_writing_to_a_missing_bucket_names_it_and_never_creates_it(s3_storage):
    """s3fs's makedirs creates a missing bucket: a typo would send the data to a new bucket in the caller's
    account. Every way in which we write files checks the bucket instead."""
    import torch

    from pipelines.synth_criteo import generate_criteo
    from training.exchange import SnapshotPublisher

    rule = s3_storage.rule  # the same endpoint and credentials for the misspelt name
    storage.configure([rule, StorageConfig(f"s3://{MISSPELT}", rule.options, rule.env)])
    fs, _ = storage.url_to_fs(f"s3://{MISSPELT}")
    expected = f"s3://{MISSPELT}: no such bucket; buckets are never created here"
    with pytest.raises(storage.StoreError, match=re.escape(expected)):
        storage.write_atomically(f"s3://{MISSPELT}/data/manifest.json", b"{}")
    with pytest.raises(storage.StoreError, match=re.escape(expected)):
        with storage.atomic_writer(f"s3://{MISSPELT}/data/shard-00000.tfrecord") as f:
            f.write(b"rows")
    with pytest.raises(storage.StoreError, match=re.escape(expected)):
        storage.check_writable(f"s3://{MISSPELT}/store/run/group-0")
    assert not SnapshotPublisher(f"s3://{MISSPELT}/store", "run", group=0).publish(1, {"w": torch.zeros(2)})
    with pytest.raises(storage.StoreError, match=re.escape(expected)):  # the generators write through it too
        generate_criteo(f"s3://{MISSPELT}/raw", 10)
    fs.invalidate_cache()
    assert MISSPELT not in {b.rstrip("/") for b in fs.ls("")}, "a bucket was created"
    storage.write_atomically(s3_storage.url("exists/manifest.json"), b"{}")  # the real bucket still takes files


# --- wrong credentials, an unreachable endpoint: one line naming the URL and the likely cause ---------------


SCOPED_BUCKET = "scoped"


@pytest.fixture(scope="module")
def s3_checking_credentials(tmp_path_factory):
    """A second moto server, this one checking credentials and IAM policies: ours are unknown to it. Its first
    four requests (no credentials checked yet) make a bucket and a user whose key may only touch objects under
    `scoped/data/` (no s3:ListBucket on the bucket's root, as prefix-scoped keys often have)."""
    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("moto-auth") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="4"))
    try:
        _wait_for_port(proc, port, log)
        endpoint = f"http://127.0.0.1:{port}"
        setup = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                     aws_secret_access_key="setup")
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="writer")
        key = iam.create_access_key(UserName="writer")["AccessKey"]
        iam.put_user_policy(UserName="writer", PolicyName="data-prefix-only", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Action": ["s3:PutObject", "s3:GetObject", "s3:DeleteObject"],
                "Resource": f"arn:aws:s3:::{SCOPED_BUCKET}/data/*"}]}))
        boto3.client("s3", **setup).create_bucket(Bucket=SCOPED_BUCKET)
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def rule_for(endpoint: str) -> dict:
    # One attempt per botocore call: an unreachable endpoint fails sooner (s3fs still retries for a few seconds).
    return {"prefix": "s3://codistill-test", "env": {"key": "CODISTILL_TEST_S3_KEY",
                                                     "secret": "CODISTILL_TEST_S3_SECRET"},
            "options": {"endpoint_url": endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}}}


def closed_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.mark.parametrize("case", ["wrong credentials", "no credentials", "unreachable endpoint"])
def test_cli_names_the_url_and_the_likely_cause_of_a_store_failure(s3_checking_credentials, tmp_path, case):
    endpoint = s3_checking_credentials[0] if case.endswith("credentials") else closed_endpoint()
    rule = rule_for(endpoint)
    if case == "no credentials":  # no keys in the rule, none in AWS_* nor in a credentials file
        rule.pop("env")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"name": "m", "data": {"input": "unused"}, "storage": [rule]}))
    url = "s3://codistill-test/data"
    env = cli_env(**S3_ENV, AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    proc = subprocess.run([str(BIN / "codistill"), "verify", "-m", str(manifest), url], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    cause = {"wrong credentials": "access denied: wrong or missing credentials, or no permission there "
                                  "(PermissionError: Forbidden)",
             "no credentials": "no credentials found: set the storage rule's env variables (or the provider's own: "
                               "AWS_* for S3, GOOGLE_APPLICATION_CREDENTIALS for GCS) (NoCredentialsError: Unable "
                               "to locate credentials)",
             "unreachable endpoint": "cannot reach the store's endpoint: is it running, and is the endpoint_url "
                                     "(storage rule) right? (EndpointConnectionError: Could not connect to the "
                                     f"endpoint URL: \"{endpoint}/"}[case]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [errors[0]] and errors[0].startswith(f"Error: {url}/manifest.json: {cause}"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_credentials_scoped_to_a_prefix_write_there(s3_checking_credentials, monkeypatch):
    """Looking at the bucket is denied to such a key; the check that it exists must not stop writes it may make."""
    endpoint, key, secret = s3_checking_credentials
    monkeypatch.setenv("SCOPED_KEY", key)
    monkeypatch.setenv("SCOPED_SECRET", secret)
    storage.configure([StorageConfig(f"s3://{SCOPED_BUCKET}", {"endpoint_url": endpoint},
                                     {"key": "SCOPED_KEY", "secret": "SCOPED_SECRET"})])
    try:
        storage.write_atomically(f"s3://{SCOPED_BUCKET}/data/manifest.json", b"{}")
        fs, _ = storage.url_to_fs(f"s3://{SCOPED_BUCKET}")
        assert fs.cat_file(f"{SCOPED_BUCKET}/data/manifest.json") == b"{}"
        with pytest.raises(storage.StoreError, match=f"s3://{SCOPED_BUCKET}/elsewhere/x.json: access denied"):
            with storage.explained(f"s3://{SCOPED_BUCKET}/elsewhere/x.json"):
                storage.write_atomically(f"s3://{SCOPED_BUCKET}/elsewhere/x.json", b"{}")
    finally:
        storage.configure(())


def test_training_with_an_unreachable_store_ends_in_one_line(s3_dataset, tmp_path):
    """Group 0 on 2 ranks, its dataset local, its snapshot store on an endpoint nothing listens on."""
    endpoint = closed_endpoint()
    sets = TINY + [f"data.output={s3_dataset[1]}", f"storage={json.dumps([rule_for(endpoint)])}",
                   "train.store=s3://codistill-test/store", "schedule.steps=6", f"train.run_dir={tmp_path / 'run'}"]
    env = cli_env(**S3_ENV, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(group_commands("criteo-tiny", [0], 2, sets, resume=False)[0].argv, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=280)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in output.splitlines() if "error: group 0: " in line]
    assert len(errors) == 1, output[-4000:]
    # (The first thing the group does there: join the run's record, store/run/run.json, in the bucket.)
    assert errors[0].split("error: group 0: ")[1].startswith(
        "s3://codistill-test/store: cannot reach the store's endpoint: is it running, and is the endpoint_url "
        f"(storage rule) right? (EndpointConnectionError: Could not connect to the endpoint URL: \"{endpoint}/"
        "codistill-test"), errors
    assert "Traceback" not in output, output[-4000:]
