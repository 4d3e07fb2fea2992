"""Operator commands that act: tick, retry, pause, resume, cancel.

Every action on a case is made by engine/cases.py and written to the audit log
with the operating-system user, the time and the reason. Unknown ids and
refused actions exit 1.
"""

from __future__ import annotations

from collections.abc import Callable

import click

from recovery import clock
from recovery.cli.common import Unavailable, find_case, instant_option, needs_database, operator
from recovery.config import get_settings
from recovery.db import session_scope
from recovery.engine import cases as case_machine
from recovery.engine import scheduler
from recovery.models import StepOutcome

# -- tick -------------------------------------------------------------------------


@click.command()
@click.option("--now", "at", help="ISO 8601 instant to run as (default: the real time).")
@click.option("--sync", is_flag=True, help="Execute in this process instead of on workers.")
@needs_database
def tick(at: str | None, sync: bool) -> None:
    """Run one full pass: pending events, then the steps due.

    \b
    Examples:
      recovery tick                                  # hand due work to workers
      recovery tick --now 2026-12-01T09:00Z --sync   # simulated time, in-process

    --now moves this process's clock only; a Stripe-compatible server keeps
    its own (move it through its /_sim/clock route).
    """
    settings = get_settings()
    if at:
        clock.set_now(instant_option(at, "--now"))
    if sync:
        result = scheduler.run_pass(settings, sync=True)
    else:
        # recovery.tasks builds the Celery app from the settings when imported:
        # only the commands that publish to workers import it.
        from recovery import tasks

        result = scheduler.run_pass(
            settings,
            sync=False,
            publish_events=tasks.publish_event_batch,
            publish_steps=tasks.publish_step_batch,
            publish_messages=tasks.publish_messages,
            publish_deliveries=tasks.publish_deliveries,
        )
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(result.outcomes.items()))
    click.echo(
        f"{clock.now():%Y-%m-%d %H:%M:%S}Z: {result.events} event(s), {result.steps} step(s),"
        f" {result.emails} email(s), {result.webhooks} webhook deliveries"
        + (f" ({outcomes})" if outcomes else "")
    )


# -- actions ----------------------------------------------------------------------


@click.command()
@click.argument("ref")
@click.option("--dry-run", is_flag=True, help="Say what would happen; change nothing.")
@click.option("--force", is_flag=True, help="Retry even where the rules refuse.")
@click.option("--reason", help="Why (required with --force; written to the audit log).")
@needs_database
def retry(ref: str, dry_run: bool, force: bool, reason: str | None) -> None:
    """Retry a case's payment now, through the same path as scheduled retries.

    Refuses cases whose card must not be retried (customer must act, dead card,
    do-not-contact) and retries the card networks forbid, unless --force with a
    --reason.

    \b
    Examples:
      recovery retry 42 --dry-run
      recovery retry in_1MtHbELkdIwHu7ixl4OzzPMv --force --reason "customer asked on the phone"
    """
    if force and not reason:
        raise click.UsageError("--force needs a --reason")
    settings = get_settings()
    now = clock.now()
    with session_scope() as session:
        case = find_case(session, ref, lock=True)
        try:
            request = case_machine.request_retry(
                session, case, now, operator(), reason, force, settings, dry_run=dry_run
            )
        except case_machine.CaseRefused as refused:
            raise click.ClickException(str(refused)) from None
        case_id, invoice_id = case.id, case.invoice_id
    if request.step is None:
        past = " (forced past: " + "; ".join(request.refusals) + ")" if request.refusals else ""
        click.echo(f"case {case_id}: would retry{past} invoice {invoice_id} now")
        return
    outcome = scheduler.execute_named(case_id, request.step, now, settings)
    joined = f" (joined retry {request.step}, already due)" if request.joined else ""
    if outcome == StepOutcome.DEFERRED_UNAVAILABLE:
        raise Unavailable(
            f"case {case_id}: Stripe did not answer; the retry stays due and a worker"
            f" tries it again{joined}"
        )
    click.echo(f"case {case_id}: {outcome or 'the retry is under way in a worker'}{joined}")


_DONE = {"pause": "paused", "cancel": "canceled", "resume": "resumed"}
_ACTIONS: dict[str, Callable[..., None]] = {
    "pause": case_machine.pause,
    "cancel": case_machine.cancel,
    "resume": lambda session, case, now, actor, reason: case_machine.resume(
        session, case, now, actor, reason, get_settings()
    ),
}


def _case_action(ref: str, reason: str, action: str) -> None:
    now = clock.now()
    error: click.ClickException | None
    with session_scope() as session:
        case = find_case(session, ref, lock=True)
        try:
            _ACTIONS[action](session, case, now, operator(), reason)
        except case_machine.CaseRefused as refused:
            case_machine.refused(session, case, operator(), action, str(refused))
            error = click.ClickException(str(refused))
        else:
            error = None
            click.echo(f"case {case.id}: {_DONE[action]}")
    if error is not None:
        raise error


def _action_command(action: str, help_text: str) -> click.Command:
    @click.command(action, help=help_text)
    @click.argument("ref")
    @click.option("--reason", required=True, help="Why; written to the audit log.")
    @needs_database
    def command(ref: str, reason: str) -> None:
        _case_action(ref, reason, action)

    return command


pause = _action_command(
    "pause",
    "Stop a case's retries and emails until resumed.\n\nExample: recovery pause 42 "
    "--reason 'customer disputes the charge'",
)
resume = _action_command(
    "resume",
    "Plan a paused case again from now.\n\nExample: recovery resume 42 --reason 'resolved'",
)
cancel = _action_command(
    "cancel",
    "Stop recovering a case for good (Stripe is not told).\n\nExample: recovery cancel "
    "42 --reason 'refunded by support'",
)

COMMANDS = [tick, retry, pause, resume, cancel]
