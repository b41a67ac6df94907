"""web sessions kept on the server (a login can be ended: logout, users disable, new password, idle);
site settings (the fingerprint of the site's pseudonym key, kept outside the database)

Revision ID: 0007_web_sessions
Revises: 0006_job_routes
Create Date: 2026-12-06

The session cookie carries a random id; its SHA-256 is the row's key, so the cookie alone proves
nothing once the row is ended. `site_settings` holds the SHA-256 of the pseudonym key (db/audit.py),
so a missing or different key file is noticed. Portable types only (SQLite and PostgreSQL).
"""
from alembic import op
import sqlalchemy as sa


revision = "0007_web_sessions"
down_revision = "0006_job_routes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("client", sa.String(length=64), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_reason", sa.String(length=16), nullable=False, server_default=""),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_sha256"),
    )
    op.create_index("ix_web_sessions_user_id", "web_sessions", ["user_id"], unique=False)
    op.create_table(
        "site_settings",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("site_settings")
    op.drop_index("ix_web_sessions_user_id", "web_sessions")
    op.drop_table("web_sessions")
