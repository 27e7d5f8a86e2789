"""ImageNet as users have it: the archives as downloaded (train tar of class tars, flat val tar, devkit), the
extracted folders and Kaggle's layout, each built in miniature from the 13 real ILSVRC images; the damaged
and hostile versions of each; junk folders; strict JPEG checks; exact duplicates across splits."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy.io import savemat

from codistill.cli import main
from codistill.dataset import load_manifest
from codistill.datasets.imagenet import ImageNetConfig
from codistill.verify import verify_dataset
from pipelines import jpeg
from pipelines.imagenet import Quarantine, check_image
from pipelines.imagenet_input import ArchiveError, plan_input, read_val_labels

from conftest import shard_bytes
from test_imagenet_pipeline import MULTI, read_records, read_rejected_tree, run_imagenet
from test_verify_cli import rewrite_shard

MEMBER_SIZE_FIELD = slice(124, 136)  # a ustar header's size (octal) and checksum fields
CHECKSUM_FIELD = slice(148, 156)


# --- the miniature data set -------------------------------------------------------------------------


def variant(data: bytes, step: int) -> bytes:
    """Another real picture: the image cropped by `step` pixels per side, re-encoded (distinct bytes)."""
    image = Image.open(io.BytesIO(data))
    out = io.BytesIO()
    image.crop((step, step, image.width - step, image.height - step)).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def imagenet(shared_data) -> dict:
    """Per class: two train images (the real one and a crop of it) and one val image (another crop)."""
    folder = shared_data / "imagenet"
    real = {p.parent.name: p.read_bytes() for p in sorted((folder / "train").glob("*/*.JPEG"))}
    assert len(real) == 13, "expected the 13 real images"
    wnids = sorted(real)
    train = {w: {f"{w}_1.JPEG": real[w], f"{w}_2.JPEG": variant(real[w], 4)} for w in wnids}
    val = {f"ILSVRC2012_val_{i:08d}.JPEG": (w, variant(real[w], 9)) for i, w in enumerate(reversed(wnids), 1)}
    synsets = (folder / "meta" / "imagenet_synsets.txt").read_text().split()
    return {"train": train, "val": val, "synsets": synsets, "synsets_file": folder / "meta" / "imagenet_synsets.txt",
            "lemmas": folder / "meta" / "imagenet_synset_to_lemma.txt"}


def tar_bytes(members: list[tuple[str, bytes]], gz: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gz else "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_300_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def ilsvrc_ids(synsets: list[str]) -> dict[str, int]:
    """The devkit numbers classes in its own order (ID 1 is not the first sorted wnid): a fixed shuffle."""
    order = np.random.default_rng(2012).permutation(len(synsets))
    return {synsets[i]: rank + 1 for rank, i in enumerate(order)}


def meta_mat(synsets: list[str]) -> bytes:
    """`data/meta.mat` in the devkit's structure: a `synsets` struct array, the 1000 leaves first (IDs 1-1000),
    then inner WordNet nodes (num_children > 0)."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    ids = ilsvrc_ids(synsets)
    rows = [(np.uint16(ids[w]), w, f"class {w}", "a leaf", np.uint8(0), np.zeros((1, 0), np.uint8), np.uint8(0),
             np.uint16(1300)) for w in sorted(synsets, key=ids.get)]
    rows += [(np.uint16(1000 + i), f"n0000000{i}", "entity", "an inner node", np.uint8(2),
              np.array([[1, 2]], np.uint16), np.uint8(i), np.uint16(0)) for i in (1, 2)]
    out = io.BytesIO()
    savemat(out, {"synsets": np.array(rows, dtype=[(f, "O") for f in fields]).reshape(-1, 1)})
    return out.getvalue()


def ground_truth(imagenet: dict) -> str:
    ids = ilsvrc_ids(imagenet["synsets"])
    return "".join(f"{ids[wnid]}\n" for _, (wnid, _) in sorted(imagenet["val"].items()))


