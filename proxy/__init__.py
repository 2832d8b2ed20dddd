"""WhatsApp session-window proxy for Twilio: the Flask application factory."""

from __future__ import annotations

import os
import random
import re
import socket
import sys

import click
from flask import Flask, g, request
from sqlalchemy.exc import DataError, DBAPIError, SQLAlchemyError, StatementError
from twilio.request_validator import RequestValidator
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from . import admin, cli, gateway, logs, ops, webhooks
from .attempts import AttemptWriter
from .auth import require_basic_auth
from .content import ContentResolver
from .forwarding import Forwarder
from .group_commit import GroupCommit, values_refused
from .db import make_engine, unavailable_reason
from .errors import ApiError, twilio_error
from .metrics import DECISIONS, WEBHOOKS
from .migrate import (UPGRADE_COMMAND, HeadCheck, head_revision, known_revision, revision_at_start, schema_hint,
                      schema_missing)
from .runtime import Runtime
from .sandbox.simulator import SANDBOX_ACCOUNT_SID
from .settings import ConfigError, Settings
from .upstream import Upstream

# The greenlets (or threads) of one gunicorn worker share its upstream pool (one connection per
# in-flight send; a gevent worker can have hundreds) and its database pool: a request holds a
# connection for about a millisecond, so 10 per worker, kept open and never more (callers queue for
# one), keeps WEB_CONCURRENCY x 10 under PostgreSQL's default max_connections of 100.
DEFAULT_POOL_SIZE = 256
DB_POOL_SIZE = 10
# Forwarding threads of a web process: its inline attempts at once (each waits up to FORWARD_TIMEOUT_SECONDS).
FORWARD_THREADS = 16
# The outbox worker's connections besides one per delivery: its claims (and hand-backs) and the attempt writer.
WORKER_SPARE_CONNECTIONS = 2
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # what a Twilio idempotency token looks like


# gunicorn restarts a worker that exits with any other code, forever, behind a listening port; 4 (its
# APP_LOAD_ERROR) makes the master stop with the worker, so the bad setting ends the start.
_CONFIG_ERROR_EXIT_UNDER_GUNICORN = 4


def _in_gunicorn() -> bool:
    return os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/")  # set by gunicorn's master


def _asking_flask_for_help() -> bool:
    """`flask --app proxy [COMMAND] --help`: the flask CLI loads the app only to list its commands."""
    return click.get_current_context(silent=True) is not None and "--help" in sys.argv[1:]


def _loaded_by_flask_cli() -> bool:
    """`flask --app proxy COMMAND`: the app serves no requests (the `worker` command says its own start)."""
    return click.get_current_context(silent=True) is not None


# flask's own options that take a value (`flask --app proxy --env-file .env worker`).
_FLASK_OPTIONS_WITH_VALUES = ("--app", "-A", "--env-file", "-e")


def _log_stream():
    """stdout for a serving process (gunicorn's workers, `flask run`, the `worker` command): its log lines are its
    output. Any other command prints what it was asked for on stdout, which scripts read (`outbox list` a JSON
    line per item): its log lines go to stderr. Read from the command line: flask loads the app while it is still
    working out which command was asked for, and click has not kept it anywhere yet."""
    if not _loaded_by_flask_cli():
        return sys.stdout
    words = iter(sys.argv[1:])
    for word in words:
        if word in _FLASK_OPTIONS_WITH_VALUES:
            next(words, None)
        elif not word.startswith("-"):
            return sys.stdout if word in ("run", "worker") else sys.stderr
    return sys.stderr


class _Unconfigured:
    """The runtime of an app whose settings could not be read: any command that uses it stops there."""

    def __init__(self, error: ConfigError):
        self.error = error

    def __getattr__(self, name):
        raise click.ClickException(f"configuration error: {self.error}")


def _commands_only(error: ConfigError) -> Flask:
    """An app with the proxy's commands and nothing else, so that a new user's `--help` lists them before any
    credentials are set (the sandbox, which needs none, is among them). It serves nothing."""
    app = Flask(__name__)
    app.extensions["proxy"] = _Unconfigured(error)
    cli.register(app)
    return app


