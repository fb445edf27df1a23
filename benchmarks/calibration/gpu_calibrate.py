"""Measure a device's cost profile (ckptplan.costmodel.DeviceProfile) and write it as a profile file.

    PYTHONPATH=. python benchmarks/calibration/gpu_calibrate.py --out OUT/h100.yaml      # a CUDA GPU, under 3 minutes
    python benchmarks/calibration/gpu_calibrate.py --smoke --out /tmp/cpu.yaml             # tiny sizes on the CPU

Then plan with it: ``ckptplan solve --budget ... --profile OUT/h100.yaml`` (or ``solve(graph, budget,
profile=...)``). It times, at the model's dtype (``--dtype``, default bfloat16 on CUDA):

* matmuls (``flops_per_s``), an out-of-place add (``bytes_per_s``: bytes read plus written, as the trace
  counts them), LayerNorm and softmax (``slow_bytes_per_s``), dropout's random numbers
  (``random_bytes_per_s``, bytes of output), and a one-element op (``op_overhead_ns``);
* the runtime's host costs: a ``torch.utils.checkpoint`` call and its per-op hooks, selective
  checkpointing's dispatch modes per op, each as the extra time of a step of small ops with it against
  one without.

Fields it does not measure (the rematerialization's costs) keep the built-in profile's values; the file
lists what was measured under ``measured``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ckptplan import costmodel

ROOT = Path(__file__).resolve().parents[2]


def _timer(device: str, repeat: int) -> Callable[[Callable[[], object]], float]:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def run(fn: Callable[[], object]) -> float:
        """Median seconds of ``fn`` after two warm-ups."""
        fn(), fn()
        times = []
        for _ in range(repeat):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return run


class _Chain(nn.Module):
    """``n`` small blocks of ``ops`` elementwise ops each: host time, not device time, dominates."""

    def __init__(self, n: int, ops: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))
        self.ops = ops

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks[i](x)
        for _ in range(self.ops - 1):
            x = x.sin()
        return x

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        for i in range(len(self.blocks)):
            if mode == "plain":
                x = self.block(i, x)
            elif mode == "checkpoint":
                x = checkpoint(self.block, i, x, use_reentrant=False)
            else:  # selective: nothing saved, every op walked by the policy
                x = checkpoint(
                    self.block,
                    i,
                    x,
                    use_reentrant=False,
                    context_fn=lambda: create_selective_checkpoint_contexts(
                        lambda ctx, op, *a, **k: CheckpointPolicy.PREFER_RECOMPUTE
                    ),
                )
        return x.sum()


def calibrate(device: str, dtype: torch.dtype, smoke: bool) -> tuple[costmodel.DeviceProfile, list[str]]:
    t = _timer(device, 3 if smoke else 20)
    n = 256 if smoke else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    flops = 2 * n**3 / t(lambda: a @ b)
    big = (1 << 20) if smoke else (256 << 20) // torch.empty((), dtype=dtype).element_size()
    x, y = (torch.randn(big, device=device, dtype=dtype) for _ in range(2))
    bytes_per_s = 3 * x.nbytes / t(lambda: x + y)
    rows = x.view(-1, 4096) if big % 4096 == 0 else x.view(1, -1)
    w = torch.ones(rows.shape[-1], device=device, dtype=dtype)
    slow = [
        2 * rows.nbytes / t(lambda: F.layer_norm(rows, w.shape, w, w)),
        2 * rows.nbytes / t(lambda: torch.softmax(rows, -1)),
    ]
    random_bytes = x.nbytes / t(lambda: torch.ops.aten.native_dropout(x, 0.1, True))
    one = torch.ones(1, device=device)
    k = 200
    op_ns = t(lambda: [one.add(1) for _ in range(k)]) / k * 1e9

    blocks, ops = (8, 4) if smoke else (64, 8)
    chain = _Chain(blocks, ops).to(device)
    inp = torch.randn(4, 8, device=device, requires_grad=True)

    def step(mode: str) -> Callable[[], None]:
        return lambda: chain(inp, mode).backward()

    plain, ckpt, sac = (t(step(m)) for m in ("plain", "checkpoint", "selective"))
    per_region = max(0.0, ckpt - plain) / blocks * 1e9  # a call plus its ops' hooks (and their rerun)
    op_share = 0.15  # the split of a region's extra time between the call and its ops' hooks
    checkpoint_op_ns = per_region * op_share / ops
    checkpoint_call_ns = per_region * (1 - op_share)
    sac_op_ns = max(0.0, sac - ckpt) / (blocks * 2 * ops) * 1e9  # forward and recomputation walks

    base = costmodel.GPU if device == "cuda" else costmodel.CPU
    values = costmodel.profile_to_dict(base) | {
        "name": f"{device}-{torch.cuda.get_device_name().lower().replace(' ', '-')}"
        if device == "cuda"
        else "cpu-measured",
        "flops_per_s": float(flops),
        "bytes_per_s": float(bytes_per_s),
        "slow_bytes_per_s": float(min(slow)),
        "random_bytes_per_s": float(random_bytes),
        "op_overhead_ns": int(op_ns),
        "checkpoint_call_ns": int(checkpoint_call_ns),
        "checkpoint_op_ns": int(checkpoint_op_ns),
        "sac_forward_ns": int(sac_op_ns),
        "sac_replay_ns": int(sac_op_ns),
        "asynchronous": device == "cuda",
        "op_rates": [],
    }
    measured = [
        "flops_per_s",
        "bytes_per_s",
        "slow_bytes_per_s",
        "random_bytes_per_s",
        "op_overhead_ns",
        "checkpoint_call_ns",
        "checkpoint_op_ns",
        "sac_forward_ns",
        "sac_replay_ns",
    ]
    return costmodel.profile_from_dict(values), measured


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="profile file to write (YAML)")
    ap.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: bf16 on CUDA)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the test suite runs this)")
    a = ap.parse_args(argv)
    device = "cpu" if a.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_calibrate: no CUDA device; use --smoke on a CPU")
    dtype = getattr(torch, a.dtype or ("float32" if a.smoke else "bfloat16"))
    started = time.perf_counter()
    profile, measured = calibrate(device, dtype, a.smoke)
    data = costmodel.profile_to_dict(profile) | {"measured": measured}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# ckptplan device profile: {device}"
        f"{' ' + torch.cuda.get_device_name() if device == 'cuda' else ''}, dtype {dtype}, torch "
        f"{torch.__version__}, measured in {time.perf_counter() - started:.0f} s "
        "by benchmarks/calibration/gpu_calibrate.py\n"
    )
    a.out.write_text(header + yaml.safe_dump(data, sort_keys=False))
    print(f"wrote {a.out}", file=sys.stderr)
    return a.out


if __name__ == "__main__":
    main()
