"""User-facing errors: each one knows its one-line message and its exit status.

A user's mistake raises a ShoalError; `cli.main` alone turns it into one line on stderr and
an exit status, with no traceback. Internal invariants use `assert`.
"""

from __future__ import annotations


class ShoalError(Exception):
    """A problem the user can fix; the message is one line and says how."""

    exit_code = 2


class ConfigError(ShoalError):
    """A bad config file, key or value; names the file and the dotted key."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        self.key = key
        self.source = source
        where = ": ".join(p for p in (source, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


class DataError(ShoalError):
    """Unreadable or malformed data; names the shard and the sample key."""


class CheckpointError(ShoalError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the model."""


class ClusterError(ShoalError):
    """The cluster cannot run the job as asked (resources, address, authentication)."""


class RunDirError(ShoalError):
    """The run directory would be overwritten, or cannot be written."""


class WorkerFailed(ShoalError):
    """A rank failed with an unexpected error; the message names the rank."""

    exit_code = 1
