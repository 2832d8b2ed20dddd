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
