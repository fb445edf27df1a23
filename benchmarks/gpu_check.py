"""The GPU check: plans made on a laptop (meta tensors, target cuda) and on the GPU, applied to real CUDA
steps, against ``torch.cuda.max_memory_allocated`` and against what users run instead.

    PYTHONPATH=. python benchmarks/gpu_check.py --out OUT        # one CUDA GPU; about 5-8 min on an H100
    python benchmarks/gpu_check.py --make-plans                  # a laptop: plans/gpu/*.yaml from meta
    python benchmarks/gpu_check.py --smoke --out /tmp/smoke      # the same code, tiny models, on the CPU

For each model (bf16, real sizes: a Llama-style 1.1B at seq 4096 with grouped-query attention in SDPA,
GPT-2 medium with dropout, ViT-L/16, a ResNet-50-like with BatchNorm; and GPT-2 medium with float32
weights under ``torch.autocast("cuda", dtype=torch.bfloat16)``, the usual mixed-precision loop) and each
budget (fractions of the predicted no-checkpointing peak), it records for two plans, the committed laptop plan
(plans/gpu/MODEL-PCT.yaml) and one traced on the GPU itself:

* the measured peak (``max_memory_allocated``) against the prediction, and whether it fits the budget;
* gradients against the unplanned step with the same seeds: bitwise equal, or the largest difference
  relative to the gradient's largest magnitude, beside the same figure for two unplanned steps (the
  kernels' own nondeterminism: flash and cuDNN attention backward accumulate in a free order);
* step time (median of ``--steps``) against no checkpointing, Hugging Face-style full per-block
  checkpointing, every-k-th block, torchtitan-style op-level SAC and torch.compile with
  ``activation_memory_budget`` (``--compile``), each anchor at its fastest knob whose measured peak fits.

Results: OUT/gpu_check.json and OUT/gpu_check.md (the command and the card included). ``--smoke`` runs the
same code on tiny CPU models (laptop plans made on the fly for the CPU target); tests/test_gpu_check.py runs
it so this script cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(2, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ckptplan
from ckptplan.measure import measure_peak
from ckptplan.trace import default_loss

ROOT = Path(__file__).resolve().parent.parent

PLANS = ROOT / "plans" / "gpu"
LAPTOP_GPU = "h100"  # the laptop plans are made for this card's kernels (sm90: H100 and H200 alike)
BUDGETS = (0.8, 0.65, 0.5)
ANCHORS = ("none", "full", "every_k", "op_sac")


@dataclass(frozen=True)
class Model:
    name: str
    build: Callable[[str, torch.dtype], tuple]  # (device, dtype) -> (model, args)
    autocast: torch.dtype | None = None  # forward and loss under torch.autocast (float32 weights)


def _amp(m: Model, device: str) -> Any:
    """The step's autocast region: forward and loss, as a mixed-precision training loop runs them."""
    return torch.autocast(device, dtype=m.autocast) if m.autocast is not None else contextlib.nullcontext()


def _cast(model: torch.nn.Module, args: tuple, dtype: torch.dtype) -> tuple:
    if dtype != torch.float32:
        model.to(dtype=dtype)
    return model, tuple(a.to(dtype) if a.is_floating_point() else a for a in args)


