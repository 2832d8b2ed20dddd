"""The durable outbox: enqueue, claim (row locks and leases), complete, retry with backoff, replay."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Integer, and_, bindparam, case, exists, func, literal, or_, select, update
from sqlalchemy.orm import aliased

from .db import outbox
from .prepared import Statements

PENDING, DELIVERED, EXHAUSTED = "pending", "delivered", "exhausted"
# A fallback send is not idempotent: `sending` is committed before its create, and one Twilio may have
# taken (no answer, a 5xx, or its worker died in the create) is `uncertain`: an operator's, never sent again.
SENDING, UNCERTAIN = "sending", "uncertain"
STATUSES = (PENDING, SENDING, DELIVERED, EXHAUSTED, UNCERTAIN)
ABANDONED = "the worker stopped during the create: Twilio may have taken it; not sent again"
OUTBOX_ID_HEADER = "X-Proxy-Outbox-Id"


@dataclass(frozen=True)
class Item:
    id: int
    kind: str
    ordering_key: str
    target: str
    headers: dict
    body: list
    attempts: int
    lease_until: datetime | None = None  # as claimed: while the row still has it, no one else has claimed it


def next_attempt_at(attempts_made: int, schedule: tuple[int, ...], now: datetime) -> datetime | None:
    """When to try again after `attempts_made` failed attempts; None when the schedule is used up."""
    if attempts_made >= len(schedule):
        return None
    return now + timedelta(seconds=schedule[attempts_made])


def enqueue(conn: Connection, *, kind: str, ordering_key: str, target: str, headers: dict, body: list,
            now: datetime, lease_until: datetime | None = None, due: datetime | None = None) -> int:
    """Store an item, due now or at `due`; with a lease, the caller tries it inline first and workers leave
    it alone meanwhile.

    The item's id is also put into `headers` as X-Proxy-Outbox-Id (`with_id` does it for the worker's
    attempts), so the inline attempt made with them carries the same id as every retry.
    """
    # Without an id an earlier run put in (a request's write may run twice, proxy/group_commit.py).
    stored = {name: value for name, value in headers.items() if name != OUTBOX_ID_HEADER}
    (item_id,) = _statement(conn, "enqueue").first(conn, {
        "kind": kind, "ordering_key": ordering_key[:300], "target": target, "headers": json.dumps(stored),
        "body": json.dumps(body), "status": PENDING, "attempts": 0, "next_attempt_at": due or now,
        "lease_until": lease_until, "created_at": now, "updated_at": now})
    headers[OUTBOX_ID_HEADER] = str(item_id)
    return item_id


def enqueue_in_turn(conn: Connection, *, kind: str, ordering_key: str, target: str, headers: dict, body: list,
                    now: datetime, lease_until: datetime, checked_at: datetime) -> tuple[int, str | None]:
    """`enqueue` an item leased for an inline attempt, and whether an earlier one of its key is still pending
    (as `earlier_pending` at `checked_at`): its id and that answer.

    On PostgreSQL one statement, one round trip per forwarded webhook less: the insert in a CTE, the earlier
    items read beside it (the snapshot before the insert, which is all the check needs: they have smaller ids).
    """
    stored = {name: value for name, value in headers.items() if name != OUTBOX_ID_HEADER}
    row = {"kind": kind, "ordering_key": ordering_key[:300], "target": target, "headers": json.dumps(stored),
           "body": json.dumps(body), "status": PENDING, "attempts": 0, "next_attempt_at": now,
           "lease_until": lease_until, "created_at": now, "updated_at": now}
    if conn.dialect.name != "postgresql":  # in-process SQLite: a second statement costs no round trip
        item_id = enqueue(conn, kind=kind, ordering_key=ordering_key, target=target, headers=headers, body=body,
                          now=now, lease_until=lease_until)
        return item_id, earlier_pending(conn, ordering_key, item_id, checked_at)
    rows = _statement(conn, "enqueue_in_turn").rows(conn, row)
    item_id = rows[0][0]
    headers[OUTBOX_ID_HEADER] = str(item_id)
    return item_id, _turn([lease for _, earlier_id, lease in rows if earlier_id is not None], checked_at)


def with_id(item: Item) -> dict:
    """The item's forwarding headers with its id: delivery is at-least-once, and the id is how the app
    recognises a second copy of one forward."""
    return {**item.headers, OUTBOX_ID_HEADER: str(item.id)}


def earlier_pending(conn: Connection, ordering_key: str, item_id: int, now: datetime) -> str | None:
    """Whether an earlier item of the key is still pending: "in_flight" while one is leased (being
    delivered), "queued" when one waits for a retry, None when none is left."""
    return _turn([lease for (lease,) in _statement(conn, "earlier_pending").rows(
        conn, {"ordering_key": ordering_key[:300], "item_id": item_id})], now)


def _turn(leases: list, now: datetime) -> str | None:
    if not leases:
        return None
    return "in_flight" if all(lease is not None and lease > now for lease in leases) else "queued"


def has_pending(conn: Connection, ordering_key: str) -> bool:
    return conn.execute(
        select(exists().where(outbox.c.ordering_key == ordering_key[:300], outbox.c.status == PENDING))
    ).scalar()


def release_lease(conn: Connection, item_id: int, held: datetime) -> None:
    """Leave the item to the workers now, if it is still under the caller's lease."""
    conn.execute(update(outbox).where(outbox.c.id == item_id, outbox.c.lease_until == held).values(lease_until=None))


