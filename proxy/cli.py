"""`flask --app proxy ...` commands: migrations, content cache, windows, retention."""

from __future__ import annotations

import functools
import json
import re
import signal
import threading
import traceback
from datetime import timedelta

import click
from alembic.util import CommandError
from flask import Flask
from sqlalchemy.exc import DatabaseError, OperationalError, ProgrammingError, SQLAlchemyError

from . import holds, logs, outbox, store, window_api
from .db import unavailable_reason, utcnow, writing
from .errors import ApiError

from .migrate import head_revision, known_revision, revision_at_start, schema_hint, schema_missing, upgrade
from .settings import without_credentials

MAX_ONCE_PASSES = 1000  # `worker --once`: passes over the outbox at most
# Bounds that keep an argument out of OverflowError: a date a century away, an id the database can store.
MAX_DURATION = timedelta(days=36500)
LIMIT = click.IntRange(1, 1_000_000)
ITEM_ID = click.IntRange(1, 2**63 - 1)


def needs_schema(command_function):
    """A command run before the migrations, or while the database cannot be reached, says so in one line
    instead of SQLAlchemy's traceback (the release phase's output is often all an operator sees)."""
    @functools.wraps(command_function)
    def run(*args, **kwargs):
        try:
            return command_function(*args, **kwargs)
        except SQLAlchemyError as exc:
            if schema_missing(exc):
                raise click.ClickException(schema_hint(exc)) from None
            driver_said = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0]
            if isinstance(exc, (OperationalError, ProgrammingError)) and "already exists" in driver_said:
                # SQLite calls it an OperationalError, which read as an outage; PostgreSQL's was a traceback.
                raise click.ClickException(
                    f"the database already holds what the migrations create ({driver_said}) but no record of them: "
                    "tables made by hand or by another application; use an empty database") from None
            state = getattr(getattr(exc, "orig", None), "sqlstate", None)
            if state == "25006":  # a hot standby, or a role or database set read-only: InternalError, no outage
                raise click.ClickException(f"the database is read-only: {unavailable_reason(exc)}") from None
            if state in ("40P01", "55P03"):  # deadlock, lock_not_available: the running app held what it needed
                raise click.ClickException(f"the database ended this command on a lock conflict with the running "
                                           f"app ({unavailable_reason(exc)}); run it again") from None
            # OperationalError: refused, timed out, locked, disk; a bare DatabaseError: a file that is no SQLite
            # database. The driver's words say which.
            if isinstance(exc, OperationalError) or type(exc) is DatabaseError:
                raise click.ClickException(f"the database is unavailable: {unavailable_reason(exc)}") from None
            raise  # anything else keeps its traceback: it is the operator's best clue
    return run


def alembic_errors(app: Flask):
    """`db` commands: Alembic's refusals (a revision it cannot find) in one line, not its traceback; a
    database a newer release migrated (a rollback's release phase) is named as such."""
    def decorate(command_function):
        @functools.wraps(command_function)
        def run(*args, **kwargs):
            try:
                return command_function(*args, **kwargs)
            except CommandError as exc:
                current = revision_at_start(app.extensions["proxy"].engine)
                if current is not None and not known_revision(current):
                    raise newer_release(current) from None
                raise click.ClickException(str(exc)) from None
            except AssertionError as exc:
                # Alembic asserts, rather than refuses, a relative step past its head or base (`head+1`,
                # `0005+1`): its own traceback, for a mistyped argument. Any other AssertionError is a bug: raised.
                if "/alembic/" not in traceback.extract_tb(exc.__traceback__)[-1].filename.replace("\\", "/"):
                    raise
                raise click.ClickException("Alembic cannot step that far from that revision: there is no such "
                                           f"revision (head is {head_revision()})") from None
        return run
    return decorate


def newer_release(current: str) -> click.ClickException:
    return click.ClickException(
        f"the database is at revision {current}, which this code (head {head_revision()}) does not "
        "know: a newer release has migrated it (run that release, or restore a backup), or it is another "
        "application's database")


