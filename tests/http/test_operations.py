"""Operations: decision logs, window API, CLI, health and readiness, metrics, API keys."""

import json
import logging
import threading
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import func, insert, select

from proxy import create_app, logs
from proxy.attempts import flush_all
from proxy.db import held_messages, late_failures, messages, outbox, send_attempts, sticky_senders, utcnow, windows
from proxy.migrate import head_revision, upgrade
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, BUSINESS, USER, basic_auth, inbound_params, signed_post
from tests.http.test_gateway import SHAPE, open_window, send

API_KEY, API_SECRET = "SK" + "5" * 32, "api-secret-value-xyz"


def test_one_json_line_per_decision_without_secrets_or_bodies(client, fake_twilio, log_lines):
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "1" * 32, Body="my secret body"),
                )
    send(client, {"To": USER, "From": BUSINESS, "Body": "outgoing secret body"})
    send(client, {"To": "whatsapp:+14155550199", "From": BUSINESS, "Body": "blocked body"})
    lines = log_lines()
    assert [line["event"] for line in lines] == ["inbound", "send", "send"]
    for line in lines:
        assert {"time", "level", "logger", "event", "decision", "sender", "user", "request_id", "duration_ms"} <= set(line)
        assert line["sender"] == "whatsapp:+1415*****00"
        assert "+1415555" not in json.dumps(line)
    assert [line["decision"] for line in lines] == ["window_opened", "allowed", "blocked"]
    assert lines[2]["code"] == 63016 and lines[2]["reason"] == "no_window"
    text = json.dumps(lines)
    assert AUTH_TOKEN not in text and "secret body" not in text and "blocked body" not in text


def test_request_id_comes_from_twilios_idempotency_token(client, log_lines):
    params = inbound_params("SM" + "2" * 32)
    from tests.conftest import sign
    response = client.post("/twilio/inbound", data=params, headers={
        "X-Twilio-Signature": sign("http://localhost/twilio/inbound", params),
        "I-Twilio-Idempotency-Token": "idem-123"})
    assert response.headers["X-Request-Id"] == "idem-123"
    assert log_lines()[0]["request_id"] == "idem-123"


@pytest.mark.parametrize("token", ["call me on +1 415 555 0111", "tok-SECRET with spaces", "a;b", "x" * 65, "é"])
def test_an_idempotency_token_that_is_no_token_is_not_the_request_id(client, log_lines, token):
    """Anyone may send the header, signed or not: free text from it must not become a log field."""
    response = client.post("/twilio/inbound", data={"x": "1"}, headers={"I-Twilio-Idempotency-Token": token})
    assert response.status_code == 403
    request_id = response.headers["X-Request-Id"]
    assert request_id != token and len(request_id) == 32 and int(request_id, 16) >= 0
    assert [line["request_id"] for line in log_lines()] == [request_id]


def test_numbers_shown_when_redaction_is_off(settings, db_engine, log_lines):
    client = create_app(replace(settings, log_redact_numbers=False)).test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "3" * 32))
    assert [line["user"] for line in log_lines() if line["event"] == "inbound"] == [USER]


def test_text_format_for_humans(settings, db_engine, capsys):
    create_app(replace(settings, log_format="text"))
    record = logging.makeLogRecord({"msg": "send", "levelname": "INFO", "decision": "blocked", "code": 63016})
    line = logs.output_formatter().format(record)
    assert "send" in line and "decision=blocked" in line and "code=63016" in line and not line.startswith("{")
    create_app(settings)  # back to JSON for the other tests


def test_window_api(client):
    open_window(client, MessagingServiceSid="MG" + "a" * 32)
    body = client.get(f"/v1/windows?sender={BUSINESS}&user=whatsapp:14155550111", headers=basic_auth()).get_json()
    assert body["open"] is True and body["sender"] == BUSINESS and body["user"] == USER
    assert 86000 < body["seconds_left"] <= 86340 and body["expires_at"].endswith("Z")
    assert body["last_inbound_at"] and body["profile_name"] == "Ada"
    by_service = client.get(f"/v1/windows?sender=MG{'a' * 32}&user={USER}", headers=basic_auth()).get_json()
    assert by_service["open"] is True and by_service["expires_at"] == body["expires_at"]
    # Only a real Messaging Service SID, and only as the sender: any "MG…" passed unchecked, control bytes too.
    for query in (f"sender=MG%0a%1b&user={USER}", f"sender=MG{'a' * 5000}&user={USER}",
                  f"sender={BUSINESS}&user=MG{'a' * 32}"):
        for path in ("/v1/windows", "/v1/held"):
            refused = client.get(f"{path}?{query}", headers=basic_auth())
            assert refused.status_code == 400 and refused.get_json()["code"] == 21211, (path, query)
    unknown = client.get(f"/v1/windows?sender={BUSINESS}&user=whatsapp:+14155550999", headers=basic_auth())
    assert unknown.status_code == 200 and unknown.get_json()["open"] is False
    assert client.get(f"/v1/windows?sender={BUSINESS}&user={USER}").status_code == 401
    bad = client.get(f"/v1/windows?sender={BUSINESS}", headers=basic_auth())
    assert bad.status_code == 400 and set(bad.get_json()) == {"code", "message", "more_info", "status"}
    # The user's number without its channel is another conversation: said so, not answered "closed".
    mixed = client.get(f"/v1/windows?sender={BUSINESS}&user=%2B14155550111", headers=basic_auth())
    assert mixed.status_code == 400 and "different channels" in mixed.get_json()["message"]


def add_window(engine, user, expires_in, sender=BUSINESS):
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(insert(windows).values(sender=sender, user=user, expires_at=now + expires_in,
                                            last_inbound_at=now + expires_in - timedelta(days=1), updated_at=now))


