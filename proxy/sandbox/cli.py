"""`flask --app proxy sandbox …`: run the simulator, play the user, run the proxy against it, run the demo.

Registered as a Flask plugin command (pyproject entry point), so it runs without Twilio credentials:
the app factory is never called for it.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import click
import requests
from sqlalchemy import create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ..addresses import channel_of
from ..db import utcnow, windows
from ..settings import DEFAULT_SQLITE_PATH, ConfigError, normalise_database_url, without_credentials
from .server import ServerThread
from .simulator import (BUSINESS, MESSAGING_SERVICE_SID, SANDBOX_ACCOUNT_SID, SANDBOX_API_KEY_SECRET,
                        SANDBOX_API_KEY_SID, SANDBOX_AUTH_TOKEN, Simulator, is_loopback, whatsapp_key)

ROOT = Path(__file__).resolve().parents[2]
# Never the real mode's default (instance/proxy.sqlite3): a sandbox window left there let real sends to
# that user through, and its held messages were listed by the real proxy.
SANDBOX_SQLITE_PATH = Path("instance") / "sandbox.sqlite3"

BANNER = """
================================================================================
  SANDBOX MODE: no Twilio account is used. A local Twilio simulator answers on
  {sim}; {leaves}, and no real WhatsApp message is sent.
  Set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN to serve for real.
