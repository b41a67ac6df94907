"""The job engine's queues (pipeline/tasks.py, db/queue.py): what a worker takes, and that a GPU worker runs one
job at a time (which queue a job goes to: tests/test_backends.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config.errors import UserError
from config.load import load_config
from pipeline.tasks import conninfo, worker_groups, worker_queues


def test_a_worker_takes_the_queues_it_is_given_and_gpu_jobs_one_at_a_time_beside_the_others() -> None:
    assert worker_queues(None) == ["cpu", "gpu", "sends", "batch"]
    assert worker_queues(["gpu"]) == ["gpu"]
    with pytest.raises(UserError, match="unknown queue.*cuda.*cpu, gpu, sends, batch"):
        worker_queues(["cuda"])
    assert worker_groups(["gpu"], 4) == [(["gpu"], 1)]
    assert worker_groups(["cpu", "gpu", "sends"], 4) == [(["gpu"], 1), (["cpu", "sends"], 4)]
    assert worker_groups(["cpu", "sends"], 4) == [(["cpu", "sends"], 4)]


def test_the_engine_connects_with_the_same_credentials_as_the_database() -> None:
    assert conninfo("postgresql+psycopg://rtprop:s3cret@db.example:5433/rtprop") == \
        "postgresql://rtprop:s3cret@db.example:5433/rtprop"


def test_queues_without_a_postgres_database_are_a_user_error(tmp_path: Path) -> None:
    rtprop = str(Path(sys.executable).parent / "rtprop")
    r = subprocess.run([rtprop, "worker", "--storage", str(tmp_path), "--queues", "gpu"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "database.url" in r.stderr
    r = subprocess.run([rtprop, "batch", "--storage", str(tmp_path), "--distributed"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "database.url" in r.stderr


def test_a_claim_of_another_host_is_alive_while_that_process_beats(tmp_path: Path) -> None:
    """Workers on several machines: a claim's process on another host counts as alive while its heartbeat row
    is younger than pipeline.heartbeat_timeout_s; then its send goes back to pending for another sender."""
    from datetime import timedelta

    from config.schema import Destination
    from db.engine import open_database, transaction
    from db.schema import Heartbeat, Send, utcnow
    from dicom_node.scu import enqueue, recover_stale
    from node_helpers import make_ct_slice
    from pipeline.tasks import live_owner

    factory = open_database(tmp_path / "rtprop.sqlite")
    config = load_config(None, environ={}, overrides={"pipeline": {"heartbeat_timeout_s": 30}})
    path = tmp_path / "RS.dcm"
    make_ct_slice("1.2.3", "1.2.3.4", 0).save_as(path, enforce_file_format=True)
    with transaction(factory) as session:
        for process, age_s in (("far:11:1#worker", 5), ("far:12:1#worker", 300)):
            session.add(Heartbeat(process=process, kind="worker", started_at=utcnow(),
                                  beat_at=utcnow() - timedelta(seconds=age_s)))
        for owner in ("far:11:1#t7", "far:12:1#t7"):
            row = enqueue(session, path, Destination(ae_title=f"T{owner[4:6]}", host="127.0.0.1", port=104))
            row.state, row.claimed_by = "sending", owner
    alive = live_owner(factory, config)
    assert alive("far:11:1#t7") and not alive("far:12:1#t7") and not alive("far:13:1#t7")
    assert len(recover_stale(factory, me="here:1:1", alive=alive)) == 1
    with factory() as session:
        assert dict(session.query(Send.claimed_by, Send.state).all()) == {"far:11:1#t7": "sending", "": "pending"}
    factory.kw["bind"].dispose()
