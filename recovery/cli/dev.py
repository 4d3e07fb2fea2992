"""Trying the product without Stripe: the Stripe-compatible server, the whole
stack live on this machine, the month-long demo and the backtest."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack, nullcontext, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from recovery.cli import story
from recovery.cli.common import DEMO_DIR, Unavailable, emit_json
from recovery.cli.figures import print_summary, write_report
from recovery.config import get_settings
from recovery.db import session_scope, upgrade
from recovery.models import CaseStatus, Message, MessageStatus, RecoveryCase, RecoveryPath
from recovery.money import format_totals
from recovery.sim import backtest, compare, population
from recovery.sim import demo as month
from recovery.sim.server import StripeSim
from recovery.sim.servers import serve_wsgi


@click.command("stripe-sim")
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
    sim = StripeSim(base_url=f"http://{host}:{port}")
    if webhook_url:
        secret = webhook_secret or get_settings().stripe_webhook_secrets[0]
        sim.state.endpoints.append((webhook_url, secret))
    click.echo(f"Stripe-compatible server on http://{host}:{port}")
    serve_wsgi(sim.wsgi, host, port).serve_forever()


# -- the embedded stack ----------------------------------------------------------


T = TypeVar("T")
SIM_PORT, WEB_PORT = 12111, 8000
# SIGHUP: the terminal closed. The processes of the stack are in groups of
# their own, out of the terminal's reach; they stop when this one does.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - local
            return json.loads(response.read())
    except urllib.error.HTTPError as refused:
        raise click.ClickException(f"{url} refused the request: HTTP {refused.code}") from None
    except OSError as down:
        reason = getattr(down, "reason", down)
        raise Unavailable(
            f"the Stripe simulator at {url.split('/_sim', 1)[0]} is not answering ({reason});"
            " start it with `recovery dev` (or `recovery stripe-sim`)"
        ) from None


# The processes' own logs (JSON lines, Celery's banner): in a file, so the
# terminal tells the story alone.
DEV_LOG = Path("var/dev.log")


class _Stopped(Exception):
    """Ctrl-C or SIGTERM, raised only where `recovery dev` waits."""


class _Signals:
    """Ctrl-C and SIGTERM, noted rather than raised. A KeyboardInterrupt
    thrown at an arbitrary point can leave a lock held (an Event's, as
    `with` gives no guarantee between taking a lock and entering its block),
    and the stop then hangs on it; a note is read where it is safe."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, _signum: int, _frame: object) -> None:
        self.count += 1

    def nap(self, seconds: float) -> None:
        """Sleep, then stop here if a signal came (it cuts the sleep short)."""
        if not self.count:
            time.sleep(seconds)
        if self.count:
            raise _Stopped


def _wait_http(url: str, signals: _Signals, seconds: float = 30, see: str = "") -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - local
                return
        except OSError:
            if time.monotonic() > deadline:
                raise click.ClickException(f"{url} did not come up{see}") from None
            signals.nap(0.2)