def register(app: Flask) -> None:
    db = click.Group("db", help="Database schema (Alembic migrations).")

    @db.command("upgrade")
    @click.argument("revision", default="head")
    @needs_schema
    @alembic_errors(app)
    def db_upgrade(revision: str):
        """Apply migrations up to REVISION (default: head)."""
        if not revision.strip():  # a script's unset $REV: Alembic's own answer was an AssertionError's traceback
            raise click.BadParameter("give a revision (or none, for head)", param_hint="REVISION")
        engine = app.extensions["proxy"].engine
        before = revision_at_start(engine)
        upgrade(app.extensions["proxy"].settings.database_url, revision)
        # What the database is at now, not the argument: an upgrade "to" an older revision changes nothing (there
        # is no downgrade command; `alembic downgrade` does that), and saying "database at 0003" misled. A
        # relative one (+1) that moved it is no refusal.
        now = revision_at_start(engine)
        # `head`, `heads`, `0005@head` name where the database should end up, whatever it is at; a revision by its
        # id (or base) that it did not move from is one it is past.
        behind = "head" not in revision and (revision == "base" or known_revision(revision))
        if now is not None and now == before and now != revision and behind:
            raise click.ClickException(f"the database is at {now}, past {revision}: `db upgrade` never goes back "
                                       "(alembic downgrade does; restore a backup otherwise)")
        click.echo(f"database at {now or 'base'}" + (" (head)" if now == head_revision() else ""))

    @db.command("current")
    @needs_schema
    @alembic_errors(app)
    def db_current():
        """Show the revision the database is at."""
        current, head = revision_at_start(app.extensions["proxy"].engine), head_revision()
        if current is None:  # Alembic printed nothing at all for a database never migrated
            click.echo(f"none: no migrations applied (head is {head}; run `flask --app proxy db upgrade`)")
        elif current == head:
            click.echo(f"{current} (head)")
        elif not known_revision(current):
            raise newer_release(current)
        else:
            click.echo(f"{current} (head is {head}; run `flask --app proxy db upgrade`)")

    app.cli.add_command(db)

    content = click.Group("content", help="The Content API cache (types and WhatsApp approvals).")

    @content.command("refresh")
    @needs_schema
    def content_refresh():
        """Fetch every Content and its approval (/v1/ContentAndApprovals) into the cache."""
        from .content import ContentUnavailable

        try:
            count = app.extensions["proxy"].content.refresh_all()
        except ContentUnavailable as exc:
            base = without_credentials(app.extensions["proxy"].settings.twilio_content_base_url)
            raise click.ClickException(f"{exc} at {base} (TWILIO_CONTENT_BASE_URL)") from None
        click.echo(f"cached {count} content templates")

    app.cli.add_command(content)

    windows = click.Group("windows", help="Customer-service windows.")

    @windows.command("show")
    @click.argument("sender")
    @click.argument("user")
    @needs_schema
    def windows_show(sender: str, user: str):
        """The window of SENDER (whatsapp:+E164 or MG…) and USER (whatsapp:+E164, or whatsapp:US.1349… for a user
        known by a WhatsApp business-scoped id)."""
        try:
            click.echo(json.dumps(window_api.show(app.extensions["proxy"], sender, user), indent=2))
        except ApiError as exc:
            raise click.BadParameter(exc.message) from None

    @windows.command("expiring")
    @click.option("--within", default="1h", show_default=True, help="e.g. 3600, 90m, 2h")
    @click.option("--limit", default=100, show_default=True, type=LIMIT)
    @needs_schema
    def windows_expiring(within: str, limit: int):
        """Windows that close within the given time, soonest first (one JSON object per line)."""
        seconds = int(parse_duration(within).total_seconds())
        if seconds < 1:  # what GET /v1/windows/expiring refuses too
            raise click.BadParameter("must be at least 1 second", param_hint="'--within'")
        result = window_api.expiring(app.extensions["proxy"], seconds, limit, None)
        for item in result["windows"]:
            click.echo(json.dumps(item))
        click.echo(f"{len(result['windows'])} window(s) close within {within}"
                   + (" (more: raise --limit)" if result["meta"]["next_page_token"] else ""), err=True)

    app.cli.add_command(windows)

    box = click.Group("outbox", help="Durable deliveries (forwarded webhooks, releases, fallback sends).")

    @box.command("list")
    @click.option("--status", type=click.Choice(outbox.STATUSES), default=None,
                  help="`sending`: a fallback being sent now; `uncertain`: one Twilio may have taken, never sent "
                       "again (check Twilio's Messages list, then `outbox replay ID` if it is missing).")
    @click.option("--limit", default=100, show_default=True, type=LIMIT)
    @needs_schema
    def outbox_list(status: str | None, limit: int):
        """Outbox items, oldest first (one JSON object per line)."""
        with app.extensions["proxy"].engine.connect() as conn:
            rows = outbox.listing(conn, status, limit)
            counts = outbox.depth(conn)
        for row in rows:
            item = dict(row._mapping)
            for key in ("next_attempt_at", "created_at"):
                item[key] = item[key].isoformat()
            if item["kind"] in ("inbound", "status"):  # FORWARD_*_URL: its user:password@ and ?token are not shown
                item["target"] = without_credentials(item["target"])
            click.echo(json.dumps(item))
        click.echo(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "outbox empty", err=True)

    @box.command("replay")
    @click.argument("item_id", required=False, type=ITEM_ID)
    @click.option("--all", "replay_all", is_flag=True, help="Replay every exhausted item.")
    @needs_schema
    def outbox_replay(item_id: int | None, replay_all: bool):
        """Give an exhausted item (or --all of them), or an uncertain one by its id, a fresh round of attempts; a
        pending one waiting for its next attempt is made due now."""
        if (item_id is None) == (not replay_all):
            raise click.UsageError("give one ITEM_ID or --all")
        with writing(app.extensions["proxy"].engine) as conn:
            now = utcnow()
            count = outbox.replay(conn, now, item_id)
            single = item_id is not None and not count
            was_due = single and (outbox.due_at(conn, item_id) or now) <= now
            hurried = single and outbox.hurry(conn, item_id, now)
            ahead = outbox.ahead_of(conn, item_id) if hurried else None
            status = outbox.status_of(conn, item_id) if single else None
        if hurried and ahead is not None:  # the worker keeps each conversation's order: that one goes first
            ahead_id, ahead_due = ahead
            click.echo(f"outbox item {item_id} is {'due' if was_due else 'due now'}, behind item {ahead_id} of its "
                       f"conversation (next attempt {ahead_due.isoformat()}), which a worker delivers first: "
                       f"`outbox replay {ahead_id}` to hurry that one")
            return
        if hurried:  # the app is back: its webhooks need not wait out the retry schedule
            click.echo(f"outbox item {item_id} was already due: a worker takes it within a poll" if was_due else
                       f"outbox item {item_id} was waiting for its next attempt: due now (a worker takes it within a "
                       "poll)")
            return
        if item_id is not None and not count:
            # One item asked for and none queued is a mistake (a mistyped id, a live item), not a result: a
            # script must not take it for done. --all with nothing exhausted is a result.
            found = "is being delivered now" if status == outbox.PENDING else f"is {status}" if status else \
                "does not exist"
            raise click.ClickException(f"outbox item {item_id} {found}: only an exhausted or uncertain item can be "
                                       "replayed, or a pending one hurried (`outbox list --status exhausted`)")
        click.echo(f"{count} item(s) queued again")

    app.cli.add_command(box)

    held = click.Group("held", help="Messages held until the user writes again (HOLD_ON_REROUTE).")

    @held.command("list")
    @click.option("--status", type=click.Choice([*holds.STATUSES, "all"]), default=holds.HELD, show_default=True,
                  help="`sending`: being sent now; `uncertain`: Twilio may have taken it (check its Messages list).")
    @click.option("--sender", help="Only this sender's (a whatsapp: number or an MG Messaging Service SID).")
    @click.option("--user", help="Only this user's.")
    @click.option("--limit", default=100, show_default=True, type=LIMIT)
    @needs_schema
    def held_list(status: str, sender: str | None, user: str | None, limit: int):
        """Held messages, oldest first (one JSON object per line), as GET /v1/held."""
        try:
            sender_key = window_api.address_key(sender, sender=True, windowed=True)
            user_key = window_api.address_key(user, windowed=True)
        except ApiError as exc:
            raise click.BadParameter(exc.message, param_hint="'--sender' or '--user'") from None
        with app.extensions["proxy"].engine.connect() as conn:
            rows = holds.listing(conn, sender=sender_key, user=user_key, status=None if status == "all" else status,
                                 limit=limit + 1)
        for row in rows[:limit]:
            click.echo(json.dumps({k: (v.isoformat().replace("+00:00", "Z") if hasattr(v, "isoformat") else v)
                                   for k, v in row.items()}))
        if len(rows) > limit:  # cut off silently, an operator took the list for all of them
            click.echo(f"(more: raise --limit above {limit})", err=True)

    @held.command("cancel")
    @click.argument("held_id", type=click.IntRange(1, 2**63 - 1))
    @needs_schema
    def held_cancel(held_id: int):
        """Withdraw a message still held, as DELETE /v1/held/ID: no release sends it."""
        try:
            with writing(app.extensions["proxy"].engine) as conn:
                row, canceled = holds.cancel(conn, held_id, utcnow())
        except ApiError as exc:  # no such id, or no longer held: the API's own words
            raise click.ClickException(exc.message) from None
        if canceled:
            logs.event("hold_canceled", redact=app.extensions["proxy"].settings.log_redact_numbers, held_id=held_id,
                       sender=row["sender"], user=row["user"], request_id="cli")
        click.echo(f"held message {held_id} canceled")

    app.cli.add_command(held)

    @app.cli.command("worker")
    @click.option("--once", is_flag=True, help="Deliver everything due now, then exit.")
    @needs_schema
    def worker(once: bool):
        """Deliver the outbox: forwarded webhooks with backoff, held-message releases, fallback sends."""
        from . import worker_runtime
        from .worker import Worker

        rt = worker_runtime(app.extensions["proxy"])  # a connection and a forwarding thread per delivery
        runner = Worker(rt)
        try:
            if once:
                # A pass takes one item per conversation (their order); passes repeat until nothing is due.
                # Each failure pushes its item back by the retry schedule, so this ends; the bound is a backstop.
                total = 0
                for _ in range(MAX_ONCE_PASSES):
                    claimed = runner.run_once()
                    total += claimed
                    if not claimed:
                        break
                click.echo(f"{total} item(s) processed")
                return
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, setting_from_another_thread(stop))
            logs.database_in_use("worker", rt.settings)
            logs.event("worker_started", redact=True, poll_seconds=rt.settings.worker_poll_seconds,
                       concurrency=rt.settings.worker_concurrency)
            runner.run_forever(stop)
            logs.event("worker_stopped", redact=True)
        finally:
            rt.engine.dispose()  # its last attempt records are still stored at exit, on a fresh connection

    @app.cli.command("purge")
    @click.option("--older-than", "older_than", required=True, help="an age with its unit: 30d, 12h, 2w")
    @click.option("--yes", is_flag=True, help=f"Needed for an age under {_days(PURGE_WITHOUT_YES)}: records of "
                  "conversations still going on are deleted too.")
    @needs_schema
    def purge(older_than: str, yes: bool):
        """Delete message and send-attempt records older than the given age, delivered outbox items and finished
        holds as old, and windows closed that long.

        Open windows, pending outbox items and live holds (held, sending) are never deleted."""
        # Deleting is not undone: a bare number (seconds elsewhere) must not stand for days here, and an age
        # of minutes takes the audit trail of today's conversations with it.
        if not re.search(r"[smhdw]\s*$", older_than):
            raise click.BadParameter(f"{older_than!r} has no unit it knows (s, m, h, d, w): e.g. 30d, 12h or 2w",
                                     param_hint="'--older-than'")
        try:
            age = parse_duration(older_than)
        except click.BadParameter:  # its examples offer a bare number, which is refused here
            raise click.BadParameter(f"{older_than!r} is not an age such as 30d, 12h or 2w",
                                     param_hint="'--older-than'") from None
        if age < PURGE_WITHOUT_YES and not yes:
            raise click.UsageError(f"--older-than {older_than.strip()} deletes records younger than "
                                   f"{_days(PURGE_WITHOUT_YES)}, today's conversations among them: add --yes if that is meant")
        cutoff = utcnow() - age
        with writing(app.extensions["proxy"].engine) as conn:
            counts = store.purge(conn, cutoff)
        click.echo(", ".join(f"{n} {table}" for table, n in counts.items()) + f" deleted (before {cutoff:%Y-%m-%dT%H:%M:%SZ})")


def setting_from_another_thread(stop: threading.Event):
    """A signal handler that sets `stop` from a thread of its own.

    Python runs a handler in the main thread between two bytecodes, which may be inside `stop.wait()`
    holding the event's own lock: `stop.set()` there waits for that lock forever, and the worker never
    stops (a CI run's worker ignored SIGTERM for 15 s, then was killed). A new thread takes the lock once
    the main thread lets go of it."""
    def handler(_signum, _frame):
        threading.Thread(target=stop.set, name="stop", daemon=True).start()
    return handler


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
PURGE_WITHOUT_YES = timedelta(days=1)


def _days(age: timedelta) -> str:
    return f"{age.days} day" + ("s" if age.days != 1 else "")


def parse_duration(text: str) -> timedelta:
    # ASCII digits, at most 12: int() reads other scripts' digits too (the API refuses them), and refuses past 4300.
    match = re.fullmatch(r"\s*([0-9]{1,12})\s*([smhdw]?)\s*", text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration such as 3600, 90m, 12h, 30d or 2w")
    seconds = int(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds > MAX_DURATION.total_seconds():
        raise click.BadParameter(f"{text!r} is longer than {MAX_DURATION.days}d")
    return timedelta(seconds=seconds)