def test_expiring_windows_paginated(client, db_engine):
    for i in range(7):  # usable end (expiry - 60 s margin) from ~5 to ~35 min away
        add_window(db_engine, f"whatsapp:+1415555020{i}", timedelta(minutes=5 + 5 * i, seconds=60))
    add_window(db_engine, "whatsapp:+14155550300", timedelta(hours=5))  # not soon
    add_window(db_engine, "whatsapp:+14155550301", timedelta(minutes=-5))  # closed already
    add_window(db_engine, "whatsapp:+14155550302", timedelta(seconds=30))  # inside the safety margin: closed
    add_window(db_engine, "whatsapp:+14155550200", timedelta(minutes=10), sender="MG" + "b" * 32)  # duplicate view
    seen, url = [], "/v1/windows/expiring?within=3600&PageSize=3"
    while url:
        body = client.get(url, headers=basic_auth()).get_json()
        assert len(body["windows"]) <= 3
        seen += body["windows"]
        url = body["meta"]["next_page_url"]
    assert [w["user"] for w in seen] == [f"whatsapp:+1415555020{i}" for i in range(7)]
    assert all(w["sender"] == BUSINESS and w["open"] for w in seen)
    assert [w["seconds_left"] for w in seen] == sorted(w["seconds_left"] for w in seen)
    soon = client.get("/v1/windows/expiring?within=800", headers=basic_auth()).get_json()["windows"]
    assert [w["user"] for w in soon] == ["whatsapp:+14155550200", "whatsapp:+14155550201"]
    assert client.get("/v1/windows/expiring?within=abc", headers=basic_auth()).status_code == 400
    assert client.get("/v1/windows/expiring?PageToken=zzz", headers=basic_auth()).status_code == 400


def test_cli_windows(app, client, db_engine):
    open_window(client)
    add_window(db_engine, "whatsapp:+14155550201", timedelta(minutes=20))
    runner = app.test_cli_runner()
    shown = runner.invoke(args=["windows", "show", BUSINESS, USER])
    assert shown.exit_code == 0 and json.loads(shown.output)["open"] is True
    expiring = runner.invoke(args=["windows", "expiring", "--within", "1h"])
    assert expiring.exit_code == 0
    assert [json.loads(line)["user"] for line in expiring.stdout.splitlines()] == ["whatsapp:+14155550201"]
    assert runner.invoke(args=["windows", "show", BUSINESS, "whatsapp:no body"]).exit_code != 0


def test_purge_keeps_open_windows_and_recent_records(app, client, fake_twilio, db_engine):
    open_window(client)  # open window, recent inbound message
    send(client, {"To": USER, "From": BUSINESS, "Body": "x"})  # recent attempt
    assert flush_all()  # the recent attempt is written in the background
    old = utcnow() - timedelta(days=40)
    with db_engine.begin() as conn:
        conn.execute(insert(messages).values(sid="SMold", direction="inbound", status="received", status_rank=3,
                                             created_at=old, updated_at=old))
        conn.execute(insert(send_attempts).values(created_at=old, request_id="r", account_sid=ACCOUNT_SID,
                                                  decision="blocked", reason="no_window", outcome="blocked",
                                                  params="[]", duration_ms=1))
        conn.execute(insert(windows).values(sender=BUSINESS, user="whatsapp:+14155550999", expires_at=old,
                                            last_inbound_at=old - timedelta(days=1), updated_at=old))
        for status in ("pending", "delivered"):
            conn.execute(insert(outbox).values(kind="inbound", ordering_key="k", target="http://app", headers="{}",
                                               body="[]", status=status, attempts=1, next_attempt_at=old,
                                               created_at=old, updated_at=old))
        for sid, at in (("SMold", old), ("SMnew", utcnow())):
            conn.execute(insert(late_failures).values(message_sid=sid, action="closed", created_at=at))
        for user, at in (("whatsapp:+14155550998", old), (USER, utcnow())):  # a service's number, learnt then
            conn.execute(insert(sticky_senders).values(service_sid="MG" + "1" * 32, user=user, sender=BUSINESS,
                                                       sent_at=at, updated_at=at))
    result = app.test_cli_runner().invoke(args=["purge", "--older-than", "30d"])
    assert result.exit_code == 0, result.output
    assert "1 messages" in result.output and "1 send_attempts" in result.output and "1 windows" in result.output
    assert "1 late_failures" in result.output and "1 sticky_senders" in result.output
    with db_engine.connect() as conn:
        assert conn.execute(select(windows.c.user)).scalars().all() == [USER]
        assert conn.execute(select(func.count()).select_from(messages)).scalar_one() == 1
        assert conn.execute(select(func.count()).select_from(send_attempts)).scalar_one() == 1
        assert conn.execute(select(outbox.c.status)).scalars().all() == ["pending"]  # never a pending item
        assert conn.execute(select(late_failures.c.message_sid)).scalars().all() == ["SMnew"]
        assert conn.execute(select(sticky_senders.c.user)).scalars().all() == [USER]
    assert app.test_cli_runner().invoke(args=["purge", "--older-than", "soon"]).exit_code != 0


HOLD_STATUSES = ("held", "sending", "released", "expired", "failed")


def add_holds(engine, created_at):
    """One hold in each status, oldest first."""
    with engine.begin() as conn:
        for status in HOLD_STATUSES:
            conn.execute(insert(held_messages).values(sender=BUSINESS, user=USER, account_sid=ACCOUNT_SID,
                                                      params="[]", status=status, request_id=status,
                                                      created_at=created_at, expires_at=created_at))


def test_purge_deletes_finished_holds_only(app, db_engine):
    """`sending` is live: being sent now, or stuck after a worker crash (the operator must still see it)."""
    from proxy import holds, store

    assert store._FINISHED_HOLDS == holds.FINISHED  # spelt out in store.py, which holds.py imports
    add_holds(db_engine, utcnow() - timedelta(days=40))
    result = app.test_cli_runner().invoke(args=["purge", "--older-than", "30d"])
    assert result.exit_code == 0 and "3 held_messages" in result.output, result.output
    with db_engine.connect() as conn:
        assert conn.execute(select(held_messages.c.status).order_by(held_messages.c.id)).scalars().all() == \
            ["held", "sending"]


def test_purge_ages_a_finished_hold_by_when_it_finished(app, db_engine):
    """Held a week ago and released a minute ago: a late 63016 on the release is still matched to it."""
    long_ago = utcnow() - timedelta(days=8)
    with db_engine.begin() as conn:
        for finished in (utcnow() - timedelta(minutes=1), utcnow() - timedelta(days=2)):
            conn.execute(insert(held_messages).values(sender=BUSINESS, user=USER, account_sid=ACCOUNT_SID, params="[]",
                                                      status="released", request_id="r", created_at=long_ago,
                                                      expires_at=long_ago + timedelta(days=1), released_at=finished))
    result = app.test_cli_runner().invoke(args=["purge", "--older-than", "1d", "--yes"])
    assert result.exit_code == 0 and "1 held_messages" in result.output, result.output
    with db_engine.connect() as conn:
        [left] = conn.execute(select(held_messages.c.released_at)).scalars().all()
    assert utcnow() - left < timedelta(hours=1)