def keep(conn: Connection, item: Item, now: datetime, lease_seconds: float) -> datetime | None:
    """Lease a claimed item afresh for its delivery: the new lease, or None if another worker has claimed it since.

    A worker delivers its batch WORKER_CONCURRENCY items at a time, so the last ones can outlive the
    claim's lease; any claim changes lease_until, so an unchanged one means the item is still this worker's.
    """
    return keep_lease(conn, item.id, item.lease_until, now, lease_seconds)


def keep_lease(conn: Connection, item_id: int, held: datetime | None, now: datetime,
               lease_seconds: float) -> datetime | None:
    """`keep` by the lease the caller holds: the new lease, or None when the item is no longer under it."""
    if held is None:  # `= NULL` is never true: a lease must be held to be kept
        return None
    found = _statement(conn, "keep_lease").first(
        conn, {"item_id": item_id, "held": held, "lease": now + timedelta(seconds=lease_seconds), "now": now})
    return found[0] if found else None


def unclaim(conn: Connection, item: Item, now: datetime) -> None:
    """Hand back a claimed item not yet started (the worker is stopping): claimable again at once."""
    conn.execute(update(outbox).where(outbox.c.id == item.id, outbox.c.status == PENDING,
                                      outbox.c.lease_until == item.lease_until)
                 .values(lease_until=None, updated_at=now))


def start_sending(conn: Connection, item: Item, now: datetime) -> bool:
    """Mark an item this worker holds (item.lease_until) as being sent; False if another worker has it.

    Committed before the create: a worker that dies during it leaves the item `sending`, which no claim
    takes again (`abandoned` hands it to an operator once its lease has run out).
    """
    return conn.execute(
        update(outbox)
        .where(outbox.c.id == item.id, outbox.c.status == PENDING, outbox.c.lease_until == item.lease_until)
        .values(status=SENDING, updated_at=now)
        .returning(outbox.c.id)
    ).first() is not None


def abandoned(conn: Connection, now: datetime) -> list:
    """Items still `sending` after their lease: their worker died during the create. Marked `uncertain`
    (the rows returned, for the one log line each): Twilio may have taken them."""
    return conn.execute(
        update(outbox).where(outbox.c.status == SENDING, outbox.c.lease_until < now)
        .values(status=UNCERTAIN, lease_until=None, updated_at=now,
                last_error=ABANDONED)
        .returning(outbox.c.id, outbox.c.kind, outbox.c.attempts)
    ).all()