@click.command()
@click.option(
    "--check",
    is_flag=True,
    help="Send one failed payment through the stack, follow it to recovery, stop.",
)
@click.option("--port", default=WEB_PORT, show_default=True, help="The receiver's port.")
@click.option(
    "--sim-port", default=SIM_PORT, show_default=True, help="The Stripe-compatible server's port."
)
@click.option(
    "--log",
    "log_to",
    default=str(DEV_LOG),
    show_default=True,
    help="Where the processes' own logs go, appended; '-' for this terminal.",
)
def dev(check: bool, port: int, sim_port: int, log_to: str) -> None:
    """Run everything on this machine: simulator, receiver, worker and beat.

    \b
    Examples:
      recovery dev            # keep it running; send declines from another shell
      recovery dev --check    # decline, recover, and stop: a smoke test
      recovery dev --port 8100 --sim-port 12200
      recovery dev --log -    # the processes' logs here too, between the story's lines
    """
    settings = get_settings()
    for option, number in (("--port", port), ("--sim-port", sim_port)):
        if not _port_free(number):
            raise click.UsageError(
                f"port {number} is taken (another `recovery dev`?); choose another with {option}"
            )
    env = dict(os.environ)
    env.setdefault("STRIPE_API_BASE", f"http://127.0.0.1:{sim_port}")
    # Links in the emails (var/outbox) open this receiver.
    env.setdefault("PUBLIC_BASE_URL", f"http://127.0.0.1:{port}")
    upgrade(settings.database_url)
    log = None if log_to == "-" else Path(log_to)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    # SIGTERM (a supervisor, `kill`) and SIGHUP stop the stack as Ctrl-C does.
    signals = _Signals()
    for number in STOP_SIGNALS:
        signal.signal(number, signals)
    # The children hold their own copy of the log's descriptor.
    with open(log, "ab") if log is not None else nullcontext() as written:
        output = {"stdout": written.fileno(), "stderr": subprocess.STDOUT} if written else {}
        children = _start([sys.executable, "-m", "recovery"], env, port, sim_port, output)
    see = f"; see {log}" if log is not None else ""
    over = False
    try:
        _wait_http(f"http://127.0.0.1:{port}/readyz", signals, see=see)
        _wait_http(f"http://127.0.0.1:{sim_port}/_sim/events", signals, see=see)
        click.echo(
            f"\nrecovery is running: receiver http://127.0.0.1:{port}/webhooks/stripe,"
            f" Stripe-compatible server http://127.0.0.1:{sim_port}"
            + (f"; their logs: {log}" if log is not None else "")
        )
        story.tell_while(lambda: not (over or signals.count), Path(settings.outbox_dir), click.echo)
        if check:
            _check_round_trip(f"http://127.0.0.1:{sim_port}", Path(settings.outbox_dir), signals)
            signals.nap(1.5)  # the story's last lines
            return
        click.echo(
            "send a failed payment: recovery send-test-event   (Ctrl-C stops)\n"
            "what happens is told below; emails are in"
            f" {settings.outbox_dir}, their links open here\n"
        )
        while all(child.poll() is None for child in children):
            signals.nap(0.5)
        raise click.ClickException(f"a process of the stack stopped{see}")
    except _Stopped:
        click.echo("stopping…")
    finally:
        over = True
        _stop(children)
        # The stack is down and this process is ending. Python puts its own
        # handlers back to the default while it finalizes, and a Ctrl-C
        # still landing then (an impatient person) would kill it with no
        # word; from here on they change nothing, so they are ignored.
        for number in STOP_SIGNALS:
            signal.signal(number, signal.SIG_IGN)


def _spawn(argv: list[str], env: dict[str, str], output: dict[str, Any]) -> subprocess.Popen:
    """A process of the stack, in a process group of its own, so the stop
    reaches what it forks too (the worker's embedded beat)."""
    return subprocess.Popen(argv, env=env, start_new_session=True, **output)


def _signal_group(child: subprocess.Popen, number: int) -> None:
    with suppress(ProcessLookupError):  # the group has ended
        os.killpg(child.pid, number)


def _stop(children: list[subprocess.Popen], grace: float = 15) -> None:
    """SIGTERM to each process's group; `grace` seconds for them to end;
    then SIGKILL to whatever is left in their groups: a process one of them
    forked and did not stop (the worker forks its embedded beat) would
    otherwise run on alone once the stack is gone."""
    for child in children:
        _signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        with suppress(subprocess.TimeoutExpired):
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
    for child in children:
        _signal_group(child, signal.SIGKILL)
        child.wait()