def test_a_purge_never_lets_an_outbox_or_hold_id_be_handed_out_again(app, db_engine):
    """Apps de-duplicate forwards on X-Proxy-Outbox-Id, and callers were shown X-Proxy-Held-Id: on SQLite a
    purge that deleted the newest rows let the next items take their ids again, so a new webhook looked like
    a copy of an old one and was dropped. PostgreSQL's sequences never give an id twice."""
    from proxy import holds
    from proxy import outbox as queue

    def forwarded(at):
        with db_engine.begin() as conn:
            headers = {}
            item_id = queue.enqueue(conn, kind="inbound", ordering_key="k", target="http://app", headers=headers,
                                    body=[], now=at, lease_until=at)
            assert queue.delivered(conn, item_id, at, at)
        assert headers[queue.OUTBOX_ID_HEADER] == str(item_id)
        return item_id

    def released(at):
        with db_engine.begin() as conn:
            held_id, _ = holds.hold(conn, sender=BUSINESS, user=USER, account_sid=ACCOUNT_SID, params=[],
                                    request_id="r", now=at, ttl_seconds=60, judged_inbound_at=None)
            holds.mark(conn, held_id, holds.RELEASED, at, message_sid="SM" + "7" * 32)
        return held_id

    earlier = utcnow() - timedelta(minutes=1)
    outbox_ids = [forwarded(earlier) for _ in range(3)]
    held_ids = [released(earlier) for _ in range(3)]
    result = app.test_cli_runner().invoke(args=["purge", "--older-than", "0d", "--yes"])  # as the user did: every row goes
    assert result.exit_code == 0 and "3 outbox" in result.output and "3 held_messages" in result.output, result.output
    assert forwarded(utcnow()) > max(outbox_ids)
    assert released(utcnow()) > max(held_ids)


def test_cli_held_list_takes_the_statuses_the_api_takes(app, client, db_engine):
    add_holds(db_engine, utcnow())
    runner = app.test_cli_runner()

    def listed(*args):
        result = runner.invoke(args=["held", "list", *args])
        assert result.exit_code == 0, result.output
        return [json.loads(line)["status"] for line in result.stdout.splitlines()]

    assert listed() == ["held"]
    for status in HOLD_STATUSES:
        assert listed("--status", status) == [status]
        api = client.get(f"/v1/held?status={status}", headers=basic_auth()).get_json()["held"]
        assert [h["status"] for h in api] == [status]
    assert listed("--status", "all") == list(HOLD_STATUSES)
    assert runner.invoke(args=["held", "list", "--status", "gone"]).exit_code != 0


def test_a_held_filter_by_an_address_without_windows_is_refused_not_answered_empty(app, client, db_engine):
    """`--user +14155550111` is an SMS address: no hold is ever one's, and the WhatsApp user's were not listed."""
    add_holds(db_engine, utcnow())
    bare = USER.removeprefix("whatsapp:")
    found = client.get(f"/v1/held?status=all&user={USER}", headers=basic_auth()).get_json()["held"]
    assert len(found) == len(HOLD_STATUSES)
    for query in (f"user={bare}", f"sender={BUSINESS.removeprefix('whatsapp:')}"):
        refused = client.get(f"/v1/held?status=all&{query}".replace("+", "%2B"), headers=basic_auth())
        assert refused.status_code == 400 and "nothing is held for" in refused.get_json()["message"]
    result = app.test_cli_runner().invoke(args=["held", "list", "--status", "all", "--user", bare])
    assert result.exit_code == 2 and "whatsapp:+14155550111" in result.output and result.stdout == ""
    # An SMS pair's window is still shown: an inbound SMS keeps one, and /v1/windows/expiring lists it.
    both_sms = client.get(f"/v1/windows?sender=%2B14155550100&user={bare.replace('+', '%2B')}", headers=basic_auth())
    assert both_sms.status_code == 200 and both_sms.get_json()["open"] is False


def test_held_messages_come_in_pages_and_the_cli_says_when_it_cut_the_list(app, client, db_engine):
    """GET /v1/held returned the first 100 (or PageSize) and nothing said there were more; `held list` likewise."""
    for _ in range(3):
        add_holds(db_engine, utcnow())  # 15 holds, 3 in each status
    seen, url = [], "/v1/held?status=all&PageSize=4"
    while url:
        page = client.get(url, headers=basic_auth()).get_json()
        assert len(page["held"]) <= 4 and page["meta"]["page_size"] == 4
        seen += [h["id"] for h in page["held"]]
        url = page["meta"]["next_page_url"]
    everything = client.get("/v1/held?status=all&PageSize=1000", headers=basic_auth()).get_json()
    assert seen == [h["id"] for h in everything["held"]] and len(seen) == 15
    assert everything["meta"]["next_page_token"] is None
    # The filters ride along: the next page is of the same status.
    released = client.get("/v1/held?status=released&PageSize=2", headers=basic_auth()).get_json()
    rest = client.get(released["meta"]["next_page_url"], headers=basic_auth()).get_json()
    assert [h["status"] for h in released["held"] + rest["held"]] == ["released"] * 3
    bad = client.get("/v1/held?PageToken=-1", headers=basic_auth())
    assert bad.status_code == 400 and bad.get_json()["code"] == 400
    # Its largest value is a page token like any other (it was refused, "must be … from 0 to" itself).
    last = client.get(f"/v1/held?PageToken={2**63 - 1}", headers=basic_auth())
    assert last.status_code == 200 and last.get_json()["held"] == []
    assert client.get(f"/v1/held?PageToken={2**63}", headers=basic_auth()).status_code == 400

    runner = app.test_cli_runner()
    cut = runner.invoke(args=["held", "list", "--status", "all", "--limit", "10"])
    assert cut.exit_code == 0 and len(cut.stdout.splitlines()) == 10
    assert "more: raise --limit" in cut.stderr
    whole = runner.invoke(args=["held", "list", "--status", "all", "--limit", "15", "--user", USER])
    assert len(whole.stdout.splitlines()) == 15 and "more" not in whole.stderr
    assert json.loads(whole.stdout.splitlines()[0])["created_at"].endswith("Z")
    assert runner.invoke(args=["held", "list", "--user", "whatsapp:+1415555011199999"]).stdout == ""
    assert runner.invoke(args=["held", "list", "--sender", "whatsapp:not a number"]).exit_code == 2


