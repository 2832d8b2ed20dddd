"""The outbox worker: delivers forwarded webhooks with backoff, releases held messages, sends fallbacks."""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import replace
from datetime import datetime, timedelta

from sqlalchemy.exc import OperationalError
from werkzeug.datastructures import MultiDict

from . import attempts, holds, late_failures, logs, outbox
from .db import unavailable_reason, utcnow, writing
from .errors import ApiError
from .forwarding import too_large
from .judge import Judgement, judge
from .migrate import schema_hint, schema_missing
from .policy import Action
from .rules import OUTSIDE_WINDOW
from .runtime import Runtime
from .settings import ATTEMPT_FLUSH_SECONDS, LEASE_MARGIN_SECONDS
from .upstream import UpstreamError


# Items a worker claimed at once before its deliveries ran concurrently; the batch is at least this many.
CLAIM_BATCH = 10
# How often a worker waiting for its deliveries looks at its stop event (SIGTERM).
STOP_CHECK_SECONDS = 0.1


class Retry(Exception):
    """Deliver this item again later, per the retry schedule."""


class GiveUp(Exception):
    """This item cannot succeed (or could send twice if retried): exhaust it now."""


class NotYet(Retry):
    """Expected to succeed later, per the kind's own schedule: logged at INFO, not as a failure."""


class MaybeSent(GiveUp):
    """Twilio may have taken this create (no answer, a 5xx, a broken connection): never sent again."""


class Skip(Exception):
    """Another worker has claimed this item since: it is that worker's now."""


