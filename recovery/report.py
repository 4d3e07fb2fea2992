"""The HTML report: one self-contained page an operator would rather look at.

Charts are hand-written SVG: a plotting library would add megabytes for a few
rectangles, and the page must open offline. Each chart is drawn 400 units
wide and scales with its column (one on a phone, two on a desktop), so its
text is as large as the page's at 390 px and grows no more than a fifth on a
wide screen. A row's label and value share a line when they fit in it, and
take two when they would not (their length is known when the page is made).
"""

from __future__ import annotations

from datetime import datetime

from markupsafe import Markup, escape

from recovery.config import Settings
from recovery.engine.classify import described
from recovery.money import format_totals

WIDTH = 400  # a chart's width in its own units
FONT = 15  # text size in those units: 12 px or more at a phone's 390 px
# Characters a line of text holds, at about 0.58 em a character.
LINE_CHARS = int(WIDTH / (0.58 * FONT))


def _ticks(top: float, as_rate: bool) -> list[str]:
    """The axis's values at 0, half and the top."""
    if as_rate:
        return [f"{top * f:.0%}" for f in (0, 0.5, 1)]
    return [f"{top * f:g}" for f in (0, 0.5, 1)]


def _text(x: float, y: float, words: str, anchor: str = "start", css: str = "") -> str:
    kind = f' class="{css}"' if css else ""
    return f'<text x="{x:g}" y="{y:g}" text-anchor="{anchor}"{kind}>{escape(words)}</text>'


def _svg(height: float, css: str, label: str, body: list[str]) -> Markup:
    return Markup(  # noqa: S704 - every value in it went through escape()
        f'<svg class="chart {css}" viewBox="0 0 {WIDTH} {height:g}" role="img"'
        f' aria-label="{escape(label)}" font-size="{FONT}"'
        f' preserveAspectRatio="xMinYMin meet">{"".join(body)}</svg>'
    )


def hbars(
    rows: list[tuple[str, float, str]],
    top: float | None = None,
    as_rate: bool = False,
    label: str = "",
) -> Markup:
    """Horizontal bars: (label, value, text shown with the bar), scaled to
    `top` (rates: 1.0) or to the largest value, with the axis's values under
    them."""
    top = top or max((value for _, value, _ in rows), default=0) or 1
    body, y = [], 0.0
    for name, value, shown in rows:
        share = min(max(value / top, 0.0), 1.0)
        body.append('<g class="row">')
        if len(name) + len(shown) + 4 <= LINE_CHARS:
            body.append(_text(0, y + FONT, name, css="label"))
            body.append(_text(WIDTH, y + FONT, shown, "end", "value"))
            y += FONT + 4
        else:
            body.append(_text(0, y + FONT, name, css="label"))
            body.append(_text(WIDTH, y + 2 * FONT + 3, shown, "end", "value"))
            y += 2 * FONT + 7
        body.append(
            f'<rect class="track" x="0" y="{y:g}" width="{WIDTH}" height="12" rx="3"/>'
            f'<rect class="bar" x="0" y="{y:g}" width="{share * WIDTH:.1f}" height="12" rx="3">'
            f"<title>{escape(name)}: {escape(shown)}</title></rect></g>"
        )
        y += 12 + 12
    ticks = _ticks(top, as_rate)
    places = ((0, "start"), (WIDTH / 2, "middle"), (WIDTH, "end"))
    body.append('<g class="axis">')
    body += [
        _text(x, y + FONT - 4, tick, anchor)
        for (x, anchor), tick in zip(places, ticks, strict=True)
    ]
    body.append("</g>")
    return _svg(y + FONT, "hbars", label, body)


def vbars(points: list[tuple[str, float]], label: str = "") -> Markup:
    """Vertical bars over time, (day, value): the count's axis on the left,
    the first, middle and last day under them; each bar's value on hover."""
    if not points:
        return Markup("<p>No recoveries yet.</p>")
    top = max(v for _, v in points) or 1
    left, plot_top, plot_bottom = 40, 8, 150
    plot = WIDTH - left
    body = ['<g class="ticks">']
    for tick, y in zip(reversed(_ticks(top, False)), (plot_top, 79, plot_bottom), strict=True):
        body.append(_text(left - 6, y + 4, tick, "end"))
    body.append("</g>")
    body.append(f'<path class="frame" d="M{left},{plot_top} V{plot_bottom} H{WIDTH}" fill="none"/>')
    step = plot / len(points)
    for n, (day, value) in enumerate(points):
        height = (plot_bottom - plot_top) * value / top
        body.append(
            f'<rect class="bar" x="{left + n * step + step * 0.1:.2f}"'
            f' y="{plot_bottom - height:.2f}" width="{max(step * 0.8, 0.5):.2f}"'
            f' height="{height:.2f}"><title>{escape(day)}: {value:g}</title></rect>'
        )
    body.append('<g class="days">')
    shown = sorted({0, len(points) // 2, len(points) - 1})
    for n in shown:
        x = left + (n + 0.5) * step
        anchor = "start" if n == 0 else "end" if n == len(points) - 1 else "middle"
        x = left if anchor == "start" else WIDTH if anchor == "end" else x
        body.append(_text(x, plot_bottom + FONT + 6, points[n][0], anchor))
    body.append("</g>")
    return _svg(plot_bottom + FONT + 10, "vbars", label, body)


def days(hours: float | None) -> str:
    """A time to recover as people count it: "3.4 days"."""
    return "-" if hours is None else f"{hours / 24:.1f} days"


def _pct(rate: float) -> str:
    return f"{rate * 100:.1f}%"


def render(
    stats: dict,
    settings: Settings,
    title: str,
    generated: datetime,
    headline: str | None = None,
    checks: dict[str, bool] | None = None,
) -> str:
    """The page. A run that has them (the demo) opens with its `headline`
    and the `checks` it passed or failed."""
    # Jinja only where a page is drawn: `recovery stats` imports this module too.
    from jinja2 import Environment, FileSystemLoader, select_autoescape

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
            label="Recovery rate by category",
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
            label="How recoveries happened",
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
            label="Emails, clicks and recoveries",
        ),
        "over_time": vbars(
            [(d["day"], d["recovered"]) for d in stats["over_time"]], "Recoveries per day"
        ),
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
        headline=headline,
        checks=checks or {},
    )
