"""The HTML report's plots, drawn with matplotlib and returned as SVG text to inline in the page.

Four plots, each from a v1 report (docs/report.md) alone: bytes and dirty pages per precopy round, the
throughput over the transfer, the pause broken down, and the stages on a timeline. A plot whose data the
report lacks (a dry run, a run that failed before precopy) is a ``Plot`` without SVG and with a note
saying why. matplotlib is imported here, and this module only by ``report_html.render_html``, so the CLI
starts without it; figures are made with ``matplotlib.figure.Figure`` (no pyplot, no GUI backend, no
global state) and saved by the SVG backend with text kept as text, so the page can be searched and a test
can read the labels.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MIB = 1024 * 1024
# stop-and-copy's steps (migration/outgoing.py, stages/modules/stop_and_copy.py), in the order they happen.
PAUSE_ORDER = ("pause_vcpus", "final_pages", "vcpu_and_device_state", "target_confirmed")
SHARED, SEALED, DIRTY, FINAL = "#4c78a8", "#f58518", "#54a24b", "#b279a2"
STATUS_COLOURS = {"done": "#54a24b", "failed": "#e45756", "running": "#eeca3b", "skipped": "#bab0ac",
                  "pending": "#bab0ac"}  # fmt: skip


@dataclass(frozen=True)
class Plot:
    """One plot of the page: ``svg`` is None when the report has no data for it, and ``note`` says why."""

    id: str
    title: str
    svg: str | None
    note: str


def plots(report: Mapping[str, Any]) -> list[Plot]:
    """The report's four plots, in page order."""
    import matplotlib

    migration = report.get("migration") or {}
    rounds = [r for r in migration.get("rounds") or [] if isinstance(r, Mapping)]
    why = _why_missing(report)
    with matplotlib.rc_context(
        {
            "svg.fonttype": "none",  # text stays <text>, not glyph outlines: searchable, and smaller
            "text.parse_math": False,  # a '$' in a stage or step name is a dollar, not TeX
            "font.family": "sans-serif",
            "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial"],
            "font.size": 9.0,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
        }
    ):
        return [
            _maybe("plot-rounds", "Bytes and dirty pages per precopy round", rounds,
                   _rounds_figure, f"No precopy rounds: {why}."),
            _maybe("plot-throughput", "Throughput over the transfer",
                   [r for r in rounds if _num(r.get("seconds")) and _num(r.get("bytes_sent")) is not None],
                   _throughput_figure, f"No round with a duration: {why}."),
            _maybe("plot-pause", "The pause broken down", _pause_steps(migration),
                   lambda steps: _pause_figure(steps, migration), f"No pause: {why}."),
            _maybe("plot-timeline", "Stage timeline", _timed_stages(report),
                   lambda spans: _timeline_figure(spans, report), f"No stage has run: {why}."),
        ]  # fmt: skip


def _maybe(plot_id: str, title: str, data: Sequence[Any], draw: Callable[[Any], Figure], note: str) -> Plot:
    if not data:
        return Plot(plot_id, title, None, note)
    return Plot(plot_id, title, _svg(draw(data), plot_id), "")


# -- the plots -----------------------------------------------------------------------------------------


