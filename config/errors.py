"""The one error taxonomy: what a user can fix, as opposed to what is our fault.

`UserError` is the base of every error a user can fix (bad input, bad prompt, bad configuration):
the CLI prints its message on one line and exits 2; the pipeline ends the job with it and never
retries it. Its message names the file, UID, slice or key. Anything else is internal (exit 1).
`TransientError` marks faults that go away by themselves (a full disk, a busy database, a peer
down): jobs hit by one are retried with backoff. Kept in `config/`, the leaf every layer may import.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input, prompt or configuration: the message says what and where, in one line."""


class TransientError(RuntimeError):
    """A fault expected to clear by itself; the work is retried later."""
