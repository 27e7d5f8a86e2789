"""ImageNet (ILSVRC-2012): archives or JPEG folders -> checked, repaired, deduplicated image shards, trained by a
ResNet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from codistill.datasets.spec import DatasetSpec, Flag
from codistill.fields import require


@dataclass(frozen=True)
class ImageNetSynthConfig:
    """Generate an ILSVRC-layout folder of images instead of reading `data.input`."""

    classes: int = 10
    per_class: int = 100  # train images per class (bad inputs included)
    val_per_class: int = 10  # flat `val/` folder + LOC_val_solution.csv; 0 = no val folder
    seed: int = 0
    min_size: int = 64  # image sides (pixels) are drawn from [min_size, max_size]
    max_size: int = 160
    faults: int = 1  # copies of each bad input kind (zero-byte, text, truncated, ...); 0 = a clean data set
    synsets: str | None = None  # take the wnids from this synset list (path or URL); None = made-up wnids
    val_layout: Literal["flat", "folders"] = "flat"  # val/ + LOC_val_solution.csv, or val/<wnid>/

    def validate(self, name: str) -> None:
        require(self.classes >= 1, f"{name}.classes", f"must be >= 1, got {self.classes}")
        require(self.per_class >= 1, f"{name}.per_class", f"must be >= 1, got {self.per_class}")
        require(self.val_per_class >= 0, f"{name}.val_per_class", f"must be >= 0, got {self.val_per_class}")
        require(self.min_size >= 16, f"{name}.min_size", f"must be >= 16, got {self.min_size}")
        require(self.max_size >= self.min_size, f"{name}.max_size",
                 f"must be >= min_size ({self.min_size}), got {self.max_size}")
        require(self.faults >= 0, f"{name}.faults", f"must be >= 0, got {self.faults}")
        require(self.faults * 8 <= self.classes * self.per_class, f"{name}.faults",
                 f"{self.faults} of each of the 8 bad-input kinds do not fit in {self.classes * self.per_class} "
                 "train images")


@dataclass(frozen=True)
class ImageNetConfig:
    """Labels, repairs and resizing of ILSVRC-layout JPEG folders (`data.dataset: imagenet`)."""

    # Synset list (one wnid per line, 0-based line = label; path or URL); None = the sorted train folder names.
    synsets: str | None = None
    label_offset: int = 0  # added to every label (1 for the TF-slim/TPU convention with 0 = background)
    # Where the shared eval split comes from: "auto" = the input's val/ folder when there is one, else a
    # keyed-hash `data.eval_fraction` of train; "val" requires the folder; "train" ignores it.
    eval_source: Literal["auto", "val", "train"] = "auto"
    # Labels of a flat val split (path or URL): Kaggle's LOC_val_solution.csv, `filename<TAB>wnid` lines, the
    # devkit's ILSVRC2012_validation_ground_truth.txt (meta.mat beside it), or the devkit archive or folder;
    # None = LOC_val_solution.csv where Kaggle puts it, else the devkit in the input. Unused for val/<wnid>/.
    val_labels: str | None = None
    # Class folder names (or class tars) that are not wnids (n + 8 digits) are refused, unless this is set.
    any_class_names: bool = False
    grayscale: Literal["keep", "rgb"] = "keep"  # grayscale JPEGs stay 1-channel, or become RGB JPEGs
    resize_shorter: int | None = None  # shrink images whose shorter side is longer (never upscales); None = keep
    jpeg_quality: int = 95  # for re-encoded images (repairs, resizes)
    max_image_bytes: int = 64 << 20  # bigger files are quarantined unread
    max_image_pixels: int = 89_478_485  # bigger images (decompression bombs) are quarantined; Pillow's default
    images_per_task: int = 256  # images per unit of parallel work
    dedup_buckets: int = 16  # the content hashes of all images are shuffled into this many groups to find copies

    def validate(self, name: str) -> None:
        require(self.label_offset >= 0, f"{name}.label_offset", f"must be >= 0, got {self.label_offset}")
        require(self.resize_shorter is None or self.resize_shorter >= 8, f"{name}.resize_shorter",
                 f"must be >= 8 or null, got {self.resize_shorter}")
        require(95 <= self.jpeg_quality <= 100, f"{name}.jpeg_quality",
                 f"must be in [95, 100] (lower re-encodes lose detail), got {self.jpeg_quality}")
        require(self.max_image_bytes >= 1, f"{name}.max_image_bytes", f"must be >= 1, got {self.max_image_bytes}")
        require(self.max_image_pixels >= 1, f"{name}.max_image_pixels",
                 f"must be >= 1, got {self.max_image_pixels}")
        require(self.images_per_task >= 1, f"{name}.images_per_task", f"must be >= 1, got {self.images_per_task}")
        require(self.dedup_buckets >= 1, f"{name}.dedup_buckets", f"must be >= 1, got {self.dedup_buckets}")


@dataclass(frozen=True)
class ResNetConfig:
    """ResNet-18/34/50 for the image workload (torchvision's layout, training/resnet.py)."""

    kind: Literal["resnet"] = "resnet"
    depth: int = 50  # 18 or 34 (basic blocks), 50 (bottlenecks)
    width: int = 64  # channels of the first stage; each later stage doubles them
    # "imagenet": 7x7 stride-2 conv + max pool (/4); "small": one 3x3 stride-1 conv, no pool (for 32-64 px inputs)
    stem: Literal["imagenet", "small"] = "imagenet"
    zero_init_residual: bool = False  # each block's last BatchNorm starts at gamma 0 (Goyal et al. 2017)
    channels_last: bool = True  # NHWC inputs, so convolutions run NHWC (faster on CPU and on tensor cores)
    image_size: int = 224  # train crops and eval center crops are image_size x image_size

    def validate(self, name: str) -> None:
        require(self.depth in (18, 34, 50), f"{name}.depth", f"must be 18, 34 or 50, got {self.depth}")
        require(self.width >= 1, f"{name}.width", f"must be >= 1, got {self.width}")
        require(self.image_size >= 16, f"{name}.image_size", f"must be >= 16, got {self.image_size}")


SPEC = DatasetSpec(
    summary="ImageNet as downloaded (ILSVRC2012_img_*.tar + devkit), extracted (train/<wnid>/, val/) or from Kaggle",
    name="imagenet", config=ImageNetConfig, synth=ImageNetSynthConfig, models=(ResNetConfig,),
    pipeline="pipelines.imagenet", workload="training.workloads.imagenet",
    flags=(Flag("synsets", "Synset list, one wnid per line (0-based line = label); default: sorted folders."),
           Flag("label_offset", "Added to every label (1: TF-slim convention)."),
           Flag("grayscale", "Grayscale JPEGs: keep 1-channel (default) or make them RGB."),
           Flag("resize_shorter", "Shrink the shorter side to this (never enlarge)."),
           Flag("val_labels", "Labels of a flat val split: LOC_val_solution.csv, filename<TAB>wnid lines, the "
                "devkit's ground truth, or the devkit archive or folder; default: found in the input."),
           Flag("any_class_names", "Accept class folders not named as wnids (n + 8 digits).")),
    synth_flags=(Flag("classes", required=True), Flag("per_class", "Train images per class.", required=True),
                 Flag("val_per_class", "Validation images per class; 0 = none."),
                 Flag("val_layout", "flat: val/ + LOC_val_solution.csv; folders: val/<wnid>/."), Flag("seed"),
                 Flag("min_size", "Smallest image side (pixels)."), Flag("max_size", "Largest image side (pixels)."),
                 Flag("faults", "Copies of each bad-input kind (zero-byte, text, truncated, corrupt, PNG, CMYK, "
                      "16-bit, gray)."),
                 Flag("synsets", "Take the wnids from this synset list (e.g. imagenet_synsets.txt).")),
    entries=("classes.txt",))  # the class list, one wnid per label
