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
