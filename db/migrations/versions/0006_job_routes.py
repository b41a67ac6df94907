"""jobs: where the result goes (decided when the job is created), the engine queue, the result's UID

Revision ID: 0006_job_routes
Revises: 0005_models
Create Date: 2026-12-10

- `route` (JSON, null for jobs created before this revision, which are still routed when they are
  delivered): the destination and dry-run decided from the receiving node's routes when the job
  was created (dicom_node/routing.py `JobRoute`), so a worker needs no routes of its own and a change
  of routes applies to new jobs only.
- `queue`: the job engine's queue (`cpu`, `gpu`) of the models routed to its structures.
- `result_sop_instance_uid`: the SOP Instance UID of the RTSTRUCT the job wrote
  (`rtstruct_sop_instance_uid` is the prompt's).
Portable types only: runs on SQLite and PostgreSQL.
"""
from alembic import op
import sqlalchemy as sa


revision = "0006_job_routes"
down_revision = "0005_models"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("route", sa.JSON(), nullable=True))
    op.add_column("jobs", sa.Column("queue", sa.String(length=16), nullable=False, server_default="cpu"))
    op.add_column("jobs", sa.Column("result_sop_instance_uid", sa.String(length=64), nullable=False,
                                    server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("result_sop_instance_uid")
        batch.drop_column("queue")
        batch.drop_column("route")