def _start(
    exe: list[str], env: dict[str, str], port: int, sim_port: int, output: dict[str, Any]
) -> list[subprocess.Popen]:
    """The simulator, the receiver, and a worker with beat."""
    return [
        _spawn(
            [
                *exe,
                "stripe-sim",
                "--port",
                str(sim_port),
                "--webhook-url",
                f"http://127.0.0.1:{port}/webhooks/stripe",
            ],
            env,
            output,
        ),
        _spawn([*exe, "serve", "--dev", "--port", str(port)], env, output),
        _spawn([*exe, "worker", "--beat"], env, output),
    ]


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        # As the servers bind: a port left in TIME_WAIT by the last run is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_for(find: Callable[[Session], T | None], signals: _Signals, missing: str) -> T:
    """Ask the database with `find` until it answers, for up to a minute."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with session_scope() as session:
            found = find(session)
            if found is not None:
                return found
        signals.nap(0.25)
    raise click.ClickException(f"{missing} after 60s")


def _wait_case(invoice_id: str, status: CaseStatus, signals: _Signals) -> RecoveryCase:
    def find(session: Session) -> RecoveryCase | None:
        case = session.scalars(
            select(RecoveryCase).where(RecoveryCase.invoice_id == invoice_id)
        ).one_or_none()
        return case if case is not None and case.status == status else None

    return _wait_for(find, signals, f"no {status} case for {invoice_id}")


def _wait_email(case_id: int, template: str | None, signals: _Signals) -> Message:
    def find(session: Session) -> Message | None:
        query = select(Message).where(
            Message.case_id == case_id, Message.status == MessageStatus.SENT
        )
        if template is not None:
            query = query.where(Message.template == template)
        return session.scalars(query).first()

    return _wait_for(find, signals, f"no {template or ''} email sent for case {case_id}")


def _check_round_trip(sim_url: str, outbox: Path, signals: _Signals) -> None:
    """A renewal declined; the customer opens our email's link, saves a new
    card on Stripe's page, and our retry charges it."""
    scenario = _post(
        f"{sim_url}/_sim/scenarios/failed_invoice",
        {"behavior": {"decline_code": "insufficient_funds"}},
    )
    invoice_id = scenario["invoice"]
    click.echo(f"simulated a declined renewal: invoice {invoice_id}")
    case = _wait_case(invoice_id, CaseStatus.OPEN, signals)
    email = _wait_email(case.id, None, signals)
    link = story.email_link(outbox, email.smtp_message_id)
    if link is None:
        raise click.ClickException(f"email {email.template} of case {case.id} holds no link")
    click.echo(f"the customer opens the link in the {email.template} email and saves a new card")
    target, chose = month.open_link(link, "card")
    card = {"brand": "visa", "last4": "4242"}
    if target is None or month.finish_on_page(target, chose, card) != "cards_saved":
        raise click.ClickException(f"the link {link} did not lead to saving a card")
    case = _wait_case(invoice_id, CaseStatus.RECOVERED, signals)
    if case.recovery_path is not RecoveryPath.CARD_UPDATE:
        raise click.ClickException(
            f"case {case.id} was recovered by {case.recovery_path}, not by our retry"
        )
    # The customer hears of it: and nothing of this run is left for the next.
    _wait_email(case.id, "recovered", signals)
    click.echo("check passed: the link, a saved card and our retry recovered the payment")


@click.command("send-test-event")
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


@click.command()
@click.option("--size", default=200, show_default=True, help="Subscribers whose renewal fails.")
# Renewals fail over the first 10 days and the longest plan runs 33: every
# case has ended by day 45, so policies are compared on finished cases.
@click.option("--days", default=45, show_default=True, help="Simulated days.")
@click.option("--seed", default=1, show_default=True, help="Same seed, same month.")
@click.option(
    "--dir",
    "workdir",
    default=str(DEMO_DIR),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the run's database, emails and report go: a new or empty directory, or"
    " one an earlier run made (emptied first). Never one holding other files.",
)
@click.option(
    "--compare/--no-compare",
    "compare_to_stripe",
    default=True,
    show_default=True,
    help="Also run Stripe's recommended schedule on the same subscribers, alongside.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the stats as JSON instead.")