def test_health_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["status"] == "ok"


def test_not_ready_when_the_database_is_unreachable(settings):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(replace(settings, database_url=f"postgresql+psycopg://nobody@127.0.0.1:{port}/none"))
    response = app.test_client().get("/readyz")
    assert response.status_code == 503 and response.get_json()["reason"] == "database_unreachable"
    assert app.test_client().get("/healthz").status_code == 200


def test_not_ready_when_a_migration_is_missing(settings, tmp_path):
    url = f"sqlite:///{tmp_path / 'behind.sqlite3'}"
    upgrade(url, "0001")
    app = create_app(replace(settings, database_url=url))
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["reason"] == "migrations_not_at_head" and body["database_revision"] == "0001"
    upgrade(url)
    assert app.test_client().get("/readyz").status_code == 200


def newer_releases_database(tmp_path) -> str:
    """A SQLite database at revision 0099, which this code does not know: a newer release migrated it."""
    from sqlalchemy import create_engine, text

    url = f"sqlite:///{tmp_path / 'newer.sqlite3'}"
    upgrade(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    return url


def test_a_sqlite_path_whose_folder_cannot_be_made_is_the_database_unavailable_not_a_crash(settings, tmp_path):
    """A file where the folder should be: every process died at start with a traceback (gunicorn's exit 3)."""
    (tmp_path / "a-file").write_text("")
    app = create_app(replace(settings, database_url=f"sqlite:///{tmp_path / 'a-file' / 'proxy.sqlite3'}"))
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["reason"] == "database_unreachable"
    refused = send(client, {"To": USER, "From": BUSINESS, "Body": "x"})
    assert refused.status_code == 503 and set(refused.get_json()) == {"code", "message", "more_info", "status"}
    result = app.test_cli_runner().invoke(args=["db", "current"])
    assert result.exit_code == 1 and "Traceback" not in result.output and "database is unavailable" in result.output


def test_ready_when_a_newer_release_has_migrated_the_database(settings, tmp_path):
    """A release phase runs its migrations before its instances are up: every old instance answered 503 at once
    and left the load balancer, although each serves on (as the gateway does past its head)."""
    url = newer_releases_database(tmp_path)
    response = create_app(replace(settings, database_url=url)).test_client().get("/readyz")
    body = response.get_json()
    assert response.status_code == 200 and body["status"] == "ok" and body["database_revision"] == "0099"
    assert "ahead of this code" in body["detail"]


UPGRADE = "flask --app proxy db upgrade"


def _migrations_warnings(lines):
    return [line for line in lines if line["event"] == "migrations_not_at_head"]


def test_start_up_names_migrations_that_were_not_applied(settings, tmp_path, log_lines):
    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    create_app(replace(settings, database_url=url)).extensions["proxy"].engine.dispose()
    (fresh,) = _migrations_warnings(log_lines())
    assert fresh["level"] == "WARNING" and fresh["database_revision"] is None and UPGRADE in fresh["detail"]
    upgrade(url, "0001")
    create_app(replace(settings, database_url=url)).extensions["proxy"].engine.dispose()
    assert _migrations_warnings(log_lines())[1]["database_revision"] == "0001"
    upgrade(url)
    create_app(replace(settings, database_url=url)).extensions["proxy"].engine.dispose()
    assert len(_migrations_warnings(log_lines())) == 2  # at head: nothing to say


def test_start_up_goes_on_when_the_database_is_down(settings, log_lines):
    """The proxy must come up and fail closed (503) until the database is back, not refuse to start."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(replace(settings, database_url=f"postgresql+psycopg://nobody@127.0.0.1:{port}/none"))
    assert app.test_client().get("/healthz").status_code == 200
    lines = log_lines()
    assert not _migrations_warnings(lines)  # down is not "behind"
    assert [line["level"] for line in lines if line["event"] == "database_unavailable"] == ["WARNING"]


@pytest.mark.parametrize("fail_open", [False, True])
def test_requests_on_an_unmigrated_database_are_logged_as_such(settings, tmp_path, fake_twilio, log_lines, fail_open):
    app = create_app(replace(settings, database_url=f"sqlite:///{tmp_path / 'fresh.sqlite3'}", fail_open=fail_open))
    client = app.test_client()
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "x"})
    assert response.status_code == 503 and not fake_twilio.creates  # fail closed, FAIL_OPEN or not: no outage
    assert response.headers["X-Proxy-Decision"] == "rejected"
    assert signed_post(client, "/twilio/inbound", inbound_params("SM" + "4" * 32)).status_code == 503
    lines = [line for line in log_lines() if line.get("path")]
    assert [(line["event"], line["level"]) for line in lines] == [("migrations_not_at_head", "ERROR")] * 2
    assert all(UPGRADE in line["detail"] for line in lines)


@pytest.mark.parametrize("args", [["outbox", "list"], ["held", "list"], ["outbox", "replay", "--all"],
                                  ["windows", "expiring"], ["purge", "--older-than", "30d"], ["worker", "--once"]])
def test_cli_on_an_unmigrated_database_says_so_in_one_line(settings, tmp_path, args):
    app = create_app(replace(settings, database_url=f"sqlite:///{tmp_path / 'fresh.sqlite3'}"))
    result = app.test_cli_runner().invoke(args=args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert UPGRADE in line and "Traceback" not in result.output


@pytest.mark.parametrize("args", [["db", "upgrade"], ["db", "current"], ["outbox", "list"], ["held", "list"],
                                  ["windows", "expiring"], ["worker", "--once"]])
def test_cli_on_an_unreachable_database_says_so_in_one_line(settings, tmp_path, args):
    """The release phase (`db upgrade`) printed ~140 lines of traceback for a database it could not reach."""
    from tests.e2e.conftest import free_port

    unreachable = f"postgresql+psycopg://proxy@127.0.0.1:{free_port()}/proxy"  # nothing listens there
    app = create_app(replace(settings, database_url=unreachable))
    result = app.test_cli_runner().invoke(args=args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "the database is unavailable: connection failed" in line and "refused" in line, result.output
    assert "Traceback" not in result.output


class Rounds(threading.Event):
    """A worker's stop event that ends its loop after `count` idle waits, without waiting."""

    def __init__(self, count: int):
        super().__init__()
        self.count, self.rounds = count, 0

    def wait(self, timeout=None):
        self.rounds += 1
        if self.rounds == self.count:
            self.set()
        return self.is_set()


def test_worker_on_an_unmigrated_database_says_so_once_without_a_traceback(settings, tmp_path, log_lines):
    from proxy.worker import Worker

    app = create_app(replace(settings, database_url=f"sqlite:///{tmp_path / 'fresh.sqlite3'}"))
    started = len(log_lines())
    Worker(app.extensions["proxy"]).run_forever(Rounds(3))
    lines = log_lines()[started:]
    assert [line["event"] for line in lines] == ["migrations_not_at_head"]
    assert UPGRADE in lines[0]["detail"] and "exc_info" not in lines[0]


def test_metrics_need_auth_or_token(settings, db_engine, fake_twilio):
    app = create_app(replace(settings, metrics_token="metrics-token-1"))
    client = app.test_client()
    send(client, {"To": USER, "From": BUSINESS, "Body": "x"})
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    by_token = client.get("/metrics", headers={"Authorization": "Bearer metrics-token-1"})
    assert by_token.status_code == 200 and by_token.mimetype == "text/plain"
    text = by_token.get_data(as_text=True)
    assert 'proxy_send_decisions_total{action="blocked",content_type="twilio/text",reason="no_window"}' in text
    assert 'proxy_outbox_items{status="pending"} 0.0' in text
    assert client.get("/metrics", headers=basic_auth()).status_code == 200
    # Another site's page is refused before any credentials, the Bearer token's too.
    for header in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://evil.example"}):
        cross = client.get("/metrics", headers={"Authorization": "Bearer metrics-token-1", **header})
        assert cross.status_code == 403 and cross.get_json()["code"] == 20403


def test_metrics_say_how_long_the_oldest_due_outbox_item_has_waited(settings, db_engine, fake_twilio):
    """Nothing else shows a deployment without a worker: held messages, retries and fallbacks just wait."""
    from proxy import outbox as outbox_module

    client = create_app(settings).test_client()

    def oldest() -> float:
        text = client.get("/metrics", headers=basic_auth()).get_data(as_text=True)
        [line] = [line for line in text.splitlines() if line.startswith("proxy_outbox_oldest_due_seconds ")]
        return float(line.split()[1])

    assert oldest() == 0.0
    with db_engine.begin() as conn:
        for due in (utcnow() - timedelta(seconds=120), utcnow() + timedelta(hours=1)):  # waiting; a retry ahead
            outbox_module.enqueue(conn, kind="inbound", ordering_key="k", target="http://127.0.0.1:9/app",
                                  headers={}, body=[], now=utcnow(), due=due)
    assert 119 <= oldest() < 180
    with db_engine.begin() as conn:  # the first waits for its retry; the one behind it is due, but in order
        conn.execute(outbox.delete())
        for key, due in (("k", utcnow() + timedelta(minutes=5)), ("k", utcnow() - timedelta(seconds=120))):
            outbox_module.enqueue(conn, kind="inbound", ordering_key=key, target="http://127.0.0.1:9/app",
                                  headers={}, body=[], now=utcnow(), due=due)
    assert oldest() == 0.0


def test_api_keys_authenticate_and_are_forwarded(settings, db_engine, fake_twilio):
    fake_twilio.api_keys = {API_KEY: API_SECRET}
    client = create_app(replace(settings, api_keys={API_KEY: API_SECRET})).test_client()
    open_window(client)
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "x"}, auth=basic_auth(API_KEY, API_SECRET))
    assert response.status_code == 201
    assert fake_twilio.creates[0].headers["Authorization"] == basic_auth(API_KEY, API_SECRET)["Authorization"]
    assert send(client, {"To": USER, "From": BUSINESS, "Body": "x"},
                auth=basic_auth(API_KEY, "wrong")).status_code == 401
    assert send(client, {"To": USER, "From": BUSINESS, "Body": "x"},
                auth=basic_auth("SK" + "6" * 32, API_SECRET)).status_code == 401
    fake_twilio.api_keys = {}


