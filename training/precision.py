"""The precision a group trains in: `deepspeed.precision: auto` takes bf16 only where the hardware runs it natively.

Emulated bf16 is slow: on a CPU without AVX512-BF16, ImageNet's ResNet took 16.5 s a step in bf16 against 1.4 s
in fp32 (issue 19). So `auto` picks bf16 on a CUDA device that computes in bf16 (compute capability 8.0 on) and
on a CPU whose flags (Linux's /proc/cpuinfo) list avx512_bf16 or amx_bf16; fp32 everywhere else.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def choose_precision(requested: str, cuda_bf16: bool | None, cpu_flags: Collection[str]) -> tuple[str, str]:
    """(precision, why) for `deepspeed.precision`. `cuda_bf16`: None when training on a CPU, else whether the
    GPU runs bf16 natively; `cpu_flags`: the CPU's feature flags. Anything but `auto` is taken as given."""
    if requested != "auto":
        return requested, "as the manifest sets it"
    if cuda_bf16 is not None:
        return ("bf16", "auto: the GPU computes in bf16") if cuda_bf16 else (
            "fp32", "auto: the GPU has no native bf16")
    native = [flag for flag in CPU_BF16_FLAGS if flag in cpu_flags]
    if native:
        return "bf16", f"auto: the CPU has {' and '.join(native)}"
    return "fp32", f"auto: the CPU has neither {' nor '.join(CPU_BF16_FLAGS)}, so bf16 would be emulated"


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first CPU's feature flags; none where /proc/cpuinfo does not exist (not Linux: `auto` then means fp32)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cuda_bf16(device: torch.device) -> bool | None:
    if device.type != "cuda":
        return None
    return torch.cuda.is_bf16_supported(including_emulation=False)


def local_precision(requested: str, device: torch.device | None = None) -> tuple[str, str]:
    """`choose_precision` for this process's device (default: CUDA if there is one, else the CPU)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return choose_precision(requested, cuda_bf16(device), cpu_flags())


def group_precision(requested: str, device: torch.device, world: int) -> tuple[str, str]:
    """`local_precision`, the same on every rank of the group (bf16 only if every rank's hardware runs it:
    ranks on mixed machines must not train in different precisions)."""
    import torch.distributed as dist

    precision, why = local_precision(requested, device)
    if requested == "auto" and world > 1:
        everywhere = torch.tensor(int(precision == "bf16"), device=device)
        dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)
        if precision == "bf16" and not everywhere:
            return "fp32", "auto: another rank of the group has no native bf16"
    return precision, why
