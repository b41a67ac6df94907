"""One process: SCP + series completion checker + sender loop, stopped cleanly by SIGTERM/SIGINT.

Started by `rtprop serve` (pipeline/cli.py), which also runs the pipeline's workers beside it. In the
distributed mode (database.url) the sends are tasks of the job engine (pipeline/tasks.py, queue
`sends`), so there is no sender loop here: `rtprop serve --workers 0` only receives and completes.
"""
from __future__ import annotations

import logging
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from config.schema import Config
from db.audit import record
from db.engine import open_configured, transaction
from dicom_node.completion import CompletionChecker
from dicom_node.scp import start_scp
from dicom_node.scu import Sender
from dicom_node.storage import Store, recover

LOG = logging.getLogger("rtprop.node.service")
READY_LINE = "rtprop node ready"


def serve_forever(config: Config, stop: threading.Event | None = None) -> None:
    """Run the node until `stop` is set or SIGTERM/SIGINT arrives (storage paths already resolved)."""
    stop = stop or threading.Event()
    st = config.storage
    for folder in (st.root, st.archive, st.quarantine, st.outbox):
        Path(folder).mkdir(parents=True, exist_ok=True)
    factory = open_configured(config)
    removed = recover(st)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def _on_signal(signum: int, _frame: Any) -> None:
            LOG.info("signal %d: stopping", signum)
            stop.set()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _on_signal)

    store = Store(st, factory, fsync=st.fsync)
    receipts_recovered = store.recover_receipts()
    checker = CompletionChecker(factory, config)
    sender = Sender(factory, config)
    ae, server = start_scp(config, store, on_release=checker.notify_release)
    threads = [threading.Thread(target=checker.run, args=(stop, config.node.poll_interval_s),
                                name="rtprop-completion", daemon=True)]
    if not config.database.url:  # distributed: workers send (queue `sends`)
        threads.append(threading.Thread(target=sender.run, args=(stop,), name="rtprop-sender", daemon=True))
    for t in threads:
        t.start()
    port = server.server_address[1]
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
