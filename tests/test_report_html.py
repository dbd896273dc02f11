"""``render_html``: one self-contained page per v1 report, with its plots as inline SVG drawn by matplotlib.

These read the page as written; tests/test_report_browser.py renders it in Chromium as a person would.
"""

from __future__ import annotations

import functools
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from htmlpage import Page
from reportdata import OUTCOMES, load

from confplan.report_html import render_html, write_html

PLOTS = ("plot-rounds", "plot-throughput", "plot-pause", "plot-timeline")


@functools.cache
def rendered(outcome: str) -> str:
    """The page of an unchanged fixture (rendering takes a second; several tests read the same page)."""
    return render_html(load(outcome))


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_the_page_is_self_contained_and_its_ids_unique(outcome: str) -> None:
    html = rendered(outcome)
    page = Page(html)
    assert not {"script", "link", "img", "iframe", "object"} & set(page.tags), "nothing runs or loads"
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#)""", html), "no reference outside the page"
    assert "@import" not in html and "url(http" not in html
    # The only URLs are the SVG namespace names, which nothing fetches.
    assert set(re.findall(r"https?://[^\s\"')]+", html)) <= {"http://www.w3.org/2000/svg",
                                                             "http://www.w3.org/1999/xlink"}  # fmt: skip
    repeated = [ident for ident, count in page.ids.items() if count > 1]
    assert repeated == [], "four inlined SVGs must not share ids"
    assert all(ident in page.ids for ident in (*PLOTS, "summary", "outcome"))


def test_a_success_has_every_plot_with_its_labels() -> None:
    doc = load("success")
    page = Page(rendered("success"))
    for plot in PLOTS:
        assert page.attrs[plot]["data-has-data"] == "yes"
        assert f"{plot}-svg" in page.ids, f"{plot} has its SVG inline"
    rounds = page.texts["plot-rounds-svg"]
    assert {"1", "2", "3", "4", "5", "6", "final", "in the pause"} <= set(rounds), (
        "round numbers, final marked"
    )
    assert "170.6 MiB" in rounds and "5230" in rounds, "bytes of round 1 and its dirty pages, as labels"
    assert {"round 1", "final", "MiB/s"} <= set(page.texts["plot-throughput-svg"])
    pause = page.texts["plot-pause-svg"]
    assert set(doc["migration"]["pause"]) <= set(pause) and "19.1 ms" in pause and "downtime 41.2 ms" in pause
    timeline = page.texts["plot-timeline-svg"]
    assert [name for name in timeline if name in {s["name"] for s in doc["stages"]}] == [
        s["name"] for s in doc["stages"]
    ], "every stage on the timeline, in plan order"
    assert "succeeded" in page.text("outcome") and "error" not in page.ids
    summary = page.text("summary")
    assert "41.2 ms" in summary and "0 (done)" in summary and "190.4 MiB" in summary


def test_a_failure_shows_the_error_and_says_why_plots_are_empty() -> None:
    doc = load("failed-precopy")
    page = Page(rendered("failed-precopy"))
    error = page.text("error")
    assert doc["error"]["message"].splitlines()[1] in error and doc["error"]["hint"] in error
    assert "in stage precopy" in error
    for plot in ("plot-rounds", "plot-throughput", "plot-pause"):
        assert page.attrs[plot]["data-has-data"] == "no" and f"{plot}-svg" not in page.ids
        assert "the run ended in precopy" in page.text(plot)
    assert page.attrs["plot-timeline"]["data-has-data"] == "yes"
    assert "41.60 s failed" in page.texts["plot-timeline-svg"]
    assert "failed" in page.text("stage-table") and "pending" in page.text("stage-table")


@pytest.mark.parametrize(
    ("outcome", "why"),
    [("dry-run", "a dry run moves nothing"), ("preflight-refused", "preflight refused the run")],
)
def test_without_a_run_every_plot_is_a_note_and_the_tables_come_first(outcome: str, why: str) -> None:
    html = rendered(outcome)
    page = Page(html)
    for plot in PLOTS:
        assert page.attrs[plot]["data-has-data"] == "no" and why in page.text(plot)
    assert "<svg" not in html
    assert html.index('id="preflight"') < html.index('id="plots"')


def test_report_text_is_escaped_everywhere() -> None:
    doc = load("success")
    doc["stages"][0]["name"] = "<script>alert(1)</script>$x$"
    doc["migration"]["pause"] = {"<b>step</b> & $money$": 0.01}
    html = render_html(doc)
    assert "<script>" not in html and "<b>step</b>" not in html
    page = Page(html)
    assert "<script>alert(1)</script>$x$" in page.texts["plot-timeline-svg"], "a $ is not TeX"
    assert "<b>step</b> & $money$" in page.texts["plot-pause-svg"]
    refused = Page(rendered("preflight-refused"))
    assert 'port 4444 on 127.0.0.1 is taken by another process <pid 812 "nginx"> & in use' in refused.text(
        "preflight-table"
    )


def test_missing_and_odd_values_degrade_instead_of_failing() -> None:
    doc = load("success")
    doc["migration"].update(rounds=[{"round": 1, "seconds": 0, "bytes_sent": None}], pause={"x": None})
    doc["stages"][3]["finished"] = None  # a stage still running when the report was written
    doc["exit_code"] = 99
    page = Page(render_html(doc))
    assert page.attrs["plot-rounds"]["data-has-data"] == "yes"
    assert page.attrs["plot-throughput"]["data-has-data"] == "no"
    assert page.attrs["plot-pause"]["data-has-data"] == "no"
    assert "99 (unknown)" in page.text("summary")


def test_write_html_writes_the_page_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_html(path, load("success"))
    assert path.read_text() == rendered("success"), "the same page each time (stable SVG ids)"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_the_cli_and_the_html_module_start_without_matplotlib() -> None:
    """matplotlib costs ~0.5 s to import: only rendering a page may pay it."""
    code = (
        "import sys, confplan.cli, confplan.report_html, confplan.report_junit\n"
        "assert 'matplotlib' not in sys.modules, sorted(m for m in sys.modules if 'matplotlib' in m)[:3]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_pause_steps_are_drawn_in_the_order_they_happen() -> None:
    """The checkpoint stores a stage's result with its keys sorted: the reader puts the steps back in time
    order, and keeps steps it does not know, after the others."""
    doc = load("success")
    doc["migration"]["pause"] = dict(sorted({**doc["migration"]["pause"], "a_new_step": 0.002}.items()))
    texts = Page(render_html(doc)).texts["plot-pause-svg"]
    order = [t for t in texts if t in doc["migration"]["pause"]]
    assert order == ["pause_vcpus", "final_pages", "vcpu_and_device_state", "target_confirmed", "a_new_step"]
