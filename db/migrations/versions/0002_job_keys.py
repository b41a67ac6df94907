"""patient keys on jobs, series and sends; the drop-in case and retry time on the job; the send outcome

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

- jobs.patient_id_hash, series.patient_id_hash, sends.patient_id_hash: every audit row of a patient's
  jobs and sends carries the key `rtprop audit export --patient-id` selects on (filled from the
  instances already received).
- jobs.dropin_case: the drop-in case a prompt came in (was looked up in the audit on every pass;
  filled from the `dropin.rtstruct` audit rows).
- jobs.not_before: a job put back after a transient error waits until then (backoff).
- jobs.waiting_for / waiting_since: what a received job waits for, and since when (shown, audited).
- sends.outcome: what the peer's last answer meant ("sent", "sent with warning ...", "failed ...").
Plain portable columns (SQLite and PostgreSQL); no table is rebuilt, so the audit triggers stay.
"""
import json

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('jobs', 'series', 'sends'):
        op.add_column(table, sa.Column('patient_id_hash', sa.String(length=64), nullable=False, server_default=''))
    op.add_column('jobs', sa.Column('dropin_case', sa.Text(), nullable=False, server_default=''))
    op.add_column('jobs', sa.Column('not_before', sa.DateTime(timezone=True), nullable=True))
    op.add_column('jobs', sa.Column('waiting_for', sa.Text(), nullable=False, server_default=''))
    op.add_column('jobs', sa.Column('waiting_since', sa.DateTime(timezone=True), nullable=True))
    op.add_column('sends', sa.Column('outcome', sa.Text(), nullable=False, server_default=''))
    op.create_index('ix_jobs_patient_id_hash', 'jobs', ['patient_id_hash'])

    bind = op.get_bind()
    hashes = dict(bind.execute(sa.text("SELECT sop_instance_uid, patient_id_hash FROM instances")).all())
    for job_id, rtstruct_uid in bind.execute(sa.text("SELECT id, rtstruct_sop_instance_uid FROM jobs")).all():
        if hashes.get(rtstruct_uid):
            bind.execute(sa.text("UPDATE jobs SET patient_id_hash = :h WHERE id = :i"),
                         {"h": hashes[rtstruct_uid], "i": job_id})
    bind.execute(sa.text(
        "UPDATE series SET patient_id_hash = COALESCE((SELECT MAX(i.patient_id_hash) FROM instances i "
        "WHERE i.series_instance_uid = series.series_instance_uid), '')"))
    bind.execute(sa.text(
        "UPDATE sends SET patient_id_hash = COALESCE((SELECT j.patient_id_hash FROM jobs j "
        "WHERE j.id = sends.job_id), '')"))
    bind.execute(sa.text("UPDATE sends SET outcome = 'sent' WHERE state = 'sent'"))
    for uid, details in bind.execute(sa.text(
            "SELECT sop_instance_uid, details FROM audit WHERE event = 'dropin.rtstruct' ORDER BY id")).all():
        case = str(json.loads(details or "{}").get("case", ""))
        if case:
            bind.execute(sa.text("UPDATE jobs SET dropin_case = :c WHERE rtstruct_sop_instance_uid = :u"),
                         {"c": case, "u": uid})


def downgrade() -> None:
    op.drop_index('ix_jobs_patient_id_hash', 'jobs')
    with op.batch_alter_table('sends') as batch_op:
        batch_op.drop_column('outcome')
        batch_op.drop_column('patient_id_hash')
    with op.batch_alter_table('series') as batch_op:
        batch_op.drop_column('patient_id_hash')
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.drop_column('waiting_since')
        batch_op.drop_column('waiting_for')
        batch_op.drop_column('not_before')
        batch_op.drop_column('dropin_case')
        batch_op.drop_column('patient_id_hash')
