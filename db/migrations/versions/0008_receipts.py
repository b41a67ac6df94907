"""receipts: the audit records what an association stored once, not one chained row per instance

Revision ID: 0008_receipts
Revises: 0007_web_sessions
Create Date: 2026-12-02

A `receipts` row per association (drop-in case, re-ingest); `instances.receipt` names it, and
`series.completed_by` the rule that closed a series (dicom_node/completion.py). Rows received before
this revision keep their `instance.received` audit rows: the chain is untouched, `rtprop audit verify`
proves them by those rows and newer ones by their receipt's digest (db/receipts.py).
"""
from alembic import op
import sqlalchemy as sa


revision = "0008_receipts"
down_revision = "0007_web_sessions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "receipts",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("received_by", sa.String(length=128), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("peer_address", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("how", sa.String(length=16), nullable=False),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("receipts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_receipts_closed_at"), ["closed_at"], unique=False)
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("receipt", sa.String(length=32), nullable=False, server_default=""))
        batch_op.create_index(batch_op.f("ix_instances_receipt"), ["receipt"], unique=False)
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("completed_by", sa.String(length=16), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("completed_by")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_receipt"))
        batch_op.drop_column("receipt")
    with op.batch_alter_table("receipts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_receipts_closed_at"))
    op.drop_table("receipts")