def demo(
    size: int, days: int, seed: int, workdir: Path, compare_to_stripe: bool, as_json: bool
) -> None:
    """Run six weeks of failed renewals through the real product, on this machine.

    No servers: SQLite, the bundled Stripe-compatible server and a file email
    sink, all in this process. Renewals fail with a mix of causes and arrive
    as signed webhooks over HTTP; the engine retries and emails on a
    simulated clock; simulated customers open emails, click links, pay or
    update cards. Ends with a summary, the same subscribers under Stripe's
    recommended schedule beside it, consistency checks and an HTML report.

    \b
    Examples:
      recovery demo
      recovery demo --size 500 --seed 7 --dir /tmp/demo
      recovery demo --json | jq .recovered
    """
    if size < 1 or days < 1:
        raise click.BadParameter("--size and --days must be at least 1")
    members = population.synthetic(size, seed, month.START)
    hours = days * 24 + 1
    where = workdir.resolve()
    try:
        month.clear(where)
    except month.NotARunDirectory as exc:
        raise click.BadParameter(str(exc), param_hint="--dir") from None
    with ExitStack() as stack:
        baseline = None
        if compare_to_stripe:
            # The same subscribers under Stripe's schedule, in a process of its
            # own (a run owns its process's clock), while this one runs.
            pool = stack.enter_context(compare.processes(1))
            baseline = pool.apply_async(
                compare.run_one,
                (
                    seed,
                    compare.Population(size, days),
                    STRIPE,
                    compare.BUILT_IN[STRIPE],
                    where / "compare",
                ),
            )
        with click.progressbar(
            length=hours,
            label=f"Simulating {days} days, {size} subscribers",
            file=sys.stderr,
        ) as bar:
            outcome = month.run(members, seed, days, where, progress=bar.update, fresh=False)
        against = _against(compare.figures_of(outcome), baseline.get()) if baseline else None
    report_path = workdir / "report.html"
    headline = _headline(against) if against else None
    title = f"Recovery demo: {size} subscribers, seed {seed}"
    write_report(outcome.stats, report_path, title, headline, outcome.checks)
    if as_json:
        emit_json({"stats": outcome.stats, "checks": outcome.checks, "against_stripe": against})
    else:
        print_summary(outcome.stats)
        if headline:
            click.echo("\n" + headline)
        click.echo(
            f"\ncustomers opened {outcome.emails_opened} emails, clicked {outcome.links_clicked}"
            f" links, paid {outcome.paid_on_page} at once on the invoice's page, saved"
            f" {outcome.cards_saved} new cards, authenticated {outcome.authenticated}"
        )
        click.echo("\nchecks:")
        for name, ok in outcome.checks.items():
            mark = click.style("ok  ", fg="green") if ok else click.style("FAIL", fg="red")
            click.echo(f"  {mark} {name}")
        database = workdir / "recovery.sqlite3"
        click.echo(f"\nreport: {report_path}")
        click.echo(f"database: {database}")
        click.echo(f"  look around: DATABASE_URL=sqlite:///{database} recovery cases list")
    if not all(outcome.checks.values()):
        raise SystemExit(1)