def claim(conn: Connection, now: datetime, lease_seconds: float, limit: int = 10) -> list[Item]:
    """Lease up to `limit` due items, each the oldest pending one of its ordering key, the longest due first.

    On PostgreSQL the candidate rows are locked FOR UPDATE SKIP LOCKED, so concurrent workers pass over
    each other's rows, and leased in the same statement; SQLite has no row locks, but its writes take
    turns, so no other claim runs between the choice and the lease.
    """
    rows = _statement(conn, "claim").rows(conn, {"now": now, "limit": limit,
                                                 "lease": now + timedelta(seconds=lease_seconds)})
    # One statement (the ids chosen and leased together, on PostgreSQL under the rows' locks); RETURNING
    # keeps no order, so the claim's own is restored: the longest due first.
    rows.sort(key=lambda row: (row[-1], row[0]))
    return [Item(item_id, kind, key, target, json.loads(headers), json.loads(body), attempts, lease_until)
            for item_id, kind, key, target, headers, body, attempts, lease_until, _due in rows]


def _chosen(now, limit):
    """The ids of up to `limit` items `claim` may take, in the order it takes them."""
    candidate, earlier = aliased(outbox, name="candidate"), aliased(outbox, name="earlier")
    return (
        select(candidate.c.id)
        .where(
            candidate.c.status == literal(PENDING),
            candidate.c.next_attempt_at <= now,
            (candidate.c.lease_until.is_(None)) | (candidate.c.lease_until < now),
            ~exists().where(and_(earlier.c.ordering_key == candidate.c.ordering_key,
                                 earlier.c.status == literal(PENDING), earlier.c.id < candidate.c.id)),
        )
        .order_by(candidate.c.next_attempt_at, candidate.c.id)  # the index's order: it stops at `limit`
        .limit(limit)
        .with_for_update(skip_locked=True, of=candidate)
    )


def delivered(conn: Connection, item_id: int, now: datetime, lease: datetime) -> bool:
    """Mark an item delivered by the attempt holding `lease`; False when it no longer does.

    Like `failed`: an attempt that overran its lease must not overwrite what the worker that claimed the item
    since has recorded (`uncertain`, `exhausted`), nor mark done an item that worker is still delivering.
    """
    return bool(_statement(conn, "delivered").rows(conn, {"item_id": item_id, "now": now, "lease": lease}))


def failed(conn: Connection, item_id: int, error: str, now: datetime, schedule: tuple[int, ...],
           *, retry: bool = True, lease: datetime | None = None, uncertain: bool = False) -> str:
    """Record a failed attempt; schedule the next one, or exhaust the item (`uncertain`: Twilio may have
    taken it). Returns the new status.

    Only a pending (or `sending`) item still under `lease` (the attempt's own, when given): an attempt
    that overran its lease must not reschedule an item another worker claimed meanwhile (a third would
    claim it while the second still delivers), nor turn a delivered one back into pending.
    """
    current, attempts, held_until = conn.execute(
        select(outbox.c.status, outbox.c.attempts, outbox.c.lease_until).where(outbox.c.id == item_id)).one()
    if current not in (PENDING, SENDING) or (lease is not None and held_until != lease):
        return current
    attempts += 1
    when = next_attempt_at(attempts, schedule, now) if retry and not uncertain else None
    status = UNCERTAIN if uncertain else PENDING if when else EXHAUSTED
    # The lease read above rechecked in the update: on PostgreSQL the update may have waited on another worker's
    # claim of the row, committed after the read, and rechecks only what its WHERE names.
    done = conn.execute(update(outbox).where(outbox.c.id == item_id, outbox.c.status == current,
                                             outbox.c.lease_until.is_(None) if held_until is None
                                             else outbox.c.lease_until == held_until)
                        .values(status=status, attempts=attempts, next_attempt_at=when or now, lease_until=None,
                                last_error=error[:500], updated_at=now))
    if not done.rowcount:  # claimed by another worker (or settled) since the read: it is that worker's now
        return conn.execute(select(outbox.c.status).where(outbox.c.id == item_id)).scalar()
    return status


