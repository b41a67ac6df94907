"""models: the model registry (registered checkpoints, where each is active, last evaluation)

Revision ID: 0005_models
Revises: 0004_engine
Create Date: 2026-12-01

One row per model; the weight-free `classic` backend is a row from the start (registered, no
checkpoint), so it can be evaluated, compared and activated like any other model. Portable types
only (String/Text/Integer/JSON/DateTime): runs on SQLite and PostgreSQL.
"""
from datetime import datetime, timezone

from alembic import op
import sqlalchemy as sa


revision = "0005_models"
down_revision = "0004_engine"
branch_labels = None
depends_on = None


def upgrade() -> None:
    models = op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("backend", sa.String(length=16), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("model_cfg", sa.String(length=255), nullable=False),
        sa.Column("image_size", sa.Integer(), nullable=True),
        sa.Column("card", sa.JSON(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("roi_regex", sa.String(length=255), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("evaluation", sa.JSON(), nullable=True),
        sa.Column("evaluated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("added_by", sa.String(length=64), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("activated_by", sa.String(length=64), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_models_sha256"), ["sha256"], unique=False)
        batch_op.create_index(batch_op.f("ix_models_state"), ["state"], unique=False)
    op.bulk_insert(models, [{
        "name": "classic", "backend": "classic", "path": "", "sha256": "", "model_cfg": "", "image_size": None,
        "card": None, "state": "registered", "roi_regex": "", "modality": "", "evaluation": None,
        "evaluated_at": None, "added_by": "rtprop", "added_at": datetime.now(timezone.utc), "activated_by": "",
        "activated_at": None,
    }])


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_models_state"))
        batch_op.drop_index(batch_op.f("ix_models_sha256"))
    op.drop_table("models")
