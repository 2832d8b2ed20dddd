"""Twilio misbehaving: stalled, refusing, 5xx, 429. The caller gets 504/502 or Twilio's own answer,
the attempt is stored with its outcome, and a create is never sent twice."""

import pytest
from sqlalchemy import select

from proxy.attempts import flush_all
from proxy.db import send_attempts
from tests.conftest import BUSINESS, USER
from tests.http.test_gateway import open_window, send


@pytest.mark.parametrize("status, code", [(500, 20500), (503, 20503), (429, 20429)])
def test_twilio_errors_are_relayed_and_never_retried(client, fake_twilio, db_engine, status, code):
    open_window(client)
    body = {"code": code, "message": "Twilio is having a moment", "more_info": "https://www.twilio.com/docs/errors/x",
            "status": status}
    fake_twilio.fail_with = (status, body)
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "x"})
    assert response.status_code == status and response.get_json() == body
    assert len(fake_twilio.creates) == 1
    assert flush_all()
    with db_engine.connect() as conn:
        attempt = conn.execute(select(send_attempts)).mappings().one()
    assert (attempt["outcome"], attempt["upstream_status"], attempt["decision"]) == ("upstream_error", status, "allowed")


@pytest.mark.parametrize("sid", [["SM" + "1" * 32], 12345, {"x": 1}, None])
def test_a_created_message_whose_sid_is_not_text_is_relayed_and_recorded_without_it(client, fake_twilio, db_engine,
                                                                                      sid):
    """Twilio took the message: the caller must get its 201 (a 500 invites a retry, so a second message), and
    the attempt writer must not be handed a value it cannot store (it took that for an outage, retried forever
    and stopped recording the worker's sends)."""
    open_window(client)
    body = {"sid": sid, "status": "queued"}
    fake_twilio.fail_with = (201, body)
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "x"})
    assert response.status_code == 201 and response.get_json() == body
    fake_twilio.fail_with = None
    assert send(client, {"To": USER, "From": BUSINESS, "Body": "y"}).status_code == 201
    assert flush_all(5)
    with db_engine.connect() as conn:
        attempts = conn.execute(select(send_attempts).order_by(send_attempts.c.id)).mappings().all()
    assert [(a["outcome"], a["message_sid"]) for a in attempts][0] == ("sent", None)
    assert len(attempts) == 2 and attempts[1]["message_sid"].startswith("SM")