def listing(conn: Connection, status: str | None, limit: int = 100):
    query = select(outbox.c.id, outbox.c.kind, outbox.c.ordering_key, outbox.c.target, outbox.c.status,
                   outbox.c.attempts, outbox.c.next_attempt_at, outbox.c.last_error, outbox.c.created_at)
    if status:
        query = query.where(outbox.c.status == status)
    return conn.execute(query.order_by(outbox.c.id).limit(limit)).all()


def replay(conn: Connection, now: datetime, item_id: int | None = None) -> int:
    """Put exhausted items (one, or all) back in line for a fresh round of attempts.

    An `uncertain` one only by its id: an operator who found it missing from Twilio's Messages list.
    """
    query = update(outbox).where(outbox.c.status.in_((EXHAUSTED,) if item_id is None else (EXHAUSTED, UNCERTAIN)))
    if item_id is not None:
        query = query.where(outbox.c.id == item_id)
    return conn.execute(query.values(status=PENDING, attempts=0, next_attempt_at=now, lease_until=None,
                                      updated_at=now)).rowcount


def hurry(conn: Connection, item_id: int, now: datetime) -> bool:
    """Make a pending item waiting for its next attempt due now (its attempts so far still count); False
    when it is not pending, or is being delivered (leased) right now."""
    return conn.execute(
        update(outbox).where(outbox.c.id == item_id, outbox.c.status == PENDING,
                             (outbox.c.lease_until.is_(None)) | (outbox.c.lease_until < now))
        # one already due keeps its time: how long it has waited is what /metrics reports
        .values(next_attempt_at=case((outbox.c.next_attempt_at > now, now), else_=outbox.c.next_attempt_at),
                updated_at=now)
    ).rowcount == 1


def ahead_of(conn: Connection, item_id: int):
    """The first pending item of `item_id`'s conversation before it (its id and next attempt): the worker delivers
    that one first, whenever `item_id` is due. None when there is none."""
    earlier = aliased(outbox)
    return conn.execute(select(earlier.c.id, earlier.c.next_attempt_at)
                        .where(outbox.c.id == item_id, earlier.c.ordering_key == outbox.c.ordering_key,
                               earlier.c.status == PENDING, earlier.c.id < outbox.c.id)
                        .order_by(earlier.c.id).limit(1)).first()


def due_at(conn: Connection, item_id: int) -> datetime | None:
    return conn.execute(select(outbox.c.next_attempt_at).where(outbox.c.id == item_id)).scalar()


def status_of(conn: Connection, item_id: int) -> str | None:
    """An item's status; None when there is no such item."""
    return conn.execute(select(outbox.c.status).where(outbox.c.id == item_id)).scalar()


def oldest_due(conn: Connection, now: datetime) -> datetime | None:
    """When the longest-waiting item a worker could take became due (None when none is): a worker takes
    one within about a poll, so a long wait means no worker runs, or it is far behind.

    Like `claim`, only the oldest pending item of its ordering key: a newer one waiting behind an earlier one's
    retry is in order, not neglected.
    """
    earlier = aliased(outbox)
    # The first in the index's order rather than min(): PostgreSQL then stops at it instead of reading every
    # pending item (seconds per scrape on a backlog of tens of thousands).
    return conn.execute(select(outbox.c.next_attempt_at)
                        .where(outbox.c.status == PENDING, outbox.c.next_attempt_at <= now,
                               ~exists().where(and_(earlier.c.ordering_key == outbox.c.ordering_key,
                                                    earlier.c.status == PENDING, earlier.c.id < outbox.c.id)))
                        .order_by(outbox.c.next_attempt_at, outbox.c.id).limit(1)
                        ).scalar()


