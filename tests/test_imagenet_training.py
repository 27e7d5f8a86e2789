"""ImageNet training: transforms, the decoding loader, ResNet sizes, the weight decay schedule, and a real
2-rank DeepSpeed run of 2 groups with codistillation on a tiny data set built by the ImageNet pipeline."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from codistill.config import ConfigError, load_experiment
from codistill.datasets.imagenet import ResNetConfig
from codistill.dataset import DatasetManifest, ShardEntry, write_manifest
from codistill.rundir import RunDir
from pipelines.formats import write_shard
from pipelines.imagenet import SCHEMA
from training import image_transforms as T
from training.data import ShardStream, StreamSpec, loader
from training.resnet import ResNet
from training.train import Schedule
from training.workloads.imagenet import DecodeFailuresError, ImageBatches

from test_training import BIN, records, run, sets_args, tail

pytestmark = pytest.mark.timeout(300)


def jpeg(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR).convert(mode)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95)
    return out.getvalue()


# --- transforms -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(500, 375), (168, 168), (64, 300), (1000, 10)])
def test_random_resized_box_stays_within_scale_and_ratio(size):
    width, height = size
    fallbacks = 0
    for seed in range(300):
        left, top, right, bottom = T.random_resized_box(width, height, random.Random(seed))
        w, h = right - left, bottom - top
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        if (w, h) == (width, height) or left == (width - w) // 2 and top == (height - h) // 2 and (
                w == width or h == height):
            fallbacks += 1  # the centre-crop fallback (or a draw that happens to look like it)
            continue
        # rounding w and h to pixels moves area and ratio by at most ~1 pixel's worth
        assert 0.08 * width * height - (w + h) <= w * h <= width * height
        assert 3 / 4 - 1 / min(w, h) <= w / h <= 4 / 3 + 1 / min(w, h)
    if size == (1000, 10):  # no 3/4..4/3 box fits: always the fallback, cut to ratio 4/3
        assert fallbacks == 300
        assert T.random_resized_box(width, height, random.Random(0)) == (493, 0, 506, 10)


def test_train_crop_is_the_box_resized_and_flipped_half_the_time():
    data = jpeg(480, 360, seed=1)
    reference = Image.open(io.BytesIO(data)).convert("RGB")  # full decode, no draft
    flips = 0
    for seed in range(12):
        out = T.crop(data, 64, True, random.Random(seed))
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
        box = T.random_resized_box(480, 360, random.Random(seed))
        expected = np.asarray(reference.resize((64, 64), Image.Resampling.BILINEAR, box=box)).astype(float)
        plain, flipped = np.abs(out - expected).mean(), np.abs(out[:, ::-1] - expected).mean()
        assert min(plain, flipped) < 12, (seed, plain, flipped)  # the draft decode only blurs a little
        flips += flipped < plain
    assert 2 <= flips <= 10


def test_eval_crop_resizes_the_shorter_side_then_center_crops():
    # 256 x 320: after "shorter side to 256" the 224 center crop keeps x in [48, 272), y in [16, 240).
    pixels = np.zeros((256, 320, 3), np.uint8)
    pixels[:, :, 0] = 255  # red border ...
    pixels[20:236, 52:268] = (0, 255, 0)  # ... a green center a little inside the crop
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, "JPEG", quality=98)
    out = T.crop(data.getvalue(), 224, False).astype(int)
    assert out.shape == (224, 224, 3)
    assert out[8:-8, 8:-8, 1].min() > 200 and out[8:-8, 8:-8, 0].max() < 60  # green inside
    assert out[:2, :, 0].mean() > 150 and out[:, :2, 0].mean() > 150  # only the strip just outside is red
    assert T.center_box(300, 200) == pytest.approx((62.5, 12.5, 237.5, 187.5))


def test_crops_are_deterministic_per_seed_epoch_and_key():
    data = jpeg(300, 200, seed=2)
    first = T.crop(data, 32, True, T.sample_rng(7, 0, b"a"))
    assert np.array_equal(first, T.crop(data, 32, True, T.sample_rng(7, 0, b"a")))
    others = [T.crop(data, 32, True, T.sample_rng(*args)) for args in ((7, 1, b"a"), (8, 0, b"a"), (7, 0, b"b"))]
    assert all(not np.array_equal(first, other) for other in others)


def test_grayscale_decodes_to_three_channels_and_normalize_is_channels_last():
    out = T.crop(jpeg(100, 80, mode="L"), 32, False)
    assert out.shape == (32, 32, 3) and (out[..., 0] == out[..., 1]).all()
    images = torch.from_numpy(np.stack([out, out]))
    x = T.normalize(images, torch.float32, channels_last=True)
    assert x.shape == (2, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    expected = (out[..., 1].astype(np.float32) / 255 - T.MEAN[1]) / T.STD[1]
    np.testing.assert_allclose(x[0, 1].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert T.normalize(images, torch.float32, channels_last=False).is_contiguous()


# --- the loader ---------------------------------------------------------------------------------------

COLUMNS = {name: SCHEMA[name] for name in ("key", "image", "label")}


def image_dataset(root: str, shards: list[list[bytes]], batch: int = 4, **spec) -> StreamSpec:
    """Shards of one group holding the given image bytes (keys `<shard>-<i>`, label = i % 3)."""
    entries = []
    for s, images in enumerate(shards):
        column = np.empty(len(images), object)
        column[:] = images
        block = {"key": np.array([f"{s}-{i}".encode() for i in range(len(images))], np.bytes_), "image": column,
                 "label": np.arange(len(images), dtype=np.int64) % 3}
        written = write_shard(f"{root}/train/0/s{s}.tfrecord", [block], COLUMNS, "tfrecord", f"s{s}")
        entries.append(ShardEntry(f"train/0/s{s}.tfrecord", "train", 0, written.records, written.bytes,
                                  written.sha256))
    manifest = DatasetManifest("imagenet", "tfrecord", COLUMNS, 1, tuple(entries),
                               ({"source": "test", "rows": sum(map(len, shards))},), {}, {},
                               extra={"classes": ["a", "b", "c"], "label_offset": 0})
    write_manifest(root, manifest)
    return StreamSpec(root, manifest, manifest.shards, batch, **spec)


BAD = {"truncated": jpeg(64, 64, seed=3)[:300], "text": b"not a jpeg at all", "empty": b""}


def test_undecodable_samples_are_skipped_counted_and_keep_the_batch_count(tmp_path, caplog):
    good = [jpeg(48 + i, 40, seed=i) for i in range(9)]
    shard = good[:2] + [BAD["truncated"]] + good[2:5] + [BAD["text"], BAD["empty"]] + good[5:]  # 12 rows
    spec = image_dataset(str(tmp_path), [shard])
    out = list(ImageBatches(spec, 16, train=False, max_failures=3))
    assert [len(b["key"]) for b in out] == [3, 2, 4]  # the batches ShardStream gives, less the bad rows
    assert len(out) == len(list(ShardStream(spec)))
    assert [k.decode() for b in out for k in b["key"]] == [f"0-{i}" for i in (0, 1, 3, 4, 5, 8, 9, 10, 11)]
    assert all(b["image"].shape[1:] == (16, 16, 3) for b in out)
    assert sum("skipped an image that does not decode" in r.message for r in caplog.records) == 3
    with pytest.raises(DecodeFailuresError, match=r"3 images failed to decode .*loader.max_decode_failures=2"):
        list(ImageBatches(spec, 16, train=False, max_failures=2))


def test_too_many_failures_stop_training_from_a_loader_worker(tmp_path):
    spec = image_dataset(str(tmp_path), [[jpeg(40, 40)] * 3 + [BAD["text"]] * 5], repeat=True, shuffle_buffer=4)
    batches = iter(loader(ImageBatches(spec, 16, train=True, max_failures=4), workers=1))
    with pytest.raises(DecodeFailuresError, match="loader worker 0"):
        for _ in range(10):
            next(batches)


def test_every_rank_and_worker_gets_full_batches_from_its_own_shards_each_epoch(tmp_path):
    # 5 shards of uneven size for 2 ranks x 2 workers: not divisible, so records are dealt out one by one.
    shards = [[jpeg(40, 40, seed=s * 10 + i) for i in range(n)] for s, n in enumerate([7, 3, 6, 5, 4])]
    root = str(tmp_path)
    for rank in range(2):
        spec = image_dataset(root, shards, batch=3, rank=rank, world=2, repeat=True, shuffle_buffer=4, seed=5)
        stream = iter(loader(ImageBatches(spec, 16, train=True, max_failures=0), workers=2))
        taken = [next(stream) for _ in range(12)]  # several epochs of each consumer: the stream never runs dry
        assert all(len(b["key"]) == 3 and b["image"].shape == (3, 16, 16, 3) for b in taken)
    # Per epoch (no workers here: consumers = ranks): disjoint, together everything but the dropped partial batches.
    for epoch_keys in zip(*[_keys_by_epoch(image_dataset(root, shards, batch=3, rank=r, world=2, repeat=True,
                                                         shuffle_buffer=4, seed=5)) for r in range(2)]):
        a, b = epoch_keys
        assert not a & b and len(a | b) >= 25 - 2 * 2
    orders = [list(_keys_by_epoch(image_dataset(root, shards, batch=3, repeat=True, shuffle_buffer=4, seed=5),
                                  ordered=True))[e] for e in (0, 1)]
    assert orders[0] != orders[1]  # reshuffled every epoch


def test_resume_passes_over_batches_undecoded_and_continues_the_same_stream(tmp_path):
    """The trainer's fast-forward on resume: whole worker rounds inside the stream, the rest through the loader."""
    shards = [[jpeg(40, 40, seed=s * 10 + i) for i in range(n)] for s, n in enumerate([7, 5, 6])]
    spec = image_dataset(str(tmp_path), shards, batch=3, repeat=True, shuffle_buffer=4, seed=5)
    full = iter(loader(ImageBatches(spec, 16, train=True, max_failures=0), workers=2))
    expected = [next(full) for _ in range(14)][5:]  # past an epoch boundary (6 batches an epoch)
    resumed_spec = image_dataset(str(tmp_path), shards, batch=3, repeat=True, shuffle_buffer=4, seed=5, skip=4)
    resumed = iter(loader(ImageBatches(resumed_spec, 16, train=True, max_failures=0), workers=2))
    next(resumed)  # skip 5 = 4 inside the stream (2 per worker) + 1 through the loader
    for want in expected:
        got = next(resumed)
        assert got["key"].tolist() == want["key"].tolist() and np.array_equal(got["image"], want["image"])


