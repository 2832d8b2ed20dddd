"""Content API lookups: malformed answers, the caches' TTL across processes, one lookup per sid at a time."""

import json
import threading
import time
from dataclasses import replace
from datetime import timedelta

import pytest
from flask import Flask, Response, request
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from proxy import create_app
from proxy.content import ContentUnavailable
from proxy.db import content_cache, utcnow
from proxy.sandbox import ServerThread
from tests.conftest import BUSINESS, USER
from tests.http.test_gateway import SHAPE, send

SID = "HX" + "ab" * 16
GOOD = json.dumps({"sid": SID, "types": {"twilio/carousel": {"body": "x", "cards": []}}, "friendly_name": "n"})


class ContentAPI:
    """A Content API on loopback whose answers and speed each test sets; it counts the calls."""

    def __init__(self):
        self.content, self.approval, self.delay, self.status = GOOD, "approved", 0.0, 200
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def app(self) -> Flask:
        app = Flask("content-api")

        @app.get("/v1/Content/<sid>")
        def content(sid):
            return self._answer(self.content)

        @app.get("/v1/Content/<sid>/ApprovalRequests")
        def approval(sid):
            return self._answer(json.dumps({"whatsapp": {"status": self.approval}}))

        return app

    def _answer(self, body):
        with self.lock:
            self.calls.append(request.path)
        time.sleep(self.delay)
        return Response(body, status=self.status, mimetype="application/json")


@pytest.fixture
def content_api():
    api = ContentAPI()
    with ServerThread(api.app()) as server:
        api.url = server.url
        yield api


@pytest.fixture
def make_app(settings, db_engine, content_api):
    apps = []

    def make(**changes):
        app = create_app(replace(settings, twilio_content_base_url=content_api.url, **changes))
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["proxy"].engine.dispose()


def cold_template_send(client):
    """Out of the window (no inbound), so only an approved template may go out."""
    return send(client, {"To": USER, "From": BUSINESS, "ContentSid": SID})


@pytest.mark.parametrize("body", ["[]", '"hello"', "null", json.dumps({"sid": SID, "types": ["twilio/text"]}),
                                  json.dumps({"sid": SID, "types": "twilio/card"})])
def test_a_malformed_content_answer_fails_closed_with_503_and_is_not_kept(make_app, content_api, fake_twilio, body):
    client = make_app().test_client()
    content_api.content = body
    response = cold_template_send(client)
    assert response.status_code == 503 and set(response.get_json()) == SHAPE
    assert "Content API" in response.get_json()["message"] and fake_twilio.creates == []
    content_api.content = GOOD  # Twilio answers properly again: nothing wrong was cached meanwhile
    assert cold_template_send(client).status_code == 201


@pytest.mark.parametrize("status, then", [(401, "operator must fix"), (403, "operator must fix"),
                                          (500, "Retry later"), (429, "Retry later")])
def test_content_api_refusing_the_proxys_credentials_is_not_said_to_pass(make_app, content_api, fake_twilio, status,
                                                                          then):
    """A 401/403 said "Retry later" like an outage: no retry helps until the operator fixes the credentials."""
    content_api.status = status
    response = cold_template_send(make_app().test_client())
    assert response.status_code == 503 and set(response.get_json()) == SHAPE and fake_twilio.creates == []
    message = response.get_json()["message"]
    assert then in message and ("TWILIO_AUTH_TOKEN" in message) == (status in (401, 403))


def test_a_content_cache_row_that_cannot_be_written_is_no_database_outage(make_app, content_api, fake_twilio,
                                                                          monkeypatch):
    """With FAIL_OPEN, a failed cache write must not send unjudged: the lookup itself succeeded."""
    app = make_app(fail_open=True)
    content_api.approval = "paused"

    def refuse(*args, **kwargs):
        raise OperationalError("INSERT INTO content_cache", {}, Exception("disk I/O error"))

    monkeypatch.setattr(app.extensions["proxy"].content, "save", refuse)
    response = cold_template_send(app.test_client())
    assert response.status_code == 400 and response.headers["X-Proxy-Decision"] == "blocked"
    assert response.get_json()["code"] == 63016 and fake_twilio.creates == []


def test_a_row_another_process_cached_is_trusted_only_for_what_is_left_of_its_ttl(make_app, content_api, db_engine):
    first, second = make_app(content_cache_seconds=300), make_app(content_cache_seconds=300)
    first.extensions["proxy"].content.get(SID)
    with db_engine.begin() as conn:  # the first process fetched it 290 s ago
        conn.execute(update(content_cache).values(fetched_at=utcnow() - timedelta(seconds=290)))
    resolver = second.extensions["proxy"].content
    assert resolver.get(SID).approval == "approved"
    expires, _ = resolver._memory[SID]
    assert expires - time.monotonic() <= 10  # not another 300 s: a revoked approval must not live twice the TTL
    assert content_api.calls == ["/v1/Content/" + SID, f"/v1/Content/{SID}/ApprovalRequests"]  # the row was used


@pytest.mark.parametrize("status", [200, 500])
def test_concurrent_requests_for_one_sid_share_one_lookup(make_app, content_api, status):
    """A new template used by many sends at once is asked for once; an outage costs them one wait, not one each."""
    resolver = make_app().extensions["proxy"].content
    content_api.delay, content_api.status = 0.5, status
    results, start = [], threading.Barrier(10)

    def ask():
        start.wait()
        try:
            results.append(resolver.get(SID).approval)
        except ContentUnavailable:
            results.append("unavailable")

    threads = [threading.Thread(target=ask) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == (["approved"] * 10 if status == 200 else ["unavailable"] * 10)
    expected_calls = 2 if status == 200 else 1  # the approval is not asked for when the Content failed
    assert len(content_api.calls) == expected_calls
