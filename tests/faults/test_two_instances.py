"""Two gunicorn instances on one PostgreSQL: 1,000 inbound webhooks for a handful of pairs, interleaved
with sends through both. Every window ends with the latest expiry, every sid is recorded once, and every
send decision matches the window state."""

import random
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import requests
from sqlalchemy import create_engine, func, select

from proxy.db import messages, send_attempts, windows
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, BUSINESS, basic_auth, inbound_params, sign
from tests.e2e.conftest import Gunicorn

pytestmark = pytest.mark.e2e
MESSAGES = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
HOT = [f"whatsapp:+1415555{1000 + i}" for i in range(5)]  # users who write
COLD = [f"whatsapp:+1415555{2000 + i}" for i in range(3)]  # users who never write


def test_two_instances_share_one_database(pg_cluster, fake_twilio, tmp_path):
    env = {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "DATABASE_URL": pg_cluster.url,
           "TWILIO_API_BASE_URL": fake_twilio.url, "TWILIO_CONTENT_BASE_URL": fake_twilio.url,
           "WEB_CONCURRENCY": "2"}
    servers = [Gunicorn(env, tmp_path / f"instance{i}.log") for i in range(2)]
    engine = create_engine(pg_cluster.url)
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=32))

    def inbound(job):
        server, sid, user = job
        url = server.url + "/twilio/inbound"
        params = inbound_params(sid, user=user)
        return session.post(url, data=params, headers={"X-Twilio-Signature": sign(url, params)}, timeout=30)

    def send(job):
        server, user = job
        return session.post(server.url + MESSAGES, data={"To": user, "From": BUSINESS, "Body": "x"},
                            headers=basic_auth(), timeout=30)

    try:
        # Each hot pair is opened first, so any send to it afterwards must be allowed.
        for i, user in enumerate(HOT):
            assert inbound((servers[i % 2], f"SM{9000 + i:032d}", user)).status_code == 200
        rng = random.Random(7)
        inbound_jobs = [(servers[i % 2], f"SM{i:032d}", rng.choice(HOT)) for i in range(1000)]
        retries = [(servers[(i + 1) % 2], sid, user) for i, (_, sid, user) in enumerate(inbound_jobs[::10])]
        send_jobs = [(servers[i % 2], rng.choice(HOT + COLD)) for i in range(300)]
        jobs = [("in", j) for j in inbound_jobs + retries] + [("send", j) for j in send_jobs]
        rng.shuffle(jobs)
        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(lambda job: (job, (inbound if job[0] == "in" else send)(job[1])), jobs))
        assert all(r.status_code in (200, 201, 400) for _, r in results)
        assert all(r.status_code == 200 for (kind, _), r in results if kind == "in")

        # Attempts are written by each worker's background writer, within ~50 ms of the answer.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                if conn.execute(select(func.count()).select_from(send_attempts)).scalar_one() >= 300:
                    break
            time.sleep(0.1)
        with engine.connect() as conn:
            rows = conn.execute(select(windows)).mappings().all()
            received = conn.execute(select(messages.c.sid, messages.c.user, messages.c.created_at)
                                    .where(messages.c.direction == "inbound")).all()
            attempts = conn.execute(select(send_attempts.c.user, send_attempts.c.decision,
                                           send_attempts.c.reason)).all()
            distinct = conn.execute(select(func.count(func.distinct(messages.c.sid)))).scalar_one()
        assert len(received) == 1005 == distinct  # every sid once, retries included
        assert {(r["sender"], r["user"]) for r in rows} == {(BUSINESS, u) for u in HOT}
        for row in rows:
            latest = max(r.created_at for r in received if r.user == row["user"])
            assert row["expires_at"] == latest + timedelta(seconds=86400)
            assert row["last_inbound_at"] == latest
        assert len(attempts) == 300
        for user, decision, reason in attempts:
            expected = ("allowed", "window_open") if user in HOT else ("blocked", "no_window")
            assert (decision, reason) == expected
        hot_sends = sum(1 for _, user in send_jobs if user in HOT)
        assert len(fake_twilio.creates) == hot_sends
    finally:
        for server in servers:
            server.stop()
        engine.dispose()
