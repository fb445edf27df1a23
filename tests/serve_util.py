"""A live ``ckptplan serve`` on a free loopback port, for the serve tests (a process of its own)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, store: Path, *args: str, log: Path | None = None) -> None:
        self.store, self.args = store, args
        self.log = log or store.with_suffix(".log")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180.0) -> "LiveServer":
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("CKPTPLAN_TOKEN", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ckptplan.cli",
                    "serve",
                    "--port",
                    str(self.port),
                    "--store",
                    str(self.store),
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                status, h, _ = self.get("/healthz")
                if status == 200 and h["workers_ready"]:
                    return self
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not become ready in {timeout_s} s: {self.log.read_text()[-2000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    # ---- requests ----------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 300.0,
    ) -> tuple[int, dict, bytes]:
        req = urllib.request.Request(self.url + path, data=body, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def get(self, path: str) -> tuple[int, Any, dict]:
        status, headers, raw = self.request("GET", path)
        return status, json.loads(raw), headers

    def post_solve(
        self, body: bytes, *, gzipped: bool = True, headers: dict[str, str] | None = None, timeout: float = 300.0
    ) -> tuple[int, dict, dict]:
        h = {"Content-Type": "application/json", **({"Content-Encoding": "gzip"} if gzipped else {}), **(headers or {})}
        status, rh, raw = self.request("POST", "/v1/solve", body, h, timeout)
        return status, json.loads(raw), rh

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /metrics, by name."""
        _, _, raw = self.request("GET", "/metrics")
        out = {}
        for line in raw.decode().splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.split()
                out[name] = float(value)
        return out


def solve_body(graph, budget, **options) -> bytes:
    from ckptplan.serve.client import request_body

    return request_body(graph, budget, **options)


def plain_json(body: bytes) -> bytes:
    return gzip.decompress(body)