def _models(smoke: bool) -> list[Model]:
    import gpt2
    import llama
    import resnet
    import vit

    if smoke:

        def tiny_llama(device, dtype):
            config = llama.LlamaConfig(
                dim=64,
                n_layer=2,
                n_heads=4,
                n_kv_heads=2,
                vocab_size=128,
                hidden_dim=128,
                max_seq_len=32,
                sdpa_gqa=True,
            )
            return llama.build(config, device=device, batch_size=2, seq_len=32, dtype=dtype)

        return [
            Model("llama", tiny_llama),
            Model("gpt2", lambda d, t: _cast(*gpt2.gpt2_tiny(device=d, n_layer=2, seq_len=32), t)),
            Model("vit", lambda d, t: _cast(*vit.vit_tiny(device=d, n_layer=2, batch_size=4), t)),
            Model("resnet", lambda d, t: _cast(*resnet.resnet_tiny(device=d, batch_size=4), t)),
            Model(
                "gpt2_amp", lambda d, t: gpt2.gpt2_tiny(device=d, n_layer=2, seq_len=64, batch_size=4), torch.bfloat16
            ),
        ]

    def gpt2_medium(device, dtype):
        config = gpt2.GPTConfig(
            n_layer=24, n_head=16, n_embd=1024, vocab_size=50304, block_size=1024, dropout=0.1, bias=True
        )
        return _cast(*gpt2.build(config, device=device, batch_size=8, seq_len=1024), dtype)

    def gpt2_medium_amp(device, dtype):  # float32 weights under autocast
        config = gpt2.GPTConfig(
            n_layer=24, n_head=16, n_embd=1024, vocab_size=50304, block_size=1024, dropout=0.1, bias=True
        )
        return gpt2.build(config, device=device, batch_size=8, seq_len=1024)

    def vit_l16(device, dtype):
        config = vit.ViTConfig(
            image_size=224, patch_size=16, num_classes=1000, n_layer=24, n_head=16, n_embd=1024, dropout=0.0
        )
        return _cast(*vit.build(config, device=device, batch_size=32), dtype)

    return [
        Model("llama1b", lambda d, t: llama.llama_1b(device=d, dtype=t, batch_size=1, seq_len=4096)),
        Model("gpt2_medium", gpt2_medium),
        Model("vit_l16", vit_l16),
        Model("resnet50", lambda d, t: resnet.resnet50ish(device=d, dtype=t, batch_size=128)),
        Model("gpt2_medium_amp", gpt2_medium_amp, torch.bfloat16),
    ]


def _plan_path(model: str, fraction: float) -> Path:
    return PLANS / f"{model}-{round(100 * fraction)}.yaml"


def laptop_plans(
    models: list[Model], *, target: str, dtype: torch.dtype, time_limit: float, write: bool
) -> dict[tuple[str, float], ckptplan.Plan]:
    """Plans made from meta tensors, as a laptop makes them; written to plans/gpu/ with ``write``."""
    out = {}
    for m in models:
        # autocast on meta stands in for CUDA's; a CPU plan under autocast traces real CPU tensors
        model, args = m.build("cpu" if m.autocast is not None and target == "cpu" else "meta", dtype)
        graph = ckptplan.trace(
            model,
            *args,
            target=target,
            gpu=LAPTOP_GPU if target == "cuda" else None,
            model_name=m.name,
            autocast=m.autocast,
        )
        for f in BUDGETS:
            budget = int(f * graph.baseline_peak_bytes)
            try:
                plan = ckptplan.solve(graph, budget, time_limit_s=time_limit)
            except ckptplan.InfeasibleBudget as e:
                plan = ckptplan.solve(graph, e.minimum_bytes, time_limit_s=time_limit)
            out[(m.name, f)] = plan
            if write:
                PLANS.mkdir(parents=True, exist_ok=True)
                plan.save(_plan_path(m.name, f))
                print(f"wrote {_plan_path(m.name, f).relative_to(ROOT)}", file=sys.stderr)
    return out


