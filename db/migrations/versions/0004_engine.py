"""distributed mode: one outbound row per job and destination; Procrastinate's queue on PostgreSQL

Revision ID: 0004_engine
Revises: 0003_web
Create Date: 2026-12-01

- uq_sends_job_destination: a job's result is queued at most once per destination, however often
  its task runs (both dialects; a unique index, so SQLite rebuilds no table). Rows without a job
  (batch results, `enqueue` by hand) have job_id NULL and are not constrained. Earlier releases
  made a new row for each re-send by a person: of such rows the newest keeps the job, the older
  ones are kept without it, their outcome saying which send replaced them (the audit keeps every
  attempt with its job either way).
- PostgreSQL only: the schema of the job engine, Procrastinate (procrastinate==3.10.0's own
  schema.sql, applied as it ships), so a job is enqueued in the same transaction that moves its
  row (db/queue.py). SQLite keeps the in-process worker loop and gets nothing here.
"""
from importlib import resources

import sqlalchemy as sa
from alembic import op

revision = "0004_engine"
down_revision = "0003_web"
branch_labels = None
depends_on = None

SEND_KEY = ["job_id", "destination_ae", "destination_host", "destination_port"]


def upgrade() -> None:
    bind = op.get_bind()
    repeated = bind.execute(sa.text(
        "SELECT job_id, destination_ae, destination_host, destination_port, MAX(id) FROM sends "
        "WHERE job_id IS NOT NULL GROUP BY job_id, destination_ae, destination_host, destination_port "
        "HAVING COUNT(*) > 1")).all()
    for job_id, ae, host, port, newest in repeated:
        bind.execute(sa.text(
            "UPDATE sends SET job_id = NULL, outcome = outcome || :note WHERE job_id = :job AND destination_ae = :ae "
            "AND destination_host = :host AND destination_port = :port AND id <> :newest"),
            {"note": f" (an earlier send of job {job_id}, re-sent as send {newest})", "job": job_id, "ae": ae,
             "host": host, "port": port, "newest": newest})
    op.create_index("uq_sends_job_destination", "sends", SEND_KEY, unique=True)
    if bind.dialect.name == "postgresql":
        schema = (resources.files("procrastinate.sql") / "schema.sql").read_text(encoding="utf-8")
        bind.connection.driver_connection.execute(schema)  # as shipped: no parameters, several statements


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        bind.exec_driver_sql(
            "DO $$ DECLARE f record; BEGIN FOR f IN SELECT oid::regprocedure AS sig FROM pg_proc "
            "WHERE starts_with(proname, 'procrastinate') LOOP EXECUTE 'DROP FUNCTION IF EXISTS ' || f.sig || ' CASCADE'; "
            "END LOOP; END $$")
        bind.exec_driver_sql("DROP TABLE IF EXISTS procrastinate_events, procrastinate_periodic_defers, "
                             "procrastinate_jobs, procrastinate_workers CASCADE")
        bind.exec_driver_sql("DROP TYPE IF EXISTS procrastinate_job_to_defer_v1, procrastinate_job_event_type, "
                             "procrastinate_job_status CASCADE")
    op.drop_index("uq_sends_job_destination", table_name="sends")