def create_app(settings: Settings | None = None) -> Flask:
    if settings is None:
        try:
            settings = Settings.from_env()
        except ConfigError as exc:
            if _asking_flask_for_help():
                # The help is what was asked for, and is given: the settings are a note, not an error.
                sys.stderr.write(f"whatsapp-window-proxy: note: {exc} Until then the commands below stop with this "
                                 "(`sandbox` needs no settings).\n")
                return _commands_only(exc)
            # A clean message, not a traceback, for whoever starts the proxy.
            sys.stderr.write(f"whatsapp-window-proxy: configuration error: {exc}\n")
            raise SystemExit(_CONFIG_ERROR_EXIT_UNDER_GUNICORN if _in_gunicorn() else 2) from None
    logs.configure(settings.log_level, settings.log_format, _log_stream())

    app = Flask(__name__)
    # Set before any rule is added (each rule copies it): werkzeug's default answers `//` with a 308 of its own,
    # an HTML redirect before authentication; unmerged, such a path is an unknown one, a Twilio-shaped 404.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length
    app.config["BODY_READ_SECONDS"] = settings.body_read_seconds  # proxy/forms.py
    if settings.allow_unsigned_webhooks:
        logs.log.critical("unsigned_webhooks_allowed", extra={
            "detail": "ALLOW_UNSIGNED_WEBHOOKS=true: anyone can open windows; for local development only"})
    unused = settings.unused_reroute_settings()
    if unused and settings.account_sid != SANDBOX_ACCOUNT_SID:  # `sandbox up` sets a fallback and holds itself
        logs.log.warning("reroute_settings_unused", extra={
            "detail": f"{unused} set, but every out-of-window action is block (OUT_OF_WINDOW_ACTION, POLICY_FILE): "
                      "nothing is rerouted or held"})
    if settings.fail_open:
        logs.log.critical("fail_open_enabled", extra={
            "detail": "FAIL_OPEN=true: if the database is down, sends go to Twilio unjudged"})
    if not _loaded_by_flask_cli():  # a serving process: once per gunicorn worker, as each loads the app
        logs.database_in_use("web", settings)
    app.extensions["proxy"] = make_runtime(settings)
    app.register_blueprint(webhooks.bp)
    app.register_blueprint(gateway.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(ops.bp)
    cli.register(app)

    @app.before_request
    def assign_request_id():
        # Twilio's idempotency token ties our log line to Twilio's own request log.
        # Not uuid4: a log correlation id needs no OS entropy, and os.urandom cost ~0.1 ms a request here.
        # Anyone may send the header, signed or not: only a token-shaped value becomes a log field.
        token = request.headers.get("I-Twilio-Idempotency-Token", "")
        g.request_id = token if _REQUEST_ID.fullmatch(token) else f"{random.getrandbits(128):032x}"

    @app.after_request
    def add_request_id(response):
        if "request_id" in g:
            response.headers["X-Request-Id"] = g.request_id
        return response

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        if exc.refusal:
            count_refusal(exc.refusal)
        return exc.response()

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if exc.code == 404:
            return twilio_error(20404, 404, path=request.path)
        if getattr(exc, "close_connection", False):
            end_of_requests()
        if not isinstance(exc, MethodNotAllowed):
            return twilio_error(exc.code, exc.code, exc.description)
        # Refused by routing, before the blueprints' own hooks: a PUT, PATCH or OPTIONS to the Messages API or the
        # admin API is answered only to a caller with credentials (its Allow says which methods exist), and the
        # gateway's says it was not judged, as its other answers do.
        on_gateway = request.path.startswith(gateway.bp.url_prefix + "/")
        authenticated = on_gateway or request.path.startswith(admin.bp.url_prefix + "/")
        response = require_basic_auth() if authenticated else None
        if response is None:
            response = twilio_error(405, 405, exc.description)
            response.headers["Allow"] = ", ".join(exc.valid_methods or ())
        if on_gateway:
            response.headers["X-Proxy-Decision"] = "rejected"
        return response

    @app.errorhandler(DataError)
    def unstorable_value(exc: StatementError):
        # A value the database refuses is bad input, not an outage.
        logs.log.warning("unstorable_value", extra={"path": logs.masked_path(request.path), "request_id": g.get("request_id")})
        return twilio_error(400, 400, "A value in the request cannot be stored (control characters or too long).")

    @app.errorhandler(SQLAlchemyError)
    def database_error(exc: SQLAlchemyError):
        if isinstance(exc, StatementError) and values_refused(exc):
            return unstorable_value(exc)  # a value that could not even be bound: bad input, not an outage
        extra = {"error": type(exc).__name__, "path": logs.masked_path(request.path), "request_id": g.get("request_id")}
        missing = schema_missing(exc)  # no outage: the migrations were not applied, and no retry will help
        if missing:
            extra["detail"] = schema_hint(exc)
        elif isinstance(exc, DBAPIError):  # refused, timed out, read-only, not a database: the driver's words say which
            extra["detail"] = unavailable_reason(exc)
        reason = "migrations_not_at_head" if missing else "database_unavailable"
        logs.log.error(reason, extra=extra)
        count_refusal(reason)
        # Fail closed: without the window state nothing is judged, so nothing is sent.
        return twilio_error(503, 503, "The proxy's database is unavailable; nothing was sent or recorded. Retry later.")

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        logs.log.exception("unhandled_error", extra={"path": logs.masked_path(request.path), "request_id": g.get("request_id")})
        return twilio_error(20500, 500, "An internal server error has occurred in the proxy.")

    return app


def end_of_requests() -> None:
    """No further request is read from this connection: the rest of a body not read whole would be parsed as
    one, or waited for (up to the keep-alive's 75 s). gunicorn drops an app's `Connection: close`; a socket
    shut for reading ends its next read, and it closes the connection once this answer is written."""
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:  # gone already
            pass


def make_runtime(settings: Settings, *, db_pool_size: int = DB_POOL_SIZE, forward_threads: int = FORWARD_THREADS,
                 check: bool = True) -> Runtime:
    """What a process holds for its lifetime: a database pool of `db_pool_size`, `forward_threads` forwarding
    threads. `check`: ask the database's revision now, and say if it is behind (else asked at first need)."""
    engine = make_engine(settings.database_url, pool_size=db_pool_size)
    head = head_revision()
    at_start = check_migrations(engine, head) if check else False
    upstream = Upstream(settings.twilio_api_base_url, settings.twilio_timeout_seconds, DEFAULT_POOL_SIZE)
    return Runtime(
        settings=settings,
        engine=engine,
        # pysqlite begins no transaction before a SELECT, and switching isolation costs it a PRAGMA.
        reader=engine if engine.dialect.name == "sqlite" else engine.execution_options(isolation_level="AUTOCOMMIT"),
        upstream=upstream,
        validator=RequestValidator(settings.auth_token),
        previous_validator=RequestValidator(settings.previous_auth_token) if settings.previous_auth_token else None,
        migrations_head=head,
        schema=HeadCheck(engine, head, at_start),
        forwarder=Forwarder(settings.auth_token, settings.forward_timeout_seconds, pool_size=forward_threads),
        attempts=AttemptWriter(engine),
        shared_writes=GroupCommit(engine),
        content=ContentResolver(upstream.http, settings.twilio_content_base_url,
                                (settings.account_sid, settings.auth_token), engine, settings.content_cache_seconds),
    )


def worker_runtime(rt: Runtime) -> Runtime:
    """The runtime the `worker` command delivers with: the app's, with a database pool and forwarding
    threads for WORKER_CONCURRENCY deliveries at once. Each delivery holds a connection while it writes
    and a forwarding thread while it waits for the app; the web's pool (10 per gunicorn worker) would make
    them queue, and a forward still waiting for a thread at its deadline is a failed attempt. The app's
    own engine is closed: the worker process uses this one."""
    concurrency = rt.settings.worker_concurrency
    worker = make_runtime(rt.settings, db_pool_size=concurrency + WORKER_SPARE_CONNECTIONS,
                          forward_threads=max(FORWARD_THREADS, concurrency), check=False)  # create_app asked
    rt.engine.dispose()
    return worker


def count_refusal(reason: str) -> None:
    """A send or a webhook answered 503 because of the database (`reason`): counted with the decisions and
    webhooks, so a dashboard shows refusals, not only fewer requests."""
    if request.endpoint == "gateway.create_message":
        DECISIONS.labels("rejected", reason, "none").inc()  # `rejected`: the X-Proxy-Decision such a send gets
    elif request.blueprint == "webhooks":
        WEBHOOKS.labels(g.get("webhook_kind", "unknown"), reason).inc()


def check_migrations(engine, head: str) -> str | None | bool:
    """Say at start-up, in one line, that the database's migrations are not at the code's head; the revision
    found (None: no migrations at all), or False when the database did not answer.

    Otherwise the first sign is a 503 per request, logged like an outage. One query; a database that is
    down does not stop the start: the proxy comes up and fails closed until the database is back."""
    try:
        current = revision_at_start(engine)
    except SQLAlchemyError as exc:
        reason = f" ({unavailable_reason(exc)})" if isinstance(exc, DBAPIError) else ""
        logs.log.warning("database_unavailable", extra={
            "error": type(exc).__name__,
            "detail": f"at start-up{reason}; starting anyway: what needs the database answers 503 until it is back"})
        return False
    if current == head:
        return current
    if current is None or known_revision(current):
        detail = (f"run `{UPGRADE_COMMAND}` (the Procfile's release phase); until then a request that "
                  "meets a missing table or column answers 503")
    else:
        detail = "the database is at a revision this code does not know: a newer release has migrated it"
    logs.log.warning("migrations_not_at_head", extra={"database_revision": current, "code_revision": head,
                                                      "detail": detail})
    return current
