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
