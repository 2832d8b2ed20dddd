"""gunicorn (the Procfile command) + the real twilio-python client + the fake Twilio on 127.0.0.1."""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import requests
from sqlalchemy import select
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client
from twilio.rest.api.v2010.account.message import MessageInstance

from proxy.db import messages, windows
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, BUSINESS, USER, inbound_params, sign
from tests.e2e.conftest import json_lines

pytestmark = pytest.mark.e2e


def twilio_client(proxy_server, password=AUTH_TOKEN) -> Client:
    client = Client(ACCOUNT_SID, password)
    client.api.base_url = proxy_server.url  # the one line a user changes
    return client


def post_inbound(proxy_server, params) -> requests.Response:
    url = proxy_server.url + "/twilio/inbound"
    return requests.post(url, data=params, headers={"X-Twilio-Signature": sign(url, params)}, timeout=10)


def test_real_client_is_blocked_then_allowed_once_the_user_writes(proxy_server, fake_twilio):
    client = twilio_client(proxy_server)
    with pytest.raises(TwilioRestException) as blocked:
        client.messages.create(to=USER, from_=BUSINESS, body="Your code is 123456")
    assert blocked.value.code == 63016 and blocked.value.status == 400
    assert "outside the allowed window" in blocked.value.msg
    assert fake_twilio.creates == []

    response = post_inbound(proxy_server, inbound_params("SM" + "1" * 32))
    assert response.status_code == 200 and response.text.endswith("<Response />")

    message = client.messages.create(to=USER, from_=BUSINESS, body="Thanks for writing!",
                                     media_url=["https://example.com/a.png", "https://example.com/b.png"])
    assert isinstance(message, MessageInstance)
    assert message.sid.startswith("SM") and message.status == "queued" and message.to == USER
    [received] = fake_twilio.creates
    assert received.form.count(("MediaUrl", "https://example.com/a.png")) == 1
    assert [v for k, v in received.form if k == "MediaUrl"] == ["https://example.com/a.png", "https://example.com/b.png"]

    fetched = client.messages(message.sid).fetch()  # a passthrough call
    assert fetched.sid == message.sid and fetched.body == "Thanks for writing!"

    lines = [json.loads(line) for line in json_lines(proxy_server.log_lines())]
    sends = [line for line in lines if line["event"] == "send"]
    assert [s["decision"] for s in sends] == ["blocked", "allowed"]
    assert {"reason", "sender", "user", "message_sid", "window_expires_at", "duration_ms", "request_id"} <= set(sends[1])
    assert sends[1]["message_sid"] == message.sid
    text = "\n".join(proxy_server.log_lines())
    assert AUTH_TOKEN not in text
    assert "Your code is 123456" not in text and "Thanks for writing!" not in text
    assert "+14155550111" not in text  # numbers are masked by default


def test_wrong_credentials_raise_20003(proxy_server, fake_twilio):
    with pytest.raises(TwilioRestException) as exc:
        twilio_client(proxy_server, password="wrong").messages.create(to=USER, from_=BUSINESS, body="x")
    assert exc.value.code == 20003 and exc.value.status == 401
    assert fake_twilio.requests == []


def test_sms_passes_through_untouched(proxy_server, fake_twilio):
    message = twilio_client(proxy_server).messages.create(to="+14155550111", from_="+14155550100", body="x")
    assert message.sid in fake_twilio.messages


def test_concurrent_inbound_webhooks_leave_one_row_with_the_latest_expiry(proxy_server, db_engine):
    sids = [f"SM{i:032x}" for i in range(60)]
    with ThreadPoolExecutor(max_workers=30) as pool:
        statuses = list(pool.map(lambda sid: post_inbound(proxy_server, inbound_params(sid)).status_code, sids))
    assert statuses == [200] * len(sids)
    with db_engine.connect() as conn:
        rows = conn.execute(select(windows)).mappings().all()
        received = conn.execute(select(messages.c.sid, messages.c.created_at)).all()
    assert len(rows) == 1 and len(received) == len(sids)
    latest_sid, latest_at = max(received, key=lambda r: r.created_at)
    assert rows[0]["expires_at"] == latest_at + timedelta(seconds=86400)
    assert rows[0]["last_inbound_at"] == latest_at


def test_real_client_sees_63005_for_unapproved_rich_content_in_session(proxy_server, fake_twilio):
    client = twilio_client(proxy_server)
    carousel = fake_twilio.add_content({"twilio/carousel": {"body": "c", "cards": []}}, "pending")
    post_inbound(proxy_server, inbound_params("SM" + "2" * 32))
    with pytest.raises(TwilioRestException) as exc:
        client.messages.create(to=USER, from_=BUSINESS, content_sid=carousel)
    assert exc.value.code == 63005 and exc.value.status == 400
    assert "twilio/carousel" in exc.value.msg
    approved = fake_twilio.add_content({"twilio/carousel": {"body": "c", "cards": []}}, "approved")
    message = client.messages.create(to=USER, from_=BUSINESS, content_sid=approved,
                                     content_variables=json.dumps({"1": "Ada"}))
    assert isinstance(message, MessageInstance) and message.sid in fake_twilio.messages
    assert dict(fake_twilio.creates[0].form)["ContentVariables"] == '{"1": "Ada"}'