def depth(conn: Connection) -> dict[str, int]:
    rows = conn.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status)).all()
    return {status: count for status, count in rows}


_ENQUEUED = ("kind", "ordering_key", "target", "headers", "body", "status", "attempts", "next_attempt_at",
             "lease_until", "created_at", "updated_at")


# The statements every forwarded webhook and every delivery runs, compiled once per dialect (proxy/prepared.py).
def _build_enqueue(_dialect):
    return outbox.insert().returning(outbox.c.id)


def _build_enqueue_in_turn(_dialect):
    # PostgreSQL only (a data-modifying CTE): the new item's id, and each earlier pending item of its key
    # (id and lease; one row with a NULL id when there is none).
    values = {name: bindparam(name, type_=outbox.c[name].type) for name in _ENQUEUED}
    new = outbox.insert().values(values).returning(outbox.c.id).cte("new")
    earlier = aliased(outbox, name="earlier")
    return select(new.c.id, earlier.c.id, earlier.c.lease_until).select_from(new.outerjoin(earlier, and_(
        earlier.c.ordering_key == bindparam("ordering_key", type_=outbox.c.ordering_key.type),
        earlier.c.status == literal(PENDING), earlier.c.id < new.c.id)))


def _build_earlier_pending(_dialect):
    return select(outbox.c.lease_until).where(
        outbox.c.ordering_key == bindparam("ordering_key"), outbox.c.status == literal(PENDING),
        outbox.c.id < bindparam("item_id"))


def _build_delivered(_dialect):
    now = bindparam("now", type_=outbox.c.updated_at.type)
    being_sent = or_(outbox.c.status == literal(PENDING), outbox.c.status == literal(SENDING))
    return (update(outbox).where(outbox.c.id == bindparam("item_id"), being_sent,
                                 outbox.c.lease_until == bindparam("lease", type_=outbox.c.lease_until.type))
            .values(status=literal(DELIVERED), attempts=outbox.c.attempts + 1, lease_until=None, delivered_at=now,
                    updated_at=now, last_error=None)
            .returning(outbox.c.id))


def _build_claim(_dialect):
    now = bindparam("now", type_=outbox.c.next_attempt_at.type)
    # A CTE, evaluated once: PostgreSQL may run a plain IN (subquery) of an UPDATE more than once, and with
    # SKIP LOCKED each run can choose other rows (a claim of 2 leased 3). The chosen rows' conditions are not
    # checked again: PostgreSQL rechecks them as it locks each row (FOR UPDATE), and on SQLite the statement
    # runs under the write lock. Checked again, SQLite walked every pending item to find the ten.
    chosen = _chosen(now, bindparam("limit", type_=Integer())).cte("chosen")
    return (update(outbox)
            .where(outbox.c.id.in_(select(chosen.c.id)))
            .values(lease_until=bindparam("lease", type_=outbox.c.lease_until.type), updated_at=now)
            .returning(outbox.c.id, outbox.c.kind, outbox.c.ordering_key, outbox.c.target, outbox.c.headers,
                       outbox.c.body, outbox.c.attempts, outbox.c.lease_until, outbox.c.next_attempt_at))


def _build_keep_lease(_dialect):
    return (update(outbox)
            .where(outbox.c.id == bindparam("item_id"), outbox.c.status == literal(PENDING),
                   outbox.c.lease_until == bindparam("held", type_=outbox.c.lease_until.type))
            .values(lease_until=bindparam("lease", type_=outbox.c.lease_until.type),
                    updated_at=bindparam("now", type_=outbox.c.updated_at.type))
            .returning(outbox.c.lease_until))


_statement = Statements({
    "claim": (_build_claim, None),
    "keep_lease": (_build_keep_lease, None),
    "enqueue": (_build_enqueue, _ENQUEUED),
    "enqueue_in_turn": (_build_enqueue_in_turn, None),
    "earlier_pending": (_build_earlier_pending, None),
    "delivered": (_build_delivered, None),
})