def _keys_by_epoch(spec: StreamSpec, epochs: int = 2, ordered: bool = False):
    out: dict[int, list[bytes]] = {}
    for epoch, batch in ShardStream(spec).epochs():
        if epoch >= epochs:
            break
        out.setdefault(epoch, []).extend(batch["key"].tolist())
    return [v if ordered else set(v) for v in out.values()]


# --- model, config, optimizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth,params", [(18, 11_689_512), (50, 25_557_032)])
def test_resnet_parameter_counts_match_torchvision(depth, params):
    model = ResNet(ResNetConfig(depth=depth), 1000)
    assert sum(p.numel() for p in model.parameters()) == params


def test_resnet_outputs_and_zero_init_residual():
    model = ResNet(ResNetConfig(depth=18, width=8, zero_init_residual=True), 7).eval()
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 7)
    small = ResNet(ResNetConfig(depth=50, width=4, stem="small"), 5).eval()
    assert small(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    assert (model.stages[0][0].bn2.weight == 0).all() and (model.stages[0][0].bn1.weight == 1).all()
    assert not (ResNet(ResNetConfig(depth=18, width=8), 7).stages[0][0].bn2.weight == 0).any()


@pytest.mark.parametrize("override,error", [
    ("model.depth=101", "model.depth: must be 18, 34 or 50, got 101"),
    ("model.stem=big", "model.stem: must be one of ['imagenet', 'small'], got 'big'"),
    ("model.image_size=8", "model.image_size: must be >= 16, got 8"),
    ("optimizer.weight_decay_schedule=[[0, 1e-4], [0, 0]]", "weight_decay_schedule[1]: steps must increase"),
    ("optimizer.weight_decay_schedule=[[10, -1]]", "weight_decay_schedule[0]: weight decay must be >= 0"),
    ("loader.max_decode_failures=-1", "loader.max_decode_failures: must be >= 0, got -1"),
])
def test_bad_image_settings_name_their_field(override, error):
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        load_experiment("imagenet-tiny", [override])


def test_weight_decay_schedule_is_applied_each_step_and_pickles():
    config = load_experiment("imagenet-tiny", ["optimizer.weight_decay=0.5", "schedule.decay=constant",
                                               "optimizer.weight_decay_schedule=[[2, 1e-4], [4, 0.0]]"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, weight_decay=0.5)
    schedule = Schedule(optimizer, config)
    decays = []
    for _ in range(6):
        decays.append(optimizer.param_groups[0]["weight_decay"])
        optimizer.step()
        schedule.step()
    assert decays == [0.5, 0.5, 1e-4, 1e-4, 0.0, 0.0]
    buffer = io.BytesIO()
    torch.save(schedule.state_dict(), buffer)  # DeepSpeed checkpoints pickle it


# --- a real run: `codistill train` on pipeline-built data, 2 groups x 2 ranks, codistillation -------------

RUN_SETS = [
    # 3 classes (+ the generator's empty class folder) x 24 train images, 4 val images each; 40-56 px
    "data.synth.classes=3", "data.synth.per_class=24", "data.synth.val_per_class=4", "data.synth.min_size=40",
    "data.synth.max_size=56", "data.imagenet.images_per_task=64",
    # a narrow ResNet-18 at 32 px, 2 ranks per group, one decoding worker per rank
    "model.width=8", "model.image_size=32", "deepspeed.ranks_per_group=2", "deepspeed.micro_batch_size=6",
    "loader.workers=1", "loader.shuffle_buffer=16",
    "schedule.steps=16", "schedule.warmup_steps=1", "optimizer.weight_decay_schedule=[[0, 1e-4], [8, 0]]",
    "codistill.burn_in_steps=2", "codistill.exchange_every=2", "codistill.poll_seconds=0.05",
    "codistill.max_staleness=100", "codistill.min_peer_coverage=0",  # 14 steps: a start-up skew is most of them
    "eval.every=8", "eval.batch_size=8", "train.log_every=8", "train.checkpoint_every=8"]


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("imagenet-run") / "run"
    sets = RUN_SETS + [f"data.output={run_dir.parent / 'data'}"]
    proc = run([str(BIN / "codistill"), "train", "imagenet-tiny", "--run-dir", str(run_dir), *sets_args(sets)])
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr, 60)
    return run_dir, proc


def test_two_groups_train_with_codistillation_and_report_top1_top5(imagenet_run):
    run_dir, proc = imagenet_run
    used = 0
    for group in range(2):
        evals = records(run_dir, group, "eval")
        assert [e["step"] for e in evals] == [8, 16]
        for e in evals:
            assert 0 <= e["top1"] <= e["top5"] <= 1 and 0 < e["loss"] == e["cross_entropy"] < 10
            assert e["rows"] == 12  # the val folder: 3 classes x 4
        trains = records(run_dir, group, "train")
        assert [t["step"] for t in trains] == list(range(1, 17))
        for t in trains:
            if t["peers"]:  # a peer's snapshot was adopted (BatchNorm buffers and all) and distilled from
                assert set(t["peers"]) == {str(1 - group)}
                if t["step"] > 2:
                    used += 1
                    assert t["distill_loss"] > 0, t
        with np.load(RunDir(run_dir).group(group).predictions) as saved:
            # 4 outputs: the 3 classes and the generator's empty class folder
            assert str(saved["workload"]) == "imagenet" and saved["top5"].shape == (12, 4)
    assert used > 0, "no group ever distilled from an adopted peer snapshot"
    assert "top-1" in proc.stdout and "top-5" in proc.stdout
