"""`flask --app proxy ...` commands: database migrations, content cache."""

from __future__ import annotations

from pathlib import Path

import click
from alembic import command
from alembic.config import Config
from flask import Flask

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def register(app: Flask) -> None:
    db = click.Group("db", help="Database schema (Alembic migrations).")

    @db.command("upgrade")
    @click.argument("revision", default="head")
    def db_upgrade(revision: str):
        """Apply migrations up to REVISION (default: head)."""
        upgrade(app.extensions["proxy"].settings.database_url, revision)
        click.echo(f"database at {revision}")

    @db.command("current")
    def db_current():
        """Show the revision the database is at."""
        command.current(alembic_config(app.extensions["proxy"].settings.database_url))

    app.cli.add_command(db)

    content = click.Group("content", help="The Content API cache (types and WhatsApp approvals).")

    @content.command("refresh")
    def content_refresh():
        """Fetch every Content and its approval (/v1/ContentAndApprovals) into the cache."""
        from .content import ContentUnavailable

        try:
            count = app.extensions["proxy"].content.refresh_all()
        except ContentUnavailable as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"cached {count} content templates")

    app.cli.add_command(content)
