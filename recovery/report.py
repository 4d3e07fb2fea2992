"""The HTML report: one self-contained page an operator would rather look at.

Charts are hand-written HTML bars: a plotting library would add megabytes for
a few rectangles, the page must open offline, and text in HTML stays
readable on a phone where a scaled-down SVG's would not.
"""

from __future__ import annotations

from datetime import datetime

from markupsafe import Markup, escape

from recovery.config import Settings
from recovery.engine.classify import described
from recovery.money import format_totals


def _ticks(top: float, as_rate: bool) -> list[str]:
    """The axis's values at 0, half and the top."""
    if as_rate:
        return [f"{top * f:.0%}" for f in (0, 0.5, 1)]
    return [f"{top * f:g}" for f in (0, 0.5, 1)]


def hbars(
    rows: list[tuple[str, float, str]], top: float | None = None, as_rate: bool = False
) -> Markup:
    """Horizontal bars: (label, value, text shown beside the bar), scaled to
    `top` (rates: 1.0) or to the largest value, with the axis's values under
    them. HTML, not SVG, so a phone's narrow screen reflows the labels
    instead of shrinking the text (report.html's stylesheet lays it out)."""
    top = top or max((value for _, value, _ in rows), default=0) or 1
    parts = ['<div class="hbars">']
    for label, value, text in rows:
        share = min(max(value / top, 0.0), 1.0) * 100
        parts.append(
            f'<div class="row"><span class="label">{escape(label)}</span>'
            f'<span class="track"><span class="bar" style="width:{share:.1f}%"></span></span>'
            f'<span class="value">{escape(text)}</span></div>'
        )
    ticks = "".join(f"<span>{escape(t)}</span>" for t in _ticks(top, as_rate))
    parts.append(f'<div class="row axis"><span></span><span class="ticks">{ticks}</span></div>')
    parts.append("</div>")
    return Markup("".join(parts))  # noqa: S704 - every value in it went through escape()


def vbars(points: list[tuple[str, float]]) -> Markup:
    """Vertical bars over time, (day, value): the count's axis on the left,
    the first, middle and last day under them; each bar's value on hover."""
    if not points:
        return Markup("<p>No recoveries yet.</p>")
    top = max(v for _, v in points) or 1
    ticks = "".join(f"<span>{escape(t)}</span>" for t in reversed(_ticks(top, False)))
    bars = "".join(
        f'<span class="bar" style="height:{100 * value / top:.1f}%"'
        f' title="{escape(day)}: {value:g}"></span>'
        for day, value in points
    )
    days = "".join(
        f"<span>{escape(points[n][0])}</span>"
        for n in sorted({0, len(points) // 2, len(points) - 1})
    )
    return Markup(  # noqa: S704 - every value in it went through escape()
        f'<div class="vbars"><div class="ticks">{ticks}</div><div class="plot">{bars}</div>'
        f'<div></div><div class="days">{days}</div></div>'
    )


def days(hours: float | None) -> str:
    """A time to recover as people count it: "3.4 days"."""
    return "-" if hours is None else f"{hours / 24:.1f} days"


def _pct(rate: float) -> str:
    return f"{rate * 100:.1f}%"


def render(stats: dict, settings: Settings, title: str, generated: datetime) -> str:
    from jinja2 import Environment, FileSystemLoader, select_autoescape  # to render, not to read

    accent = settings.brand_accent_color
    env = Environment(
        loader=FileSystemLoader(str(settings.templates_dir / "report")),
        autoescape=select_autoescape(default=True),
    )
    causes = stats["by_cause"]
    paths = stats["by_path"]
    funnel = stats["funnel"]
    charts = {
        "causes": hbars(
            [
                (
                    described(c["name"]),
                    c["rate"],
                    f"{_pct(c['rate'])} of {c['cases']} · {format_totals(c['amount'])}",
                )
                for c in causes
            ],
            top=1.0,
            as_rate=True,
        ),
        "paths": hbars(
            [
                (
                    p["name"].replace("_", " "),
                    p["recovered"],
                    f"{p['recovered']} · {format_totals(p['amount'])}",
                )
                for p in paths
            ],
        ),
        "funnel": hbars(
            [
                ("cases", funnel["cases"], str(funnel["cases"])),
                ("emailed", funnel["emailed"], str(funnel["emailed"])),
                ("clicked a link", funnel["clicked"], str(funnel["clicked"])),
                (
                    "recovered after a click",
                    funnel["recovered_after_click"],
                    str(funnel["recovered_after_click"]),
                ),
            ],
        ),
        "over_time": vbars([(d["day"], d["recovered"]) for d in stats["over_time"]]),
    }
    return env.get_template("report.html").render(
        title=title,
        generated=generated,
        stats=stats,
        charts=charts,
        money=format_totals,
        pct=_pct,
        accent=accent,
        median_days=days(stats["time_to_recover_hours"]["median"]),
    )