def _rounds_figure(rounds: Sequence[Mapping[str, Any]]) -> Figure:
    """Stacked shared/sealed bytes per round above the pages left dirty after it; the final round (sent
    in the pause) hatched and labelled."""
    fig, (top, bottom) = _figure(2, height=5.2, sharex=True)
    xs = list(range(len(rounds)))
    labels = [
        f"{r.get('round', i + 1)}" + ("\nfinal" if r.get("final") else "") for i, r in enumerate(rounds)
    ]
    shared = [(_num(r.get("bytes_shared")) or 0) / MIB for r in rounds]
    sealed = [(_num(r.get("bytes_sealed")) or 0) / MIB for r in rounds]
    hatch = ["//" if r.get("final") else "" for r in rounds]
    top.bar(xs, shared, color=SHARED, label="shared (sent as is)", hatch=hatch, edgecolor="white")
    bars = top.bar(xs, sealed, bottom=shared, color=SEALED, label="sealed (by the helper)", hatch=hatch,
                   edgecolor="white")  # fmt: skip
    top.bar_label(bars, labels=[_mib(a + b) for a, b in zip(shared, sealed, strict=True)], fontsize=8)
    top.set_ylabel("MiB sent")
    top.legend(loc="upper center", frameon=False)
    dirty = [_num(r.get("dirty_after")) or 0 for r in rounds]
    colours = [FINAL if r.get("final") else DIRTY for r in rounds]
    bars = bottom.bar(xs, dirty, color=colours, hatch=hatch, edgecolor="white")
    bottom.bar_label(bars, labels=[f"{int(d)}" for d in dirty], fontsize=8)
    bottom.set_ylabel("pages dirty after")
    bottom.set_xlabel("precopy round (the final one runs in the pause)")
    bottom.set_xticks(xs, labels)
    for x, r in zip(xs, rounds, strict=True):
        if r.get("final"):
            for ax in (top, bottom):
                ax.axvspan(x - 0.5, x + 0.5, color=FINAL, alpha=0.12, linewidth=0)
            top.annotate("in the pause", (x, 1.0), xycoords=("data", "axes fraction"), ha="center",
                         va="top", fontsize=8, color="#6a3d75")  # fmt: skip
    for ax in (top, bottom):
        ax.margins(y=0.18)
    return fig


def _throughput_figure(rounds: Sequence[Mapping[str, Any]]) -> Figure:
    """Each round's bytes_sent/seconds, held over the round and marked where it ended, on the cumulative
    time of the transfer (the gaps between rounds are left out)."""
    fig, (ax,) = _figure(1, height=3.2)
    edges, rates = [0.0], []
    for r in rounds:
        seconds = float(_num(r.get("seconds")) or 0.0)
        edges.append(edges[-1] + seconds)
        rates.append(float(_num(r.get("bytes_sent")) or 0.0) / seconds / MIB)
    ax.stairs(rates, edges, fill=True, color=SHARED, alpha=0.25)
    ax.stairs(rates, edges, color=SHARED, label="rate over the round")
    finals = [bool(r.get("final")) for r in rounds]
    ends = edges[1:]
    for final in (False, True):
        points = [(x, y) for x, y, f in zip(ends, rates, finals, strict=True) if f is final]
        if points:
            ax.plot(*zip(*points, strict=True), "o", color=FINAL if final else SHARED,
                    label="final round (in the pause)" if final else "end of a precopy round")  # fmt: skip
    # Label from the right (the final round first) and skip a label that would sit on the last one: late
    # rounds are short and crowd the right edge; their markers still show.
    room, last = 0.06 * edges[-1], float("inf")
    for index in reversed(range(len(rounds))):
        x, r = ends[index], rounds[index]
        if last - x < room:
            continue
        name = "final" if r.get("final") else f"round {r.get('round', index + 1)}"
        ax.annotate(
            name, (x, rates[index]), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8
        )
        last = x
    ax.set_xlabel("seconds of transfer (rounds back to back)")
    ax.set_ylabel("MiB/s")
    ax.set_ylim(bottom=0)
    ax.margins(y=0.25)
    ax.legend(loc="lower left", frameon=False)
    return fig


def _pause_figure(steps: Sequence[tuple[str, float]], migration: Mapping[str, Any]) -> Figure:
    """One bar per step of the pause, in milliseconds, against the downtime the run measured."""
    fig, (ax,) = _figure(1, height=0.9 + 0.38 * len(steps))
    names = [name for name, _ in steps]
    millis = [seconds * 1e3 for _, seconds in steps]
    bars = ax.barh(names, millis, color=SEALED)
    ax.bar_label(bars, labels=[f"{ms:.1f} ms" for ms in millis], padding=3, fontsize=8)
    ax.invert_yaxis()  # the steps in the order they happened, top down
    for key, label, style in (("downtime_seconds", "downtime", "--"),
                              ("source_paused_seconds", "source paused", ":")):  # fmt: skip
        value = _num(migration.get(key))
        if value is not None:
            ax.axvline(value * 1e3, color="#444444", linestyle=style, label=f"{label} {value * 1e3:.1f} ms")
    ax.set_xlabel("milliseconds (each step from its own start; some steps include others)")
    ax.margins(x=0.15)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", frameon=True, framealpha=0.9)
    return fig


