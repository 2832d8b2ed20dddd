"""`make demo`: the proxy and the simulator side by side, a scripted conversation, and what each step showed."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

import requests
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

from .. import create_app
from ..db import messages
from ..migrate import upgrade
from ..policy import Policy
from ..policy_file import Fallback
from ..rules import TABLE
from ..settings import Settings
from ..worker import Worker
from .server import ServerThread
from .simulator import BUSINESS, Simulator

USER = "whatsapp:+14155550111"
COLD_USER = "whatsapp:+14155550199"


class DecisionLog(logging.Handler):
    """Keeps the proxy's decision lines to show them in a readable form."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def since(self, start: int, quiet: float = 0.05, limit: float = 2.0) -> list[str]:
        # A send's line is written by the server's thread once its answer is (proxy/gateway.py), so it may land just
        # after the caller has the answer: wait until no line came for `quiet` seconds, or it shows under the next step.
        deadline, seen = time.monotonic() + limit, -1
        while seen != len(self.records) and time.monotonic() < deadline:
            seen = len(self.records)
            time.sleep(quiet)
        lines = []
        for r in self.records[start:]:
            fields = {k: getattr(r, k, None) for k in ("decision", "reason", "code", "content_type", "message_sid")}
            detail = " ".join(f"{k}={v}" for k, v in fields.items() if v not in (None, ""))
            lines.append(f"      log: {r.getMessage():<20} {detail}")
        return lines


def run(echo: Callable[[str], None]) -> bool:
    # Removed afterwards, database and all: every `make demo` left a /tmp/proxy-demo-* behind.
    with tempfile.TemporaryDirectory(prefix="proxy-demo-") as workdir:
        return _run(echo, Path(workdir))


def _run(echo: Callable[[str], None], workdir: Path) -> bool:
    results: list[tuple[str, bool]] = []

    def step(title: str, ok: bool, *details: str) -> None:
        results.append((title, ok))
        echo(f"\n{'✓' if ok else '✗'} Step {len(results)}: {title}")
        for line in details:
            echo(f"    {line}")

    database_url = f"sqlite:///{workdir / 'demo.sqlite3'}"
    upgrade(database_url)
    sim = Simulator(callback_delay=0.02)
    samples = sim.load_samples()
    with ServerThread(sim.app()) as sim_server:
        sim.url = sim_server.url
        fallback = samples[("twilio/text", True)]
        settings = Settings(
            account_sid=sim.account_sid, auth_token=sim.auth_token, database_url=database_url,
            twilio_api_base_url=sim.url, twilio_content_base_url=sim.url,
            # Reroute what may not go out, except carousels: those are blocked, to show both actions.
            policy=Policy(default_action="reroute", actions={"twilio/carousel": "block"}), fallback=Fallback(fallback, {"1": "{profile_name}", "2": "#1001"}),
            hold_on_reroute=True, log_level="INFO",
        )
        app = create_app(settings)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the servers' access lines would drown the story
        decisions = DecisionLog()
        logging.getLogger("proxy").addHandler(decisions)
        logging.getLogger("proxy").handlers[0].setLevel(logging.CRITICAL)  # keep the JSON lines off the screen
        rt = app.extensions["proxy"]
        try:
            with ServerThread(app) as proxy_server:
                sim.inbound_url = f"{proxy_server.url}/twilio/inbound"
                sim.status_callback_url = f"{proxy_server.url}/twilio/status"
                echo(f"simulator (WhatsApp via Twilio) on {sim.url}, proxy on {proxy_server.url}")
                _tour(echo, step, sim, samples, proxy_server.url, rt, decisions, fallback)
        finally:
            logging.getLogger("proxy").removeHandler(decisions)
            logging.getLogger("proxy").handlers[0].setLevel(logging.NOTSET)
            rt.engine.dispose()
    passed = sum(ok for _, ok in results)
    echo(f"\n{passed}/{len(results)} steps showed what they should.")
    return passed == len(results)


