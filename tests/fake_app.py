"""A fake business app on 127.0.0.1: validates forwarded signatures with twilio-python, answers TwiML,
and can be made slow, failing or unavailable."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from flask import Flask, Response, request
from twilio.request_validator import RequestValidator


REPLY = '<?xml version="1.0" encoding="UTF-8"?><Response><Message>Thanks!</Message></Response>'


@dataclass
class FakeApp:
    auth_token: str
    url: str = ""
    received: list = field(default_factory=list)  # (path, form pairs, headers) of accepted requests
    rejected: int = 0
    started: int = 0  # requests that arrived, whether or not they finished
    last_headers: dict = field(default_factory=dict)  # of the latest request, accepted or not
    queries: list = field(default_factory=list)  # each request's query string, as sent
    # Requests being handled right now, and the most there ever were at once: overall, and per
    # conversation (the pair of From and To, whichever way round).
    in_flight: int = 0
    max_in_flight: int = 0
    in_flight_by_pair: dict = field(default_factory=dict)
    max_in_flight_by_pair: dict = field(default_factory=dict)
    delay: float = 0.0
    fail_status: int | None = None
    headers: list = field(default_factory=list)  # (name, value) pairs the answer carries instead of its own
    reply: str | bytes = REPLY
    # A broken app's answer (a debug page, a runaway loop): this many bytes instead of `reply`, streamed in
    # 64 KiB pieces, chunked unless `declare_length`; `streamed` counts the bytes that went out before the
    # proxy hung up (or the answer ended), and `stream_ended` is set then.
    huge_reply: int = 0
    declare_length: bool = False
    streamed: int = 0
    stream_ended: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.received.clear()
        self.rejected, self.delay, self.fail_status, self.started = 0, 0.0, None, 0
        self.in_flight, self.max_in_flight = 0, 0
        self.in_flight_by_pair, self.max_in_flight_by_pair = {}, {}
        self.headers, self.last_headers, self.reply, self.queries = [], {}, REPLY, []
        self.huge_reply, self.declare_length, self.streamed, self.stream_ended = 0, False, 0, threading.Event()

    def bodies(self, path: str | None = None) -> list[str]:
        return [dict(form).get("Body") for p, form, _ in self.received if path is None or p == path]

    def app(self) -> Flask:
        app = Flask("fake_app")
        validator = RequestValidator(self.auth_token)

        @app.post("/<path:path>")
        def webhook(path):
            pair = tuple(sorted((request.form.get("From", ""), request.form.get("To", ""))))
            with self.lock:
                self.started += 1
                self.last_headers = dict(request.headers)
                self.queries.append(request.query_string.decode())
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                self.in_flight_by_pair[pair] = self.in_flight_by_pair.get(pair, 0) + 1
                self.max_in_flight_by_pair[pair] = max(self.max_in_flight_by_pair.get(pair, 0),
                                                       self.in_flight_by_pair[pair])
            try:
                return self._answer(validator)
            finally:
                with self.lock:  # a reset while it was in flight started the counts afresh
                    self.in_flight = max(0, self.in_flight - 1)
                    self.in_flight_by_pair[pair] = max(0, self.in_flight_by_pair.get(pair, 0) - 1)

        return app

    def _answer(self, validator: RequestValidator) -> Response:
        if self.delay:
            time.sleep(self.delay)
        # Exactly what a business app does with twilio-python: validate against its own URL.
        if not validator.validate(request.url, request.form, request.headers.get("X-Twilio-Signature", "")):
            self.rejected += 1
            return Response("bad signature", status=403)
        if self.fail_status:
            return Response("app error", status=self.fail_status)
        with self.lock:
            self.received.append((request.path, list(request.form.items(multi=True)), dict(request.headers)))
        if self.huge_reply:
            return self._huge()
        response = Response(self.reply, status=200, mimetype="text/xml")
        for name in {name for name, _ in self.headers}:
            del response.headers[name]
        for name, value in self.headers:
            response.headers.add(name, value)
        return response

    def _huge(self) -> Response:
        size, piece, ended = self.huge_reply, b"<Response>" + b"x" * (64 * 1024 - 10), self.stream_ended

        def pieces():
            try:
                while self.streamed < size:
                    chunk = piece[:size - self.streamed]
                    yield chunk  # resumed once the server has written it
                    self.streamed += len(chunk)
            finally:  # also when the write fails: the proxy closed the connection
                ended.set()

        headers = {"Content-Length": str(size)} if self.declare_length else {}
        return Response(pieces(), status=200, mimetype="text/xml", headers=headers)
