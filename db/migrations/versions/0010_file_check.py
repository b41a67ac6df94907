"""jobs.self_check_dice is jobs.file_check_dice: it checks the written file, not the contour

Revision ID: 0010_file_check
Revises: 0009_revisions
Create Date: 2026-12-05

The value is the Dice between the written RTSTRUCT read back and the masks it was written from
(pipeline/file_check.py): whether the file carries what was computed, never how good the contour
is. Named "self-check Dice", it was read as quality (1.000 on a contour about something else), so the
column carries the name of what it measures. ALTER TABLE ... RENAME COLUMN runs on SQLite (>= 3.25)
and PostgreSQL alike; the values are kept.
"""
from alembic import op

revision = "0010_file_check"
down_revision = "0009_revisions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE jobs RENAME COLUMN self_check_dice TO file_check_dice")


def downgrade() -> None:
    op.execute("ALTER TABLE jobs RENAME COLUMN file_check_dice TO self_check_dice")