def _tour(echo, step, sim: Simulator, samples: dict, proxy_url: str, rt, decisions: DecisionLog, fallback: str):
    auth = (sim.account_sid, sim.auth_token)
    messages_url = f"{proxy_url}/2010-04-01/Accounts/{sim.account_sid}/Messages.json"
    client = Client(*auth)
    client.api.base_url = proxy_url  # the one line an app changes

    # 1. A cold send: outside the window, free-form text is rerouted to the approved template and held.
    mark = len(decisions.records)
    cold = requests.post(messages_url, auth=auth, timeout=30,
                         data={"To": USER, "From": BUSINESS, "Body": "Your order #1001 is ready for pickup"})
    sim.wait_for_callbacks()
    sent = [dict(r.form) for r in sim.creates]
    step("A cold send before the user ever wrote",
         cold.status_code == 201 and cold.headers.get("X-Proxy-Decision") == "rerouted"
         and sent[-1].get("ContentSid") == fallback and "Body" not in sent[-1]
         and cold.headers.get("X-Proxy-Held-Id") is not None,
         f"proxy: {cold.headers.get('X-Proxy-Decision')} to approved template {fallback}, "
         f"original held as #{cold.headers.get('X-Proxy-Held-Id')}",
         "WhatsApp received the template, never the free-form text (which would have failed with 63016)",
         *decisions.since(mark))

    # 2. The user replies: the simulator posts a signed webhook, the proxy opens the window.
    mark = len(decisions.records)
    reply = sim.say(USER, "Hi! Is my order ready?", profile_name="Ada")
    window = requests.get(f"{proxy_url}/v1/windows", params={"sender": BUSINESS, "user": USER}, auth=auth,
                          timeout=30).json()
    step("The user replies", reply.status_code == 200 and window["open"],
         f"webhook answered {reply.status_code}; window open until {window['expires_at']}",
         *decisions.since(mark))

    # 3. The worker releases the held message, judged again; Twilio's callbacks come back to the proxy.
    mark = len(decisions.records)
    before = len(sim.creates)
    Worker(rt).run_once()
    sim.wait_for_callbacks()
    released = [dict(r.form) for r in sim.creates[before:]]
    sid = next((m["sid"] for m in sim.messages.values() if m["body"].startswith("Your order #1001")), None)
    status = _status_of(rt, sid)
    step("The held message is released now that the window is open",
         [r.get("Body") for r in released] == ["Your order #1001 is ready for pickup"] and status == "read",
         f"sent {len(released)} held message(s); status callbacks sent → delivered → read reached the proxy "
         f"(last: {status})",
         *decisions.since(mark))

    # 4. Rich content, cell by cell: the proxy's preflight against the simulator's own WhatsApp rules.
    rows, agree, total = [], 0, 0
    for content_type in TABLE:
        cells = []
        for approved in (True, False):
            sid = samples[(content_type, approved)]
            for user in (USER, COLD_USER):
                form = {"To": user, "From": BUSINESS, "ContentSid": sid}
                verdict = requests.post(f"{proxy_url}/v1/preflight", data=form, auth=auth, timeout=30).json()
                whatsapp = sim.verdict(_MultiDictLike(form))
                proxy_allows = verdict["decision"] == "allowed"
                total += 1
                agree += proxy_allows == (whatsapp is None)
                cells.append("send" if proxy_allows else f"stop {verdict['code']}")
        rows.append(f"{content_type:<24} {cells[0]:<10} {cells[1]:<10} {cells[2]:<10} {cells[3]:<10}")
    step(f"Rich content judged cell by cell ({len(TABLE)} types × approved/unapproved × in/out of the window)",
         agree == total,
         f"{'content type':<24} {'approved':<21} {'unapproved':<21}",
         f"{'':<24} {'in':<10} {'out':<10} {'in':<10} {'out':<10}",
         *rows,
         f"the proxy and the simulated WhatsApp agree on {agree}/{total} cells")

    # 5. twilio-python sees a block as the exception it already handles.
    mark = len(decisions.records)
    try:
        client.messages.create(to=USER, from_=BUSINESS, content_sid=samples[("twilio/carousel", False)])
        error = None
    except TwilioRestException as exc:
        error = exc
    step("An unapproved carousel inside the window, through the real twilio-python client",
         error is not None and error.code == 63005,
         f"TwilioRestException code={getattr(error, 'code', None)}: {getattr(error, 'msg', '')[:110]}…",
         *decisions.since(mark))

    # 6. WhatsApp closes the window early: Twilio fails the send later with 63016; the proxy learns it.
    mark = len(decisions.records)
    sim.expire_window(USER)
    allowed = requests.post(messages_url, auth=auth, timeout=30,
                            data={"To": USER, "From": BUSINESS, "Body": "One more thing…"})
    sim.wait_for_callbacks()
    window = requests.get(f"{proxy_url}/v1/windows", params={"sender": BUSINESS, "user": USER}, auth=auth,
                          timeout=30).json()
    before = len(sim.creates)
    Worker(rt).run_once()  # the fallback send the late failure queued
    sim.wait_for_callbacks()
    fallback_sent = [dict(r.form).get("ContentSid") for r in sim.creates[before:]] == [fallback]
    step("WhatsApp closes the window early (a late 63016)",
         allowed.headers.get("X-Proxy-Decision") == "allowed" and not window["open"] and fallback_sent,
         "the proxy let it through (its window was open); the simulated WhatsApp failed it with 63016;",
         f"the proxy closed its window at once (open={window['open']}) and sent the approved fallback once",
         *decisions.since(mark))


def _status_of(rt, sid: str | None) -> str | None:
    if sid is None:
        return None
    from sqlalchemy import select

    with rt.engine.connect() as conn:
        return conn.execute(select(messages.c.status).where(messages.c.sid == sid)).scalar()


class _MultiDictLike(dict):
    def getlist(self, key):
        return [self[key]] if key in self else []


if __name__ == "__main__":
    raise SystemExit(0 if run(print) else 1)
