"""The database layer on both dialects: every migration up and down on SQLite and on a real PostgreSQL
(Debian's, started by the tests), and the PostgreSQL unit of work: serialised writers, read-only reads,
one audit chain with several processes appending at once."""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import DBAPIError

from db import audit
from db.engine import MIGRATIONS, WRITE, NestedTransactionError, make_engine, open_database, transaction
from db.schema import AuditEntry, Base, Job

TABLES = {"audit", "instances", "jobs", "series", "sends", "users", "api_tokens", "heartbeats", "reviews"}


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path: Path) -> str | Path:
    if request.param == "sqlite":
        return tmp_path / "rtprop.sqlite"
    return request.getfixturevalue("pg_url")


def _alembic(engine, connection) -> AlembicConfig:  # type: ignore[no-untyped-def]
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def test_every_migration_runs_up_and_down_on_both_dialects(location) -> None:
    engine = make_engine(location)
    revisions = [r.revision for r in ScriptDirectory(str(MIGRATIONS)).walk_revisions()][::-1]
    assert revisions[0] == "0001" and len(revisions) >= 4
    with engine.connect().execution_options(**{WRITE: True}) as connection:
        cfg = _alembic(engine, connection)
        for revision in revisions:  # one step at a time, so every upgrade() runs on its own
            command.upgrade(cfg, revision)
    names = set(inspect(engine).get_table_names())
    assert TABLES <= names
    if engine.dialect.name == "postgresql":
        assert {"procrastinate_jobs", "procrastinate_workers"} <= names
    indexes = {i["name"]: i for i in inspect(engine).get_indexes("sends")}
    assert indexes["uq_sends_job_destination"]["unique"]
    with engine.connect().execution_options(**{WRITE: True}) as connection:
        cfg = _alembic(engine, connection)
        for revision in [*revisions[-2::-1], "base"]:
            command.downgrade(cfg, revision)
    left = set(inspect(engine).get_table_names()) - {"alembic_version"}
    assert left == set(), f"left after downgrading to base: {left}"
    with engine.connect().execution_options(**{WRITE: True}) as connection:
        command.upgrade(_alembic(engine, connection), "head")  # and up again from nothing
    assert TABLES <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_the_migrated_schema_is_the_models_schema(location, tmp_path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = make_engine(location)
    factory = open_database(location, head_path=tmp_path / "pg.audit-head" if not isinstance(location, Path)
                            else None)  # the anchor and the key in the test's folder, not the working directory
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    diff = [d for d in diff if not (d[0] == "remove_table" and d[1].name.startswith("procrastinate"))
            and not (d[0] in ("remove_index", "remove_fk") and "procrastinate" in str(d))]
    assert diff == []
    factory.kw["bind"].dispose()
    engine.dispose()


def test_the_audit_is_append_only_on_both_dialects(location, tmp_path: Path) -> None:
    factory = open_database(location, head_path=tmp_path / "head")
    with transaction(factory) as session:
        audit.record(session, "test.one")
    for sql in ("UPDATE audit SET event = 'x'", "DELETE FROM audit"):
        with pytest.raises(DBAPIError, match="append-only"):
            with transaction(factory) as session:
                session.execute(text(sql))
    factory.kw["bind"].dispose()


def test_postgres_reads_cannot_write_and_transactions_do_not_nest(pg_url, tmp_path: Path) -> None:
    factory = open_database(pg_url, head_path=tmp_path / "head")
    with pytest.raises(DBAPIError, match="read-only"):
        with factory() as session:
            session.execute(text("INSERT INTO heartbeats (process, kind, started_at, beat_at) "
                                 "VALUES ('p', 'k', now(), now())"))
    with transaction(factory) as session:
        with pytest.raises(NestedTransactionError):
            with transaction(factory):
                pass
        session.add(Job(series_instance_uid="1.2", state="queued"))
    with factory() as session:
        assert session.execute(select(Job.id)).scalar() is not None
    factory.kw["bind"].dispose()


def _append(url: str, head: str, n: int, tag: str) -> None:
    factory = open_database(url, head_path=head)
    for i in range(n):
        with transaction(factory) as session:
            audit.record(session, "test.concurrent", component=tag, i=i)
    factory.kw["bind"].dispose()


def test_several_processes_appending_at_once_keep_one_chain_on_postgres(pg_url, tmp_path: Path) -> None:
    head = str(tmp_path / "shared-root" / "audit-head")
    Path(head).parent.mkdir()
    factory = open_database(pg_url, head_path=head)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append, args=(pg_url, head, 150, f"p{k}")) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with transaction(factory) as session:
        count, problems = audit.verify(session)
        last = session.execute(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(1)).scalar()
    assert problems == [] and count == 600
    assert audit.head_of(factory) == audit.Head(last.id, last.hash)  # the anchor is at the true end
    factory.kw["bind"].dispose()