@pytest.mark.parametrize("variables, code", [({"1": "Ada", "2": "Lovelace"}, 400), ({"1": "Ada"}, 21656)])
def test_a_dict_given_as_content_variables_is_refused_with_the_fix_in_the_message(proxy_server, fake_twilio,
                                                                                   variables, code):
    """twilio-python 9 form-encodes a dict's keys (one field per key), not its JSON: the error must say how."""
    approved = fake_twilio.add_content({"twilio/text": {"body": "Hi {{1}}"}}, "approved")
    with pytest.raises(TwilioRestException) as exc:
        twilio_client(proxy_server).messages.create(to=USER, from_=BUSINESS, content_sid=approved,
                                                    content_variables=variables)
    assert exc.value.code == code and exc.value.status == 400
    assert "content_variables=json.dumps(" in exc.value.msg
    assert fake_twilio.creates == []


def test_api_key_client_works_through_the_proxy(proxy_server, fake_twilio):
    from tests.e2e.conftest import API_KEY, API_SECRET
    fake_twilio.api_keys = {API_KEY: API_SECRET}
    client = Client(API_KEY, API_SECRET, ACCOUNT_SID)  # how twilio-python uses API keys
    client.api.base_url = proxy_server.url
    post_inbound(proxy_server, inbound_params("SM" + "3" * 32))
    message = client.messages.create(to=USER, from_=BUSINESS, body="hello")
    assert message.sid in fake_twilio.messages
    assert fake_twilio.creates[0].headers["Authorization"].startswith("Basic ")
    import base64
    creds = base64.b64decode(fake_twilio.creates[0].headers["Authorization"][6:]).decode()
    assert creds == f"{API_KEY}:{API_SECRET}"  # the caller's own credentials go upstream
    bad = Client(API_KEY, "wrong-secret", ACCOUNT_SID)
    bad.api.base_url = proxy_server.url
    with pytest.raises(TwilioRestException) as exc:
        bad.messages.create(to=USER, from_=BUSINESS, body="x")
    assert exc.value.code == 20003
    fake_twilio.api_keys = {}


