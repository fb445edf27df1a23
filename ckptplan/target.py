"""The device a step is planned for: its type (``Target``), the GPU (``GpuSpec``, ``--gpu``) and CUDA's
caching allocator (``cuda_block_bytes``, ``reserved_estimate``). The kernels a GPU runs, stood in for on
meta tensors, are in kernels.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .errors import InputError


class Target(str, Enum):
    """The device type a plan is for."""

    CPU = "cpu"
    CUDA = "cuda"


class SdpaBackend(str, Enum):
    """The attention kernel a CUDA step runs (``torch.nn.attention.SDPBackend``)."""

    AUTO = "auto"  # as torch would choose for the GPU
    CUDNN = "cudnn"
    FLASH = "flash"
    EFFICIENT = "efficient"
    MATH = "math"


# NOTE [ CUDA caching allocator rounding ]
# c10/cuda/CUDACachingAllocator.cpp, ``round_size``: a request below kMinBlockSize (512 bytes) takes 512
# bytes, any other is rounded up to a multiple of 512; ``allocated_bytes`` (what max_memory_allocated
# reports) adds ``block->size``, the rounded size. A block carved from the small pool (<= 1 MiB) is split
# to that size; a large block is only split when more than 1 MiB would remain, so reusing a slightly
# larger cached block can count up to 1 MiB more (not modelled: it depends on the allocator's history).
# Segments come from cudaMalloc in 2 MiB (small pool), 20 MiB (requests of 1-10 MiB) or 2 MiB multiples
# (larger requests): that is reserved memory, which ``reserved_estimate`` approximates.
CUDA_MIN_BLOCK = 512
CUDA_SMALL_SIZE = 1 << 20
CUDA_SMALL_SEGMENT = 2 << 20
CUDA_LARGE_SEGMENT = 20 << 20
CUDA_MIN_LARGE_ALLOC = 10 << 20
CUDA_ROUND_LARGE = 2 << 20
# What neither max_memory_allocated nor max_memory_reserved counts: the CUDA context and the kernels'
# module images (lazy loading), measured in the hundreds of MiB on recent drivers; an estimate.
CUDA_CONTEXT_BYTES = 600 << 20
# Kept free between reserved and allocated memory when ``--budget card`` is resolved: the caching
# allocator's fragmentation, an estimate.
CUDA_FRAGMENTATION = 0.05


def cuda_block_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator's stats count for a storage of ``nbytes`` (see NOTE above)."""
    if nbytes <= 0:
        return 0
    return -(-nbytes // CUDA_MIN_BLOCK) * CUDA_MIN_BLOCK


def reserved_estimate(live_blocks: list[int]) -> int:
    """A lower estimate of ``max_memory_reserved`` when ``live_blocks`` (allocator block sizes) are alive at
    the peak: each large request in its own 2 MiB-rounded segment, medium ones packed into 20 MiB segments,
    small ones into 2 MiB segments."""
    small = sum(b for b in live_blocks if b <= CUDA_SMALL_SIZE)
    medium = sum(b for b in live_blocks if CUDA_SMALL_SIZE < b < CUDA_MIN_LARGE_ALLOC)
    large = sum(-(-b // CUDA_ROUND_LARGE) * CUDA_ROUND_LARGE for b in live_blocks if b >= CUDA_MIN_LARGE_ALLOC)
    return (
        large
        + -(-medium // CUDA_LARGE_SEGMENT) * CUDA_LARGE_SEGMENT
        + -(-small // CUDA_SMALL_SEGMENT) * CUDA_SMALL_SEGMENT
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuSpec:
    """A GPU a step is planned for: its compute capability decides the kernels, its memory ``--budget card``."""

    name: str
    capability: tuple[int, int]
    memory_bytes: int = 0  # total memory as cudaGetDeviceProperties reports it; 0 when unknown

    def __post_init__(self) -> None:
        major, minor = self.capability
        if not (3 <= major <= 20 and 0 <= minor <= 9):
            raise InputError(f"GPU compute capability {major}.{minor} is not one CUDA has; give e.g. 9.0 or sm90")

    @property
    def sm(self) -> str:
        return f"sm{self.capability[0]}{self.capability[1]}"

    @property
    def cublas_workspace_bytes(self) -> int:
        """The cuBLAS workspace torch allocates through the caching allocator at the first matmul of a
        stream (``getChosenWorkspaceSize`` in aten/src/ATen/cuda/CublasHandlePool.cpp): 4096 KiB x 8 on
        Hopper and newer, 4096 KiB x 2 + 16 KiB x 8 before."""
        return 4096 * 1024 * 8 if self.capability[0] >= 9 else 4096 * 1024 * 2 + 16 * 1024 * 8

    def card_budget(self) -> int:
        """The budget ``--budget card`` stands for: the card's memory less the CUDA context and the
        allocator's fragmentation (estimates)."""
        if not self.memory_bytes:
            raise InputError(
                f"the memory of GPU {self.name!r} is unknown; give --gpu a named card "
                f"({', '.join(sorted(GPUS))}) or a budget in bytes"
            )
        return int((self.memory_bytes - CUDA_CONTEXT_BYTES) * (1 - CUDA_FRAGMENTATION))


_MiB = 1 << 20
# Total memory as torch.cuda.get_device_properties(0).total_memory reports it on common SKUs (approximate).
GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec(name="h100", capability=(9, 0), memory_bytes=81_559 * _MiB),
        GpuSpec(name="h100-80gb", capability=(9, 0), memory_bytes=81_559 * _MiB),
        GpuSpec(name="h200", capability=(9, 0), memory_bytes=143_771 * _MiB),
        GpuSpec(name="b200", capability=(10, 0), memory_bytes=183_359 * _MiB),
        GpuSpec(name="a100", capability=(8, 0), memory_bytes=81_251 * _MiB),
        GpuSpec(name="a100-80gb", capability=(8, 0), memory_bytes=81_251 * _MiB),
        GpuSpec(name="a100-40gb", capability=(8, 0), memory_bytes=40_536 * _MiB),
        GpuSpec(name="l4", capability=(8, 9), memory_bytes=22_491 * _MiB),
        GpuSpec(name="l40s", capability=(8, 9), memory_bytes=45_589 * _MiB),
        GpuSpec(name="a10g", capability=(8, 6), memory_bytes=22_731 * _MiB),
        GpuSpec(name="rtx4090", capability=(8, 9), memory_bytes=24_080 * _MiB),
        GpuSpec(name="v100", capability=(7, 0), memory_bytes=32_510 * _MiB),
        GpuSpec(name="t4", capability=(7, 5), memory_bytes=15_095 * _MiB),
    )
}
DEFAULT_GPU = "h100"


def parse_gpu(text: str | GpuSpec | None) -> GpuSpec:
    """``h100``, ``a100-40gb``, ... or a compute capability (``9.0``, ``sm90``, ``sm_86``)."""
    if isinstance(text, GpuSpec):
        return text
    key = (text or DEFAULT_GPU).strip().lower()
    if key in GPUS:
        return GPUS[key]
    m = re.fullmatch(r"(?:sm_?)?(\d{1,2})\.?(\d)", key)
    if m:
        return GpuSpec(name=f"sm{m[1]}{m[2]}", capability=(int(m[1]), int(m[2])))
    raise InputError(
        f"unknown GPU {text!r}: give one of {', '.join(sorted(GPUS))} or a compute capability such as 9.0 or sm90"
    )


def parse_target(text: str | Target | None) -> Target | None:
    if text is None or isinstance(text, Target):
        return text
    try:
        return Target(text.strip().lower())
    except ValueError:
        raise InputError(f"unknown target {text!r}: choose cpu or cuda") from None


def parse_sdpa(text: str | SdpaBackend | None) -> SdpaBackend:
    if text is None or isinstance(text, SdpaBackend):
        return text or SdpaBackend.AUTO
    try:
        return SdpaBackend(text.strip().lower())
    except ValueError:
        raise InputError(
            f"unknown attention backend {text!r}: choose one of {', '.join(b.value for b in SdpaBackend)}"
        ) from None