def test_worker_with_the_database_down_says_so_once_then_says_when_it_is_back(settings, db_engine, log_lines):
    """Not a traceback every poll (one a second, all through an outage): one line when it goes, one when it
    comes back."""
    from sqlalchemy.exc import OperationalError

    from proxy.worker import Worker

    worker = Worker(create_app(settings).extensions["proxy"])
    answers = iter([OperationalError("SELECT", {}, Exception("connection refused\nmore detail")),
                    OperationalError("SELECT", {}, Exception("connection refused")), 0, 0,
                    OperationalError("SELECT", {}, Exception("server closed the connection"))])

    def run_once(now=None, stop=None, refill=False):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    worker.run_once = run_once
    started = len(log_lines())
    worker.run_forever(Rounds(5))
    lines = [line for line in log_lines()[started:] if line["event"].startswith("database")]
    assert [(line["event"], line["level"]) for line in lines] == [
        ("database_unavailable", "ERROR"), ("database_available", "INFO"), ("database_unavailable", "ERROR")]
    assert lines[0]["detail"] == "connection refused" and "exc_info" not in lines[0]


@pytest.mark.parametrize("args", [["db", "current"], ["db", "upgrade"], ["db", "upgrade", "0002"]])
def test_cli_db_on_a_database_a_newer_release_migrated_says_so_in_one_line(settings, tmp_path, args):
    """A rollback's `db upgrade` or `db current` met a revision it does not know: Alembic's traceback."""
    url = newer_releases_database(tmp_path)
    result = create_app(replace(settings, database_url=url)).test_cli_runner().invoke(args=args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "0099" in line and "newer release" in line and "Traceback" not in result.output


def test_cli_db_upgrade_says_where_the_database_is_not_what_it_was_asked(settings, tmp_path):
    """`db upgrade 0003` on a database at head printed "database at 0003" and exit 0: nothing had changed."""
    url = f"sqlite:///{tmp_path / 'older.sqlite3'}"
    runner = create_app(replace(settings, database_url=url)).test_cli_runner()
    first = runner.invoke(args=["db", "upgrade", "0002"])
    assert first.exit_code == 0 and first.output.strip() == "database at 0002", first.output
    relative = runner.invoke(args=["db", "upgrade", "+1"])  # Alembic's relative step: it moved, no refusal
    assert relative.exit_code == 0 and relative.output.strip() == "database at 0003", relative.output
    to_head = runner.invoke(args=["db", "upgrade"])
    assert to_head.exit_code == 0 and to_head.output.strip() == f"database at {head_revision()} (head)"
    for again in (["db", "upgrade"], ["db", "upgrade", "heads"], ["db", "upgrade", f"{head_revision()}"]):
        # Every release phase after the first: already at head is no refusal.
        rerun = runner.invoke(args=again)
        assert rerun.exit_code == 0 and rerun.output.strip() == f"database at {head_revision()} (head)", rerun.output
    for older in ("0003", "base"):
        back = runner.invoke(args=["db", "upgrade", older])
        assert back.exit_code == 1, back.output
        (line,) = [line for line in back.output.splitlines() if line.startswith("Error:")]
        assert f"the database is at {head_revision()}, past {older}" in line
    assert runner.invoke(args=["db", "current"]).output.strip() == f"{head_revision()} (head)"


def test_cli_db_upgrade_over_tables_made_without_the_migrations_says_so_in_one_line(settings, tmp_path, db_engine):
    """SQLite said "the database is unavailable: table windows already exists"; PostgreSQL printed a traceback."""
    from sqlalchemy import create_engine, text

    if db_engine.dialect.name == "postgresql":
        url = str(db_engine.url.render_as_string(hide_password=False))
        with db_engine.begin() as conn:  # this run's own database, migrated: forget the migrations, keep the tables
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
            conn.execute(text("DROP TABLE alembic_version"))
    else:
        url = f"sqlite:///{tmp_path / 'by-hand.sqlite3'}"
        with create_engine(url).begin() as conn:
            conn.execute(text("CREATE TABLE windows (id INTEGER PRIMARY KEY)"))
    try:
        result = create_app(replace(settings, database_url=url)).test_cli_runner().invoke(args=["db", "upgrade"])
    finally:
        if db_engine.dialect.name == "postgresql":  # back as it was for the next tests (the failed upgrade rolled back)
            with db_engine.begin() as conn:
                conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                                  "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"))
                conn.execute(text("INSERT INTO alembic_version VALUES (:v)"), {"v": version})
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "already holds what the migrations create" in line and "unavailable" not in line