def test_metrics_add_up_across_gunicorn_workers(proxy_server, fake_twilio):
    from tests.e2e.conftest import METRICS_TOKEN

    def blocked_count() -> float:
        text = requests.get(proxy_server.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
                            timeout=10).text
        lines = [line for line in text.splitlines() if line.startswith("proxy_send_decisions_total{")
                 and 'reason="no_window"' in line]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    def per_worker() -> dict[str, float]:
        """The blocked count in each worker's own sample file: which processes counted what."""
        from prometheus_client.mmap_dict import MmapedDict

        counts = {}
        for path in proxy_server.metrics_dir.glob("counter_*.db"):
            counts[path.name] = sum(value for key, value, *_ in MmapedDict.read_all_values_from_file(str(path))
                                    if "proxy_send_decisions_total" in key and "no_window" in key)
        return counts

    def send_blocked() -> None:  # a fresh connection each: the kernel hands them to either worker
        response = requests.post(f"{proxy_server.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json",
                                  data={"To": USER, "From": BUSINESS, "Body": "x"}, auth=(ACCOUNT_SID, AUTH_TOKEN),
                                  headers={"Connection": "close"}, timeout=10)
        assert response.status_code == 400 and response.json()["code"] == 63016

    before, workers_before, sent = blocked_count(), per_worker(), 0
    client = twilio_client(proxy_server)
    for _ in range(6):
        with pytest.raises(TwilioRestException):
            client.messages.create(to=USER, from_=BUSINESS, body="x")
        sent += 1
    while sent < 400:  # until two workers have each counted some of them (the sum is then a real sum)
        counted = per_worker()
        if sum(counted.get(name, 0.0) > workers_before.get(name, 0.0) for name in counted) >= 2:
            break
        send_blocked()
        sent += 1
    assert sum(counted.get(name, 0.0) > workers_before.get(name, 0.0) for name in counted) >= 2
    assert blocked_count() - before == float(sent)
    assert requests.get(proxy_server.url + "/metrics", timeout=10).status_code == 401
    ready = requests.get(proxy_server.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ok"


def test_a_webhook_url_with_escapes_is_checked_as_twilio_requested_it(proxy_server, db_engine):
    """gunicorn passes the request line's target on (RAW_URI): the URL Twilio signed, %-escapes and all.
    (http.client sends the target as given; requests would normalise %7E and %69 first.)"""
    import http.client
    from urllib.parse import urlencode

    target = "/twilio/%69nbound?k=%7E&v=%C3%A9&p=%2F"
    params = inbound_params("SM" + "4" * 32)
    conn = http.client.HTTPConnection("127.0.0.1", proxy_server.port, timeout=10)
    try:
        conn.request("POST", target, body=urlencode(params),
                     headers={"Content-Type": "application/x-www-form-urlencoded",
                              "X-Twilio-Signature": sign(proxy_server.url + target, params)})
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    with db_engine.connect() as conn:
        assert conn.execute(select(windows.c.last_inbound_sid)).scalars().all() == ["SM" + "4" * 32]


def test_each_gunicorn_worker_names_its_database_at_start(proxy_server, database_url):
    """The Procfile's web line: one INFO line per worker (WEB_CONCURRENCY=2 here) as it loads the app."""
    from proxy.settings import database_shown

    import time

    deadline, said = time.monotonic() + 20, []
    while len(said) < 2 and time.monotonic() < deadline:  # the port is open before the workers have loaded the app
        time.sleep(0.1)
        lines = [json.loads(line) for line in json_lines(proxy_server.log_path.read_text().splitlines())]
        said = [line for line in lines if line["event"] == "database_in_use"]
    assert len(said) >= 2 and {line["process_type"] for line in said} == {"web"}, said
    assert {line["database"] for line in said} == {database_shown(database_url)}
    assert {line["database_default"] for line in said} == {False}


def test_a_send_whose_window_read_waits_behind_a_lock_is_refused_at_ten_seconds(proxy_server, fake_twilio,
                                                                               db_engine):
    """PostgreSQL: the read waited out the whole lock (a migration's, a LOCK TABLE) and was refused as slow only
    then: 30 s for a 30 s lock, past the caller's timeout. gevent's workers give it up at SLOW_DATABASE_SECONDS,
    while the lock is still held."""
    import time

    from sqlalchemy import text

    from tests.http.test_gateway import windows_locked

    if db_engine.dialect.name != "postgresql":
        pytest.skip("SQLite's readers never wait for a writer (WAL)")
    if os.environ.get("WEB_WORKER_CLASS", "gevent") != "gevent":
        pytest.skip("a thread's blocked read cannot be given up on from outside: refused once it returns")
    assert post_inbound(proxy_server, inbound_params("SM" + "5" * 32)).status_code == 200
    url = f"{proxy_server.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    with windows_locked(db_engine) as (release, holder):
        response = requests.post(url, data={"To": USER, "From": BUSINESS, "Body": "x"}, auth=(ACCOUNT_SID, AUTH_TOKEN),
                                 timeout=40)
        still_locked = not release.is_set() and holder.is_alive()
        # The read's statement was cancelled on the server, not left waiting on the lock (one backend per send).
        waiting = None
        for _ in range(50):
            with db_engine.connect() as conn:
                waiting = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                            "AND query LIKE '%FROM windows%'")).scalar()
            if not waiting:
                break
            time.sleep(0.1)
    assert response.status_code == 503 and "did not answer within 10 s" in response.json()["message"]
    assert still_locked and fake_twilio.creates == []
    assert waiting == 0
    slow = [json.loads(line) for line in json_lines(proxy_server.log_lines()) if '"database_slow"' in line]
    assert [line["level"] for line in slow] == ["ERROR"]
    # The interrupted connection was dropped, not handed to the next request mid-query.
    ok = requests.post(url, data={"To": USER, "From": BUSINESS, "Body": "y"}, auth=(ACCOUNT_SID, AUTH_TOKEN), timeout=20)
    assert ok.status_code == 201, ok.text


def test_real_client_replies_to_a_user_known_by_a_bsuid(proxy_server, fake_twilio, db_engine):
    """A user with a WhatsApp username writes from a business-scoped user id, not a number: the window is theirs,
    and twilio-python's reply to the same address goes out."""
    bsuid = "whatsapp:US.13491208655302741918"
    client = twilio_client(proxy_server)
    with pytest.raises(TwilioRestException) as blocked:
        client.messages.create(to=bsuid, from_=BUSINESS, body="Before they wrote")
    assert blocked.value.code == 63016
    assert post_inbound(proxy_server, inbound_params("SM" + "7" * 32, user=bsuid)).status_code == 200
    message = client.messages.create(to=bsuid, from_=BUSINESS, body="Thanks for writing!")
    assert message.to == bsuid and message.status == "queued"
    [received] = fake_twilio.creates
    assert dict(received.form)["To"] == bsuid
    with db_engine.connect() as conn:
        assert conn.execute(select(windows.c.user)).scalars().all() == [bsuid]
    assert "13491208655302741918" not in "\n".join(proxy_server.log_lines())  # masked as numbers are
