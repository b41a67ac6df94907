"""How every rtprop process logs: one line per record, whatever the record holds.

A peer's AE title, a file name or an exception message may contain newlines or other control
characters; written as they are, `X\nFAKE: admin ok` would forge a second line in the node's log.
So the message's control characters are escaped (`\n`, `\x1b`, ...), and an exception becomes
`| Type: message (file:line)` at the end of its line instead of a multi-line traceback
(RTPROP_DEBUG=1 keeps tracebacks, for developers). Two kinds of pynetdicom records repeat what another
line says and are dropped: `LOGGER.exception(exc)` right after a line saying what failed, and
pynetdicom.utils' ERROR lines about a value, each followed by a ValueError with the same message
(which its catcher logs: for a bad A-ASSOCIATE-RQ, the node's one refusal line).
"""
from __future__ import annotations

import logging
import os
import re
import traceback
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the CLI and every child process log alike
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


def escape(text: str) -> str:
    """Control characters (line breaks included) as Python escapes; the rest as it is."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class OneLineFormatter(logging.Formatter):
    """The module docstring's format."""

    def format(self, record: logging.LogRecord) -> str:
        message = escape(record.getMessage())
        exc_info = record.exc_info
        if exc_info and exc_info[1] is not None and not os.environ.get("RTPROP_DEBUG"):
            exc = exc_info[1]
            frames = traceback.extract_tb(exc.__traceback__)[-1:]
            where = f" ({Path(frames[0].filename).name}:{frames[0].lineno})" if frames else ""
            message += f" | {type(exc).__name__}: {escape(str(exc))}{where}"
            exc_info = None
        one = logging.makeLogRecord({**record.__dict__, "msg": message, "args": None, "exc_info": exc_info,
                                     "exc_text": None})
        return super().format(one)


def _not_a_repeat(record: logging.LogRecord) -> bool:
    if os.environ.get("RTPROP_DEBUG") or not record.name.startswith("pynetdicom"):
        return True
    return not (isinstance(record.msg, BaseException)
                or (record.name == "pynetdicom.utils" and record.levelno >= logging.ERROR))


def log_to_stderr(level: int = logging.WARNING) -> None:
    """The root logger's handler (as logging.basicConfig would make it), one line per record."""
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))
    handler.addFilter(_not_a_repeat)
    logging.basicConfig(level=level, handlers=[handler])
