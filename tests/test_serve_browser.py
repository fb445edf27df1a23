"""The review pages in a real headless browser: Debian's chromium driven by Playwright.

CI installs chromium (``.ci/run``) and sets CKPTPLAN_REQUIRE_BROWSER=1, so a missing browser fails there;
elsewhere these tests are skipped, saying why.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from ckptplan.serve.client import sweep_remote

from .serve_util import LiveServer, solve_body

CHROMIUM = Path(os.environ.get("CKPTPLAN_CHROMIUM", "/usr/bin/chromium"))
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _need(ok: bool, why: str) -> None:
    if not ok:
        if os.environ.get("CKPTPLAN_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{why}, and CKPTPLAN_REQUIRE_BROWSER=1 (CI) needs the browser tests", pytrace=False)
        pytest.skip(why, allow_module_level=True)


try:
    import fastapi  # noqa: F401  only whether it is installed: the pages are served by it
    from playwright.sync_api import expect, sync_playwright
except ImportError as e:
    _need(False, f"{e.name} is not installed (pip install -e '.[test]')")
_need(CHROMIUM.exists(), f"no chromium at {CHROMIUM} (apt-get install -y chromium)")

EVIL = '<img src=x onerror="window.pwned=1">'


@pytest.fixture(scope="module")
def server(tmp_path_factory, traced):
    s = LiveServer(tmp_path_factory.mktemp("browser") / "plans.sqlite", "--workers", "1").start()
    graph = traced("gpt2")[2]
    for budget in ("90%", "80%"):
        assert s.post_solve(solve_body(graph, budget))[0] == 200
    doc = json.loads(__import__("gzip").decompress(solve_body(graph, "10%")))
    doc["graph"]["graphs"][0]["model_name"] = EVIL  # not part of the fingerprint: a valid upload
    assert s.post_solve(json.dumps(doc).encode(), gzipped=False)[0] == 422  # infeasible, stored
    sweep_remote(graph, ["90%", "80%", "70%"], server=s.url)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True, args=ARGS
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def test_index_lists_the_plans_with_their_numbers(server, page):
    page.goto(server.url + "/")
    expect(page).to_have_title("ckptplan plans")
    rows = page.locator("#plans tr")
    expect(rows).to_have_count(5)  # header and four answers
    header = page.locator("#plans th").all_inner_texts()
    assert header == [
        "model",
        "budget",
        "predicted peak",
        "extra FLOPs",
        "est. recompute time",
        "status",
        "objective",
        "when",
    ]
    texts = [r.inner_text() for r in rows.all()[1:]]
    assert sum(bool(re.search(r"^GPT\t.*\t(optimal|feasible)\t", t)) for t in texts) == 2, texts
    assert any("infeasible" in t and "10%" in t for t in texts)
    assert any("swept" in t and "90%,80%,70%" in t for t in texts)
    assert all(re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", t) for t in texts)
    assert any(re.search(r"\d+\.\d+ MiB", t) and "ms" in t for t in texts)


def test_the_markup_in_a_model_name_is_shown_not_run(server, page):
    page.goto(server.url + "/")
    expect(page.get_by_text(EVIL, exact=True)).to_have_count(1)
    assert page.evaluate("window.pwned") is None
    assert page.locator("#plans img").count() == 0
    page.get_by_text(EVIL, exact=True).click()
    expect(page.locator("#error")).to_contain_text("infeasible: budget")
    assert page.evaluate("window.pwned") is None


def test_a_plan_page_folds_identical_layers(server, page):
    page.goto(server.url + "/")
    page.locator("#plans tr:has(.status-optimal), #plans tr:has(.status-feasible)").first.locator("a").click()
    expect(page.locator("h1")).to_contain_text("GPT at")
    summary = page.locator("#summary").inner_text()
    for row in ("peak, this plan", "extra forward FLOPs", "estimated recompute time", "solver"):
        assert row in summary
    groups = page.locator("details.group summary").all_inner_texts()
    assert groups and any(re.search(r"\{0-\d+\}.* x\d+\)", g) for g in groups), groups  # layers folded
    assert page.locator("details.group td span.recompute").count() > 0
    page.get_by_text("plan file (YAML)").click()
    assert page.locator("body").inner_text().startswith("# ckptplan plan for GPT")


def test_two_plans_can_be_diffed(server, page):
    page.goto(server.url + "/")
    selects = page.locator("#diff-form select")
    options = selects.first.locator("option")
    expect(options).to_have_count(2)  # the two plans (not the refusal, nor the sweep)
    values = [o.get_attribute("value") for o in options.all()]
    selects.nth(0).select_option(values[0])
    selects.nth(1).select_option(values[1])
    page.locator("#diff-form button").click()
    expect(page.locator("h1")).to_have_text("Diff")
    table = page.locator("#diff").inner_text()
    assert "predicted_peak_bytes" in table and "budget" in table
    page.goto(server.url + f"/diff?a={values[0]}&b={values[0]}")
    expect(page.locator("#same")).to_have_text("The two plans are the same.")


def test_a_sweep_page_draws_the_pareto_plot(server, page):
    page.goto(server.url + "/")
    page.locator("#plans tr", has_text="swept").locator("a").click()
    expect(page.locator("h1")).to_contain_text("sweep at 90%,80%,70%")
    plot = page.locator("svg#pareto")
    expect(plot).to_be_visible()
    policies = [p.get_attribute("data-policy") for p in plot.locator("polyline.policy").all()]
    assert policies[0] == "ckptplan" and len(policies) >= 2
    assert plot.locator("circle").count() >= 3  # ckptplan's three budgets at least
    box = plot.bounding_box()
    assert box and box["width"] > 300 and box["height"] > 200
    rows = page.locator("#sweep tr")
    assert rows.count() > 3 and "ckptplan" in rows.nth(1).inner_text()
