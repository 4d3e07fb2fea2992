"""The ASGI entry point for gunicorn: `gunicorn -k recovery.serving.Worker recovery.asgi:app`."""

import sys

from recovery import preflight
from recovery.config import ConfigError, explain, get_settings
from recovery.observability import configure
from recovery.web import make_app

try:
    settings = get_settings()
    preflight.check(settings)
except ConfigError as exc:
    print(explain(exc), file=sys.stderr)
    sys.exit(2)

configure(settings)
app = make_app(settings)