# ---- one step, measured ----------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _grads(model: torch.nn.Module, step_model: torch.nn.Module, args: tuple, seed: int, amp: Any) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    _seed(seed)
    with amp:
        loss = default_loss(step_model(*args))
    loss.backward()
    out = [p.grad.detach().clone() if p.grad is not None else torch.zeros(0) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def _grad_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[bool, float]:
    """(bitwise equal, largest |a - b| relative to the largest |a|)."""
    equal = all(torch.equal(x, y) for x, y in zip(a, b))
    worst = 0.0
    for x, y in zip(a, b):
        if x.numel():
            scale = float(x.abs().max().float()) or 1.0
            worst = max(worst, float((x.float() - y.float()).abs().max()) / scale)
    return equal, worst


def _peak(
    model: torch.nn.Module, step_model: torch.nn.Module, args: tuple, seed: int, autocast: torch.dtype | None
) -> int:
    model.zero_grad(set_to_none=True)
    _seed(seed)
    peak = measure_peak(step_model, *args, autocast=autocast)
    model.zero_grad(set_to_none=True)
    return peak


def _time(model: torch.nn.Module, step_model: torch.nn.Module, args: tuple, device: str, steps: int, amp: Any) -> float:
    """Median seconds of a training step (forward, backward; gradients dropped), after one warm-up."""
    times = []
    for i in range(steps + 1):
        model.zero_grad(set_to_none=True)
        _seed(i)
        _sync(device)
        start = time.perf_counter()
        with amp:
            loss = default_loss(step_model(*args))
        loss.backward()
        _sync(device)
        if i:
            times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


# ---- the check -------------------------------------------------------------------------------------------


def check_model(
    m: Model,
    laptop: dict,
    *,
    device: str,
    dtype: torch.dtype,
    steps: int,
    time_limit: float,
    anchors: tuple[str, ...],
    compile_knobs: tuple[float, ...],
) -> dict[str, Any]:
    from policies import KNOBS, NotApplicable, apply_policy

    model, args = m.build(device, dtype)
    seed = 1234
    amp = _amp(m, device)
    ref = _grads(model, model, args, seed, amp)
    noise_equal, noise = _grad_error(ref, _grads(model, model, args, seed, amp))
    graph = ckptplan.trace(model, *args, model_name=m.name, autocast=m.autocast)
    result: dict[str, Any] = {
        "model": m.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "inputs": list(graph.inputs),
        "unplanned_repeat_bitwise": noise_equal,
        "unplanned_repeat_rel_error": noise,
        "predicted_no_ckpt_peak": graph.baseline_peak_bytes,
        "plans": [],
        "anchors": [],
    }
    result["autocast"] = str(m.autocast).removeprefix("torch.") if m.autocast is not None else ""
    result["measured_no_ckpt_peak"] = _peak(model, model, args, seed, m.autocast)

    # anchors first, at every knob: each budget then takes the fastest knob that fits
    for name in anchors + (("compile_budget",) if compile_knobs else ()):
        for knob in compile_knobs if name == "compile_budget" else KNOBS[name]:
            row: dict[str, Any] = {"policy": name, "knob": knob}
            try:
                applied = apply_policy(name, model, args, {}, knob)
            except NotApplicable as e:
                row["error"] = str(e)
                result["anchors"].append(row)
                continue
            try:
                row["peak"] = _peak(model, applied.step_model, args, seed, m.autocast)
                row["step_s"] = _time(model, applied.step_model, args, device, steps, amp)
                row["setup_s"] = applied.setup_s
            except Exception as e:  # an anchor that fails here is a result, not a crash
                row["error"] = f"{type(e).__name__}: {e}"
            finally:
                applied.undo()
            result["anchors"].append(row)

    for fraction in BUDGETS:
        made_here = None
        laptop_plan = laptop.get((m.name, fraction))
        budget = laptop_plan.budget_bytes if laptop_plan else int(fraction * graph.baseline_peak_bytes)
        try:
            made_here = ckptplan.solve(graph, budget, time_limit_s=time_limit)
        except ckptplan.CkptplanError as e:
            result["plans"].append({"source": "gpu", "fraction": fraction, "budget": budget, "error": str(e)})
        for source, plan in (("laptop", laptop_plan), ("gpu", made_here)):
            if plan is None:
                continue
            row = {
                "source": source,
                "fraction": fraction,
                "budget": plan.budget_bytes,
                "predicted_peak": plan.predicted_peak_bytes,
                "extra_forward_flops": plan.extra_forward_flops,
                "estimated_recompute_ns": plan.extra_cost_ns,
                "regions": len(plan.regions),
            }
            try:
                handle = ckptplan.apply(model, plan)
            except ckptplan.PlanMismatch as e:
                row["error"] = f"PlanMismatch at apply: {e}"
                result["plans"].append(row)
                continue
            try:
                row["peak"] = _peak(model, model, args, seed, m.autocast)
                row["fits"] = row["peak"] <= plan.budget_bytes
                row["peak_error"] = row["peak"] / plan.predicted_peak_bytes - 1
                row["grad_bitwise"], row["grad_rel_error"] = _grad_error(ref, _grads(model, model, args, seed, amp))
                row["step_s"] = _time(model, model, args, device, steps, amp)
            except ckptplan.PlanMismatch as e:
                row["error"] = f"PlanMismatch in the step: {e}"
            finally:
                handle.remove()
            result["plans"].append(row)
    return result


def best_anchors(result: dict[str, Any], budget: int) -> dict[str, dict]:
    """Each anchor's fastest measured knob whose peak fits ``budget``."""
    best: dict[str, dict] = {}
    for row in result["anchors"]:
        if "step_s" in row and row["peak"] <= budget:
            cur = best.get(row["policy"])
            if cur is None or row["step_s"] < cur["step_s"]:
                best[row["policy"]] = row
    return best


def summarize(results: list[dict], header: dict[str, Any]) -> str:
    mib = 2**20
    lines = [
        f"# GPU check: {header['device']}",
        "",
        f"Command: `{header['command']}`",
        "",
        f"torch {header['torch']}, ckptplan {header['ckptplan']}, {header['when']}",
        "",
        "| model | plan | budget MiB | predicted MiB | measured MiB | error | fits | grads (rel. err; "
        "unplanned repeat) | step ms | best anchor that fits (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    totals = {"violations": 0, "mismatches": 0, "worst_peak_error": 0.0, "slower_than_anchor": 0}
    for r in results:
        for p in r["plans"]:
            label = f"{p['source']} {round(100 * p['fraction'])}%"
            if "error" in p:
                totals["mismatches"] += "PlanMismatch" in p["error"]
                lines.append(f"| {r['model']} | {label} | {p['budget'] / mib:.0f} | | | | | {p['error'][:80]} | | |")
                continue
            best = best_anchors(r, p["budget"])
            anchor = min(best.values(), key=lambda a: a["step_s"], default=None)
            totals["violations"] += not p["fits"]
            totals["worst_peak_error"] = max(totals["worst_peak_error"], abs(p["peak_error"]))
            if anchor is not None and p["step_s"] > anchor["step_s"]:
                totals["slower_than_anchor"] += 1
            grads = "bitwise" if p["grad_bitwise"] else f"{p['grad_rel_error']:.1e}"
            lines.append(
                f"| {r['model']} | {label} | {p['budget'] / mib:.0f} | {p['predicted_peak'] / mib:.0f} | "
                f"{p['peak'] / mib:.0f} | {100 * p['peak_error']:+.2f}% | {'yes' if p['fits'] else 'NO'} | "
                f"{grads}; {r['unplanned_repeat_rel_error']:.1e} | {1e3 * p['step_s']:.1f} | "
                + (
                    f"{anchor['policy']} {anchor['knob'] if anchor['knob'] is not None else ''} "
                    f"{1e3 * anchor['step_s']:.1f}"
                    if anchor
                    else "none fits"
                )
                + " |"
            )
    lines += [
        "",
        f"Budget violations: {totals['violations']}; PlanMismatch: {totals['mismatches']}; "
        f"largest |measured/predicted - 1|: {100 * totals['worst_peak_error']:.2f}%; plans slower than "
        f"the best anchor that fits: {totals['slower_than_anchor']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU (the test suite runs this)")
    ap.add_argument("--make-plans", action="store_true", help="write plans/gpu/*.yaml from meta tensors, exit")
    ap.add_argument("--models", default="", help="comma-separated subset of the models")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median)")
    ap.add_argument("--time-limit", type=float, default=20.0, help="solver time limit per plan, seconds")
    ap.add_argument("--compile", default="", help="torch.compile activation_memory_budget knobs, e.g. 0.5,0.2")
    a = ap.parse_args(argv)
    models = _models(a.smoke)
    if a.models:
        wanted = set(a.models.split(","))
        models = [m for m in models if m.name in wanted]
    dtype = torch.float32 if a.smoke else torch.bfloat16
    if a.make_plans:
        laptop_plans(models, target="cuda", dtype=dtype, time_limit=a.time_limit, write=True)
        return {}
    device = "cpu" if a.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; run with --smoke on a CPU, or --make-plans for the plans")
    if a.smoke:  # a laptop plan for the device the smoke run trains on
        laptop = laptop_plans(models, target="cpu", dtype=dtype, time_limit=a.time_limit, write=False)
    else:
        laptop = {
            (m.name, f): ckptplan.load_plan(_plan_path(m.name, f))
            for m in models
            for f in BUDGETS
            if _plan_path(m.name, f).exists()
        }
    knobs = tuple(float(k) for k in a.compile.split(",") if k.strip())
    header = {
        "command": " ".join(["python benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "ckptplan": ckptplan.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    results = []
    a.out.mkdir(parents=True, exist_ok=True)
    for m in models:
        started = time.perf_counter()
        results.append(
            check_model(
                m,
                laptop,
                device=device,
                dtype=dtype,
                steps=a.steps,
                time_limit=a.time_limit,
                anchors=ANCHORS,
                compile_knobs=knobs,
            )
        )
        results[-1]["seconds"] = round(time.perf_counter() - started, 1)
        payload = {"header": header, "results": results}
        (a.out / "gpu_check.json").write_text(json.dumps(payload, indent=1, default=str))  # as it goes
        (a.out / "gpu_check.md").write_text(summarize(results, header))
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"{m.name}: {results[-1]['seconds']} s", file=sys.stderr)
    return {"header": header, "results": results}


if __name__ == "__main__":
    main()
    sys.exit(0)
