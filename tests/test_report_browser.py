"""The HTML report as a person sees it: rendered by a real browser (Debian's headless Chromium), its DOM
read back and a screenshot taken, checked for the plots being there and drawn.

`make test` installs Chromium (as root, with apt-get) when it is missing; without it these skip.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest
from htmlpage import Page
from PIL import Image
from reportdata import load

from confplan.report_html import write_html
from confplan.report_plots import DIRTY, SEALED, SHARED, STATUS_COLOURS

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (`make test` installs it with apt-get as root)",
)
WIDTH, HEIGHT = 1200, 3000
PLOTS = ("plot-rounds", "plot-throughput", "plot-pause", "plot-timeline")


def chromium(profile: Path, *args: str) -> str:
    """Run headless Chromium once with a fresh profile and nothing fetched in the background."""
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--hide-scrollbars", f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


def render(outcome: str, tmp_path: Path) -> tuple[Page, Image.Image]:
    """The fixture's page as Chromium builds it (its DOM) and paints it (a 1200x3000 screenshot)."""
    page = tmp_path / f"{outcome}.html"
    write_html(page, load(outcome))
    dom = chromium(tmp_path / "profile-dom", "--dump-dom", page.as_uri())
    shot = tmp_path / f"{outcome}.png"
    chromium(
        tmp_path / "profile-shot", f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", page.as_uri()
    )
    image = Image.open(shot).convert("RGB")
    return Page(dom), image


def pixels(image: Image.Image) -> Counter[tuple[int, int, int]]:
    """How many pixels of each colour the screenshot has."""
    return Counter({colour: count for count, colour in image.getcolors(maxcolors=WIDTH * HEIGHT) or []})


def rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def test_chromium_builds_and_paints_every_plot_of_a_success(tmp_path: Path) -> None:
    dom, image = render("success", tmp_path)
    for plot in PLOTS:
        assert f"{plot}-svg" in dom.ids, f"{plot}: no SVG in the browser's DOM"
    rounds = set(dom.texts["plot-rounds-svg"])
    assert {"1", "2", "3", "4", "5", "6", "final", "in the pause"} <= rounds
    assert {"pause_vcpus", "final_pages", "target_confirmed"} <= set(dom.texts["plot-pause-svg"])
    assert {"launch-source", "precopy", "cleanup-source"} <= set(dom.texts["plot-timeline-svg"])
    assert "succeeded" in dom.text("outcome")

    assert image.size == (WIDTH, HEIGHT)
    seen = pixels(image)
    assert len(seen) > 500, f"only {len(seen)} colours: the page did not paint"
    # The plots' fills are painted: solid bars in the exact colours the page asked for.
    for name, colour in (("sealed bytes", SEALED), ("shared bytes", SHARED), ("dirty pages", DIRTY)):
        assert seen[rgb(colour)] > 500, f"{name} ({colour}): {seen[rgb(colour)]} pixels"


def test_chromium_shows_a_failure_without_the_plots_it_has_no_data_for(tmp_path: Path) -> None:
    dom, image = render("failed-precopy", tmp_path)
    assert "plot-timeline-svg" in dom.ids
    for plot in ("plot-rounds", "plot-throughput", "plot-pause"):
        assert f"{plot}-svg" not in dom.ids and "the run ended in precopy" in dom.text(plot)
    assert "max_precopy_rounds" in dom.text("error")
    seen = pixels(image)
    assert seen[rgb(STATUS_COLOURS["failed"])] > 500, "the failed stage's bar on the timeline"
    assert seen[rgb(SEALED)] == 0, "no rounds or pause plot drawn"
    assert seen[rgb("#fdecea")] > 5000, "the error box"