@pytest.mark.parametrize("revision, said", [("nosuchrev", "nosuchrev"), ("head+1", "no such revision"),
                                             (f"{head_revision()}+1", "no such revision")])
def test_cli_db_upgrade_to_an_unknown_revision_says_so_in_one_line(app, revision, said):
    """A relative step past head was Alembic's AssertionError, with its traceback."""
    result = app.test_cli_runner().invoke(args=["db", "upgrade", revision])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert said in line and "Traceback" not in result.output


@pytest.mark.parametrize("args", [["windows", "expiring", "--within", "99999999999999999999d"],
                                  ["windows", "expiring", "--within", "100000000000000"],
                                  ["windows", "expiring", "--within", "3000000w"],
                                  ["purge", "--older-than", "99999999999d"], ["purge", "--older-than", "800000d"],
                                  ["windows", "expiring", "--limit", "-1"], ["windows", "expiring", "--limit", "0"],
                                  ["outbox", "list", "--limit", "-5"], ["held", "list", "--limit", "-1"],
                                  ["outbox", "replay", "99999999999999999999999"], ["outbox", "replay", "0"]])
def test_cli_out_of_range_arguments_are_usage_errors(app, args):
    """A huge duration or item id ended in OverflowError's traceback, a negative --limit in IndexError's."""
    result = app.test_cli_runner().invoke(args=args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "Invalid value" in line and "Traceback" not in result.output


def test_a_send_on_a_database_behind_the_codes_migrations_is_refused_until_it_is_upgraded(settings, fake_twilio,
                                                                                         tmp_path, monkeypatch):
    """Judged on the old tables, such a send went to Twilio, and its attempt row (newer columns) was then
    dropped by the writer: a late 63016 on it could never be acted on. 503 and nothing sent, as README says."""
    from proxy import migrate

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    upgrade(url, "0001")
    app = create_app(replace(settings, database_url=url))
    client = app.test_client()
    response = send(client, {"To": "+14155550111", "From": "+14155550100", "Body": "x"})
    assert response.status_code == 503 and set(response.get_json()) == SHAPE
    assert migrate.UPGRADE_COMMAND in response.get_json()["message"]
    assert fake_twilio.creates == []
    upgrade(url)
    monkeypatch.setattr(migrate.HeadCheck, "RECHECK_SECONDS", 0.0)  # asked again at the next send
    assert send(client, {"To": "+14155550111", "From": "+14155550100", "Body": "x"}).status_code == 201
    app.extensions["proxy"].attempts.flush()
    app.extensions["proxy"].engine.dispose()


@pytest.mark.parametrize("age", ["30", " 30 ", "0"])
def test_purge_refuses_an_age_without_its_unit(app, db_engine, age):
    """`--older-than 30` was 30 seconds: a user meaning days deleted every finished record."""
    add_holds(db_engine, utcnow() - timedelta(hours=1))
    result = app.test_cli_runner().invoke(args=["purge", "--older-than", age])
    assert result.exit_code == 2 and "has no unit" in result.output and "30d" in result.output, result.output
    with db_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(held_messages)).scalar_one() == len(HOLD_STATUSES)


@pytest.mark.parametrize("age", ["-5d", "5 days", "1.5d"])
def test_purge_of_an_age_it_cannot_read_offers_no_bare_number(app, db_engine, age):
    """The duration parser's examples (`3600`) are refused by purge itself."""
    result = app.test_cli_runner().invoke(args=["purge", "--older-than", age])
    assert result.exit_code == 2 and "--older-than" in result.output and "3600" not in result.output, result.output


@pytest.mark.parametrize("age", ["0d", "90m", "23h"])
def test_purge_of_records_younger_than_a_day_needs_yes(app, db_engine, age):
    add_holds(db_engine, utcnow() - timedelta(days=2))
    refused = app.test_cli_runner().invoke(args=["purge", "--older-than", age])
    assert refused.exit_code == 2 and "--yes" in refused.output, refused.output
    with db_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(held_messages)).scalar_one() == len(HOLD_STATUSES)
    done = app.test_cli_runner().invoke(args=["purge", "--older-than", age, "--yes"])
    assert done.exit_code == 0 and "3 held_messages" in done.output, done.output


def test_windows_expiring_within_zero_is_refused_like_the_api(app):
    result = app.test_cli_runner().invoke(args=["windows", "expiring", "--within", "0"])
    assert result.exit_code == 2 and "at least 1 second" in result.output, result.output


