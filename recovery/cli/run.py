"""Running the product's processes: migrations, the web app, workers, beat."""

from __future__ import annotations

import os
import sys

import click

from recovery.config import get_settings
from recovery.db import current_revision, upgrade
from recovery.sim.servers import serve_asgi
from recovery.web import make_app


@click.group()
def db() -> None:
    """The schema: Alembic migrations."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION.

    \b
    Example:
      DATABASE_URL=postgresql://recovery@db/recovery recovery db upgrade
    """
    url = get_settings().database_url
    before = current_revision(url)
    upgrade(url, revision)
    after = current_revision(url)
    if before == after:
        click.echo(f"The database was already at migration {after}; nothing to do.")
    else:
        click.echo(f"The database is upgraded from migration {before or 'none'} to {after}.")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=2 * (os.cpu_count() or 1) + 1, show_default=True, type=int)
@click.option("--dev", is_flag=True, help="One in-process uvicorn server, no gunicorn.")
def serve(host: str, port: int, workers: int, dev: bool) -> None:
    """Serve the webhook receiver, customer links and health routes.

    \b
    Examples:
      recovery serve --host 0.0.0.0 --port 8000 --workers 4
      recovery serve --dev          # one in-process server, for a laptop
    """
    settings = get_settings()
    if dev:
        click.echo(f"receiver on http://{host}:{port}/webhooks/stripe")
        serve_asgi(make_app(settings), host, port)
        return
    os.execvp(
        sys.executable,
        [
            sys.executable,
            "-m",
            "gunicorn",
            "recovery.asgi:app",
            "--worker-class",
            "recovery.serving.Worker",
            "--bind",
            f"{host}:{port}",
            "--workers",
            str(workers),
            # gunicorn's records through our configuration; no access log of
            # its own: the app writes one line per request, tokens redacted.
            "--logger-class",
            "recovery.serving.GunicornLogger",
        ],
    )


@click.command()
@click.option(
    "--queue",
    type=click.Choice(["recovery", "webhooks"]),
    default="recovery",
    show_default=True,
    help="recovery: events, steps, emails. webhooks: deliveries to the business's"
    " endpoints (threads, 16 by default: they wait on the network).",
)
@click.option("--concurrency", type=int, default=None)
@click.option("--pool", default=None, help="prefork (default with Redis), threads or solo.")
@click.option("--beat", "with_beat", is_flag=True, help="Run the beat scheduler in-process.")
@click.option(
    "-E",
    "--events",
    is_flag=True,
    help="Send task events, for Flower or `celery -A recovery events`.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65_535),
    help="Serve this worker's Stripe request counts to Prometheus on this port"
    " (the database's figures are on the web app's /metrics).",
)
def worker(
    queue: str,
    concurrency: int | None,
    pool: str | None,
    with_beat: bool,
    events: bool,
    metrics_port: int | None,
) -> None:
    """Run a Celery worker: events, due steps, emails; or webhook deliveries.

    \b
    Examples:
      recovery worker --concurrency 4
      recovery worker --queue webhooks   # the business's endpoints, apart
      recovery worker --beat        # with the scheduler embedded (one machine only)
      recovery worker --events      # task events, so Flower shows tasks
    """
    # recovery.tasks builds the Celery app from the settings when imported:
    # only the commands that run or feed workers import it.
    from recovery.tasks import app

    settings = get_settings()
    embedded = settings.broker_url.startswith("sqla+")
    argv = [
        "worker",
        "--loglevel",
        settings.log_level,
        "--queues",
        queue,
        "--pool",
        pool or ("solo" if embedded else "threads" if queue == "webhooks" else "prefork"),
    ]
    if queue == "webhooks":
        # Its own name beside a `recovery` worker on the same host.
        argv += ["--hostname", "webhooks@%h", "--concurrency", str(concurrency or 16)]
    elif concurrency:
        argv += ["--concurrency", str(concurrency)]
    if with_beat:
        argv += ["--beat"]
    if events:
        argv += ["--task-events"]
    if metrics_port:
        _serve_worker_metrics(metrics_port, argv[argv.index("--pool") + 1])
    os.makedirs("var", exist_ok=True)
    app.worker_main(argv)


def _serve_worker_metrics(port: int, pool: str) -> None:
    from prometheus_client import start_http_server

    from recovery import metrics

    if pool == "prefork" and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Forked children count in their own memory, which this process cannot read.
        raise click.UsageError(
            "--metrics-port with the prefork pool needs PROMETHEUS_MULTIPROC_DIR"
            " (an empty directory the worker's processes share)"
        )
    try:
        start_http_server(port, registry=metrics.counters())
    except OSError as taken:
        raise click.UsageError(f"--metrics-port {port}: {taken.strerror}") from None


@click.command()
def beat() -> None:
    """Run the beat scheduler (one per deployment).

    \b
    Example:
      recovery beat
    """
    from recovery.tasks import app  # builds the Celery app; see `worker`

    os.makedirs("var", exist_ok=True)
    app.start(["beat", "--loglevel", get_settings().log_level])


COMMANDS = [db, serve, worker, beat]
