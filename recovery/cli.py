"""The `recovery` command: run the processes, inspect and steer the inbox."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import click
from sqlalchemy.exc import DBAPIError

from recovery import clock
from recovery.config import ConfigError, get_settings


def _settings():
    return get_settings()


@click.group()
def cli() -> None:
    """Win back failed Stripe subscription payments.

    \b
    Start here:
      recovery demo                      a month of failures, worked on this machine
      recovery dev                       the whole stack, live, on the embedded default
    \b
    Run it (docker-compose runs these):
      recovery db upgrade                apply migrations
      recovery serve                     webhook receiver and customer links
      recovery worker                    Celery worker (events, steps, emails)
      recovery beat                      the scheduler, exactly one
    \b
    Operate it:
      recovery cases list | show         cases and their timelines
      recovery retry | pause | resume | cancel
      recovery stats | report            what recovery brought back
      recovery emails preview | send-test | list
      recovery links revoke
      recovery sync                      backfill failed invoices at install
      recovery events replay --since     catch up after downtime
      recovery simulate                  backtest plans side by side
      recovery tick --now ISO --sync     one pass as of an instant
    \b
    Configuration is the environment (see .env.example); a bad value stops
    every command with one line naming it.
    \b
    Exit codes: 0 ok · 1 user error (unknown id, refused action) ·
    2 usage (bad arguments or configuration) · 3 a service is unavailable
    (database, Stripe).
    """
    # Validate the whole configuration before any command does anything.
    get_settings()


# -- database -------------------------------------------------------------------


@cli.group()
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
    from recovery import migrate

    migrate.upgrade(_settings().database_url, revision)
    click.echo(f"database at {revision}")


# -- processes --------------------------------------------------------------------


@cli.command()
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
    settings = _settings()
    if dev:
        from recovery.devserver import serve_asgi
        from recovery.observability import configure
        from recovery.web import make_app

        configure(settings)
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
            "uvicorn_worker.UvicornWorker",
            "--bind",
            f"{host}:{port}",
            "--workers",
            str(workers),
            "--access-logfile",
            "-",
            "--access-logformat",
            '%(h)s "%(m)s %(U)s" %(s)s %(M)sms',  # no query strings: links carry tokens
        ],
    )


@cli.command()
@click.option("--concurrency", type=int, default=None)
@click.option("--pool", default=None, help="prefork (default with Redis) or solo.")
@click.option("--beat", "with_beat", is_flag=True, help="Run the beat scheduler in-process.")
def worker(concurrency: int | None, pool: str | None, with_beat: bool) -> None:
    """Run a Celery worker: events, due steps, emails.

    \b
    Examples:
      recovery worker --concurrency 4
      recovery worker --beat        # with the scheduler embedded (one machine only)
    """
    from recovery.tasks import app

    settings = _settings()
    embedded = settings.broker_url.startswith("sqla+")
    argv = [
        "worker",
        "--loglevel",
        settings.log_level,
        "--queues",
        "recovery",
        "--pool",
        pool or ("solo" if embedded else "prefork"),
    ]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    if with_beat:
        argv += ["--beat"]
    os.makedirs("var", exist_ok=True)
    app.worker_main(argv)


@cli.command()
def beat() -> None:
    """Run the beat scheduler (one per deployment).

    \b
    Example:
      recovery beat
    """
    from recovery.tasks import app

    os.makedirs("var", exist_ok=True)
    app.start(["beat", "--loglevel", _settings().log_level])


@cli.command("stripe-sim")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=12111, show_default=True, type=int)
@click.option("--webhook-url", default=None, help="Deliver signed events here.")
@click.option("--webhook-secret", default=None, help="Signing secret (default: the configured).")
def stripe_sim(host: str, port: int, webhook_url: str | None, webhook_secret: str | None) -> None:
    """Run the Stripe-compatible server (point STRIPE_API_BASE at it).

    \b
    Example:
      recovery stripe-sim --port 12111 --webhook-url http://127.0.0.1:8000/webhooks/stripe
    """
    from recovery.devserver import serve_wsgi
    from recovery.stripe_sim import StripeSim

    sim = StripeSim(base_url=f"http://{host}:{port}")
    if webhook_url:
        secret = webhook_secret or _settings().stripe_webhook_secrets[0]
        sim.state.endpoints.append((webhook_url, secret))
    click.echo(f"Stripe-compatible server on http://{host}:{port}")
    serve_wsgi(sim.wsgi, host, port).serve_forever()


# -- the embedded stack ----------------------------------------------------------


SIM_PORT, WEB_PORT = 12111, 8000


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - local
        return json.loads(response.read())


def _wait_http(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - local
                return
        except OSError:
            if time.monotonic() > deadline:
                raise click.ClickException(f"{url} did not come up") from None
            time.sleep(0.2)


@cli.command()
@click.option(
    "--check",
    is_flag=True,
    help="Send one failed payment through the stack, follow it to recovery, stop.",
)
@click.option("--port", default=WEB_PORT, show_default=True, help="The receiver's port.")
@click.option(
    "--sim-port", default=SIM_PORT, show_default=True, help="The Stripe-compatible server's port."
)
def dev(check: bool, port: int, sim_port: int) -> None:
    """Run everything on this machine: simulator, receiver, worker and beat.

    \b
    Examples:
      recovery dev            # keep it running; send declines from another shell
      recovery dev --check    # decline, recover, and stop: a smoke test
      recovery dev --port 8100 --sim-port 12200
    """
    settings = _settings()
    env = dict(os.environ)
    env.setdefault("STRIPE_API_BASE", f"http://127.0.0.1:{sim_port}")
    # Links in the emails (var/outbox) open this receiver.
    env.setdefault("PUBLIC_BASE_URL", f"http://127.0.0.1:{port}")
    from recovery import migrate

    migrate.upgrade(settings.database_url)
    exe = [sys.executable, "-m", "recovery.cli"]
    children = [
        subprocess.Popen(
            [
                *exe,
                "stripe-sim",
                "--port",
                str(sim_port),
                "--webhook-url",
                f"http://127.0.0.1:{port}/webhooks/stripe",
            ],
            env=env,
        ),
        subprocess.Popen([*exe, "serve", "--dev", "--port", str(port)], env=env),
        subprocess.Popen([*exe, "worker", "--beat"], env=env),
    ]
    try:
        _wait_http(f"http://127.0.0.1:{port}/readyz")
        _wait_http(f"http://127.0.0.1:{sim_port}/_sim/events")
        click.echo(
            f"\nrecovery is running: receiver http://127.0.0.1:{port}/webhooks/stripe,"
            f" Stripe-compatible server http://127.0.0.1:{sim_port}"
        )
        if check:
            _check_round_trip(f"http://127.0.0.1:{sim_port}")
            return
        click.echo("send a failed payment: recovery send-test-event   (Ctrl-C stops)")
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        raise click.ClickException("a process of the stack stopped")
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()


def _wait_case(invoice_id: str, status: str, seconds: float = 60):
    from sqlalchemy import select

    from recovery.db import session_scope
    from recovery.models import RecoveryCase

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with session_scope() as session:
            case = session.scalars(
                select(RecoveryCase).where(RecoveryCase.invoice_id == invoice_id)
            ).one_or_none()
            if case is not None and case.status == status:
                return case
        time.sleep(0.25)
    raise click.ClickException(f"no {status} case for {invoice_id} after {seconds:.0f}s")


def _check_round_trip(sim_url: str) -> None:
    scenario = _post(
        f"{sim_url}/_sim/scenarios/failed_invoice",
        {"behavior": {"decline_code": "insufficient_funds"}},
    )
    invoice_id = scenario["invoice"]
    click.echo(f"simulated a declined renewal: invoice {invoice_id}")
    case = _wait_case(invoice_id, "open")
    click.echo(
        f"case {case.id} opened: {case.amount_due} {case.currency}, "
        f"decline {case.decline_code}, card {case.card_brand}"
    )
    _post(f"{sim_url}/_sim/customers/{scenario['customer']}/cards", {"brand": "visa"})
    _post(f"{sim_url}/_sim/invoices/{invoice_id}/attempt", {})
    case = _wait_case(invoice_id, "recovered")
    click.echo(f"case {case.id} recovered: {case.amount_recovered} {case.currency}")
    click.echo("check passed")


@cli.command("send-test-event")
@click.option("--decline-code", default="insufficient_funds", show_default=True)
@click.option("--sim-url", default=f"http://127.0.0.1:{SIM_PORT}", show_default=True)
def send_test_event(decline_code: str, sim_url: str) -> None:
    """Have the running simulator decline a renewal and send the webhook.

    \b
    Example:
      recovery send-test-event --decline-code expired_card
    """
    scenario = _post(
        f"{sim_url}/_sim/scenarios/failed_invoice", {"behavior": {"decline_code": decline_code}}
    )
    click.echo(
        f"invoice {scenario['invoice']} declined ({decline_code}); "
        f"see it with: recovery events list"
    )


# -- the inbox ------------------------------------------------------------------


@cli.group()
def events() -> None:
    """Stored Stripe events: the inbox."""


def _event_row(session, ref: str):
    from sqlalchemy import select

    from recovery.models import WebhookEvent

    query = select(WebhookEvent)
    if ref.isdigit():
        query = query.where(WebhookEvent.id == int(ref))
    else:
        query = query.where(WebhookEvent.stripe_event_id == ref)
    row = session.scalars(query).one_or_none()
    if row is None:
        raise click.ClickException(f"no event {ref!r}")
    return row


@events.command("list")
@click.option(
    "--status", type=click.Choice(["pending", "processing", "processed", "failed", "ignored"])
)
@click.option("--type", "event_type")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True)
def events_list(status: str | None, event_type: str | None, limit: int, as_json: bool) -> None:
    """The newest events first.

    \b
    Examples:
      recovery events list --status failed
      recovery events list --type invoice.payment_failed --json
    """
    from sqlalchemy import select

    from recovery.db import session_scope
    from recovery.models import WebhookEvent

    with session_scope() as session:
        query = select(WebhookEvent).order_by(WebhookEvent.id.desc()).limit(limit)
        if status:
            query = query.where(WebhookEvent.status == status)
        if event_type:
            query = query.where(WebhookEvent.type == event_type)
        rows = session.scalars(query).all()
        if as_json:
            click.echo(
                json.dumps(
                    [
                        {
                            "id": row.id,
                            "stripe_event_id": row.stripe_event_id,
                            "type": row.type,
                            "status": row.status,
                            "attempts": row.attempts,
                            "received_at": row.received_at.isoformat(),
                            "last_error": row.last_error,
                        }
                        for row in rows
                    ],
                    indent=2,
                )
            )
            return
        click.echo(
            f"{'id':>6}  {'status':<10} {'tries':>5}  {'received (UTC)':<19}  "
            f"{'type':<34} stripe id"
        )
        for row in rows:
            click.echo(
                f"{row.id:>6}  {row.status:<10} {row.attempts:>5}  "
                f"{row.received_at:%Y-%m-%d %H:%M:%S}  {row.type:<34} "
                f"{row.stripe_event_id}"
            )


@events.command("show")
@click.argument("ref")
def events_show(ref: str) -> None:
    """One event: REF is the inbox id or the Stripe event id.

    \b
    Example:
      recovery events show evt_1NG8Du2eZvKYlo2CUI79vXWy
    """
    from recovery.db import session_scope

    with session_scope() as session:
        row = _event_row(session, ref)
        for label, value in [
            ("id", row.id),
            ("stripe id", row.stripe_event_id),
            ("type", row.type),
            ("status", row.status),
            ("attempts", row.attempts),
            ("livemode", row.livemode),
            ("account", row.account),
            ("created", row.stripe_created_at),
            ("received", row.received_at),
            ("processed", row.processed_at),
            ("next try", row.available_at if row.status == "pending" else None),
            ("last error", row.last_error),
        ]:
            click.echo(f"{label:>10}: {value if value is not None else '-'}")
        obj = json.loads(row.payload)["data"]["object"]
        click.echo(f"{'object':>10}: {obj.get('object')} {obj.get('id')}")


@events.command("replay")
@click.argument("refs", nargs=-1)
@click.option("--failed", is_flag=True, help="Replay every failed event.")
@click.option(
    "--since",
    help="Fetch Stripe's events since this instant (ISO 8601, within 30 days) into the inbox.",
)
def events_replay(refs: tuple[str, ...], failed: bool, since: str | None) -> None:
    """Process events again: by id, all --failed ones, or fetched from Stripe --since.

    \b
    Examples:
      recovery events replay evt_1NG8Du2eZvKYlo2CUI79vXWy
      recovery events replay --failed
      recovery events replay --since 2026-11-20T08:00Z   # after the receiver was down
    """
    from sqlalchemy import select

    from recovery import inbox
    from recovery.db import session_scope
    from recovery.models import EventStatus, WebhookEvent

    if not refs and not failed and not since:
        raise click.UsageError("name event ids, or pass --failed or --since")
    if since:
        return _replay_from_stripe(since)
    with session_scope() as session:
        ids = [_event_row(session, ref).id for ref in refs]
        if failed:
            ids += session.scalars(
                select(WebhookEvent.id).where(WebhookEvent.status == EventStatus.FAILED)
            ).all()
    count = inbox.replay(ids, clock.now())
    click.echo(f"{count} event(s) queued again")


def _replay_from_stripe(since: str) -> None:
    from recovery import backfill, stripe_api
    from recovery.cli_cases import instant_option

    instant = instant_option(since, "--since")
    counts = {"new": 0}

    def count(stored: bool) -> None:
        counts["new"] += int(stored)

    try:
        seen, new = backfill.replay_since(instant, clock.now(), count)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    except stripe_api.StripeUnavailable as exc:
        click.echo(
            f"Stripe unavailable after {counts['new']} new event(s): {exc}; run it again", err=True
        )
        raise SystemExit(3) from None
    click.echo(
        f"{seen} event(s) from Stripe since {instant:%Y-%m-%d %H:%M}Z; {new} new in the inbox"
    )


from recovery.cli_cases import COMMANDS  # noqa: E402 - after the group they join
from recovery.cli_customers import COMMANDS as CUSTOMER_COMMANDS  # noqa: E402
from recovery.cli_operator import COMMANDS as OPERATOR_COMMANDS  # noqa: E402

for _command in [*COMMANDS, *CUSTOMER_COMMANDS, *OPERATOR_COMMANDS]:
    cli.add_command(_command)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except ConfigError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        sys.exit(2)
    except DBAPIError as exc:
        # The driver's first line only: the statement and the URL stay out.
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        click.echo(
            f"database unavailable: {reason} (is it running, and migrated with"
            " `recovery db upgrade`?)",
            err=True,
        )
        sys.exit(3)


if __name__ == "__main__":
    main()
