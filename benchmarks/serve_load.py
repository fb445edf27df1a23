"""Load on `ckptplan serve`: throughput and latency percentiles of cached plan requests, single flight.

    python benchmarks/serve_load.py --out benchmarks/results/serve

starts a server on a free loopback port (its own store in a temporary folder), traces the tests' tiny
GPT-2 (batch 8 x 128), solves it once, then sends ``--requests`` identical solve requests from
``--clients`` concurrent clients (each its own keep-alive connection) and records throughput, latency
percentiles, errors and the machine's load average, for each of ``--rounds`` rounds; then ``--burst``
identical concurrent requests for an uncached budget and the number of solves they caused (single
flight: 1). Also the upload's size for that model and for the Llama-2-7B shape on the meta device
(examples/llama.py:llama_7b). Writes serve_load.json and serve_load.md.
``run`` is what tests/test_serve.py calls against its own server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))


def run(url: str, body: bytes, *, requests: int, clients: int) -> dict:
    """``requests`` POST /v1/solve of ``body`` (gzip JSON) spread over ``clients`` threads."""
    u = urllib.parse.urlsplit(url)
    per = [requests // clients + (i < requests % clients) for i in range(clients)]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}

    def client(n: int) -> None:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        mine, codes = [], []
        start.wait()
        for _ in range(n):
            t = time.perf_counter()
            try:
                conn.request("POST", "/v1/solve", body=body, headers=headers)
                r = conn.getresponse()
                r.read()
                codes.append(str(r.status))
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            mine.append(time.perf_counter() - t)
        conn.close()
        with lock:
            latencies.extend(mine)
            for c in codes:
                statuses[c] = statuses.get(c, 0) + 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(client, per))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return round(1e3 * lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 2) if lat else float("nan")

    errors_total = len(errors) + sum(n for s, n in statuses.items() if s != "200")
    return {
        "requests": requests,
        "clients": clients,
        "wall_s": round(wall, 3),
        "throughput_rps": round(requests / wall, 1),
        "statuses": statuses,
        "errors": errors_total,
        "error_samples": errors[:5],
        "latency_ms": {
            "p50": pct(50),
            "p90": pct(90),
            "p99": pct(99),
            "max": pct(100),
            "mean": round(1e3 * sum(lat) / len(lat), 2) if lat else float("nan"),
        },
    }


def upload_sizes() -> dict:
    import torch

    from ckptplan import trace
    from ckptplan.serve import wire

    import gpt2
    import llama

    out = {}
    for name, make in (
        ("gpt2_tiny batch 8 x 128 (cpu)", lambda: gpt2.gpt2_tiny(batch_size=8, seq_len=128)),
        ("llama_7b batch 1 x 4096 (meta)", lambda: llama.llama_7b()),
    ):
        model, args = make()
        t = time.perf_counter()
        g = trace(model, *args)
        traced = time.perf_counter() - t
        t = time.perf_counter()
        raw = wire.dumps(wire.encode(g))
        gz = wire.compress(raw)
        encode_s = time.perf_counter() - t
        t = time.perf_counter()
        wire.decode(json.loads(wire.decompress(gz, limit=2**31)))
        out[name] = {
            "forward_ops": g.num_forward,
            "storages": len(g.storages),
            "json_bytes": len(raw),
            "gzip_bytes": len(gz),
            "trace_s": round(traced, 2),
            "encode_s": round(encode_s, 3),
            "decode_and_validate_s": round(time.perf_counter() - t, 3),
        }
        del model
        torch.manual_seed(0)
    return out


def _uvicorn() -> str:
    """uvicorn's event loop and HTTP parser: uvloop and httptools with the [standard] extra."""
    try:
        import httptools  # noqa: F401  only whether it is installed
        import uvloop  # noqa: F401  the same

        return "uvicorn with uvloop and httptools"
    except ImportError:
        return "uvicorn with asyncio and h11"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="Rounds of --requests, each recorded.")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve")
    a = ap.parse_args()

    import torch

    from ckptplan import trace
    from ckptplan.serve.client import request_body
    from tests.serve_util import LiveServer

    import gpt2
    from common import describe

    torch.set_num_threads(1)
    sizes = upload_sizes()
    model, args = gpt2.gpt2_tiny(batch_size=8, seq_len=128)
    graph = trace(model, *args)
    with tempfile.TemporaryDirectory() as tmp:
        server = LiveServer(Path(tmp) / "plans.sqlite", "--workers", "1").start()
        try:
            body = request_body(graph, "80%")
            assert server.post_solve(body)[0] == 200
            run(server.url, body, requests=100, clients=a.clients)  # warm: connections, caches
            rounds = []
            for _ in range(a.rounds):
                rounds.append(
                    {
                        **run(server.url, body, requests=a.requests, clients=a.clients),
                        "load_average_1min": round(os.getloadavg()[0], 2),
                    }
                )
            before = server.metrics()["ckptplan_solves_total"]
            burst = run(server.url, request_body(graph, "75%", gap=0.0), requests=a.burst, clients=a.burst)
            burst["solves"] = int(server.metrics()["ckptplan_solves_total"] - before)
        finally:
            server.stop()
    met = [r["latency_ms"]["p99"] < 50 and r["errors"] == 0 for r in rounds]
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": describe(f"{_uvicorn()}"),
        "cached_rounds": rounds,
        "single_flight_burst": burst,
        "upload_sizes": sizes,
        "target": {"cached_p99_ms_under": 50, "rounds_met": sum(met), "rounds": len(met)},
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "serve_load.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# serve load\n\n`{result['command']}` on {result['machine']}\n",
        "| requests | clients | throughput | p50 | p90 | p99 | max | errors | load average (1 min, after) |",
        "|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {r['requests']} | {r['clients']} | {r['throughput_rps']} req/s | {r['latency_ms']['p50']} ms | "
            f"{r['latency_ms']['p90']} ms | {r['latency_ms']['p99']} ms | {r['latency_ms']['max']} ms | "
            f"{r['errors']} | {r['load_average_1min']} |"
            for r in rounds
        ],
        f"\np99 under 50 ms with no error in {sum(met)} of {len(met)} rounds.",
        f"\n{burst['requests']} identical concurrent uncached requests: {burst['solves']} solve, "
        f"{burst['errors']} errors, p99 {burst['latency_ms']['p99']} ms.\n",
        "| upload | forward ops | storages | JSON | gzip |",
        "|---|---|---|---|---|",
    ]
    for name, s in sizes.items():
        lines.append(
            f"| {name} | {s['forward_ops']:,} | {s['storages']:,} | {s['json_bytes'] / 1e6:.2f} MB | "
            f"{s['gzip_bytes'] / 1e6:.2f} MB |"
        )
    (a.out / "serve_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