class Worker:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self._maintained = 0.0  # time.monotonic() of the last expiry of old holds and abandoned sends

    def run_once(self, now: datetime | None = None, stop: threading.Event | None = None, *,
                 refill: bool = False) -> int:
        """Expire old holds, then claim and deliver the due items; returns how many were claimed.

        A batch holds one item per ordering key (each the oldest pending one of its conversation), so its
        items are delivered at once, WORKER_CONCURRENCY at most, without changing any conversation's order.
        Once `stop` is set (SIGTERM) the deliveries under way end and the items not started are handed
        back, claimable at once: a batch of deliveries one after another took longer than a platform's grace.

        `refill` (run_forever): as deliveries end, the slots they free take the next due items, a
        conversation's next one included, until nothing is due and none is under way; otherwise every
        batch waited for its slowest delivery, and one slow answer in ten held back the other nine slots."""
        now, started = now or utcnow(), time.monotonic()
        self._maintain(now)
        with writing(self.rt.engine) as conn:
            # A claimed item is this worker's for the lease; a crashed worker's items come back after it.
            items = outbox.claim(conn, now, self.rt.settings.outbox_lease_seconds, limit=self.batch_size)
        return self._deliver(items, lambda: now + timedelta(seconds=time.monotonic() - started), stop,
                             more=self._more if refill else None)

    def _maintain(self, now: datetime) -> None:
        with writing(self.rt.engine) as conn:
            if not self.rt.settings.hold_on_reroute:  # turned off with messages still held: still released
                for sender, user in holds.release_where_written(conn, now,
                                                                self.rt.settings.window_safety_margin_seconds):
                    logs.event("release", redact=self.rt.settings.log_redact_numbers, decision="queued",
                               reason="hold_on_reroute_off", sender=sender, user=user)
            for row in holds.expire(conn, now):
                logs.event("hold_expired", redact=self.rt.settings.log_redact_numbers, decision="dropped",
                           held_id=row.id, sender=row.sender, user=row.user, request_id=row.request_id)
            for row in holds.abandoned(conn, now, self.rt.settings.outbox_lease_seconds):
                level = {holds.UNCERTAIN: logging.ERROR, holds.FAILED: logging.WARNING}.get(row["status"], logging.INFO)
                logs.event("release", redact=self.rt.settings.log_redact_numbers, level=level, decision=row["status"],
                           reason="abandoned", held_id=row["id"], message_sid=row["message_sid"], error=row["error"],
                           sender=row["sender"], user=row["user"], request_id=row["request_id"])
            for row in outbox.abandoned(conn, now):
                logs.event("delivery", redact=True, level=logging.ERROR, decision="failed", kind=row.kind,
                           outbox_id=row.id, attempt=row.attempts + 1, outcome=outbox.UNCERTAIN,
                           error=outbox.ABANDONED)
        self._maintained = time.monotonic()

    def _more(self, limit: int) -> list[outbox.Item]:
        """Up to `limit` due items, claimed now; old holds expired as often as a poll would."""
        now = utcnow()
        if time.monotonic() - self._maintained >= self.rt.settings.worker_poll_seconds:
            self._maintain(now)
        with writing(self.rt.engine) as conn:
            return outbox.claim(conn, now, self.rt.settings.outbox_lease_seconds, limit=limit)

    @property
    def batch_size(self) -> int:
        """Items claimed at once: every delivery slot filled, and at least the CLAIM_BATCH of old."""
        return max(CLAIM_BATCH, self.rt.settings.worker_concurrency)

    def _deliver(self, items: list[outbox.Item], clock, stop: threading.Event | None, more=None) -> int:
        """`process` each item in a thread of its own, WORKER_CONCURRENCY at once, the next as one ends;
        with `more`, a slot free with none waiting takes the next batch `more(n)` claims. Returns how many
        items were claimed.

        Each thread takes its own connections (`writing`, per write): none is shared between threads.
        On `stop`, or a delivery's error (the database gone: raised once the others have ended, as before),
        no other starts; on `stop` the ones not started are handed back.

        The threads take their items from one queue and report on another: a future and a `wait` per
        delivery (concurrent.futures) were a fifth of the worker's CPU, the main thread's mostly."""
        concurrency, waiting = self.rt.settings.worker_concurrency, deque(items)
        count, running, threads = len(items), 0, []
        todo, finished = queue.SimpleQueue(), queue.SimpleQueue()
        error: BaseException | None = None

        def slot():
            while (job := todo.get()) is not None:
                try:
                    self.process(*job)
                except BaseException as exc:  # noqa: BLE001 — reported to the loop below, raised there
                    finished.put(exc)
                else:
                    finished.put(None)

        def start(item: outbox.Item) -> None:
            nonlocal running
            if running == len(threads):  # every thread has a delivery: one more, WORKER_CONCURRENCY at most
                thread = threading.Thread(target=slot, name=f"delivery_{len(threads)}", daemon=True)
                thread.start()
                threads.append(thread)
            todo.put((item, clock()))
            running += 1

        # Asked again as soon as a delivery ends, or a poll's time after nothing (more) was due.
        ask_at = time.monotonic() + self.rt.settings.worker_poll_seconds
        try:
            while waiting or running:
                stopping = stop is not None and stop.is_set()
                if waiting and stopping and error is None:
                    with writing(self.rt.engine) as conn:
                        for rest in waiting:
                            outbox.unclaim(conn, rest, utcnow())
                    waiting.clear()
                while waiting and error is None and running < concurrency:
                    start(waiting.popleft())
                if (more is not None and not waiting and running < concurrency and not stopping and error is None
                        and time.monotonic() >= ask_at):
                    # A batch at a time, not a slot at a time: one claim statement per batch, not per delivery.
                    try:
                        claimed = more(self.batch_size)
                    except Exception as exc:  # noqa: BLE001 — the database gone: as a delivery's error
                        claimed, error = [], exc
                    count += len(claimed)
                    waiting.extend(claimed)
                    while waiting and running < concurrency:
                        start(waiting.popleft())
                    ask_at = time.monotonic() + (0 if claimed else self.rt.settings.worker_poll_seconds)
                if not running:
                    break
                # In slices while `stop` may come: what is still waiting goes back as soon as it does.
                try:
                    outcome = finished.get(timeout=STOP_CHECK_SECONDS if stop is not None else None)
                except queue.Empty:
                    continue
                while True:  # every delivery that has ended by now
                    running -= 1
                    if outcome is not None and error is None:
                        error = outcome
                    try:
                        outcome = finished.get_nowait()
                    except queue.Empty:
                        break
                ask_at = time.monotonic()
        finally:
            for _ in threads:  # each ends after the delivery it has, if any
                todo.put(None)
            for thread in threads:
                thread.join()
        if error is not None:
            raise error
        return count

    def run_forever(self, stop: threading.Event) -> None:
        # Said once, not with a traceback every poll, until the migrations are applied or the database is back.
        unmigrated = unavailable = False
        while not stop.is_set():
            try:
                busy = self.run_once(stop=stop, refill=True)
                unmigrated = False
                if unavailable:
                    logs.log.info("database_available")
                    unavailable = False
            except Exception as exc:  # noqa: BLE001 — a database hiccup must not kill the worker
                if schema_missing(exc):
                    if not unmigrated:
                        logs.log.error("migrations_not_at_head", extra={"error": type(exc).__name__,
                                                                        "detail": schema_hint(exc)})
                    unmigrated = True
                elif isinstance(exc, OperationalError):  # refused, timed out, locked: the driver's words say which
                    if not unavailable:
                        logs.log.error("database_unavailable", extra={"error": type(exc.orig).__name__,
                                                                      "detail": unavailable_reason(exc)})
                    unavailable = True
                else:
                    logs.log.exception("worker_error")
                busy = 0
            if not busy:
                stop.wait(self.rt.settings.worker_poll_seconds)

    def process(self, item: outbox.Item, now: datetime | None = None) -> None:
        started, settings, now = time.perf_counter(), self.rt.settings, now or utcnow()
        if item.lease_until is not None and (item.lease_until - now).total_seconds() >= \
                settings.longest_delivery_seconds + LEASE_MARGIN_SECONDS:
            # The claim's lease still outlasts this whole delivery, with the margin for other instances'
            # clocks: no one else can have claimed it, and it stays this worker's to the end. Renewing it
            # anyway was one more write transaction per delivery.
            lease = item.lease_until
        else:
            # Waited in its batch long enough that the claim's lease could run out during the delivery (or
            # has): renewed for a whole OUTBOX_LEASE_SECONDS, unless another worker has claimed it since.
            with writing(self.rt.engine) as conn:
                lease = outbox.keep(conn, item, now, settings.outbox_lease_seconds)
            if lease is None:
                self._skipped(item)
                return
            item = replace(item, lease_until=lease)
        leases = [lease]  # a release renews its lease as it goes: the failure below is recorded under the last one
        handler = {"inbound": self._forward, "status": self._forward, "send": self._send,
                   "release": lambda it: self._release(it, leases), late_failures.KIND: self._late_failure}[item.kind]
        try:
            try:
                app_status = handler(item)
            except (Retry, GiveUp, Skip):
                raise
            except ApiError as exc:  # a judgement that could not be made now (e.g. Content API down)
                raise (Retry if exc.status >= 500 else GiveUp)(f"{exc.code}: {exc.message}") from None
            except Exception as exc:  # noqa: BLE001 — one bad item must not stall the batch
                logs.log.exception("delivery_error", extra={"outbox_id": item.id, "kind": item.kind})
                raise Retry(type(exc).__name__) from None
        except Skip:
            self._skipped(item)
            return
        except (Retry, GiveUp) as exc:
            schedule = late_failures.RECHECK_SECONDS if item.kind == late_failures.KIND else settings.retry_schedule
            with writing(self.rt.engine) as conn:
                status = outbox.failed(conn, item.id, str(exc), utcnow(), schedule, retry=isinstance(exc, Retry),
                                       lease=leases[-1], uncertain=isinstance(exc, MaybeSent))
            deferred = isinstance(exc, NotYet) and status == outbox.PENDING
            level = logging.ERROR if status == outbox.UNCERTAIN else logging.INFO if deferred else logging.WARNING
            logs.event("delivery", redact=settings.log_redact_numbers, level=level,
                       decision="deferred" if deferred else "failed", kind=item.kind, outbox_id=item.id,
                       attempt=item.attempts + 1, outcome=status, error=str(exc), duration_ms=_ms(started))
            return
        with writing(self.rt.engine) as conn:
            recorded = outbox.delivered(conn, item.id, utcnow(), leases[-1])
        if not recorded:  # overran its lease: the worker that claimed the item since records its outcome
            logs.event("delivery", redact=settings.log_redact_numbers, level=logging.WARNING, decision="delivered",
                       kind=item.kind, outbox_id=item.id, attempt=item.attempts + 1, app_status=app_status,
                       outcome="lease_lost", duration_ms=_ms(started))
            return
        # The app's own refusal (a 4xx other than NOT_TAKEN_4XX) is its answer, delivered: said louder all the same.
        logs.event("delivery", redact=settings.log_redact_numbers, decision="delivered", kind=item.kind,
                   level=logging.WARNING if app_status and app_status >= 400 else logging.INFO,
                   outbox_id=item.id, attempt=item.attempts + 1, app_status=app_status, duration_ms=_ms(started))

    def _skipped(self, item: outbox.Item) -> None:
        logs.event("delivery", redact=self.rt.settings.log_redact_numbers, decision="skipped", kind=item.kind,
                   outbox_id=item.id, reason="claimed_by_another_worker")

    def _forward(self, item: outbox.Item) -> int:
        """Post a queued webhook to the app; the app's status."""
        # To the URL configured now: an operator who fixed a wrong or moved FORWARD_*_URL (or its credentials)
        # and replays the backlog means the new one. The URL it was queued for only when none is set any more.
        settings = self.rt.settings
        target = (settings.forward_inbound_url if item.kind == "inbound" else settings.forward_status_url) \
            or item.target
        reply = self.rt.forwarder.post(target, [tuple(p) for p in item.body], outbox.with_id(item))
        if not reply.ok:
            raise (GiveUp if reply.final else Retry)(reply.error or "failed")
        if reply.too_large:  # delivered all the same: the app had the webhook
            too_large(reply, redact=self.rt.settings.log_redact_numbers, kind=item.kind, outbox_id=item.id)
        return reply.status

    def _send(self, item: outbox.Item) -> None:
        """A fallback template after a late 63016: judged like any send, then sent with the account's auth,
        at most once: marked `sending` before the create, like a held message."""
        started = time.perf_counter()
        pairs = [tuple(p) for p in item.body]
        judgement = judge(self.rt, MultiDict(pairs))
        if judgement.decision.action is not Action.ALLOWED:
            raise GiveUp(f"fallback not sendable: {judgement.decision.reason}")
        with writing(self.rt.engine) as conn:
            if not outbox.start_sending(conn, item, utcnow()):
                raise Skip()
        try:
            self.create(item.target, pairs, judgement, decision=FALLBACK, request_id=f"outbox-{item.id}",
                        started=started)
        except (Retry, GiveUp):
            raise
        except Exception as exc:  # noqa: BLE001 — whatever broke, the request may have gone out
            logs.log.exception("delivery_error", extra={"outbox_id": item.id, "kind": item.kind})
            raise MaybeSent(f"{type(exc).__name__} during the create; not retried, it may have been sent") from None

    def _late_failure(self, item: outbox.Item) -> None:
        """A late 63016 whose send was not recorded when the callback came (another process had it
        still in its attempt writer): the same handling, once per sid whichever path acts first."""
        sid, sender = item.target, dict(item.body).get("From") or None
        with writing(self.rt.engine) as conn:
            action = late_failures.handle(self.rt, conn, sid=sid, callback_sender=sender, now=utcnow())
        if action is not None:
            return
        checks = item.attempts + 1
        if checks < len(late_failures.RECHECK_SECONDS):
            raise NotYet("no send of the proxy's recorded with this sid yet")
        late_failures.not_a_proxy_send(self.rt, sid=sid, callback_sender=sender, checks=checks)

    def _release(self, item: outbox.Item, leases: list[datetime]) -> None:
        """Send the pair's held messages in their original order, each judged again now.

        One the window still keeps out (it closed again before the release ran) stays held, and so do the
        ones after it: the next message of the user releases them in order. One refused for what it is stays
        held too if that may change (a template paused, or not approved yet), and is marked failed if it cannot
        (rejected, disabled, a type WhatsApp does not take); either way the next one goes on: it held back every
        later one until they expired.
        `leases`: the item's lease, renewed before each message after the first, the current one last."""
        sender, user = item.target.split("\n", 1)
        settings = self.rt.settings
        with self.rt.engine.connect() as conn:
            held = holds.held_for(conn, sender, user, utcnow())
        for index, row in enumerate(held):
            if index:
                # Renewed whatever the last message's outcome: a run of creates Twilio timed out or refused
                # outlasted the lease, and a second worker ran the same release beside this one, out of order.
                with writing(self.rt.engine) as conn:
                    lease = outbox.keep_lease(conn, item.id, leases[-1], utcnow(), settings.outbox_lease_seconds)
                if lease is None:
                    raise Skip()  # another worker took the item over: it releases the rest (holds.take: never twice)
                leases.append(lease)
            started = time.perf_counter()
            pairs = holds.as_released([tuple(p) for p in json.loads(row["params"])], utcnow())
            try:
                judgement = judge(self.rt, MultiDict(pairs))
                decision = judgement.decision
            except ApiError as exc:
                if exc.status >= 500:  # the Content API or the database is away: try again later
                    raise Retry(f"{exc.code}: {exc.message}") from None
                self._mark(row, holds.FAILED, error=f"{exc.code}: {exc.message}", level=logging.WARNING,
                           expected=holds.HELD)
                continue
            if decision.action is not Action.ALLOWED and decision.code != OUTSIDE_WINDOW and (
                    judgement.send.approval in REFUSED_FOR_GOOD or decision.reason == "type_not_supported_on_whatsapp"):
                self._mark(row, holds.FAILED, error=f"{decision.code}: {decision.reason}, even inside the window",
                           level=logging.WARNING, expected=holds.HELD)
                continue
            if decision.action is not Action.ALLOWED:
                # The window closed again: keep it, and keep the order. A template paused or not approved yet
                # may be sendable by the user's next message: kept too, but the ones after it go on.
                logs.event("release", redact=settings.log_redact_numbers, decision="still_held", held_id=row["id"],
                           reason=decision.reason, sender=sender, user=user, request_id=row["request_id"])
                if decision.code == OUTSIDE_WINDOW:
                    return
                continue
            taken_at = utcnow()
            with writing(self.rt.engine) as conn:
                if not holds.take(conn, row["id"], taken_at):
                    continue  # another worker has it
            taken = dict(expected=holds.SENDING, taken_at=taken_at)  # this take's outcome, not a later one's
            try:
                sid = self.create(row["account_sid"], pairs, judgement, decision=RELEASED,
                                  request_id=row["request_id"], started=started)
            except Retry as exc:  # Twilio never received it: put it back in line
                with writing(self.rt.engine) as conn:
                    holds.mark(conn, row["id"], holds.HELD, utcnow(), error=str(exc), **taken)
                raise
            except MaybeSent as exc:  # never sent again: an operator checks Twilio's Messages list
                self._mark(row, holds.UNCERTAIN, error=str(exc), level=logging.ERROR, **taken)
                continue
            except GiveUp as exc:
                self._mark(row, holds.FAILED, error=str(exc), level=logging.WARNING, **taken)
                continue
            self._mark(row, holds.RELEASED, message_sid=sid, **taken)

    def _mark(self, row, status: str, *, expected: str, taken_at: datetime | None = None,
              message_sid: str | None = None, error: str | None = None, level: int = logging.INFO) -> None:
        with writing(self.rt.engine) as conn:
            if not holds.mark(conn, row["id"], status, utcnow(), message_sid=message_sid, error=error,
                              expected=expected, taken_at=taken_at):
                # Changed meanwhile: a late 63016 on this very message, come before its outcome was stored, has held
                # it again (or another worker has it). Said as it is; the row keeps what the other path set.
                status = "held_again_meanwhile" if status == holds.RELEASED else "superseded"
        logs.event("release", redact=self.rt.settings.log_redact_numbers, level=level, decision=status, held_id=row["id"],
                   message_sid=message_sid, error=error, sender=row["sender"], user=row["user"],
                   request_id=row["request_id"])

    def create(self, account_sid: str, pairs: list, judgement: Judgement, *, decision: str, request_id: str,
               started: float) -> str | None:
        """send_to_twilio, recorded in send_attempts like a gateway send (whatever came of it), so a late
        63016 on it is acted on too; `decision` tells the worker's creates from the gateway's."""
        answer = {"outcome": "upstream_error", "upstream_status": None, "message_sid": None}
        try:
            answer["message_sid"] = self.send_to_twilio(account_sid, pairs, answer)
            return answer["message_sid"]
        finally:
            self.rt.attempts.submit(attempts.row(
                judgement, account_sid=account_sid, request_id=request_id, params=pairs, decision=decision,
                duration_ms=_ms(started), **answer))
            # Stored before the item is marked done; a callback that still beats it is checked again later.
            self.rt.attempts.flush(ATTEMPT_FLUSH_SECONDS)

    def send_to_twilio(self, account_sid: str, pairs: list, answer: dict | None = None) -> str | None:
        """POST a Messages create with the configured account's credentials; `answer` gets its outcome.

        Only a request Twilio never received is retried: a timeout or an answer may mean it was sent.
        """
        settings, answer = self.rt.settings, {} if answer is None else answer
        token = base64.b64encode(f"{settings.account_sid}:{settings.auth_token}".encode()).decode()
        try:
            response = self.rt.upstream.request(
                "POST", f"/2010-04-01/Accounts/{account_sid}/Messages.json", data=pairs,
                headers={"Authorization": f"Basic {token}", "Accept": "application/json",
                         "Content-Type": "application/x-www-form-urlencoded"})
        except UpstreamError as exc:
            answer["outcome"] = f"upstream_{exc.kind}"
            if exc.kind == "unreachable":
                raise Retry(f"Twilio unreachable: {exc.detail}") from None
            raise MaybeSent(f"Twilio did not answer ({exc.detail}); not retried, it may have been sent") from None
        answer["upstream_status"] = response.status_code
        if response.status_code == 429:  # rate limited: Twilio did not take it
            raise Retry(f"Twilio answered {response.status_code}")
        if response.status_code >= 500:
            raise MaybeSent(f"Twilio answered {response.status_code}; not retried, it may have been accepted")
        if response.status_code >= 300:
            raise GiveUp(f"Twilio answered {response.status_code}: {self._twilio_error(response.text)}")
        answer["outcome"] = "sent"
        try:
            sid = json.loads(response.text).get("sid")
        except (ValueError, AttributeError):
            return None
        return sid if isinstance(sid, str) else None  # Twilio took it; a sid that is not text is not recorded

    def _twilio_error(self, text: str) -> str:
        """Twilio's error code and message, trimmed; logged and stored, so its numbers are masked
        (a 21211 quotes the `To` it refused) unless LOG_REDACT_NUMBERS=false."""
        try:
            body = json.loads(text)
            text = f"{body['code']} {body['message']}"
        except (ValueError, TypeError, KeyError, RecursionError):
            # Not Twilio's JSON (a firewall's or a load balancer's page): never its text, which may quote the
            # request, and so the message's body, into a log line and held_messages.last_error.
            return f"not Twilio's error body ({len(text)} characters)"
        return (logs.mask_numbers(text) if self.rt.settings.log_redact_numbers else text)[:200]


# Approval statuses a template does not come back from: a held message refused for one of them is failed.
REFUSED_FOR_GOOD = frozenset({"rejected", "disabled"})
# send_attempts decisions of the worker's own creates (the gateway's are its Action values).
RELEASED, FALLBACK = holds.RELEASE_DECISION, "fallback"


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
