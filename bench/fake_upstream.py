"""A fake Twilio Messages API for load: answers each create after a fixed delay (250 ms by default).

It is also the business's app for forwarded webhooks: POST /app/inbound answers TwiML with a reply
after --app-delay (20 ms by default); POST /app/tail does too, but every --tail-every-th request after
--tail-delay instead, as a real app's slowest answers (bench/drain.py). An asyncio (aiohttp) server on
127.0.0.1, so thousands of requests can wait at once in one process.
Run: python -m bench.fake_upstream --port 8099 --delay 0.25 --app-delay 0.02
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from datetime import datetime, timezone
from email.utils import format_datetime

from aiohttp import web


APP_PATH = "/app/inbound"
TAIL_PATH = "/app/tail"
APP_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response><Message>Thanks, we got it.</Message></Response>'


def make_app(delay: float, app_delay: float = 0.02, tail_every: int = 20, tail_delay: float = 0.5) -> web.Application:
    answered = 0

    async def create(request: web.Request) -> web.Response:
        form = await request.post()
        await asyncio.sleep(delay)
        account = request.match_info["account"]
        sid = "SM" + uuid.uuid4().hex
        now = format_datetime(datetime.now(timezone.utc))
        body = {
            "account_sid": account, "api_version": "2010-04-01", "body": form.get("Body", ""),
            "date_created": now, "date_sent": None, "date_updated": now, "direction": "outbound-api",
            "error_code": None, "error_message": None, "from": form.get("From"),
            "messaging_service_sid": form.get("MessagingServiceSid"), "num_media": "0", "num_segments": "1",
            "price": None, "price_unit": "USD", "sid": sid, "status": "queued",
            "subresource_uris": {"media": f"/2010-04-01/Accounts/{account}/Messages/{sid}/Media.json"},
            "to": form.get("To"), "uri": f"/2010-04-01/Accounts/{account}/Messages/{sid}.json",
        }
        return web.Response(text=json.dumps(body), status=201, content_type="application/json", charset="utf-8",
                            headers={"Twilio-Request-Id": "RQ" + uuid.uuid4().hex})

    async def business_app(request: web.Request) -> web.Response:
        await request.post()
        await asyncio.sleep(app_delay)
        return web.Response(text=APP_TWIML, content_type="text/xml")

    async def business_app_with_a_tail(request: web.Request) -> web.Response:
        nonlocal answered
        await request.post()
        answered += 1
        await asyncio.sleep(tail_delay if answered % tail_every == 0 else app_delay)
        return web.Response(text=APP_TWIML, content_type="text/xml")

    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{account}/Messages.json", create)
    app.router.add_post(APP_PATH, business_app)
    app.router.add_post(TAIL_PATH, business_app_with_a_tail)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.25)
    parser.add_argument("--app-delay", type=float, default=0.02)
    parser.add_argument("--tail-every", type=int, default=20)
    parser.add_argument("--tail-delay", type=float, default=0.5)
    args = parser.parse_args()
    web.run_app(make_app(args.delay, args.app_delay, args.tail_every, args.tail_delay), host="127.0.0.1", port=args.port, access_log=None, backlog=4096,
                print=None)


if __name__ == "__main__":
    main()