@click.command()
@click.option(
    "--plans",
    "plan_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A plans file (TOML) to compare; repeat for more. The defaults always run.",
)
@click.option("--size", default=300, show_default=True, help="Synthetic subscribers.")
@click.option("--days", default=45, show_default=True, help="Simulated days per run.")
@click.option("--seed", default=1, show_default=True)
@click.option(
    "--seeds",
    default=1,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Populations to run (seed, seed+1, ...): figures as means with 95% intervals.",
)
@click.option(
    "--jobs",
    default=os.cpu_count() or 1,
    show_default="the cores",
    type=click.IntRange(1, 64),
    help="Runs at once with --seeds or --policy, a process each.",
)
@click.option(
    "--policy",
    "policies",
    multiple=True,
    type=click.Choice(sorted(compare.BUILT_IN)),
    help="A built-in policy to include (repeatable); the first one is the baseline.",
)
@click.option(
    "--spread-days",
    default=10.0,
    show_default=True,
    type=click.FloatRange(1, 3650),
    help="Failures arrive over this many days (longer lets the retry learner warm up).",
)
@click.option(
    "--warm-days",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 3650),
    help="Also report the recovered share of cases failing after this many days.",
)
@click.option(
    "--by-category",
    is_flag=True,
    help="Also the recovered share per category of failure (each has its own plan).",
)
@click.option("--from-db", is_flag=True, help="Shape the population on the stored cases.")
@click.option(
    "--dir",
    "workdir",
    default="var/simulate",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option("--json", "as_json", is_flag=True)
def simulate(
    plan_files: tuple[str, ...],
    size: int,
    days: int,
    seed: int,
    seeds: int,
    jobs: int,
    policies: tuple[str, ...],
    spread_days: float,
    warm_days: float,
    by_category: bool,
    from_db: bool,
    workdir: Path,
    as_json: bool,
) -> None:
    """Backtest plans: recovered revenue side by side, same customers, same clock.

    Every plan runs through the real engine on the simulated clock against an
    identical population (same seed), so the plan is the only difference.
    The population and customer behaviour are assumptions, stated in
    recovery/sim/population.py; --from-db takes causes, amounts and currencies
    from your stored cases instead.

    \b
    Examples:
      recovery simulate --plans fewer-retries.toml
      recovery simulate --plans a.toml --plans b.toml --size 500 --seed 3 --json
      recovery simulate --policy stripe-recommended --policy defaults --seeds 10
      recovery simulate --policy defaults --policy learning --seeds 10 \\
          --spread-days 90 --days 125 --warm-days 60 --by-category
    """
    if by_category and not (seeds > 1 or policies):
        raise click.UsageError("--by-category goes with --seeds or --policy")
    if seeds > 1 or policies:
        if from_db:
            raise click.UsageError("--seeds and --policy run synthetic populations, not --from-db")
        shape = compare.Population(size, days, spread_days, warm_days)
        return _compare_policies(
            plan_files, policies, shape, seed, seeds, jobs, workdir, as_json, by_category
        )
    if from_db:
        try:
            members = backtest.population_from_cases(seed, size)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    else:
        members = population.synthetic(size, seed, month.START)
    plans = {"default": None, **{Path(f).stem: str(Path(f).resolve()) for f in plan_files}}
    with click.progressbar(
        length=len(plans) * (days * 24 + 1),
        label=f"{len(plans)} plan(s) x {days} days, {len(members)} subscribers",
        file=sys.stderr,
    ) as bar:
        results = backtest.run(plans, members, seed, days, workdir.resolve(), bar.update)
    if as_json:
        return emit_json(results)
    names = list(results)
    rows = [
        ("recovered", lambda s: f"{s['recovered']['count']} ({s['recovered']['rate'] * 100:.1f}%)"),
        ("revenue recovered", lambda s: format_totals(s["recovered"]["amount"])),
        ("retries made", lambda s: str(s["retries"]["made"])),
        ("emails sent", lambda s: str(s["funnel"]["emails_sent"])),
        ("median hours to recover", lambda s: str(s["time_to_recover_hours"]["median"] or "-")),
        *[
            (f"  {path.replace('_', ' ')}", _path_column(path))
            for path in ("retry", "card_update", "backup_card", "link", "paid_elsewhere")
        ],
    ]
    width = max(24, *(len(n) + 2 for n in names))
    click.echo(f"\n{'':<26}" + "".join(f"{n:>{width}}" for n in names))
    for label, cell in rows:
        click.echo(f"{label:<26}" + "".join(f"{cell(results[n]['stats']):>{width}}" for n in names))
    failed = [n for n in names if not all(results[n]["checks"].values())]
    if failed:
        click.echo(f"\nconsistency checks FAILED for: {', '.join(failed)}", err=True)
        raise SystemExit(1)
    click.echo(
        "\nAssumptions: see recovery/sim/population.py (causes, when cards work again, how"
        " customers answer). Compare plans with one another, not with your real recovery rate."
    )


def _compare_policies(
    plan_files: tuple[str, ...],
    policies: tuple[str, ...],
    shape: compare.Population,
    seed: int,
    seeds: int,
    jobs: int,
    workdir: Path,
    as_json: bool,
    by_category: bool = False,
) -> None:
    chosen = {name: compare.BUILT_IN[name] for name in policies or ("defaults",)}
    chosen.update({Path(f).stem: compare.Policy(str(Path(f).resolve())) for f in plan_files})
    seed_list = list(range(seed, seed + seeds))
    with click.progressbar(
        length=len(chosen) * seeds * (shape.days * 24 + 1),
        label=(
            f"{len(chosen)} policies x {seeds} seeds x {shape.days} days, {shape.size} subscribers"
        ),
        file=sys.stderr,
    ) as bar:
        result = compare.compare(
            chosen, seed_list, shape, workdir.resolve(), bar.update, jobs, by_category
        )
    names = result.policies
    if as_json:
        emit_json(
            {
                "seeds": seed_list,
                "summary": {
                    m: {n: asdict(v) for n, v in result.summary(m).items()} for m in result.metrics
                },
                "against_first": {
                    m: {n: asdict(v) for n, v in result.against_first(m).items()}
                    for m in result.metrics
                },
                "checks_failed": result.failed_checks(),
            }
        )
    else:
        width = max(26, *(len(n) + 2 for n in names))
        click.echo(f"\nmean [95% interval] over {seeds} seeds; baseline: {names[0]}")
        click.echo(f"{'':<38}" + "".join(f"{n:>{width}}" for n in names))
        for metric in result.metrics:
            cells = result.summary(metric)
            click.echo(f"{metric:<38}" + "".join(f"{str(cells[n]):>{width}}" for n in names))
            if len(names) > 1:
                gaps = result.against_first(metric)
                click.echo(
                    f"{'  minus ' + names[0]:<38}{'':>{width}}"
                    + "".join(
                        f"{str(compare.as_shown(gaps[n], cells[n], cells[names[0]])):>{width}}"
                        for n in names[1:]
                    )
                )
        click.echo(
            "\nAssumptions: see recovery/sim/population.py; built-in policies:"
            " recovery/sim/policies/."
        )
    failed = result.failed_checks()
    if failed:
        click.echo(f"\nconsistency checks FAILED for: {', '.join(failed)}", err=True)
        raise SystemExit(1)


STRIPE = "stripe-recommended"


def _headline(against: dict[str, dict[str, Any]]) -> str:
    """The demo against Stripe's schedule, its difference taken from the
    figures as printed so that it adds up."""
    ours, theirs = against["defaults"], against[STRIPE]
    share, base = (round(100 * f["recovered_share"], 1) for f in (ours, theirs))
    return (
        f"against Stripe's recommended schedule on the same subscribers"
        f" (recovered share of the failed amount): {share:.1f}% vs {base:.1f}%,"
        f" {share - base:+.1f} points; retries per recovery"
        f" {ours['retries_per_recovery']:.1f} vs {theirs['retries_per_recovery']:.1f}"
    )


def _against(ours: compare.RunFigures, theirs: compare.RunFigures) -> dict[str, dict[str, Any]]:
    return {"defaults": asdict(ours), STRIPE: asdict(theirs)}


def _path_column(path: str) -> Any:
    def cell(s: dict[str, Any]) -> str:
        row = next(r for r in s["by_path"] if r["name"] == path)
        return f"{row['recovered']}"

    return cell


COMMANDS = [stripe_sim, dev, send_test_event, demo, simulate]
