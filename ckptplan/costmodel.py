"""What checkpointing costs in time: each recomputed op, and the runtime around each checkpointed region.

FLOPs alone say that recomputing a GELU, a LayerNorm or a transpose-copy is free. It is not: those ops
are memory bound, and on CPU (or in eager mode on any device) each op also pays a dispatch overhead.
The planner minimises this estimate; FLOPs (torch.utils.flop_counter's formulas, 2 per FMA) are
reported beside it, never mixed into it.

The runtime (runtime.py) adds its own cost, which is charged too:

* every checkpointed region pays one ``torch.utils.checkpoint`` call (the RNG state kept and restored,
  the recomputation's frame), ``checkpoint_call_ns``, and Python's saved-tensor hooks on each of its
  ops, in forward and in the recomputation, ``checkpoint_op_ns``;
* a region that saves some of its ops runs under selective checkpointing's dispatch modes, which call a
  Python policy for every op in forward (``sac_forward_ns``) and walk every op again in the
  recomputation, cached or rerun (``sac_replay_ns``). A region that saves nothing runs as plain
  ``torch.utils.checkpoint`` and pays neither.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile:
    name: str
    flops_per_s: float  # sustained matmul throughput
    bytes_per_s: float  # sustained memory bandwidth
    op_overhead_ns: int  # launch / dispatch cost paid by every op, views included
    checkpoint_call_ns: int  # one checkpointed region call: RNG state, recomputation frame
    checkpoint_op_ns: int  # per op of a checkpointed region: saved-tensor hooks (pack, unpack, repack)
    sac_forward_ns: int  # per op of a selectively checkpointed region, in forward (policy + caching mode)
    sac_replay_ns: int  # per op its recomputation walks (cached or rerun), on top of the rerun itself

    def __post_init__(self) -> None:
        if self.flops_per_s <= 0 or self.bytes_per_s <= 0 or min(
                self.op_overhead_ns, self.checkpoint_call_ns, self.checkpoint_op_ns, self.sac_forward_ns,
                self.sac_replay_ns) < 0:
            raise ValueError(f"device profile {self.name!r} needs positive rates and overheads >= 0")

    def cost_ns(self, *, flops: int, bytes_moved: int, is_view: bool) -> int:
        """Estimated time of one op: max(compute, memory traffic) + overhead. Views move no data."""
        if is_view:
            return self.op_overhead_ns
        compute = flops / self.flops_per_s
        traffic = bytes_moved / self.bytes_per_s
        return self.op_overhead_ns + int(round(max(compute, traffic) * 1e9))

    def checkpoint_ns(self, *, num_ops: int) -> int:
        """What checkpointing a region of ``num_ops`` forward ops adds beyond the ops it reruns."""
        return self.checkpoint_call_ns + num_ops * self.checkpoint_op_ns

    def selective_ns(self, *, num_ops: int, num_rerun: int) -> int:
        """What selective checkpointing's dispatch modes add to a region of ``num_ops`` forward ops whose
        recomputation walks ``num_rerun`` of them (early stop), beyond the ops it actually reruns."""
        return num_ops * self.sac_forward_ns + num_rerun * self.sac_replay_ns


# Rates: assumed orders of magnitude for a 2-core CPU (fp32 GEMM ~60 GFLOP/s, copies ~8 GB/s, ~5 us an
# eager op). Runtime overheads: measured on that CPU with ckptplan's own runtime
# (benchmarks/runtime_overhead.py, "per-op" rows: regions of many tiny ops, timed against the same model
# without a plan).
CPU = DeviceProfile(name="cpu", flops_per_s=60e9, bytes_per_s=8e9, op_overhead_ns=5_000,
                    checkpoint_call_ns=170_000, checkpoint_op_ns=8_000, sac_forward_ns=22_000,
                    sac_replay_ns=22_000)
# An H100-class GPU in eager mode, from its datasheet orders of magnitude (uncalibrated): bf16 dense
# ~600 TFLOP/s sustained, ~2.5 TB/s, ~8 us a launch. The runtime's overheads are Python on the host, as
# on the CPU: taken from the CPU's, an upper bound where the GPU's queue hides them.
GPU = DeviceProfile(name="cuda", flops_per_s=600e12, bytes_per_s=2.5e12, op_overhead_ns=8_000,
                    checkpoint_call_ns=CPU.checkpoint_call_ns, checkpoint_op_ns=CPU.checkpoint_op_ns,
                    sac_forward_ns=CPU.sac_forward_ns, sac_replay_ns=CPU.sac_replay_ns)


def profile_for(device_type: str) -> DeviceProfile:
    """The default profile for a device type; meta and fake tensors are planned for a GPU."""
    return CPU if device_type == "cpu" else GPU
