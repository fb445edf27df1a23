"""ckptplan serve under faults, on loopback: a full queue answers 503 with Retry-After; the server killed
with SIGKILL in the middle of a solve restarts on its store, which holds no partial entry, and the
retried request is solved."""

from __future__ import annotations

import threading
import time

import pytest

import ckptplan
from ckptplan.serve.store import Store

from .serve_util import LiveServer, solve_body

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")


def test_full_queue_503_then_kill_9_mid_solve_then_restart(tmp_path, traced):
    graph = traced("gpt2")[2]
    store = tmp_path / "plans.sqlite"
    server = LiveServer(store, "--workers", "1", "--queue", "1").start()
    try:
        assert server.post_solve(solve_body(graph, "90%"))[0] == 200  # one whole entry before the crash
        slow = solve_body(graph, "60%", gap=0.0)  # seconds of CP-SAT search on this graph
        answer: dict = {}

        def ask() -> None:
            try:
                answer["status"] = server.post_solve(slow)[0]
            except OSError as e:  # the server dies under it
                answer["error"] = e

        asker = threading.Thread(target=ask)
        asker.start()
        end = time.monotonic() + 60
        while server.metrics()["ckptplan_queue_depth"] < 1:
            assert time.monotonic() < end, "the solve never started"
            time.sleep(0.01)
        status, payload, headers = server.post_solve(solve_body(graph, "88%"))
        assert status == 503 and payload["error"] == "Busy", payload
        assert int(headers["retry-after"]) >= 1 and "retry in" in payload["message"]
        server.kill9()  # the 503 just proved the 60% solve is still running
        asker.join(60)
        assert "status" not in answer and isinstance(answer.get("error"), OSError)
    finally:
        server.stop()

    s = Store(store)  # the store opens as it is: whole, and without the killed request's entry
    assert s.recovered is None and s.count() == 1
    (entry,) = s.recent()
    assert entry.budget == "90%" and ckptplan.Plan is not None and entry.body.startswith("# ckptplan plan")
    s.close()

    restarted = LiveServer(store, "--workers", "1").start()
    try:
        status, payload, _ = restarted.post_solve(slow)
        assert status == 200 and payload["cache"] == "solved"
        assert payload["plan"] == ckptplan.solve(graph, "60%", gap=0.0).to_yaml()
        _, health, _ = restarted.get("/healthz")
        assert health["plans"] == 2 and health["recovered_corrupt_store"] is None
    finally:
        restarted.stop()


def test_a_corrupt_store_is_reported_by_the_restarted_server(tmp_path):
    store = tmp_path / "plans.sqlite"
    store.write_bytes(b"garbage" * 1000)
    server = LiveServer(store, "--workers", "1").start()
    try:
        _, health, _ = server.get("/healthz")
        assert health["recovered_corrupt_store"] == str(tmp_path / "plans.sqlite.corrupt-1")
        assert health["plans"] == 0
    finally:
        server.stop()
    assert "is corrupt" in server.log.read_text()
