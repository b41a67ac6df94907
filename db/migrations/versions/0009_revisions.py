"""revisions: a reviewer's corrections to a job's result, one numbered row per correction or undo

Revision ID: 0009_revisions
Revises: 0008_receipts
Create Date: 2026-12-10

One row per revision of a job's result (revision 0 is the job's own result and has no row): who
made it and when, what (a correction on one ROI, or an undo), the ROI's corrections in force after
it, the ROI's mask (an NPZ file) and the RTSTRUCT holding every ROI as it then stands. (job_id,
number) is unique: the compare-and-set two reviewers race on (pipeline/revisions.py). Portable types
only: runs on SQLite and PostgreSQL.
"""
import sqlalchemy as sa
from alembic import op

revision = "0009_revisions"
down_revision = "0008_receipts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "revisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("roi", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("correction", sa.JSON(), nullable=True),
        sa.Column("corrections", sa.JSON(), nullable=False),
        sa.Column("previous", sa.Integer(), nullable=False),
        sa.Column("restores", sa.Integer(), nullable=True),
        sa.Column("mask_path", sa.Text(), nullable=False),
        sa.Column("rtstruct_path", sa.Text(), nullable=False),
        sa.Column("rtstruct_sha256", sa.String(length=64), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.Column("user", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "number", name="uq_revisions_job_number"),
    )


def downgrade() -> None:
    op.drop_table("revisions")