def test_database_url_from_the_environment_is_what_every_command_uses(pg_url, postgres, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    rtprop = str(Path(sys.executable).parent / "rtprop")
    env = {**os.environ, "RTPROP__DATABASE__URL": pg_url}
    storage = tmp_path / "storage"
    r = subprocess.run([rtprop, "users", "add", "ada", "--role", "admin", "--password-stdin", "--storage",
                        str(storage)], input="a-long-password\n", capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert postgres.query(pg_url, "SELECT name, role FROM users") == [("ada", "admin")]
    assert not (storage / "rtprop.sqlite").exists()  # no SQLite file beside it
    for args in (["audit", "verify"], ["jobs", "list"], ["audit", "head"]):
        r = subprocess.run([rtprop, *args, "--storage", str(storage)], capture_output=True, text=True, env=env)
        assert r.returncode == 0, (args, r.stderr)
    assert (storage / "rtprop-postgresql.audit-head").is_file()  # the anchor lives on the shared storage root
    bad = subprocess.run([rtprop, "jobs", "list", "--storage", str(storage)], capture_output=True, text=True,
                         env={**env, "RTPROP__DATABASE__URL": "mysql://x@y/z"})
    assert bad.returncode == 2 and "database.url" in bad.stderr and "RTPROP__DATABASE__URL" in bad.stderr


def test_an_older_database_with_re_sent_jobs_upgrades_to_one_send_row_per_job_and_destination(location) -> None:
    """Before 0004 a person's re-send added a row: the newest keeps the job, the older ones say what replaced them."""
    engine = make_engine(location)
    with engine.connect().execution_options(**{WRITE: True}) as connection:
        command.upgrade(_alembic(engine, connection), "0003_web")
    with engine.connect().execution_options(**{WRITE: True}) as connection:
        connection.execute(text("INSERT INTO jobs (id, state, kind, series_instance_uid, study_instance_uid, "
                                "rtstruct_sop_instance_uid, calling_ae, dry_run, backend, checkpoint_sha256, "
                                "result_path, result_sha256, error, attempts, claimed_by, created_at, updated_at) "
                                "VALUES (1, 'sent', 'prompt', '1.2', '1.3', '1.4', 'TPS', false, '', '', '', '', '', 1, "
                                "'', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
        for send_id in (1, 2, 3):
            connection.execute(text(
                "INSERT INTO sends (id, job_id, path, sop_instance_uid, sop_class_uid, destination_ae, "
                "destination_host, destination_port, state, attempts, next_attempt_at, last_error, claimed_by, "
                "created_at, outcome) VALUES (:i, 1, '/o/RS.dcm', '1.5', '', 'TPS', 'h', 104, 'sent', 1, "
                "CURRENT_TIMESTAMP, '', '', CURRENT_TIMESTAMP, 'sent')"), {"i": send_id})
        connection.commit()
    with engine.connect().execution_options(**{WRITE: True}) as connection:
        command.upgrade(_alembic(engine, connection), "head")
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT id, job_id, outcome FROM sends ORDER BY id")).all()
    assert [(r[0], r[1]) for r in rows] == [(1, None), (2, None), (3, 1)]
    assert all("re-sent as send 3" in r[2] for r in rows[:2])
    engine.dispose()


def _receive(url: str, head: str, n: int, tag: str, series: str) -> None:
    """One receiver: `n` instances of `series` (every other UID shared with the other receivers)."""
    from db.instances import NewInstance, record_instance
    from db.schema import utcnow

    factory = open_database(url, head_path=head)
    for i in range(n):
        uid = f"1.2.9.{i}" if i % 2 else f"1.2.9.{i}.{tag[1:]}"
        record_instance(factory, NewInstance(
            sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_instance_uid=series,
            study_instance_uid="1.2.9", modality="CT", patient_id_hash="", path=f"/a/{uid}", sha256=tag * 32,
            transfer_syntax_uid="", calling_ae=tag, peer_address="", source="dimse", received_at=utcnow()),
            lambda: None)
    factory.kw["bind"].dispose()


def test_instances_are_recorded_without_the_write_lock_and_stay_exact_with_receivers_racing(pg_url,
                                                                                         tmp_path: Path) -> None:
    """Issue 23: no cluster-wide lock per image. An instance row commits while another process holds the write
    lock (the old receive path waited for it), the audit refuses a row outside the lock, and four receivers
    racing on one series and on shared SOP Instance UIDs store each UID once with the series count exact."""
    import threading

    from db.instances import NewInstance, record_instance
    from db.schema import Instance, Series, utcnow

    head = str(tmp_path / "head")
    factory = open_database(pg_url, head_path=head)
    new = NewInstance(sop_instance_uid="1.2.8.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                      series_instance_uid="1.2.8", study_instance_uid="1.2.7", modality="CT", patient_id_hash="",
                      path="/a/1", sha256="ab" * 32, transfer_syntax_uid="", calling_ae="TPS", peer_address="",
                      source="dimse", received_at=utcnow())
    held, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with transaction(factory):
            held.set()
            release.wait(20)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    try:
        assert held.wait(10)
        done = threading.Event()
        t = threading.Thread(target=lambda: (record_instance(factory, new, lambda: None), done.set()))
        t.start()
        assert done.wait(5), "the instance row waited for the write lock"
        t.join()
    finally:
        release.set()
        holder.join()
    with pytest.raises(RuntimeError, match="outside the write lock"):
        with transaction(factory, lock=False) as session:
            audit.record(session, "test.unlocked")

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_receive, args=(pg_url, head, 60, f"p{k}", "1.2.9.0.0")) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with factory() as session:
        uids = session.execute(select(Instance.sop_instance_uid).where(
            Instance.series_instance_uid == "1.2.9.0.0")).scalars().all()
        count = session.execute(select(Series.instance_count).where(Series.series_instance_uid == "1.2.9.0.0")).scalar()
    assert len(uids) == len(set(uids)) == 30 + 4 * 30 and count == len(uids)
    factory.kw["bind"].dispose()