def test_cli_db_current_names_the_revision_and_what_to_do(settings, tmp_path):
    """Alembic's `current` printed nothing at all for a database never migrated."""
    from proxy.migrate import head_revision

    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    runner = create_app(replace(settings, database_url=url)).test_cli_runner()
    fresh = runner.invoke(args=["db", "current"])
    assert fresh.exit_code == 0 and fresh.output.startswith("none: no migrations applied") and "db upgrade" in fresh.output
    upgrade(url, "0002")
    behind = runner.invoke(args=["db", "current"])
    assert behind.exit_code == 0 and behind.output.startswith(f"0002 (head is {head_revision()};"), behind.output
    upgrade(url)
    assert runner.invoke(args=["db", "current"]).output == f"{head_revision()} (head)\n"


def _flask_without_credentials(tmp_path, *args):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "FLASK_"))}
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'proxy.sqlite3'}"
    return subprocess.run([sys.executable, "-m", "flask", "--app", "proxy", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path)


@pytest.mark.parametrize("args, listed", [(["--help"], ["worker", "outbox", "held", "purge", "sandbox"]),
                                          (["outbox", "--help"], ["list", "replay"])])
def test_help_lists_the_commands_before_any_credentials_are_set(tmp_path, args, listed):
    """A new user's `flask --app proxy --help` answered only that the credentials were missing."""
    done = _flask_without_credentials(tmp_path, *args)
    assert done.returncode == 0, done.stderr
    assert all(f"  {name} " in done.stdout for name in listed), done.stdout
    assert "TWILIO_ACCOUNT_SID" in done.stderr and "Traceback" not in done.stderr  # and why commands will stop
    # ... as a note: "configuration error" read as if the help itself had failed.
    assert "note:" in done.stderr and "configuration error" not in done.stderr


def test_a_command_without_credentials_still_stops_with_the_configuration_error(tmp_path):
    done = _flask_without_credentials(tmp_path, "held", "list")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "configuration error: TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must be set" in done.stderr


# --- which database a process uses ---------------------------------------------------------------------

def _database_in_use(lines):
    return [line for line in lines if line["event"] == "database_in_use"]


def test_a_web_process_names_its_database_at_start_and_whether_it_is_the_default(tmp_path, monkeypatch, log_lines):
    """With DATABASE_URL unset the proxy used ./instance/proxy.sqlite3 and no line said so."""
    from proxy.settings import Settings
    from tests.e2e.conftest import free_port

    monkeypatch.chdir(tmp_path)
    env = {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN}
    create_app(Settings.from_env({**env, "DATABASE_URL": " "})).extensions["proxy"].engine.dispose()
    (default,) = _database_in_use(log_lines())
    assert (default["level"], default["process_type"], default["database_default"]) == ("INFO", "web", True)
    assert default["database"] == f"sqlite:///{tmp_path / 'instance' / 'proxy.sqlite3'}"
    assert "DATABASE_URL" in default["detail"]

    password, port = "db-password-marker-41f7", free_port()
    url = f"postgres://proxy:{password}@127.0.0.1:{port}/proxy?sslmode=disable&password={password}"
    create_app(Settings.from_env({**env, "DATABASE_URL": url})).extensions["proxy"].engine.dispose()
    given = _database_in_use(log_lines())[1]
    assert (given["database"], given["database_default"]) == (f"postgresql+psycopg://127.0.0.1:{port}/proxy", False)
    assert "detail" not in given
    assert password not in json.dumps(log_lines()) and "proxy:" not in given["database"]


@pytest.mark.parametrize("url", ["postgresql://u:pass?word@db.internal:5432/proxy", "postgresql://u:p@ss@db.internal/proxy",
                                 "postgresql://u:pass%23word@db.internal/proxy?sslmode=require"])
def test_the_database_named_in_logs_keeps_no_part_of_a_password(url):
    from proxy.settings import database_shown, normalise_database_url

    shown = database_shown(normalise_database_url(url))
    assert shown.startswith("postgresql+psycopg://") and "db.internal" in shown and "/proxy" in shown, shown
    assert not any(part in shown for part in ("pass", "word", "ss@", "u:", "sslmode")), shown


def test_the_worker_names_its_database_at_start(settings, db_engine, log_lines, monkeypatch):
    from proxy.settings import database_shown
    from proxy.worker import Worker

    monkeypatch.setattr(Worker, "run_forever", lambda self, stop: None)
    app = create_app(settings)
    started = len(log_lines())
    result = app.test_cli_runner().invoke(args=["worker"])
    assert result.exit_code == 0, result.output
    lines = log_lines()[started:]
    assert [line["event"] for line in lines] == ["database_in_use", "worker_started", "worker_stopped"]
    assert (lines[0]["process_type"], lines[0]["database_default"]) == ("worker", False)
    assert lines[0]["database"] == database_shown(settings.database_url)
    assert "postgres@" not in lines[0]["database"]  # the user the tests' PostgreSQL URL names is left out too


def test_other_commands_do_not_name_the_database(tmp_path):
    """Their output is often read by scripts (one JSON object per line): only the long-running processes say it."""
    done = _flask_with_credentials(tmp_path, "db", "upgrade")
    assert done.returncode == 0, done.stderr
    listed = _flask_with_credentials(tmp_path, "outbox", "list")
    assert listed.returncode == 0, listed.stderr
    assert "database_in_use" not in done.stdout + done.stderr + listed.stdout + listed.stderr


def _flask_with_credentials(tmp_path, *args):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "FLASK_"))}
    env.update(TWILIO_ACCOUNT_SID=ACCOUNT_SID, TWILIO_AUTH_TOKEN=AUTH_TOKEN,
               DATABASE_URL=f"sqlite:///{tmp_path / 'proxy.sqlite3'}")
    return subprocess.run([sys.executable, "-m", "flask", "--app", "proxy", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path)


# --- metrics while the database is away ----------------------------------------------------------------

def _samples(client) -> dict:
    """/metrics as {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics", headers=basic_auth()).get_data(as_text=True)
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


REFUSED_SEND = ("proxy_send_decisions_total", (("action", "rejected"), ("content_type", "none")))


def _refusals(samples: dict, reason: str) -> tuple[float, float, float]:
    """How many sends, inbound messages and status callbacks were answered 503 for `reason`."""
    name, labels = REFUSED_SEND
    return (samples.get((name, tuple(sorted((*labels, ("reason", reason))))), 0.0),
            samples.get(("proxy_webhooks_total", (("kind", "inbound"), ("outcome", reason))), 0.0),
            samples.get(("proxy_webhooks_total", (("kind", "status"), ("outcome", reason))), 0.0))


def _send_inbound_and_status(client) -> None:
    assert send(client, {"To": USER, "From": BUSINESS, "Body": "x"}).status_code == 503
    assert signed_post(client, "/twilio/inbound", inbound_params("SM" + "5" * 32)).status_code == 503
    status = inbound_params("SM" + "6" * 32, MessageStatus="delivered", SmsStatus="delivered")
    assert signed_post(client, "/twilio/status", status).status_code == 503


@pytest.mark.parametrize("database, reason", [("not-a-file", "database_unavailable"),
                                             ("fresh.sqlite3", "migrations_not_at_head")])
def test_requests_refused_because_of_the_database_are_counted(settings, fake_twilio, tmp_path, database, reason):
    """Answered 503 and counted nowhere: a dashboard showed fewer sends and webhooks, not refused ones. A SQLite
    path that is a directory cannot be opened (a database that is down); a fresh file was never migrated."""
    if database == "not-a-file":
        (tmp_path / database).mkdir()
    app = create_app(replace(settings, database_url=f"sqlite:///{tmp_path / database}"))
    client = app.test_client()
    before = _refusals(_samples(client), reason)
    _send_inbound_and_status(client)
    after = _refusals(_samples(client), reason)
    app.extensions["proxy"].engine.dispose()
    assert [b - a for a, b in zip(before, after)] == [1.0, 1.0, 1.0]


def test_sends_refused_because_a_dependency_was_slow_or_away_are_counted(settings, db_engine, monkeypatch):
    """A window read slower than judge.SLOW_DATABASE_SECONDS and a template the Content API could not be asked
    about are answered 503 like a database that is down, and were counted nowhere."""
    import time

    from proxy import judge, store

    app = create_app(replace(settings, twilio_content_base_url="http://127.0.0.1:9"))  # nothing listens there
    client = app.test_client()
    open_window(client)
    samples = _samples(client)
    slow, away = _refusals(samples, "database_slow")[0], _refusals(samples, "content_unavailable")[0]
    monkeypatch.setattr(judge, "SLOW_DATABASE_SECONDS", 0.05)
    real = store.load_window
    monkeypatch.setattr(store, "load_window", lambda *a: (time.sleep(0.1), real(*a))[1])
    assert send(client, {"To": USER, "From": BUSINESS, "Body": "x"}).status_code == 503
    monkeypatch.undo()
    assert send(client, {"To": USER, "From": BUSINESS, "ContentSid": "HX" + "7" * 32}).status_code == 503
    samples = _samples(client)
    app.extensions["proxy"].engine.dispose()
    assert _refusals(samples, "database_slow")[0] == slow + 1
    assert _refusals(samples, "content_unavailable")[0] == away + 1


def test_metrics_say_whether_the_database_answered_the_scrape(settings, db_engine, tmp_path):
    """During an outage the proxy_outbox_* series vanished and /metrics still answered 200: an alert on
    proxy_outbox_oldest_due_seconds could never fire. proxy_database_up is always there."""
    up = _samples(create_app(settings).test_client())
    assert up[("proxy_database_up", ())] == 1.0 and ("proxy_outbox_oldest_due_seconds", ()) in up
    (tmp_path / "not-a-file").mkdir()
    app = create_app(replace(settings, database_url=f"sqlite:///{tmp_path / 'not-a-file'}"))
    down = _samples(app.test_client())
    app.extensions["proxy"].engine.dispose()
    assert down[("proxy_database_up", ())] == 0.0 and ("proxy_outbox_oldest_due_seconds", ()) not in down


@pytest.mark.parametrize("args", [["purge", "--older-than", "30d"], ["outbox", "replay", "--all"], ["worker", "--once"]])
def test_cli_on_a_read_only_postgresql_says_so_in_one_line(settings, db_engine, args):
    """A hot standby or a read-only role: psycopg's ReadOnlySqlTransaction (an InternalError) was a traceback."""
    url = settings.database_url
    if not url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: a read-only SQLite file is an OperationalError, said in one line already")
    read_only = f"{url}{'&' if '?' in url else '?'}options=-cdefault_transaction_read_only%3Don"
    app = create_app(replace(settings, database_url=read_only))
    if args[0] == "outbox":  # something to replay, so the command writes
        with db_engine.begin() as conn:
            conn.execute(insert(outbox).values(kind="inbound", ordering_key="k", target="http://app", headers="{}",
                                               body="[]", status="exhausted", attempts=5, next_attempt_at=utcnow(),
                                               created_at=utcnow(), updated_at=utcnow()))
    result = app.test_cli_runner().invoke(args=args + (["--yes"] if args[0] == "purge" else []))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "the database is read-only: cannot execute" in line and "Traceback" not in result.output


@pytest.mark.parametrize("args", [["db", "current"], ["outbox", "list"], ["worker", "--once"]])
def test_cli_on_a_file_that_is_no_sqlite_database_says_so_in_one_line(settings, tmp_path, args):
    path = tmp_path / "notes.txt"
    path.write_text("not a database\n" * 100)
    app = create_app(replace(settings, database_url=f"sqlite:///{path}"))
    result = app.test_cli_runner().invoke(args=args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "the database is unavailable: file is not a database" in line and "Traceback" not in result.output


@pytest.mark.parametrize("args", [["windows", "expiring", "--within", "9" * 5000],
                                  ["purge", "--older-than", "9" * 5000 + "d"],
                                  ["windows", "expiring", "--within", "\u0661\u0662"]])
def test_a_duration_of_too_many_or_foreign_digits_is_refused_in_one_line(client, args):
    """5,000 digits were int()'s ValueError traceback; Arabic-Indic digits were read as 12 s."""
    result = client.application.test_cli_runner().invoke(args=args)
    said = "is not an age" if args[0] == "purge" else "is not a duration"  # purge takes no bare seconds
    assert result.exit_code == 2 and said in result.output and "Traceback" not in result.output


def test_db_upgrade_to_a_blank_revision_is_refused_in_one_line(client):
    """A script's unset $REV: Alembic asserted, and the release phase printed a traceback."""
    result = client.application.test_cli_runner().invoke(args=["db", "upgrade", ""])
    assert result.exit_code == 2 and "give a revision" in result.output and "Traceback" not in result.output
