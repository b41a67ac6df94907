"""One process: SCP + series completion checker + sender loop, stopped cleanly by SIGTERM/SIGINT.

Started by `rtprop serve` (cli/main.py), which also runs the pipeline's workers beside it. In the
distributed mode (database.url) the sends are tasks of the job engine (pipeline/tasks.py, queue
`sends`), so there is no sender loop here: `rtprop serve --workers 0` only receives and completes.
"""
from __future__ import annotations

import logging
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from config.errors import UserError
from config.schema import Config
from db.audit import record
from db.engine import open_configured, restrict, transaction
from db.heartbeat import start_heartbeat
from db.schema import Series
from dicom_node.completion import CompletionChecker
from dicom_node.scp import start_scp
from dicom_node.scu import Sender, process_name
from dicom_node.storage import Store, recover

LOG = logging.getLogger("rtprop.node.service")
READY_LINE = "rtprop node ready"


def port_error(config: Config, exc: OSError) -> UserError:
    return UserError(f"node.port {config.node.port} on {config.node.host}: cannot listen ({exc.strerror}): another "
                     "process uses it; give another --port or node.port (several rtprop serve on one port: "
                     "node.reuse_port)")


def check_port(config: Config) -> None:
    """Raise the start-up error `serve` would meet binding node.port, before anything else starts (a port
    shared on purpose, node.reuse_port, is not checked)."""
    if config.node.reuse_port:
        return
    with socket.socket(socket.AF_INET6 if ":" in config.node.host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((config.node.host, config.node.port))
        except OSError as exc:
            raise port_error(config, exc) from None


def node_status(config: Config, server: Any, port: int) -> dict[str, Any]:
    """The node heartbeat's details (read by /health, /metrics and the dashboard): the SCP's address, its
    open associations, connections still sending their request, and the refusals (dicom_node/gate.py)."""
    return {"ae_title": config.node.ae_title, "host": config.node.host, "port": port,
            "associations": len(server.active_associations), "max_associations": config.node.max_associations,
            "pending": server.gate.pending, "refused": server.gate.refusals.snapshot(config.web.health_refusals_window_s)}


def serve_forever(config: Config, stop: threading.Event | None = None,
                  on_series_complete: Callable[[Session, Series], Any] | None = None,
                  on_duplicate: Callable[[str, str, str], Any] | None = None) -> None:
    """Run the node until `stop` is set or SIGTERM/SIGINT arrives (storage paths already resolved).

    `on_series_complete`: called in the transaction that completes a series (the jobs of its prompts
    are created there, with this node's routes: `rtprop serve` passes pipeline/discovery.py's hook).
    `on_duplicate`: called when an identical instance arrives again (a prompt sent again is answered:
    pipeline/delivery.py)."""
    stop = stop or threading.Event()
    st = config.storage
    Path(st.root).mkdir(parents=True, exist_ok=True)
    for folder in (st.archive, st.quarantine, st.outbox):  # patient data: the node's user only (docs/conformance.md)
        Path(folder).mkdir(mode=0o700, parents=True, exist_ok=True)
        restrict(Path(folder), 0o700)
    factory = open_configured(config)
    removed = recover(st)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def _on_signal(signum: int, _frame: Any) -> None:
            LOG.info("signal %d: stopping", signum)
            stop.set()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _on_signal)

    store = Store(st, factory, fsync=st.fsync, on_duplicate=on_duplicate)
    receipts_recovered = store.recover_receipts()
    checker = CompletionChecker(factory, config, on_series_complete)
    sender = Sender(factory, config)
    try:
        ae, server = start_scp(config, store, on_release=lambda series: checker.notify_release(series)
                               if config.node.complete_on_release else checker.look_now())
    except OSError as exc:  # a start-up error the user fixes (exit 2), not ours
        raise port_error(config, exc) from None
    threads = [threading.Thread(target=checker.run, args=(stop, config.node.poll_interval_s),
                                name="rtprop-completion", daemon=True)]
    if not config.database.url:  # distributed: workers send (queue `sends`)
        threads.append(threading.Thread(target=sender.run, args=(stop,), name="rtprop-sender", daemon=True))
    for t in threads:
        t.start()
    port = server.server_address[1]
    me = process_name("node")
    threads.append(start_heartbeat(factory, me, "node", stop, interval_s=config.web.heartbeat_interval_s,
                                   details=lambda: node_status(config, server, port),
                                   alive=lambda: server.accept_thread.is_alive()))
    free_mb = shutil.disk_usage(st.archive).free // (1 << 20)
    with transaction(factory) as session:
        record(session, "node.started", component="dicom_node", calling_ae=config.node.ae_title,
               host=config.node.host, port=port, temp_files_removed=removed, receipts_recovered=len(receipts_recovered), worker=sender.me, free_mb=free_mb)
        if free_mb < st.min_free_mb:
            record(session, "node.low_disk", component="dicom_node", free_mb=free_mb, min_free_mb=st.min_free_mb)
    if free_mb < st.min_free_mb:
        LOG.warning("only %d MB free on %s, below storage.min_free_mb=%d: every C-STORE will be refused (0xA700) "
                    "until space is freed", free_mb, st.archive, st.min_free_mb)
    LOG.info("%s: %s on %s:%d (storage %s)", READY_LINE, config.node.ae_title, config.node.host, port, st.root)
    print(f"{READY_LINE} {config.node.ae_title} {config.node.host}:{port}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        LOG.info("stopping: closing the listening socket, waiting for associations")
        server.shutdown()          # no new associations; running ones finish their current message
        ae.shutdown()
        checker._wake.set()
        sender.wake.set()
        for t in threads:
            t.join(timeout=max(10.0, config.node.send_timeout_s + 5))
        with transaction(factory) as session:
            record(session, "node.stopped", component="dicom_node", calling_ae=config.node.ae_title, port=port)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        LOG.info("stopped")
