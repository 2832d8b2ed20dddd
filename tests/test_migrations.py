"""Alembic is the only way the schema is made: the migrated database must match the code's tables."""

from datetime import datetime, timezone

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, delete, insert, inspect, select, text

from proxy.migrate import alembic_config, head_revision, upgrade
from proxy.db import held_messages, metadata, outbox
from tests.conftest import ACCOUNT_SID, BUSINESS, USER


def test_migrated_schema_matches_the_tables_the_code_uses(database_url):
    engine = create_engine(database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert diff == []


def test_upgrade_downgrade_upgrade_on_a_fresh_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    upgrade(url)
    command.downgrade(alembic_config(url), "base")
    engine = create_engine(url)
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    upgrade(url)
    assert {"windows", "messages", "send_attempts"} <= set(inspect(create_engine(url)).get_table_names())
    engine.dispose()


def test_sqlite_autoincrement_is_as_the_tables_declare(tmp_path):
    """compare_metadata does not compare table options: AUTOINCREMENT (ids never given twice) is checked here."""
    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        ddl = dict(conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'table'")).all())
    engine.dispose()
    assert {name: "AUTOINCREMENT" in ddl[name] for name in metadata.tables} == \
        {name: table.dialect_options["sqlite"]["autoincrement"] for name, table in metadata.tables.items()}
    assert {"outbox", "held_messages"} <= {name for name in metadata.tables if "AUTOINCREMENT" in ddl[name]}


@pytest.fixture
def empty_database(database_url, tmp_path):
    """An empty database of the kind under test: a SQLite file, or a PostgreSQL schema of its own."""
    if not database_url.startswith("postgresql"):
        yield f"sqlite:///{tmp_path / 'empty.sqlite3'}"
        return
    schema = "migration_rows"
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{database_url}{'&' if '?' in database_url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        engine.dispose()


def test_0004_keeps_every_outbox_and_hold_row_with_its_id(empty_database):
    """0004 rebuilds SQLite's outbox and held_messages with AUTOINCREMENT (nothing to do on PostgreSQL): a
    database with rows keeps them all, ids and indexes included, and no id is given again, even once the
    newest rows are purged. Down to 0003 and up again keeps them too."""
    url = empty_database
    upgrade(url, "0003")
    engine = create_engine(url)
    at = datetime(2026, 11, 1, tzinfo=timezone.utc)
    with engine.begin() as conn:
        for status in ("delivered", "delivered", "pending", "exhausted", "uncertain"):
            conn.execute(insert(outbox).values(kind="inbound", ordering_key="k", target="http://app",
                                               headers='{"X-Proxy-Window-Expires-At": "x"}', body='[["Body", "hi"]]',
                                               status=status, attempts=2, next_attempt_at=at, last_error="503",
                                               created_at=at, updated_at=at, delivered_at=at))
        for status in ("released", "expired", "held", "sending"):
            conn.execute(insert(held_messages).values(sender=BUSINESS, user=USER, account_sid=ACCOUNT_SID,
                                                      params='[["Body", "x"]]', status=status, request_id="r",
                                                      created_at=at, expires_at=at, message_sid="SM" + "8" * 32))
        conn.execute(delete(outbox).where(outbox.c.id == 2))  # a gap, as purges leave
        conn.execute(delete(held_messages).where(held_messages.c.id == 1))
        if engine.dialect.name == "sqlite":  # an upgrade killed during its copy left its new table behind
            conn.execute(text("CREATE TABLE _alembic_tmp_outbox (id INTEGER)"))
    tables = (outbox, held_messages)
    inspector = inspect(engine)
    indexes = {table.name: inspector.get_indexes(table.name) for table in tables}

    def rows():
        with engine.connect() as conn:
            return {table.name: conn.execute(select(table).order_by(table.c.id)).all() for table in tables}

    before = rows()
    assert [row.id for row in before["outbox"]] == [1, 3, 4, 5] and [row.id for row in before["held_messages"]] == [2, 3, 4]
    engine.dispose()

    upgrade(url, "0004")
    assert rows() == before
    inspector = inspect(engine)
    assert {table.name: inspector.get_indexes(table.name) for table in tables} == indexes
    assert "_alembic_tmp_outbox" not in inspector.get_table_names()
    given = {table.name: max(row.id for row in before[table.name]) for table in tables}
    for _ in range(2):  # the next id is above every id given; then the newest rows are purged, and again
        with engine.begin() as conn:
            new_ids = {
                "outbox": conn.execute(insert(outbox).values(
                    kind="inbound", ordering_key="k", target="http://app", headers="{}", body="[]", status="delivered",
                    attempts=1, next_attempt_at=at, created_at=at, updated_at=at).returning(outbox.c.id)).scalar_one(),
                "held_messages": conn.execute(insert(held_messages).values(
                    sender=BUSINESS, user=USER, account_sid=ACCOUNT_SID, params="[]", status="released",
                    request_id="r", created_at=at, expires_at=at).returning(held_messages.c.id)).scalar_one(),
            }
            assert all(new_ids[name] > given[name] for name in given), (new_ids, given)
            for table in tables:
                conn.execute(delete(table).where(table.c.id >= given[table.name]))
            given = new_ids
    after = rows()
    engine.dispose()

    command.downgrade(alembic_config(url), "0003")
    assert rows() == after
    assert {table.name: inspect(engine).get_indexes(table.name) for table in tables} == indexes
    upgrade(url)
    assert rows() == after
    engine.dispose()


def test_a_missing_table_or_column_is_told_from_an_outage(database_url):
    """On the database under test (SQLite words, PostgreSQL's SQLSTATE): what `schema_missing` keys on."""
    import pytest
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from proxy.migrate import head_revision, revision_at_start, schema_missing

    engine = create_engine(database_url)
    assert revision_at_start(engine) == head_revision()
    for sql in ("SELECT * FROM no_such_table_here", "SELECT no_such_column_here FROM windows"):
        with pytest.raises(SQLAlchemyError) as missing, engine.connect() as conn:
            conn.execute(text(sql))
        assert schema_missing(missing.value)
    with pytest.raises(SQLAlchemyError) as other, engine.connect() as conn:
        conn.execute(text("SELEC 1"))  # a syntax error is no missing migration
    assert not schema_missing(other.value)
    engine.dispose()


def test_revision_at_start_on_a_fresh_and_a_partly_migrated_database(tmp_path):
    from proxy.migrate import revision_at_start

    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    engine = create_engine(url)
    assert revision_at_start(engine) is None  # no alembic_version table at all
    upgrade(url, "0001")
    assert revision_at_start(engine) == "0001"
    engine.dispose()


def test_concurrent_upgrades_on_postgresql_take_turns(database_url):
    """Two release phases at once (two deploys, or a one-off `db upgrade` beside the release): the second
    failed with a traceback, `duplicate key value violates unique constraint "pg_type_typname_nsp_index"`."""
    import subprocess
    import sys
    import time

    import pytest
    from sqlalchemy import text

    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: SQLite's migrations take the proxy's write lock")
    schema = "concurrent_upgrade"
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = f"{database_url}{'&' if '?' in database_url else '?'}options=-csearch_path%3D{schema}"
    upgrade(url, "0002")
    blocker = engine.connect()
    try:
        with blocker.begin():  # every run meets 0002 at once, when this lets go
            blocker.execute(text(f"LOCK TABLE {schema}.alembic_version IN ACCESS EXCLUSIVE MODE"))
            runs = [subprocess.Popen([sys.executable, "-c", f"from proxy.migrate import upgrade; upgrade({url!r})"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(8)]
            for _ in range(200):
                blocker.execute(text("SELECT pg_stat_clear_snapshot()"))  # read anew, inside this transaction
                waiting = blocker.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                               "AND datname = current_database()")).scalar()
                if waiting >= 8:
                    break
                time.sleep(0.05)
        outputs = [run.communicate(timeout=60)[0] for run in runs]
        assert [run.returncode for run in runs] == [0] * 8, outputs
        with engine.connect() as conn:
            assert conn.execute(text(f"SELECT version_num FROM {schema}.alembic_version")).scalars().all() == \
                [head_revision()]
    finally:
        blocker.close()
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        engine.dispose()


@pytest.mark.parametrize("direction", ["upgrade", "downgrade"])
def test_0005_under_live_traffic_waits_for_the_app_instead_of_deadlocking(empty_database, direction):
    """The release phase runs while the old instances serve. 0005 took a SHARE lock on the outbox (its CREATE
    INDEX), then waited for ACCESS EXCLUSIVE (its DROP INDEX) behind an app transaction that had read the outbox,
    and that transaction's INSERT then waited behind the SHARE lock: `deadlock detected`, the upgrade failed."""
    import subprocess
    import sys
    import time

    url = empty_database
    if not url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: SQLite's migrations take the proxy's write lock")
    upgrade(url, "0004" if direction == "upgrade" else "0005")
    engine = create_engine(url)
    at = datetime(2026, 11, 1, tzinfo=timezone.utc)
    script = ("from alembic import command; from proxy.migrate import alembic_config; "
              f"command.{direction}(alembic_config({url!r}), {'head' if direction == 'upgrade' else '0004'!r})")
    try:
        with engine.connect() as app:
            with app.begin():  # an app transaction that has read the outbox, as an inbound webhook's does
                app.execute(select(outbox.c.id).limit(1)).all()
                run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
                for _ in range(200):  # until the migration waits on the app's lock
                    app.execute(text("SELECT pg_stat_clear_snapshot()"))
                    if app.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                        "AND datname = current_database()")).scalar():
                        break
                    time.sleep(0.05)
                else:
                    pytest.fail("the migration never waited for the app's transaction")
                app.execute(insert(outbox).values(kind="inbound", ordering_key="k", target="http://app", headers="{}",
                                                  body="[]", status="pending", attempts=0, next_attempt_at=at,
                                                  created_at=at, updated_at=at))
            output = run.communicate(timeout=60)[0]
        assert run.returncode == 0, output
        with engine.connect() as conn:
            assert conn.execute(select(outbox.c.id)).scalars().all() == [1]
    finally:
        engine.dispose()