def _timeline_figure(
    spans: Sequence[tuple[str, str, float, float | None]], report: Mapping[str, Any]
) -> Figure:
    """A bar per stage from its start to its end (seconds since the first start), coloured by status."""
    fig, (ax,) = _figure(1, height=0.9 + 0.34 * len(spans))
    origin = min(start for _, _, start, _ in spans)
    end_of_report = _time(report.get("generated_at"))
    for row, (_, status, start, finish) in enumerate(spans):
        end = finish if finish is not None else max(end_of_report or start, start)
        ax.barh(row, end - start, left=start - origin, color=STATUS_COLOURS.get(status, "#999999"),
                hatch="//" if finish is None else "", edgecolor="white")  # fmt: skip
        ax.annotate(f"{_duration(end - start)} {status}", (end - origin, row), textcoords="offset points",
                    xytext=(4, 0), va="center", fontsize=7)  # fmt: skip
    ax.set_yticks(range(len(spans)), [name for name, *_ in spans])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first stage started")
    ax.margins(x=0.12)
    return fig


# -- data ----------------------------------------------------------------------------------------------


def _pause_steps(migration: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The pause's steps in the order they happen (the checkpoint keeps them sorted by name); steps this
    reader does not know follow in the report's order."""
    pause = migration.get("pause")
    if not isinstance(pause, Mapping):
        return []
    steps = [(str(name), float(value)) for name, value in pause.items() if _num(value) is not None]
    known = {name: index for index, name in enumerate(PAUSE_ORDER)}
    return sorted(steps, key=lambda step: known.get(step[0], len(known)))


def _timed_stages(report: Mapping[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """(name, status, start, finish or None) of every stage that started, in plan order."""
    spans = []
    for stage in report.get("stages") or []:
        start = _time(stage.get("started"))
        if start is not None:
            spans.append(
                (str(stage.get("name")), str(stage.get("status")), start, _time(stage.get("finished")))
            )
    return spans


def _why_missing(report: Mapping[str, Any]) -> str:
    """Why a plot has nothing to draw, in the report's own terms."""
    outcome = report.get("outcome")
    if report.get("kind") == "dry-run" or outcome == "planned":
        return "a dry run moves nothing"
    if outcome == "refused":
        return "preflight refused the run; nothing was launched"
    if outcome == "none":
        return "the plan was never applied"
    failed = [s.get("name") for s in report.get("stages") or [] if s.get("status") == "failed"]
    stage = (report.get("error") or {}).get("stage") or (failed[0] if failed else None)
    if stage:
        return f"the run ended in {stage}, and the report holds none"
    return "the report has no data for it"


# -- matplotlib to SVG ---------------------------------------------------------------------------------


def _figure(rows: int, *, height: float, sharex: bool = False) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, height), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=sharex, squeeze=False)
    return fig, [row[0] for row in axes]


_ID = re.compile(r'(\bid="|url\(#|href="#)([^")]+)')


def _svg(fig: Figure, plot_id: str) -> str:
    """The figure as an ``<svg>`` element for an HTML page: no XML prolog or metadata, every id prefixed
    with the plot's (four plots inlined in one page must not share ids), the root named ``plot_id-svg``
    and scaled to the page's width."""
    import matplotlib

    out = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": plot_id}):  # ids stable from run to run
        fig.savefig(out, format="svg", metadata={"Date": None, "Creator": None})
    text = out.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    text = _ID.sub(lambda m: f"{m.group(1)}{plot_id}-{m.group(2)}", text)
    root_end = text.index(">")
    root = re.sub(r'\s(width|height)="[^"]*"', "", text[:root_end])
    root += f' id="{plot_id}-svg" role="img" style="width:100%;height:auto"'
    return root + text[root_end:].rstrip() + "\n"


# -- small helpers -------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def _mib(value: float) -> str:
    return f"{value:.1f} MiB" if value >= 0.1 else f"{value * 1024:.0f} KiB"


def _duration(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"
