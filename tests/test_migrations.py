"""Alembic is the only way the schema is made: the migrated database must match the code's tables."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from proxy.migrate import alembic_config, upgrade
from proxy.db import metadata


def test_migrated_schema_matches_the_tables_the_code_uses(database_url):
    engine = create_engine(database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert diff == []


def test_upgrade_downgrade_upgrade_on_a_fresh_database(tmp_path):
    from alembic import command
    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    upgrade(url)
    command.downgrade(alembic_config(url), "base")
    engine = create_engine(url)
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    upgrade(url)
    assert {"windows", "messages", "send_attempts"} <= set(inspect(create_engine(url)).get_table_names())
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
            assert conn.execute(text(f"SELECT version_num FROM {schema}.alembic_version")).scalars().all() == ["0003"]
    finally:
        blocker.close()
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        engine.dispose()
