"""ImageNet: the generator, the Beam pipeline (real FnApiRunner), both shard formats read by upstream readers,
conformance on the 13 real ILSVRC images, and every bad input quarantined or repaired as documented."""

from __future__ import annotations

import collections
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image
from tfrecord.reader import tfrecord_loader

from codistill.cli import main
from codistill.config import ConfigError, parse_experiment
from codistill.dataset import join, load_manifest
from codistill.verify import verify_dataset
from codistill.shards import Feature, ShardFormatError
from pipelines.formats import dali_index_path, frame_record, iter_tfrecord, read_shard, write_shard
from pipelines.imagenet import SCHEMA
from pipelines.run import preprocess
from pipelines.synth_imagenet import generate_imagenet

from conftest import RUNNER, list_files, read_bytes, shard_bytes

MULTI = [RUNNER, "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
# The 13 real images (../shared/data/SOURCES.md): label in imagenet_synsets.txt -> wnid.
REAL_LABELS = {0: "n01440764", 1: "n01443537", 26: "n01630670", 66: "n01753488", 107: "n01910747",
               153: "n02085936", 167: "n02089973", 405: "n02692877", 677: "n03804744", 859: "n04442312",
               940: "n07716906", 993: "n13037406", 999: "n15075141"}
REAL_GRAYSCALE = {"n02692877", "n03804744"}


def imagenet_config(input: str, output: str, fmt: str = "tfrecord", **imagenet):
    data = {"dataset": "imagenet", "input": input, "output": output, "groups": 2, "shards_per_group": 2,
            "eval_shards": 1, "eval_fraction": 0.2, "format": fmt, "seed": 3,
            "imagenet": {"images_per_task": 64, **imagenet}}
    return parse_experiment({"name": "test", "data": data})


def run_imagenet(input, output, fmt="tfrecord", beam_args=(RUNNER,), **imagenet):
    return preprocess(imagenet_config(str(input), str(output), fmt, **imagenet), list(beam_args))


def read_records(root) -> dict[str, dict]:
    """key -> row (every column, plus split/group), hash-checked; no key twice."""
    manifest = load_manifest(str(root))
    rows = {}
    for shard in manifest.shards:
        for block in read_shard(join(str(root), shard.path), manifest.features, manifest.format,
                                expect_sha256=shard.sha256):
            for i, key in enumerate(block["key"].tolist()):
                assert key.decode() not in rows
                rows[key.decode()] = {name: block[name][i] for name in block} | {
                    "split": shard.split, "group": shard.group, "shard": shard.path}
    return rows


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth-imagenet")
    sidecar = generate_imagenet(str(root), classes=6, per_class=40, val_per_class=5, seed=4, min_size=48,
                                max_size=96, faults=1)
    return root, sidecar


@pytest.fixture(scope="module")
def built(synth, tmp_path_factory) -> dict[str, Path]:
    """The generated set through the pipeline: TFRecord (1 worker and 2 processes) and WebDataset."""
    root, _ = synth
    out = {name: tmp_path_factory.mktemp(name) / "data" for name in ("tfrecord", "tfrecord2", "webdataset")}
    run_imagenet(root, out["tfrecord"])
    run_imagenet(root, out["tfrecord2"], beam_args=MULTI)
    run_imagenet(root, out["webdataset"], "webdataset")
    return out


# --- the generator --------------------------------------------------------------------------------


def test_generator_is_deterministic_and_counts_its_files(synth, tmp_path):
    root, sidecar = synth
    again = generate_imagenet(str(tmp_path), classes=6, per_class=40, val_per_class=5, seed=4, min_size=48,
                              max_size=96, faults=1)
    assert again == sidecar
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert all((root / f).read_bytes() == (tmp_path / f).read_bytes() for f in files)
    assert len([f for f in files if f.startswith("train/")]) == sidecar["files"]["train"] == 240
    assert len([f for f in files if f.startswith("val/")]) == sidecar["files"]["val"] == 30
    assert [p.name for p in (root / "train").iterdir() if not any(p.iterdir())] == sidecar["empty_classes"]
    assert all(len(w) == 9 and w.startswith("n0") and w[1:].isdigit() for w in sidecar["all_wnids"])
    sizes = {Image.open(root / f).size for f in files if f.startswith("val/") and f.endswith(".JPEG")}
    assert len({w / h for w, h in sizes}) > 10 and all(48 <= s <= 96 for size in sizes for s in size)


def test_generator_takes_real_wnids_from_the_synset_list(shared_data, tmp_path):
    synsets = shared_data / "imagenet" / "meta" / "imagenet_synsets.txt"
    sidecar = generate_imagenet(str(tmp_path), classes=3, per_class=2, val_per_class=0, faults=0,
                                synsets=str(synsets))
    listed = set(synsets.read_text().split())
    assert len(sidecar["wnids"]) == 3 and set(sidecar["wnids"]) <= listed and not sidecar["empty_classes"]
    assert not (tmp_path / "val").exists()


def test_generated_classes_differ_in_their_statistics(synth):
    """Mean colour per class differs far more between classes than within (a CNN has something to learn)."""
    root, sidecar = synth
    faults = {root / p for paths in sidecar["fault_paths"].values() for p in paths}
    means = {w: [np.asarray(Image.open(p).convert("RGB"), np.float32).mean((0, 1))
                 for p in sorted((root / "train" / w).iterdir())[:15] if p not in faults] for w in sidecar["wnids"]}
    within = np.mean([np.std(m, axis=0).mean() for m in means.values()])
    between = np.std([np.mean(m, axis=0) for m in means.values()], axis=0).mean()
    assert between > within / 2


# --- the pipeline on the generated set -----------------------------------------------------------------


def test_counts_match_the_generator(synth, built):
    _, sidecar = synth
    manifest = load_manifest(str(built["tfrecord"]))
    expected = sidecar["expected"]
    assert manifest.rejected == expected["quarantined"]
    assert manifest.input_rows == 270 == manifest.written_rows + sum(manifest.rejected.values())
    assert manifest.extra["repairs"] == expected["repairs"]
    assert manifest.extra["grayscale"] == expected["grayscale"]
    assert manifest.extra["classes"] == sidecar["all_wnids"]
    assert manifest.extra["label_offset"] == 0 and manifest.extra["num_outputs"] == 7
    assert manifest.extra["eval_source"] == "val"
    counts = manifest.extra["class_counts"]
    assert sum(counts["eval"].values()) == expected["written"]["val"]
    assert sum(sum(counts[f"train/{g}"].values()) for g in (0, 1)) == expected["written"]["train"]
    inputs = {i["source"]: i["rows"] for i in manifest.inputs}
    assert inputs[f"train/{sidecar['empty_classes'][0]}"] == 0
    assert manifest.extra["synth"] if "synth" in manifest.extra else True
    assert manifest.extra["image_bytes"]["source"] > 0 and manifest.extra["image_bytes"]["stored"] > 0


def test_every_fault_is_quarantined_or_repaired(synth, built):
    _, sidecar = synth
    records = read_records(built["tfrecord"])
    rejected = {r["source"]: r for r in read_rejected_tree(built["tfrecord"])}
    for kind, paths in sidecar["fault_paths"].items():
        for path in paths:
            if kind in ("zero_byte", "text", "truncated", "corrupt"):
                reason = {"zero_byte": "empty", "text": "not_an_image"}.get(kind, kind)
                assert rejected[path]["reason"] == reason and rejected[path]["detail"], (kind, rejected[path])
                assert path not in records
                continue
            row = records[path]
            image = Image.open(io.BytesIO(row["image"]))
            assert image.format == "JPEG" and row["format"] == b"JPEG"
            repairs = {"png": b"png_to_jpeg", "cmyk": b"cmyk_to_rgb", "png16": b"png_to_jpeg,16bit_to_8bit",
                       "grayscale": b""}[kind]
            assert row["repairs"] == repairs, kind
            mode = "L" if kind in ("png16", "grayscale") else "RGB"
            assert image.mode == mode and row["channels"] == (1 if mode == "L" else 3)
            assert row["colorspace"] == (b"Grayscale" if mode == "L" else b"RGB")
    # a 16-bit image is scaled to 8 bits, not clipped: it is not all white
    assert np.asarray(Image.open(io.BytesIO(records[sidecar["fault_paths"]["png16"][0]]["image"]))).mean() < 250


def read_rejected_tree(root) -> list[dict]:
    out = []
    for path in sorted(Path(root, "rejected").rglob("*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines()]
    assert all(set(r) == {"source", "line", "reason", "detail", "raw"} and r["raw"] == "" for r in out)
    return out


def test_kept_images_are_the_original_bytes(synth, built):
    root, sidecar = synth
    records = read_records(built["tfrecord"])
    repaired = {p for k in ("png", "cmyk", "png16") for p in sidecar["fault_paths"][k]}
    kept = [key for key in records if key not in repaired]
    assert len(kept) == len(records) - len(repaired)
    for key in kept:
        row = records[key]
        assert row["image"] == (root / key).read_bytes()
        assert row["repairs"] == b"" and row["filename"] == Path(key).name.encode()
        width, height = Image.open(root / key).size
        assert (row["width"], row["height"]) == (width, height)


def test_labels_follow_the_sorted_folder_names(synth, built):
    root, sidecar = synth
    classes = sidecar["all_wnids"]
    assert (built["tfrecord"] / "classes.txt").read_text().split() == classes
    val_labels = dict(line.split(",")[0:1] + [line.split(",")[1].split()[0]]
                      for line in (root / "LOC_val_solution.csv").read_text().splitlines()[1:])
    for key, row in read_records(built["tfrecord"]).items():
        wnid = key.split("/")[1] if key.startswith("train/") else val_labels[Path(key).stem]
        assert row["synset"] == wnid.encode() and row["label"] == classes.index(wnid), key


def test_val_folder_is_the_eval_split_and_groups_are_disjoint(built):
    records = read_records(built["tfrecord"])
    assert {k for k, r in records.items() if r["split"] == "eval"} == {k for k in records if k.startswith("val/")}
    groups = collections.Counter(r["group"] for r in records.values() if r["split"] == "train")
    assert set(groups) == {0, 1} and min(groups.values()) > 80
    assert verify_dataset(str(built["tfrecord"])).ok


def test_same_bytes_on_every_run_and_worker_count(built):
    one, two = built["tfrecord"], built["tfrecord2"]
    assert shard_bytes(str(one)) == shard_bytes(str(two))
    for path in ["classes.txt"] + [p for p in list_files(str(one)) if p.startswith("idx/")]:
        assert read_bytes(join(str(one), path)) == read_bytes(join(str(two), path)), path
    assert not [p for p in list_files(str(one)) if ".pieces" in p or ".tmp-" in p]


def test_both_formats_hold_the_same_records(built):
    tf, web = read_records(built["tfrecord"]), read_records(built["webdataset"])
    assert tf.keys() == web.keys()
    for key, row in tf.items():
        other = web[key]
        for name in SCHEMA:
            assert row[name] == other[name], (key, name)
        assert (row["split"], row["group"]) == (other["split"], other["group"])
    assert verify_dataset(str(built["webdataset"])).ok


def test_no_shard_is_sorted_by_class(built):
    manifest = load_manifest(str(built["tfrecord"]))
    classes = len(manifest.extra["classes"]) - 1  # one is the empty folder
    for shard in manifest.shards:
        labels = np.concatenate([b["label"] for b in read_shard(join(str(built["tfrecord"]), shard.path),
                                                                  manifest.features, manifest.format)])
        share = np.bincount(labels).max() / len(labels)
        assert share < 2.5 / classes, (shard.path, share)
        assert (np.diff(labels) != 0).mean() > 0.6, shard.path  # class-sorted would change label < 7 times


def test_tfrecord_package_reads_the_converter_fields(built):
    manifest = load_manifest(str(built["tfrecord"]))
    description = {"image/encoded": "byte", "image/format": "byte", "image/class/label": "int",
                   "image/class/synset": "byte", "image/height": "int", "image/width": "int",
                   "image/channels": "int", "image/colorspace": "byte", "image/filename": "byte",
                   "image/key": "byte"}
    for shard in manifest.shards:
        url = join(str(built["tfrecord"]), shard.path)
        ours = [row for b in read_shard(url, manifest.features, "tfrecord") for row in unblock(b)]
        theirs = list(tfrecord_loader(url, None, description))
        assert len(theirs) == len(ours) == shard.records
        for record, row in zip(theirs, ours):
            assert bytes(record["image/encoded"]) == row["image"]
            assert int(record["image/class/label"][0]) == row["label"]
            assert bytes(record["image/class/synset"]) == row["synset"]
            assert (int(record["image/height"][0]), int(record["image/width"][0])) == (row["height"], row["width"])
            assert Image.open(io.BytesIO(bytes(record["image/encoded"]))).size == (row["width"], row["height"])


def unblock(block) -> list[dict]:
    return [{name: block[name][i] for name in block} for i in range(len(block["key"]))]


def test_dali_index_seeks_to_every_record(built):
    manifest = load_manifest(str(built["tfrecord"]))
    assert manifest.extra["indexes"]["dali"] == [dali_index_path(s.path) for s in manifest.shards]
    for shard in manifest.shards:
        data = read_bytes(join(str(built["tfrecord"]), shard.path))
        entries = [tuple(map(int, line.split())) for line in
                   (built["tfrecord"] / dali_index_path(shard.path)).read_text().splitlines()]
        assert len(entries) == shard.records and sum(size for _, size in entries) == len(data)
        for offset, size in entries:
            (payload,) = list(iter_tfrecord(io.BytesIO(data[offset:offset + size])))
            assert payload


def test_webdataset_reads_the_tars_and_wids_lists_them(built):
    root = built["webdataset"]
    manifest = load_manifest(str(root))
    records = read_records(root)
    lists = manifest.extra["indexes"]["wids"]
    assert lists == ["eval.wids.json", "train-0.wids.json", "train-1.wids.json"]
    listed = {}
    for name in lists:
        spec = json.loads((root / name).read_text())
        assert spec["__kind__"] == "wids-shard-index-v1" and spec["wids_version"] == 1
        listed |= {s["url"]: s["nsamples"] for s in spec["shardlist"]}
    assert listed == {s.path: s.records for s in manifest.shards}
    seen = 0
    for shard in manifest.shards:
        for sample in wds.WebDataset(str(root / shard.path), shardshuffle=False):
            assert "." not in sample["__key__"]
            meta = json.loads(sample["json"])
            row = records[meta["key"]]
            assert sample["jpg"] == row["image"] and int(sample["cls"]) == row["label"]
            assert (meta["synset"], meta["width"], meta["height"]) == (row["synset"].decode(), row["width"],
                                                                        row["height"])
            seen += 1
    assert seen == manifest.written_rows


# --- conformance on the real ILSVRC images ---------------------------------------------------------------


@pytest.fixture(scope="module")
def real(shared_data, tmp_path_factory):
    imagenet = shared_data / "imagenet"
    assert len(list((imagenet / "train").glob("*/*.JPEG"))) == 13, "expected the 13 real images"
    out = tmp_path_factory.mktemp("real") / "data"
    run_imagenet(imagenet, out, synsets=str(imagenet / "meta" / "imagenet_synsets.txt"))
    return imagenet, out


def test_real_images_get_the_standard_labels(real):
    imagenet, out = real
    records = read_records(out)
    assert len(records) == 13
    assert {int(r["label"]): r["synset"].decode() for r in records.values()} == REAL_LABELS
    manifest = load_manifest(str(out))
    synsets = (imagenet / "meta" / "imagenet_synsets.txt").read_text().split()
    assert manifest.extra["classes"] == synsets and (out / "classes.txt").read_text().split() == synsets
    assert manifest.extra["eval_source"] == "train" and manifest.rejected == {}
    assert verify_dataset(str(out)).ok


def test_real_images_are_kept_byte_for_byte_and_grayscale_stays_grayscale(real):
    imagenet, out = real
    for key, row in read_records(out).items():
        assert row["image"] == (imagenet / key).read_bytes() and row["repairs"] == b""
        gray = row["synset"].decode() in REAL_GRAYSCALE
        assert row["channels"] == (1 if gray else 3) and row["colorspace"] == (b"Grayscale" if gray else b"RGB")
        assert Image.open(io.BytesIO(row["image"])).mode == ("L" if gray else "RGB")


def test_cli_label_offset_and_grayscale_to_rgb_on_real_images(shared_data, tmp_path):
    imagenet = shared_data / "imagenet"
    result = CliRunner().invoke(main, [
        "preprocess", "imagenet", "--input", str(imagenet), "--output", str(tmp_path / "out"), "--groups", "1",
        "--synsets", str(imagenet / "meta" / "imagenet_synsets.txt"), "--label-offset", "1", "--grayscale", "rgb",
        "--format", "webdataset", "--runner", "FnApiRunner"])
    assert result.exit_code == 0, result.output
    assert "13 rows read, 13 written, 0 rejected" in result.output
    records = read_records(tmp_path / "out")
    assert {int(r["label"]) - 1: r["synset"].decode() for r in records.values()} == REAL_LABELS
    manifest = load_manifest(str(tmp_path / "out"))
    assert manifest.extra["label_offset"] == 1 and manifest.extra["num_outputs"] == 1001
    assert manifest.extra["repairs"] == {"grayscale_to_rgb": 2}
    for row in records.values():
        assert row["channels"] == 3 and Image.open(io.BytesIO(row["image"])).mode == "RGB"


# --- validation layouts, eval from train, resize ---------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    generate_imagenet(str(root), classes=3, per_class=6, val_per_class=2, seed=1, min_size=40, max_size=90,
                      faults=0, val_layout="folders")
    return root


def test_val_in_class_folders(small, tmp_path):
    run_imagenet(small, tmp_path / "out")
    records = read_records(tmp_path / "out")
    evals = {k: r for k, r in records.items() if r["split"] == "eval"}
    assert len(evals) == 6 and all(k.split("/")[1] == r["synset"].decode() for k, r in evals.items())


def test_flat_val_with_a_tab_separated_label_file(small, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(small / "train", flat / "train")
    lines = []
    for path in sorted((small / "val").glob("*/*.JPEG")):
        (flat / "val").mkdir(exist_ok=True)
        shutil.copy(path, flat / "val" / path.name)
        lines.append(f"{path.name}\t{path.parent.name}\n")
    shutil.copy(path, flat / "val" / "ILSVRC2012_val_99999999.JPEG")  # not in the label file
    (tmp_path / "val.txt").write_text("".join(lines))
    manifest = run_imagenet(flat, tmp_path / "out", val_labels=str(tmp_path / "val.txt"))
    assert manifest.rejected == {"no_label": 1}
    evals = {k: r for k, r in read_records(tmp_path / "out").items() if r["split"] == "eval"}
    assert {Path(k).name: r["synset"].decode() for k, r in evals.items()} == dict(
        line.rstrip("\n").split("\t") for line in lines)


def test_flat_val_without_a_label_file_is_a_clear_error(small, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(small / "train", flat / "train")
    (flat / "val").mkdir()
    shutil.copy(next((small / "val").glob("*/*.JPEG")), flat / "val" / "x.JPEG")
    with pytest.raises(OSError, match="no label file"):  # FileNotFoundError, as the runner reports it
        run_imagenet(flat, tmp_path / "out")


def test_eval_from_train_when_asked_and_resize_never_enlarges(small, tmp_path):
    manifest = run_imagenet(small, tmp_path / "out", eval_source="train", resize_shorter=60)
    records = read_records(tmp_path / "out")
    assert not any(k.startswith("val/") for k in records) and manifest.extra["eval_source"] == "train"
    assert {r["split"] for r in records.values()} == {"eval", "train"}
    for key, row in records.items():
        width, height = Image.open(small / key).size
        if min(width, height) > 60:
            assert min(row["width"], row["height"]) == 60 and row["repairs"] == b"resized"
            assert Image.open(io.BytesIO(row["image"])).size == (row["width"], row["height"])
        else:
            assert row["image"] == (small / key).read_bytes() and row["repairs"] == b""
    assert manifest.extra["image_bytes"] == {"source": sum((small / k).stat().st_size for k in records),
                                             "stored": sum(len(r["image"]) for r in records.values())}


def test_folder_not_in_the_synset_list_is_a_clear_error(small, tmp_path):
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("".join(w + "\n" for w in sorted(p.name for p in (small / "train").iterdir())[:2]))
    with pytest.raises(ValueError, match="not in the synset list"):
        run_imagenet(small, tmp_path / "out", synsets=str(synsets))


# --- hostile inputs -------------------------------------------------------------------------------------


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a few hundred bytes on disk)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(
        b"IEND", b"")


def test_hostile_inputs_are_quarantined_and_nothing_good_is_lost(small, tmp_path):
    root = tmp_path / "hostile"
    shutil.copytree(small / "train", root / "train")
    wnid = sorted(p.name for p in (root / "train").iterdir())[0]
    folder = root / "train" / wnid
    good = sorted(folder.iterdir())[0]
    (folder / "link.JPEG").symlink_to(good)
    (folder / "outside.JPEG").symlink_to("/etc/hostname")
    os.mkfifo(folder / "fifo.JPEG")
    (folder / "nested").mkdir()
    (folder / "huge.JPEG").write_bytes(good.read_bytes() + b"\0" * 200_000)
    (folder / "bomb.JPEG").write_bytes(png_bomb(100_000, 100_000))
    (root / "train" / "stray.JPEG").write_bytes(good.read_bytes())
    with open(os.fsencode(folder) + b"/latin1-\xe9.JPEG", "wb") as f:  # a name that is not UTF-8
        f.write(good.read_bytes())
    manifest = run_imagenet(root, tmp_path / "out", max_image_bytes=100_000)
    assert manifest.rejected == {"symlink": 2, "not_a_regular_file": 2, "too_large": 1, "decompression_bomb": 1,
                                 "no_label": 1, "bad_file_name": 1}
    assert manifest.written_rows == 18 and manifest.input_rows == 18 + 8
    rejected = {r["source"]: r["reason"] for r in read_rejected_tree(tmp_path / "out")}
    assert rejected[f"train/{wnid}/fifo.JPEG"] == "not_a_regular_file"
    assert rejected[f"train/{wnid}/nested"] == "not_a_regular_file"
    assert rejected["train/stray.JPEG"] == "no_label"
    assert rejected[f"train/{wnid}/latin1-\\xe9.JPEG"] == "bad_file_name"
    assert verify_dataset(str(tmp_path / "out")).ok


def test_hostile_shards_fail_clearly(tmp_path):
    url = str(tmp_path / "huge.tfrecord")
    header = struct.pack("<Q", 1 << 40)
    from pipelines.formats import _masked_crc
    Path(url).write_bytes(header + _masked_crc(header) + b"x" * 100)
    with pytest.raises(ShardFormatError, match="record limit"):
        list(read_shard(url, SCHEMA, "tfrecord"))
    good = str(tmp_path / "ok.tar")
    block = {"key": np.array([b"k"]), "image": np.array([b"\xff" * 5000], object), "label": np.array([1]),
             **{n: np.array([b"x"]) for n in ("synset", "colorspace", "format", "filename", "repairs")},
             **{n: np.array([1]) for n in ("height", "width", "channels")}}
    write_shard(good, [block], SCHEMA, "webdataset", "p")
    with pytest.raises(ShardFormatError, match="record limit"):
        list(read_shard(good, SCHEMA, "webdataset", max_record_bytes=1000))
    assert len(next(read_shard(good, SCHEMA, "webdataset"))["key"]) == 1
    broken = str(tmp_path / "broken.tfrecord")
    Path(broken).write_bytes(frame_record(b"\x0a\x03abc"))
    with pytest.raises(ShardFormatError):
        list(read_shard(broken, SCHEMA, "tfrecord"))


def test_row_schema_round_trips_negative_ints_and_floats(tmp_path):
    schema = {"key": Feature("bytes", tfrecord="k", webdataset="json"),
              "blob": Feature("object", tfrecord="b", webdataset="bin"),
              "n": Feature("int64", tfrecord="n", webdataset="cls"),
              "x": Feature("float32", tfrecord="x", webdataset="json")}
    blobs = np.empty(3, object)
    blobs[:] = [b"", b"\x00\x01", b"z" * 300]
    block = {"key": np.array([b"a", b"b", b"c"]), "blob": blobs, "n": np.array([-(2**63), -1, 2**63 - 1]),
             "x": np.array([0.5, -1.25, 3.0], np.float32)}
    for fmt in ("tfrecord", "webdataset"):
        url = str(tmp_path / f"s.{fmt}")
        write_shard(url, [block], schema, fmt, "p")
        (got,) = list(read_shard(url, schema, fmt))
        for name in schema:
            assert got[name].tolist() == block[name].tolist(), (fmt, name)
    with pytest.raises(ValueError, match="one-row-per-record"):
        write_shard(str(tmp_path / "bad"), [block], {**schema, "y": Feature("int64")}, "tfrecord", "p")


# --- config and CLI ---------------------------------------------------------------------------------------


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="data.imagenet.jpeg_quality"):
        imagenet_config("x", "y", jpeg_quality=80)
    with pytest.raises(ConfigError, match="data.imagenet.label_offset"):
        imagenet_config("x", "y", label_offset=-1)
    with pytest.raises(ConfigError, match="data.imagenet.grayscale"):
        imagenet_config("x", "y", grayscale="gray")


def test_cli_synth_then_preprocess_from_the_tiny_manifest(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["synth", "imagenet", "--classes", "3", "--per-class", "12", "--out",
                                  str(tmp_path / "raw"), "--val-per-class", "2", "--max-size", "72"])
    assert result.exit_code == 0, result.output
    assert "quarantine 4" in result.output
    result = runner.invoke(main, ["preprocess", "imagenet", "-m", "imagenet-tiny", "--input", str(tmp_path / "raw"),
                                  "--output", str(tmp_path / "out"), "--runner", "FnApiRunner"])
    assert result.exit_code == 0, result.output
    assert "42 rows read, 38 written, 4 rejected" in result.output
    assert verify_dataset(str(tmp_path / "out")).ok


def test_memory_file_system_in_and_out(memory_root):
    raw, out = f"{memory_root}/raw", f"{memory_root}/out"
    sidecar = generate_imagenet(raw, classes=2, per_class=8, val_per_class=1, seed=2, min_size=32, max_size=48)
    manifest = run_imagenet(raw, out, "webdataset")
    assert manifest.rejected == sidecar["expected"]["quarantined"]
    assert manifest.written_rows == sidecar["expected"]["written"]["train"] + 2
    assert manifest.extra["classes"] == sidecar["all_wnids"]
    assert verify_dataset(out).ok


def test_other_formats_and_modes_are_repaired_by_content(small, tmp_path):
    root = tmp_path / "formats"
    shutil.copytree(small / "train", root / "train")
    folder = next(p for p in sorted((root / "train").iterdir()))
    rgb = Image.open(next(folder.iterdir())).convert("RGB")
    turned = [rgb.transpose(t) for t in (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM,
                                         Image.Transpose.ROTATE_180)]  # distinct pictures: no duplicates
    files = {"rgba.JPEG": ("PNG", rgb.convert("RGBA"), {}), "palette.JPEG": ("GIF", turned[0].convert("P"), {}),
             "bmp.JPEG": ("BMP", turned[1], {}), "two-pictures.JPEG": ("MPO", turned[2], {"save_all": True,
                                                                                       "append_images": [rgb]})}
    for name, (fmt, image, options) in files.items():
        image.save(folder / name, fmt, **options)
    manifest = run_imagenet(root, tmp_path / "out")
    assert manifest.rejected == {}
    records = read_records(tmp_path / "out")
    key = f"train/{folder.name}"
    assert records[f"{key}/rgba.JPEG"]["repairs"] == b"png_to_jpeg,rgba_to_rgb"
    assert records[f"{key}/palette.JPEG"]["repairs"] == b"gif_to_jpeg,p_to_rgb"
    assert records[f"{key}/bmp.JPEG"]["repairs"] == b"bmp_to_jpeg"
    # An MPO file keeps its first picture, cut losslessly at its end-of-image marker, without the index of
    # the pictures that followed it: a plain JPEG whose pixels are the first picture's.
    mpo = records[f"{key}/two-pictures.JPEG"]
    source = (folder / "two-pictures.JPEG").read_bytes()
    assert mpo["repairs"] == b"trailing_bytes_removed" and len(mpo["image"]) < len(source)
    stored = Image.open(io.BytesIO(mpo["image"]))
    assert stored.format == "JPEG" and np.array_equal(np.asarray(stored), np.asarray(Image.open(io.BytesIO(source))))
    for name in files:
        assert Image.open(io.BytesIO(records[f"{key}/{name}"]["image"])).format == "JPEG"


def test_verify_catches_stale_indexes(built, tmp_path):
    tf, web = tmp_path / "tf", tmp_path / "web"
    shutil.copytree(built["tfrecord"], tf)
    shutil.copytree(built["webdataset"], web)
    manifest = load_manifest(str(tf))
    idx = tf / manifest.extra["indexes"]["dali"][1]
    idx.write_text(idx.read_text().replace(" ", " 1", 1))
    spec = json.loads((web / "train-0.wids.json").read_text())
    spec["shardlist"][0]["nsamples"] += 1
    (web / "train-0.wids.json").write_text(json.dumps(spec))
    assert [p for p in verify_dataset(str(tf)).problems if "record offsets do not match" in p]
    assert [p for p in verify_dataset(str(web)).problems if "sample counts listed differ" in p]


def test_listing_and_task_planning_transforms(small):
    """ListFolder -> AssignShards -> GroupByKey -> plan_tasks: every file in one task, tasks in key-hash order."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipelines.imagenet import AssignShards, plan_tasks
    from pipelines.imagenet_input import ListInput, plan_input
    from pipelines.sharding import ShardLayout, string_hash

    config = imagenet_config(str(small), "unused", eval_source="train")
    plan = plan_input(str(small), config.data.imagenet)
    layout = ShardLayout("imagenet", "tfrecord", 2, 2, 1, 0.2)
    expected_keys = sorted(p.relative_to(small).as_posix() for p in (small / "train").glob("*/*"))

    def summary(task):
        dest, index, files = task
        hashes = [string_hash(f.key, 3) for f in files]
        return dest, index, hashes == sorted(hashes), [f.key for f in files]

    with TestPipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        listed = (p | beam.Create([f for f in plan.listings if f.split == "train"])
                  | beam.ParDo(ListInput(str(small), {})).with_outputs("inputs", main="files"))
        tasks = (listed.files | beam.ParDo(AssignShards(layout, 3, False)) | beam.GroupByKey()
                 | beam.FlatMapTuple(lambda dest, batches: plan_tasks(dest, batches, 4)) | beam.Map(summary))
        keys = tasks | "Keys" >> beam.FlatMap(lambda t: t[3])
        assert_that(keys, equal_to(expected_keys), label="EveryFileOnce")
        assert_that(tasks | beam.Map(lambda t: t[2]) | beam.Distinct(), equal_to([True]), label="HashOrder")
        assert_that(listed.inputs, equal_to([("train", 0)] + [(f"train/{w}", 6) for w in plan.classes]),
                    label="InputCounts")


def test_label_files_parse_both_formats_and_bad_ones_fail_clearly(tmp_path):
    from pipelines.imagenet_input import read_val_labels

    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text("ImageId,PredictionString\nILSVRC2012_val_00000002,n01 1 2 3 4 n01 5 6 7 8 \n"
                      "ILSVRC2012_val_00000001,n02 1 2 3 4 \n")
    assert read_val_labels(str(kaggle)) == {"ILSVRC2012_val_00000002": "n01", "ILSVRC2012_val_00000001": "n02"}
    tsv = tmp_path / "val.txt"
    tsv.write_text("a.JPEG\tn01\n\nb.JPEG\tn02\n")
    assert read_val_labels(str(tsv)) == {"a": "n01", "b": "n02"}
    tsv.write_text("a.JPEG\tn01\na.JPEG\tn02\n")
    with pytest.raises(ValueError, match=":2: a labelled both n01 and n02"):
        read_val_labels(str(tsv))
    tsv.write_text("a.JPEG n01\n")
    with pytest.raises(ValueError, match=r"val.txt:1: expected filename<TAB>wnid"):
        read_val_labels(str(tsv))
