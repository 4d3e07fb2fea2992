"""Where the files beside the code are: inside the package when it was
installed from a wheel (setup.py copies them there), at the top of the
repository in a checkout or an editable install."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped(name: str) -> Path:
    """`migrations`, `templates` or `celerybeat-schedule.py`."""
    inside = _PACKAGE / "_shipped" / name
    return inside if inside.exists() else _PACKAGE.parent / name