================================================================================
"""

# The real mode's settings that `sandbox up` does not pass on to its processes: they name the real
# database, the real account's templates (the simulator has only its samples) and the public URL Twilio
# signs (the simulator signs the sandbox's own). Only names are printed, never values.
REAL_MODE_ONLY = ("DATABASE_URL", "FALLBACK_CONTENT_SID", "FALLBACK_CONTENT_VARIABLES",
                  "FALLBACK_PROFILE_NAME_DEFAULT", "POLICY_FILE", "PUBLIC_BASE_URL", "TWILIO_API_KEYS")
FORWARDS = ("FORWARD_INBOUND_URL", "FORWARD_STATUS_URL")


def procfile_command(kind: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{kind}:"):
            return line.split(":", 1)[1].strip()
    raise click.ClickException(f"Procfile has no {kind}: line")


# What `sandbox up` sets for its processes, printed as exports so that `flask --app proxy …` in another
# shell sees the same database, account, simulator and fallback.
EXPORTED = ("DATABASE_URL", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_API_BASE_URL",
            "TWILIO_CONTENT_BASE_URL", "FALLBACK_CONTENT_SID", "FALLBACK_CONTENT_VARIABLES", "HOLD_ON_REROUTE",
            "POLICY_FILE")


def bind_simulator(port: int, proxy_url: str, hint: str = "--port N") -> tuple[Simulator, ServerThread, dict]:
    """The simulator and its server, bound to the port but not serving until the server is entered."""
    proxy_url = proxy_url.rstrip("/")  # `--proxy-url http://host:8000/` must not post to `//twilio/...`, a 404
    sim = Simulator(inbound_url=f"{proxy_url}/twilio/inbound", status_callback_url=f"{proxy_url}/twilio/status")
    samples = sim.load_samples()
    # werkzeug itself prints two lines of its own for a port in use and exits.
    check_port_free(port, "the simulator's", hint)
    server = ServerThread(sim.app(), port)
    sim.url = server.url
    return sim, server, samples


def check_port_free(port: int, whose: str, hint: str) -> None:
    """Bind and let go at once, as gunicorn will bind it (SO_REUSEADDR: a restart's TIME_WAIT is no conflict).

    Before the banner: gunicorn finds a port in use only after the banner and its curl to try are out,
    and gives up ~5 s later, after its bind retries.
    """
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise _port_unusable(port, whose, exc, hint) from None


def _port_unusable(port: int, whose: str, exc: OSError, hint: str) -> click.ClickException:
    reason = "in use" if exc.errno == errno.EADDRINUSE else f"unusable ({exc.strerror or exc})"
    return click.ClickException(f"port {port} ({whose}) is {reason}: choose another with {hint}")


def sandbox_database_url(named: str | None, environ: Mapping[str, str]) -> str:
    """The sandbox's own database, spelt so that any shell in any directory finds it.

    DATABASE_URL is the real mode's and is not read: only --database-url (SANDBOX_DATABASE_URL) names
    another, and never the real mode's (DATABASE_URL, or its default file).
    """
    url = _rooted(named.strip() if named and named.strip() else f"sqlite:///{SANDBOX_SQLITE_PATH}")
    real = [_rooted(f"sqlite:///{DEFAULT_SQLITE_PATH}")]
    try:
        real.append(_rooted(environ.get("DATABASE_URL", "").strip() or f"sqlite:///{DEFAULT_SQLITE_PATH}"))
    except click.ClickException:  # the real mode's to complain about, not the sandbox's
        pass
    if _same_database(url) in {_same_database(r) for r in real}:
        raise click.ClickException(
            f"the sandbox's database {without_credentials(url)} is the real mode's (DATABASE_URL, or "
            f"{DEFAULT_SQLITE_PATH}): the sandbox's windows and held messages would be the real proxy's; name "
            f"another with --database-url (SANDBOX_DATABASE_URL), or leave it unset for {SANDBOX_SQLITE_PATH}.")
    return url


def _rooted(raw: str) -> str:
    try:
        url = make_url(normalise_database_url(raw))
    except (ConfigError, ArgumentError, ValueError) as exc:
        raise click.ClickException(str(exc).replace("DATABASE_URL", "the sandbox's database URL")) from None
    # The processes run in ROOT: a relative SQLite path (the default too) is ROOT's, wherever
    # `sandbox up` was started from.
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not Path(url.database).is_absolute():
        url = url.set(database=str(ROOT / url.database))
    return url.render_as_string(hide_password=False)


def _same_database(url: str) -> tuple:
    """What tells two URLs of one database apart from two databases (not the driver, user or password), each
    spelt one way: a host in any case, PostgreSQL's port left out or given (5432), a SQLite path through `..`
    or a link."""
    parsed = make_url(url)
    backend, database = parsed.get_backend_name(), parsed.database
    if backend == "sqlite" and database not in (None, "", ":memory:"):
        database = str(Path(database).resolve())
    def query(name: str):  # libpq also takes `?host=` (a socket directory, Cloud SQL) and `?port=`
        value = parsed.query.get(name)
        return (value[-1] if isinstance(value, tuple) else value) or None

    host = parsed.host or query("host")
    port = parsed.port or query("port") or (5432 if backend == "postgresql" else None)
    return (backend, (host or "").lower() or None, str(port) if port else None, database)


def open_windows(url: str) -> dict:
    """The windows the proxy's database holds open, keyed as the simulator keeps WhatsApp's view.

    A restarted simulator starts with them: otherwise it fails with a late 63016 what the proxy, whose
    database outlived the restart, rightly lets through. A window the proxy closed (a late 63016) stays
    closed. Messaging Service rows are left out: the same inbound message opened its sender's row, and
    the simulator matches a service to any sender.
    """
    engine = create_engine(normalise_database_url(url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(windows.c.sender, windows.c.user, windows.c.last_inbound_at)
                                .where(windows.c.expires_at > utcnow(), ~windows.c.sender.startswith("MG"))).all()
    finally:
        engine.dispose()
    return {(whatsapp_key(sender), whatsapp_key(user)): at for sender, user, at in rows}


def exports(env: Mapping[str, str], bin_dir: str, ignored: Sequence[str] = ()) -> list[str]:
    """The shell lines after which `flask --app proxy …` works against this sandbox."""
    hidden = _has_password(env.get("DATABASE_URL", ""))  # a banner is not where a database password belongs
    lines = [f"export {name}={shlex.quote(env[name])}" for name in EXPORTED
             if name in env and not (hidden and name == "DATABASE_URL")]
    if hidden:
        lines.insert(0, "# DATABASE_URL: export the one you started with (its password is not printed)")
    # The other shell has them too: its commands would read the real mode's policy file, say.
    unset = [name for name in ignored if name not in env]
    if unset:
        lines.insert(0, f"unset {' '.join(unset)}")
    # `make run` never activates the virtualenv: without this another shell has no (or another) flask.
    return [*lines, f'export PATH={shlex.quote(bin_dir)}:"$PATH"']


def _has_password(database_url: str) -> bool:
    try:
        return bool(make_url(database_url).password)
    except ArgumentError:  # not a URL: nothing in it to hide
        return False


LOOPBACK_NO_PROXY = ("127.0.0.1", "localhost")


def bypass_proxies_for_this_machine(environ) -> None:
    """Everything the sandbox calls is on this machine: an HTTP_PROXY without a NO_PROXY for it (a corporate
    laptop) took the proxy's creates, the simulator's webhooks and `say` to that proxy, off the machine.

    Set in this process's environment (the simulator, `say`, the demo) and so in `sandbox up`'s
    processes: the proxy reads NO_PROXY for its calls to the simulator. requests reads no_proxy before
    NO_PROXY; both get the same list.
    """
    given = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    missing = [host for host in LOOPBACK_NO_PROXY if host not in {h.strip() for h in given.split(",")}]
    if missing or environ.get("no_proxy") != environ.get("NO_PROXY"):
        environ["no_proxy"] = environ["NO_PROXY"] = ",".join(filter(None, [*missing, given]))


def template_lines(samples: dict) -> list[str]:
    """The sample templates, as both banners list them."""
    return ["templates:", *(f"  {sid}  {content_type:<26} {'approved' if approved else 'unapproved'}"
                            for (content_type, approved), sid in sorted(samples.items()))]


@click.group("sandbox", invoke_without_command=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8001, show_default=True,
              help="Port of the simulator on 127.0.0.1.")
@click.option("--proxy-url", default="http://127.0.0.1:8000", show_default=True,
              help="The proxy the simulated users write to and status callbacks go to.")
@click.pass_context
def sandbox(ctx: click.Context, port: int, proxy_url: str):
    """A local Twilio simulator: Messages and Content APIs, WhatsApp's own window, status callbacks."""
    bypass_proxies_for_this_machine(os.environ)
    if ctx.invoked_subcommand is not None:
        return
    sim, server, samples = bind_simulator(port, proxy_url)
    server.__enter__()
    click.echo(BANNER.format(sim=sim.url, leaves="nothing leaves this machine"))
    click.echo(f"account {sim.account_sid}, auth token {sim.auth_token} (sandbox values, not secrets)")
    click.echo("\n".join(template_lines(samples)))
    click.echo(f"users write with: flask --app proxy sandbox say whatsapp:+14155550111 'hi' --sim-url {sim.url}")
    _wait_for_signal()
    server.__exit__(None, None, None)


def _coordinate(limit: float):
    """A latitude or longitude as typed (`37.70` stays `37.70`, as Twilio posts what WhatsApp sent), checked."""
    def check(ctx, param, value):
        if value is None:
            return None
        try:
            number = float(value)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a number") from None
        if not -limit <= number <= limit:
            raise click.BadParameter(f"{value} is not between -{limit:g} and {limit:g}")
        return value.strip()
    return check


def _whatsapp_address(address: str, param_hint: str, verb: str) -> str:
    """A bare number is taken for WhatsApp's, and said so; another channel is refused.

    The sandbox is WhatsApp: `+14155550111` opened a window for the SMS address, which no send to
    `whatsapp:+14155550111` ever finds.
    """
    channel = channel_of(address)
    if channel is None:
        click.echo(f"{address} has no channel prefix: writing {verb} whatsapp:{address.strip()}")
        return f"whatsapp:{address.strip()}"
    if channel != "whatsapp":
        raise click.BadParameter(f"{address!r} is not a WhatsApp address: the sandbox plays WhatsApp only "
                                 "(e.g. whatsapp:+14155550111).", param_hint=param_hint)
    return address


@sandbox.command("say")
@click.argument("user")
@click.argument("text", required=False)
@click.option("--to", "business", default=BUSINESS, show_default=True, help="The business number written to.")
@click.option("--sim-url", default="http://127.0.0.1:8001", show_default=True)
@click.option("--profile-name", default="Sandbox User", show_default=True)
@click.option("--button-payload", default=None, help="Reply as if a quick-reply button with this id was tapped.")
@click.option("--latitude", default=None, metavar="DEGREES", callback=_coordinate(90),
              help="Share a location (with --longitude).")
@click.option("--longitude", default=None, metavar="DEGREES", callback=_coordinate(180),
              help="Share a location (with --latitude).")
@click.option("--messaging-service", default=None, metavar="MG…",
              help="The Messaging Service the business number belongs to: the webhook carries its "
                   "MessagingServiceSid, and opens the (service, user) window too.")
def say(user, text, business, sim_url, profile_name, button_payload, latitude, longitude, messaging_service):
    """Play the user: USER writes TEXT (or shares a location); the simulator posts a signed inbound webhook
    to the proxy."""
    if (latitude is None) != (longitude is None):
        raise click.UsageError("--latitude and --longitude go together: a location needs both.")
    if text is None and latitude is None:
        raise click.UsageError("Missing argument 'TEXT' (a location, --latitude and --longitude, needs none).")
    user = _whatsapp_address(user, "USER", "as")
    business = _whatsapp_address(business, "'--to'", "to")
    form = {"From": user, "To": business, "Body": text or "", "ProfileName": profile_name}
    if button_payload:
        form["ButtonPayload"] = button_payload
    if latitude is not None:
        form.update(Latitude=latitude, Longitude=longitude)
    if messaging_service:
        if not MESSAGING_SERVICE_SID.fullmatch(messaging_service):
            raise click.BadParameter("a Messaging Service SID is MG and 32 hex digits", param_hint="'--messaging-service'")
        form["MessagingServiceSid"] = messaging_service
    where = ("pass the --sim-url that `make run` printed (the simulator is on the proxy's port + 1, or SANDBOX_PORT), "
             "or start the sandbox with `make run`")
    if not is_loopback(sim_url):  # nothing the sandbox does leaves this machine
        raise click.BadParameter(f"{sim_url!r} is not on this machine: the simulator is local (127.0.0.1 or "
                                 "localhost)", param_hint="'--sim-url'")
    try:
        reply = requests.post(f"{sim_url}/sandbox/say", data=form, timeout=30)
        body = reply.json()
    except requests.RequestException:  # its JSONDecodeError too: something else answers on that port
        raise click.ClickException(f"no simulator at {sim_url}: {where}") from None
    expected = {"proxy_status", "proxy_reply"} if reply.status_code == 200 else {"message"}
    if not isinstance(body, dict) or not expected <= body.keys():  # JSON, but not the simulator's
        raise click.ClickException(f"no simulator at {sim_url}: {where}")
    if reply.status_code != 200:
        raise click.ClickException(body.get("message", reply.text))
    click.echo(f"proxy answered {body['proxy_status']}: {body['proxy_reply']}")
    for sent in body.get("twiml_replies") or ():
        click.echo(f"the simulator sent the TwiML's <Message> to {sent['to']} as Twilio would: {sent['sid']} "
                   "(its outcome in the Messages list)")


@sandbox.command("up")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port of the proxy.")
@click.option("--sandbox-port", type=click.IntRange(1, 65535), default=None,
              help="Port of the simulator.  [default: the proxy's port + 1, 8001]")
@click.option("--database-url", envvar="SANDBOX_DATABASE_URL", default=None,
              help="The sandbox's database (never DATABASE_URL, the real mode's).  [env SANDBOX_DATABASE_URL; "
                   "default: instance/sandbox.sqlite3]")
@click.option("--policy-file", envvar="SANDBOX_POLICY_FILE", default=None,
              help="A POLICY_FILE for the sandbox (its fallbacks must name the sample templates).  "
                   "[env SANDBOX_POLICY_FILE]")
def up(port: int, sandbox_port: int | None, database_url: str | None, policy_file: str | None):
    """The proxy (the Procfile's web and worker lines) wired to the simulator: `make run` with no credentials."""
    # Next to the proxy's: `make run PORT=18000`, moved off a port in use, must not meet the same
    # neighbour's simulator on 8001.
    sandbox_port = port + 1 if sandbox_port is None else sandbox_port
    if sandbox_port > 65535:
        raise click.UsageError(f"--port {port} leaves no port after it for the simulator: give --sandbox-port.")
    if sandbox_port == port:
        raise click.UsageError(f"--sandbox-port must be another port than --port ({port}).")
    for name in FORWARDS:
        target = os.environ.get(name, "").strip()
        if target and not is_loopback(target):
            raise click.ClickException(
                f"{name} points at {without_credentials(target)}: the sandbox forwards webhooks only to this "
                "machine (127.0.0.1/localhost); unset it, or point it at your app running locally.")
    proxy_url = f"http://127.0.0.1:{port}"
    sandbox_db = sandbox_database_url(database_url, os.environ)
    check_port_free(port, "the proxy's", "--port N (make run PORT=N)")
    sim, server, samples = bind_simulator(sandbox_port, proxy_url, "--sandbox-port N (make run SANDBOX_PORT=N)")
    sim.api_keys[SANDBOX_API_KEY_SID] = SANDBOX_API_KEY_SECRET  # the proxy forwards a key's callers' own credentials
    ignored = sorted(name for name in REAL_MODE_ONLY if os.environ.get(name, "").strip())
    env = {k: v for k, v in os.environ.items() if k not in REAL_MODE_ONLY}
    env.update({"DATABASE_URL": sandbox_db, "TWILIO_ACCOUNT_SID": SANDBOX_ACCOUNT_SID,
                "TWILIO_AUTH_TOKEN": SANDBOX_AUTH_TOKEN, "TWILIO_API_BASE_URL": sim.url,
                "TWILIO_API_KEYS": f"{SANDBOX_API_KEY_SID}:{SANDBOX_API_KEY_SECRET}",
                "TWILIO_CONTENT_BASE_URL": sim.url, "PORT": str(port),
                "FALLBACK_CONTENT_SID": samples[("twilio/text", True)],
                "FALLBACK_CONTENT_VARIABLES": json.dumps({"1": "{profile_name}", "2": "#1001"})})
    if policy_file:
        env["POLICY_FILE"] = policy_file
    env.setdefault("HOLD_ON_REROUTE", "true")
    env.setdefault("WORKER_POLL_SECONDS", "0.5")
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    upgraded = subprocess.run([f"{bin_dir}/flask", "--app", "proxy", "db", "upgrade"], env=env, cwd=ROOT)
    if upgraded.returncode:  # it said why in one line (a configuration error, the database): not a traceback too
        raise SystemExit(upgraded.returncode)
    # The database outlives a restart, the simulator's memory does not: it serves only once it knows the
    # windows the proxy will judge by.
    sim.windows.update(open_windows(env["DATABASE_URL"]))
    server.__enter__()
    host = make_url(sandbox_db).host
    on_this_machine = host is None or host == "" or is_loopback(f"//{host}")
    click.echo(BANNER.format(sim=sim.url, leaves="nothing leaves this machine" if on_this_machine
                             else f"nothing but the database at {host} leaves this machine"))
    web = procfile_command("web").replace("0.0.0.0:", "127.0.0.1:")
    processes = [subprocess.Popen(["bash", "-c", f"exec {web}"], env=env, cwd=ROOT),
                 subprocess.Popen(["bash", "-c", f"exec {procfile_command('worker')}"], env=env, cwd=ROOT)]
    click.echo(f"proxy on {proxy_url}; account {SANDBOX_ACCOUNT_SID}, auth token {SANDBOX_AUTH_TOKEN}\n"
               f"API key {SANDBOX_API_KEY_SID}, secret {SANDBOX_API_KEY_SECRET} (sandbox values, not secrets)\n"
               f"database: {without_credentials(sandbox_db)}"
               + ("" if database_url else " (the sandbox's own; --database-url or SANDBOX_DATABASE_URL moves it)")
               + "\n"
               + "".join(f"webhooks forwarded to {without_credentials(env[name].strip())} ({name})\n"
                         for name in FORWARDS if env.get(name, "").strip())
               + (f"ignored (the real mode's): {', '.join(ignored)}\n" if ignored else "")
               + "\n".join(template_lines(samples)) + "\n"
               "flask --app proxy … in another shell (held list, windows show, …) sees this sandbox after:\n"
               + "\n".join(f"  {line}" for line in exports(env, bin_dir, ignored)) + "\n"
               f"try:  {try_command(proxy_url)}\n"
               f"then: flask --app proxy sandbox say whatsapp:+14155550111 'hi' --sim-url {sim.url}\n"
               f"      flask --app proxy sandbox demo   (a scripted tour)")
    try:
        _wait_for_signal(processes)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        server.__exit__(None, None, None)


def try_command(proxy_url: str) -> str:
    """The curl line `sandbox up` suggests: a cold send to the sandbox user through the proxy."""
    # --data-urlencode, not -d: a form body decodes a bare `+` as a space (`whatsapp: 14155550111`).
    return (f"curl -u {SANDBOX_ACCOUNT_SID}:{SANDBOX_AUTH_TOKEN} "
            f"{proxy_url}/2010-04-01/Accounts/{SANDBOX_ACCOUNT_SID}/Messages.json "
            f"--data-urlencode To=whatsapp:+14155550111 --data-urlencode From={BUSINESS} "
            f"--data-urlencode Body=hello -i")


@sandbox.command("demo")
def demo():
    """A scripted conversation through the proxy and the simulator; says what each step showed."""
    from .demo import run

    sys.exit(0 if run(click.echo) else 1)


def _wait_for_signal(processes: list | None = None) -> None:
    # The handler only appends: it runs between any two bytecodes of the main thread, and one that took
    # a lock (Event.set) deadlocked when a second signal arrived while the first was still setting it
    # (CI's process-group TERM left `sandbox up` hung with its children unreaped).
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    while not received:
        if processes and any(p.poll() is not None for p in processes):
            raise click.ClickException("the proxy stopped; see its output above")
        time.sleep(0.2)
