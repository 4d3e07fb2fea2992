"""The HTML report: one self-contained page an operator would rather look at.

Charts are hand-written SVG (horizontal and vertical bars): a plotting library
would add megabytes for a few rectangles, and the page must open offline.
"""

from __future__ import annotations

from datetime import datetime

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape

from recovery.config import Settings
from recovery.money import format_totals


def hbars(
    rows: list[tuple[str, float, str]], accent: str, top: float | None = None, width: int = 860
) -> Markup:
    """Horizontal bars: (label, value, text shown at the bar's end), scaled to
    `top` (rates: 1.0) or to the largest value."""
    top = top or max((value for _, value, _ in rows), default=0) or 1
    label_w, bar_w, row_h = 170, width - 170 - 330, 26
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{row_h * len(rows) + 4}"'
        f' role="img">'
    ]
    for n, (label, value, text) in enumerate(rows):
        y = n * row_h + 2
        length = max(1.0, bar_w * value / top) if value else 0
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 17}" text-anchor="end">{escape(label)}</text>'
            f'<rect x="{label_w}" y="{y + 4}" width="{length:.1f}" height="{row_h - 8}"'
            f' rx="3" fill="{escape(accent)}"/>'
            f'<text x="{label_w + length + 6:.1f}" y="{y + 17}">{escape(text)}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every value in it went through escape()


def vbars(points: list[tuple[str, float]], accent: str, width: int = 860) -> Markup:
    """Vertical bars over time: (day, value)."""
    if not points:
        return Markup("<p>No recoveries yet.</p>")
    height, bottom = 160, 22
    top = max(v for _, v in points) or 1
    step = width / len(points)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
    ]
    for n, (day, value) in enumerate(points):
        h = (height - bottom - 14) * value / top
        x = n * step
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{height - bottom - h:.1f}" width="{max(step - 2, 1):.1f}"'
            f' height="{h:.1f}" fill="{escape(accent)}">'
            f"<title>{escape(day)}: {value:g}</title></rect>"
        )
    for n in sorted({0, len(points) // 2, len(points) - 1}):
        parts.append(
            f'<text x="{n * step + step / 2:.1f}" y="{height - 6}" text-anchor="middle">'
            f"{escape(points[n][0][5:])}</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every value in it went through escape()


def _pct(rate: float) -> str:
    return f"{rate * 100:.1f}%"


def render(stats: dict, settings: Settings, title: str, generated: datetime) -> str:
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
                    c["name"],
                    c["rate"],
                    f"{_pct(c['rate'])} of {c['cases']} · {format_totals(c['amount'])}",
                )
                for c in causes
            ],
            accent,
            top=1.0,
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
            accent,
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
            accent,
        ),
        "over_time": vbars([(d["day"], d["recovered"]) for d in stats["over_time"]], accent),
    }
    return env.get_template("report.html").render(
        title=title,
        generated=generated,
        stats=stats,
        charts=charts,
        money=format_totals,
        pct=_pct,
        accent=accent,
    )
