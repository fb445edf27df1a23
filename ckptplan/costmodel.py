"""How long recomputing one op takes: a roofline estimate plus a fixed dispatch overhead.

FLOPs alone say that recomputing a GELU, a LayerNorm or a transpose-copy is free. It is not: those ops
are memory bound, and on CPU (or in eager mode on any device) each op also pays a dispatch overhead.
The planner minimises this estimate; FLOPs (torch.utils.flop_counter's formulas, 2 per FMA) are
reported beside it, never mixed into it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile:
    name: str
    flops_per_s: float  # sustained matmul throughput
    bytes_per_s: float  # sustained memory bandwidth
    op_overhead_ns: int  # launch / dispatch cost paid by every op, views included

    def __post_init__(self) -> None:
        if self.flops_per_s <= 0 or self.bytes_per_s <= 0 or self.op_overhead_ns < 0:
            raise ValueError(f"device profile {self.name!r} needs positive rates and overhead >= 0")

    def cost_ns(self, *, flops: int, bytes_moved: int, is_view: bool) -> int:
        """Estimated time of one op: max(compute, memory traffic) + overhead. Views move no data."""
        if is_view:
            return self.op_overhead_ns
        compute = flops / self.flops_per_s
        traffic = bytes_moved / self.bytes_per_s
        return self.op_overhead_ns + int(round(max(compute, traffic) * 1e9))


# Assumed orders of magnitude, not yet calibrated against measured step times (the policy benchmark
# should): a 2-core CPU doing fp32 GEMM at ~60 GFLOP/s and copies at ~8 GB/s, ~5 us per eager op.
CPU = DeviceProfile(name="cpu", flops_per_s=60e9, bytes_per_s=8e9, op_overhead_ns=5_000)
# An H100-class GPU in eager mode, from its datasheet orders of magnitude (also uncalibrated):
# bf16 dense ~600 TFLOP/s sustained, ~2.5 TB/s, ~8 us per launch.
GPU = DeviceProfile(name="cuda", flops_per_s=600e12, bytes_per_s=2.5e12, op_overhead_ns=8_000)


def profile_for(device_type: str) -> DeviceProfile:
    """The default profile for a device type; meta and fake tensors are planned for a GPU."""
    return CPU if device_type == "cpu" else GPU