def write_downloaded(root: Path, imagenet: dict, devkit: bytes | None = None) -> Path:
    """The three files as downloaded from image-net.org."""
    root.mkdir(parents=True)
    (root / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes(
        [(f"{w}.tar", tar_bytes(sorted(files.items()))) for w, files in imagenet["train"].items()]))
    (root / "ILSVRC2012_img_val.tar").write_bytes(tar_bytes([(n, d) for n, (_, d) in sorted(imagenet["val"].items())]))
    (root / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(devkit if devkit is not None else tar_bytes(
        [("ILSVRC2012_devkit_t12/readme.txt", b"devkit"),
         ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", ground_truth(imagenet).encode()),
         ("ILSVRC2012_devkit_t12/data/meta.mat", meta_mat(imagenet["synsets"]))], gz=True))
    return root


def write_folders(root: Path, imagenet: dict) -> Path:
    """train/<wnid>/* and a flat val/ folder (labels come from elsewhere)."""
    for wnid, files in imagenet["train"].items():
        (root / "train" / wnid).mkdir(parents=True)
        for name, data in files.items():
            (root / "train" / wnid / name).write_bytes(data)
    (root / "val").mkdir()
    for name, (_, data) in imagenet["val"].items():
        (root / "val" / name).write_bytes(data)
    return root


def kaggle_val_csv(imagenet: dict) -> str:
    return "ImageId,PredictionString\n" + "".join(f"{n[:-5]},{w} 10 20 200 300 {w} 1 2 3 4\n"
                                                  for n, (w, _) in sorted(imagenet["val"].items()))


def write_kaggle(root: Path, imagenet: dict) -> Path:
    """Kaggle's imagenet-object-localization-challenge: images under ILSVRC/Data/CLS-LOC, labels at the root."""
    write_folders(root / "ILSVRC" / "Data" / "CLS-LOC", imagenet)
    (root / "LOC_val_solution.csv").write_text(kaggle_val_csv(imagenet))
    lemmas = dict(line.split("\t", 1) for line in imagenet["lemmas"].read_text().splitlines())
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {lemmas[w]}\n" for w in imagenet["synsets"]))
    return root


def expected_labels(imagenet: dict, classes: list[str]) -> dict[str, tuple[int, str]]:
    keys = {f"train/{w}/{n}": w for w, files in imagenet["train"].items() for n in files}
    keys |= {f"val/{n}": w for n, (w, _) in imagenet["val"].items()}
    return {k: (classes.index(w), w) for k, w in keys.items()}


# --- the three layouts --------------------------------------------------------------------------------


def test_downloaded_extracted_and_kaggle_layouts_give_the_same_dataset(imagenet, tmp_path):
    downloaded = write_downloaded(tmp_path / "downloaded", imagenet)
    extracted = write_folders(tmp_path / "extracted", imagenet)
    (extracted / "LOC_val_solution.csv").write_text(kaggle_val_csv(imagenet))
    kaggle = write_kaggle(tmp_path / "kaggle", imagenet)
    synsets = str(imagenet["synsets_file"])
    built = {"downloaded": run_imagenet(downloaded, tmp_path / "out-downloaded", beam_args=MULTI, synsets=synsets),
             "extracted": run_imagenet(extracted, tmp_path / "out-extracted", synsets=synsets),
             "kaggle": run_imagenet(kaggle, tmp_path / "out-kaggle")}  # labels from LOC_synset_mapping.txt
    reference = shard_bytes(str(tmp_path / "out-downloaded"))
    for name, manifest in built.items():
        assert shard_bytes(str(tmp_path / f"out-{name}")) == reference, name
        assert manifest.input_rows == manifest.written_rows == 39 and manifest.rejected == {}
        assert manifest.extra["classes"] == imagenet["synsets"] and manifest.extra["eval_source"] == "val"
        assert verify_dataset(str(tmp_path / f"out-{name}")).ok
    extra = {name: m.extra for name, m in built.items()}
    assert extra["downloaded"]["sources"] == {"train": "ILSVRC2012_img_train.tar", "val": "ILSVRC2012_img_val.tar"}
    assert extra["downloaded"]["val_labels_from"] == "ILSVRC2012_devkit_t12.tar.gz"
    assert extra["kaggle"]["sources"] == {"train": "ILSVRC/Data/CLS-LOC/train/", "val": "ILSVRC/Data/CLS-LOC/val/"}
    assert extra["kaggle"]["val_labels_from"] == "LOC_val_solution.csv"
    assert extra["kaggle"]["classes_from"] == "LOC_synset_mapping.txt" and extra["extracted"]["classes_from"] == synsets
    # Kaggle's image folder given as the input: the label files are found three levels up, where Kaggle puts them
    plan = plan_input(str(kaggle / "ILSVRC" / "Data" / "CLS-LOC"), ImageNetConfig())
    assert plan.classes == tuple(imagenet["synsets"]) and plan.facts["classes_from"] == "LOC_synset_mapping.txt"
    assert plan.val_labels == {n[:-5]: w for n, (w, _) in imagenet["val"].items()}
    records = read_records(tmp_path / "out-downloaded")
    labels = expected_labels(imagenet, imagenet["synsets"])
    assert {k: (int(r["label"]), r["synset"].decode()) for k, r in records.items()} == labels
    assert {k for k, r in records.items() if r["split"] == "eval"} == {f"val/{n}" for n in imagenet["val"]}
    for key, row in records.items():
        wnid, _, name = key.removeprefix("train/").partition("/")
        source = imagenet["val"][key[4:]][1] if key.startswith("val/") else imagenet["train"][wnid][name]
        assert row["image"] == source and row["repairs"] == b""


def test_without_a_list_the_classes_are_the_sorted_class_tars_and_the_manifest_says_so(imagenet, tmp_path):
    root = write_downloaded(tmp_path / "in", imagenet)
    (root / "ILSVRC2012_img_val.tar").unlink()
    manifest = run_imagenet(root, tmp_path / "out")
    wnids = sorted(imagenet["train"])
    assert manifest.extra["classes"] == wnids and (tmp_path / "out" / "classes.txt").read_text().split() == wnids
    assert manifest.extra["classes_from"] == "the sorted train class names"
    assert manifest.extra["eval_source"] == "train" and manifest.written_rows == 26
    assert {int(r["label"]) for r in read_records(tmp_path / "out").values()} == set(range(13))


def test_val_labels_in_every_format_and_the_flag(imagenet, tmp_path):
    want = {n[:-5]: w for n, (w, _) in imagenet["val"].items()}
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text(ground_truth(imagenet))
    (devkit / "meta.mat").write_bytes(meta_mat(imagenet["synsets"]))
    (tmp_path / "LOC_val_solution.csv").write_text(kaggle_val_csv(imagenet))
    archive = write_downloaded(tmp_path / "dl", imagenet) / "ILSVRC2012_devkit_t12.tar.gz"
    for url in (devkit / "ILSVRC2012_validation_ground_truth.txt", devkit.parent, archive,
                tmp_path / "LOC_val_solution.csv"):
        assert read_val_labels(str(url)) == want, url
    # the flag, with the devkit extracted somewhere else than the input
    root = write_folders(tmp_path / "in", imagenet)
    result = CliRunner().invoke(main, [
        "preprocess", "imagenet", "--input", str(root), "--output", str(tmp_path / "out"), "--runner", "FnApiRunner",
        "--val-labels", str(devkit.parent)])
    assert result.exit_code == 0, result.output
    assert "39 rows read, 39 written, 0 rejected" in result.output
    assert load_manifest(str(tmp_path / "out")).extra["val_labels_from"] == str(devkit.parent)


def test_devkit_faults_are_clear_errors(imagenet, tmp_path):
    synsets = imagenet["synsets"]
    no_truth = tar_bytes([("ILSVRC2012_devkit_t12/data/meta.mat", meta_mat(synsets))], gz=True)
    cases = {
        # FileNotFoundError, as preprocess reports it (an OSError)
        "no_ground_truth": (no_truth, OSError, "tar.gz: no data/ILSVRC2012_validation_ground_truth.txt in the"),
        "unknown_id": (tar_bytes([("d/data/ILSVRC2012_validation_ground_truth.txt", b"1\n5000\n"),
                                  ("d/data/meta.mat", meta_mat(synsets))], gz=True), ValueError,
                       r"ground_truth.txt:2: '5000' is not an ILSVRC2012 ID"),
        "not_a_number": (tar_bytes([("d/data/ILSVRC2012_validation_ground_truth.txt", b"1\nn01440764\n"),
                                    ("d/data/meta.mat", meta_mat(synsets))], gz=True), ValueError,
                         "'n01440764' is not an ILSVRC2012 ID"),
        "garbage_meta": (tar_bytes([("d/data/ILSVRC2012_validation_ground_truth.txt", b"1\n"),
                                    ("d/data/meta.mat", b"MATLAB 5.0 nonsense" * 20)], gz=True), ValueError,
                         "not the devkit's synset table"),
        "not_gzip": (b"\x1f\x8b" + b"\0" * 100, ArchiveError, "not a readable devkit archive"),
    }
    for name, (devkit, error, message) in cases.items():
        root = write_downloaded(tmp_path / name, imagenet, devkit)
        with pytest.raises(error, match=message):
            run_imagenet(root, tmp_path / f"out-{name}")
    alone = tmp_path / "alone" / "ILSVRC2012_validation_ground_truth.txt"  # IDs without meta.mat beside them
    alone.parent.mkdir()
    alone.write_text("1\n")
    with pytest.raises(FileNotFoundError, match="meta.mat"):
        read_val_labels(str(alone))


# --- damaged and hostile archives ---------------------------------------------------------------------


def patched_size(data: bytes, member: int, size: int) -> bytes:
    """The tar with member #`member`'s declared size replaced (its header checksum made valid again)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offset = tar.getmembers()[member].offset
    header = bytearray(data[offset:offset + 512])
    header[MEMBER_SIZE_FIELD] = b"%011o\0" % size
    header[CHECKSUM_FIELD] = b" " * 8
    header[CHECKSUM_FIELD] = b"%06o\0 " % sum(header)
    return data[:offset] + bytes(header) + data[offset + 512:]


def test_damaged_archives_stop_the_run_naming_the_archive(imagenet, tmp_path):
    train = write_downloaded(tmp_path / "good", imagenet) / "ILSVRC2012_img_train.tar"
    data = train.read_bytes()
    with tarfile.open(train) as tar:
        members = tar.getmembers()
    last_inner_end = members[-1].offset_data + members[-1].size
    first_inner = tar_bytes(sorted(imagenet["train"][members[0].name[:-4]].items()))
    cut_inner = tar_bytes([(members[0].name, first_inner[:len(first_inner) // 2])] + [
        (m.name, data[m.offset_data:m.offset_data + m.size]) for m in members[1:]])
    huge_inner = tar_bytes([(members[0].name, patched_size(first_inner, 1, (8 << 30) - 1))] + [
        (m.name, data[m.offset_data:m.offset_data + m.size]) for m in members[1:]])
    cases = {  # name: (file, bytes, message)
        "outer_cut_inside_a_member": ("train", data[:members[-1].offset_data + 5000],
                                      "declares .* past the archive's end"),
        "outer_cut_between_members": ("train", data[:last_inner_end], "no end-of-archive marker"),
        "outer_huge_declared_size": ("train", patched_size(data, 3, (8 << 30) - 1), "8589934591 bytes, past"),
        "outer_empty": ("train", b"", "not a readable tar"),
        "outer_garbage_header": ("train", data[:members[2].offset] + b"\x07" * 512 + data[members[2].offset + 512:],
                                 "no end-of-archive marker at byte"),
        "inner_truncated": ("train", cut_inner, r"ILSVRC2012_img_train.tar \(its member n01440764.tar\): "),
        "inner_huge_declared_size": ("train", huge_inner, r"n01440764.tar\): member 'n01440764_2.JPEG' at byte"),
        "val_truncated": ("val", (train.parent / "ILSVRC2012_img_val.tar").read_bytes()[:30_000],
                          "ILSVRC2012_img_val.tar"),
    }
    for name, (which, content, message) in cases.items():
        root = write_downloaded(tmp_path / name, imagenet)
        (root / f"ILSVRC2012_img_{which}.tar").write_bytes(content)
        with pytest.raises(ArchiveError, match=message):
            run_imagenet(root, tmp_path / f"out-{name}")


def special_member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = kind, linkname, 1_300_000_000
    return info


def test_hostile_members_are_quarantined_and_junk_skipped(imagenet, tmp_path):
    wnid = "n01440764"
    files = sorted(imagenet["train"][wnid].items())
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files + [("../../escape.JPEG", files[0][1]), ("new\nline.JPEG", files[0][1]),
                                   ("big.JPEG", b"\xff\xd8" + b"\0" * 300_000),
                                   ("sub/deeper.JPEG", variant(files[1][1], 3))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.addfile(special_member("link.JPEG", tarfile.SYMTYPE, "/etc/passwd"))
        tar.addfile(special_member("hard.JPEG", tarfile.LNKTYPE, files[0][0]))
        tar.addfile(special_member("tty.JPEG", tarfile.CHRTYPE))
        tar.addfile(special_member("fifo.JPEG", tarfile.FIFOTYPE))
        tar.addfile(special_member("folder", tarfile.DIRTYPE))
    others = [(f"{w}.tar", tar_bytes(sorted(f.items()))) for w, f in imagenet["train"].items() if w != wnid]
    root = write_downloaded(tmp_path / "in", imagenet)
    (root / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes(
        [(f"{wnid}.tar", inner.getvalue()), ("README.txt", b"not an image"), ("._n01440764.tar", b"AppleDouble"),
         ("__MACOSX/._n01443537.tar", b"AppleDouble")] + others))
    manifest = run_imagenet(root, tmp_path / "out", max_image_bytes=200_000)
    assert manifest.rejected == {"bad_file_name": 2, "symlink": 1, "not_a_regular_file": 4, "too_large": 1,
                                 "no_label": 1}
    assert manifest.written_rows == 39 + 1 and manifest.input_rows == 40 + 9  # sub/deeper.JPEG is an image
    assert set(manifest.extra["skipped"]) == {"train/._n01440764.tar", "train/__MACOSX/._n01443537.tar"}
    rejected = {r["source"]: r["reason"] for r in read_rejected_tree(tmp_path / "out")}
    assert rejected[f"train/{wnid}/..\\x2f..\\x2fescape.JPEG"] == "bad_file_name"
    assert rejected[f"train/{wnid}/new\\x0aline.JPEG"] == "bad_file_name"
    assert rejected[f"train/{wnid}/hard.JPEG"] == rejected["train/n01440764/tty.JPEG"] == "not_a_regular_file"
    assert rejected["train/README.txt"] == "no_label"
    assert not list(tmp_path.glob("**/escape.JPEG*")) and verify_dataset(str(tmp_path / "out")).ok


# --- class folder names ----------------------------------------------------------------------------------


def test_junk_folders_are_skipped_and_other_names_refused_unless_allowed(imagenet, tmp_path):
    root = write_folders(tmp_path / "in", imagenet)
    (root / "LOC_val_solution.csv").write_text(kaggle_val_csv(imagenet))
    some = next(iter(imagenet["train"]["n01440764"].values()))
    for junk in (".ipynb_checkpoints", "__MACOSX", "lost+found", ".Trash-1000"):
        (root / "train" / junk).mkdir()
        (root / "train" / junk / "x.JPEG").write_bytes(some)
    (root / "val" / ".ipynb_checkpoints").mkdir()
    manifest = run_imagenet(root, tmp_path / "out")
    assert manifest.extra["classes"] == sorted(imagenet["train"])  # label 0 is still n01440764
    assert sorted(manifest.extra["skipped"]) == ["train/.Trash-1000", "train/.ipynb_checkpoints", "train/__MACOSX",
                                                  "train/lost+found", "val/.ipynb_checkpoints"]
    assert manifest.input_rows == manifest.written_rows == 39
    (root / "train" / "cats").mkdir()
    (root / "train" / "cats" / "x.JPEG").write_bytes(variant(some, 20))
    with pytest.raises(ValueError, match="not named as ImageNet wnids .*cats.*--any-class-names"):
        run_imagenet(root, tmp_path / "refused")
    result = CliRunner().invoke(main, ["preprocess", "imagenet", "--input", str(root), "--output",
                                       str(tmp_path / "allowed"), "--runner", "FnApiRunner", "--any-class-names"])
    assert result.exit_code == 0, result.output
    assert "cats" in load_manifest(str(tmp_path / "allowed")).extra["classes"]
    archive = write_downloaded(tmp_path / "dl", imagenet)
    (archive / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes([("cats.tar", tar_bytes([("x.JPEG", some)]))]))
    with pytest.raises(ValueError, match="not named as ImageNet wnids .*cats"):
        run_imagenet(archive, tmp_path / "refused-tar")


# --- one image: damaged scans, bytes after the end, EXIF, names -------------------------------------------


def scan_bounds(data: bytes) -> tuple[int, int]:
    """(start, end) of the entropy-coded data of a baseline JPEG's one scan (end = its EOI)."""
    start = next(s for marker, s, _ in jpeg._segments(data) if marker == 0xDA)
    return start + 2 + int.from_bytes(data[start + 2:start + 4], "big"), len(data) - 2


def damaged(data: bytes, kind: str) -> bytes:
    """The damages seen written as images (all still end in EOI, all pass Pillow's load())."""
    start, end = scan_bounds(data)
    if kind == "grey_99":  # 1% of the scan, then EOI: libjpeg fills the rest grey
        return data[:start + (end - start) // 100] + b"\xff\xd9"
    if kind == "zeroed_scan":
        return data[:start] + bytes(end - start) + data[end:]
    if kind == "bit_flips":  # 20 flips; a flip that keeps the Huffman stream in step (a coefficient's magnitude
        out = bytearray(data)  # bits) cannot be told from a real picture by any decoder: this seed's flips break it
        rng = random.Random(1)
        for _ in range(20):
            out[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
        return bytes(out)
    assert kind == "huge_header"  # a 9000x9000 frame header over the real (small) scan
    sof = next(s for marker, s, _ in jpeg._segments(data) if marker in (0xC0, 0xC1, 0xC2))
    return data[:sof + 5] + (9000).to_bytes(2, "big") * 2 + data[sof + 9:]


@pytest.mark.parametrize("kind", ["grey_99", "zeroed_scan", "bit_flips", "huge_header"])
def test_damaged_scans_that_end_in_eoi_are_corrupt(shared_data, kind):
    options = ImageNetConfig()
    for path in sorted((shared_data / "imagenet" / "train").glob("*/*.JPEG")):
        bad = damaged(path.read_bytes(), kind)
        assert bad.endswith(b"\xff\xd9")
        image = Image.open(io.BytesIO(bad))
        image.draft(image.mode, (image.width // 8, image.height // 8))
        image.load()  # what used to let them through
        with pytest.raises(Quarantine) as caught:
            check_image(bad, options)
        assert caught.value.reason == "corrupt" and "libjpeg: Corrupt JPEG data" in caught.value.detail, path.name
    cut = path.read_bytes()[:-3000]
    with pytest.raises(Quarantine) as caught:
        check_image(cut, options)
    assert caught.value.reason == "truncated"


def with_exif_orientation(data: bytes, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "camera"
    image = Image.open(io.BytesIO(data))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def test_trailing_bytes_exif_orientation_and_control_characters_through_the_pipeline(imagenet, tmp_path):
    """One rule each: bytes after EOI are cut; the pixel grid as stored is the picture (an orientation tag is
    removed, losslessly, never applied); a name with a control character is quarantined, shown escaped."""
    real = imagenet["train"]["n01440764"]["n01440764_1.JPEG"]
    rotated, upright = with_exif_orientation(real, 6), with_exif_orientation(variant(real, 2), 1)
    folder = tmp_path / "in" / "train" / "n01440764"
    folder.mkdir(parents=True)
    damage = {f"{k}.JPEG": damaged(variant(real, 3 + i), k)
              for i, k in enumerate(["grey_99", "zeroed_scan", "huge_header"])}
    files = {"plain.JPEG": real, "trailing.JPEG": variant(real, 5) + b"PK\x03\x04 an appended zip" * 10,
             "rotated.JPEG": rotated, "upright.JPEG": upright, "tab\there.JPEG": variant(real, 6), **damage}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    manifest = run_imagenet(tmp_path / "in", tmp_path / "out")
    assert manifest.rejected == {"corrupt": 3, "bad_file_name": 1}
    assert manifest.extra["repairs"] == {"trailing_bytes_removed": 1, "exif_orientation_removed": 1}
    records = read_records(tmp_path / "out")
    key = "train/n01440764"
    assert records[f"{key}/plain.JPEG"]["image"] == real and records[f"{key}/upright.JPEG"]["image"] == upright
    trailing = records[f"{key}/trailing.JPEG"]
    assert trailing["image"] == variant(real, 5) and trailing["repairs"] == b"trailing_bytes_removed"
    turned = records[f"{key}/rotated.JPEG"]
    stored = Image.open(io.BytesIO(turned["image"]))
    assert turned["repairs"] == b"exif_orientation_removed" and "exif" not in stored.info
    assert np.array_equal(np.asarray(stored), np.asarray(Image.open(io.BytesIO(rotated))))  # pixels untouched
    assert (turned["width"], turned["height"]) == Image.open(io.BytesIO(rotated)).size  # not turned
    rejected = {r["source"]: r for r in read_rejected_tree(tmp_path / "out")}
    assert rejected[f"{key}/tab\\x09here.JPEG"]["reason"] == "bad_file_name"
    assert all(rejected[f"{key}/{name}"]["reason"] == "corrupt" for name in damage)


# --- duplicates -------------------------------------------------------------------------------------------


def test_duplicates_are_kept_once_never_across_splits_and_conflicts_quarantined(imagenet, tmp_path):
    root = write_folders(tmp_path / "in", imagenet)
    (root / "LOC_val_solution.csv").write_text(kaggle_val_csv(imagenet))
    train, val = imagenet["train"], imagenet["val"]
    a, b, c, d = "n01440764", "n01443537", "n01630670", "n01753488"
    (root / "train" / a / "copy.JPEG").write_bytes(train[a][f"{a}_1.JPEG"])  # within train, same label
    (root / "train" / a / "copy2.JPEG").write_bytes(train[a][f"{a}_1.JPEG"])
    val_b = next(n for n, (w, _) in val.items() if w == b)
    (root / "train" / b / "from_val.JPEG").write_bytes(val[val_b][1])  # a copy of an eval image in train
    (root / "train" / d / "also_c.JPEG").write_bytes(train[c][f"{c}_2.JPEG"])  # the same bytes under two labels
    out = {}
    for name, args in {"one": dict(), "buckets": dict(beam_args=MULTI, dedup_buckets=5, images_per_task=3)}.items():
        out[name] = tmp_path / name
        manifest = run_imagenet(root, out[name], **args)
    # bucket count, task size and worker processes: no effect
    assert shard_bytes(str(out["one"])) == shard_bytes(str(out["buckets"]))
    assert manifest.rejected == {"duplicate": 2, "duplicate_of_eval": 1, "conflicting_labels": 2}
    assert manifest.extra["duplicates"] == manifest.rejected
    assert manifest.input_rows == 43 == manifest.written_rows + 5
    records = read_records(out["one"])
    copies = {f"train/{a}/{a}_1.JPEG", f"train/{a}/copy.JPEG", f"train/{a}/copy2.JPEG"}
    from pipelines.imagenet_dedup import copy_priority
    from pipelines.sharding import string_hash
    winner = min(copies, key=lambda k: int(copy_priority(np.array([string_hash(k, 3)], np.uint64))[0]))
    assert copies & set(records) == {winner}  # the keyed choice, whatever the order of processing
    assert records[f"val/{val_b}"]["split"] == "eval" and f"train/{b}/from_val.JPEG" not in records
    assert not {f"train/{c}/{c}_2.JPEG", f"train/{d}/also_c.JPEG"} & set(records)
    rejected = {r["source"]: r for r in read_rejected_tree(out["one"])}
    assert rejected[f"train/{b}/from_val.JPEG"]["detail"] == f"the same bytes as val/{val_b}, which is kept"
    assert rejected[f"train/{d}/also_c.JPEG"]["reason"] == "conflicting_labels"
    assert verify_dataset(str(out["one"])).ok


def test_verify_finds_an_image_stored_twice(imagenet, tmp_path):
    root = write_folders(tmp_path / "in", imagenet)
    (root / "LOC_val_solution.csv").write_text(kaggle_val_csv(imagenet))
    run_imagenet(root, tmp_path / "out")
    manifest = load_manifest(str(tmp_path / "out"))
    shards = [s for s in manifest.shards if s.records]
    donor = read_records(tmp_path / "out")
    other = next(r for r in donor.values() if r["shard"] != shards[0].path)

    def steal(blocks):
        images = blocks[0]["image"].copy()
        images[0] = other["image"]
        blocks[0]["image"] = images
        return blocks

    rewrite_shard(tmp_path / "out", shards[0].path, steal)
    problems = verify_dataset(str(tmp_path / "out")).problems
    assert [p for p in problems if p.startswith("the same image is stored under keys") and other["shard"] in p]


def test_find_duplicates_transform_decides_the_same_for_any_bucket_count():
    """FindDuplicates on a real runner: copies reported by different tasks meet in one bucket; the decision
    does not depend on how many buckets there are."""
    import hashlib

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipelines.imagenet_dedup import FindDuplicates

    def facts(rows):  # rows: (key, content, label, val, prio)
        return {"key": np.array([r[0].encode() for r in rows], np.bytes_),
                "digest": np.array([hashlib.sha256(r[1]).digest() for r in rows], "S32"),
                "label": np.array([r[2] for r in rows], np.int64), "val": np.array([r[3] for r in rows], bool),
                "prio": np.array([r[4] for r in rows], np.uint64),
                "synset": np.array([b"n0000000%d" % r[2] for r in rows], np.bytes_)}

    tasks = [((0, 0), facts([("val/v1", b"A", 1, True, 9), ("val/v2", b"B", 2, True, 5)])),
             ((3, 0), facts([("train/x/a", b"A", 1, False, 1), ("train/x/c", b"C", 1, False, 7)])),
             ((4, 1), facts([("train/y/c", b"C", 1, False, 3), ("train/z/b", b"B", 3, False, 2),
                             ("train/z/d", b"D", 3, False, 4)]))]
    for buckets in (1, 4):
        with TestPipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
            found = p | beam.Create(tasks) | FindDuplicates(buckets)
            per_task = found.drops | beam.GroupByKey() | beam.MapTuple(  # buckets report a task's rows apart
                lambda task, parts: (task, sorted(row for rows in parts for row in rows)))
            assert_that(per_task,
                        equal_to([((3, 0), [0, 1]), ((0, 0), [1]), ((4, 1), [1])]), label="Drops")
            assert_that(found.rejected | beam.Map(lambda r: (r[0].source, r[0].reason)), equal_to([
                ("train/x/a", "duplicate_of_eval"), ("train/x/c", "duplicate"), ("val/v2", "conflicting_labels"),
                ("train/z/b", "conflicting_labels")]), label="Rejected")
