"""A full disk under sabr-prepare: what it raises (one line, a UserError) and how it is recognised."""

from __future__ import annotations

import errno
import os

from sabr_jax.errors import UserError

RESUME = "free space there (or give another --data_dir) and rerun sabr-prepare: it resumes, keeping the clips already prepared"


class DiskFull(UserError):
    """The disk of --data_dir is full: the message names what was being written and what to do."""


def disk_full(error: BaseException) -> bool:
    """Whether an error is a full disk (or quota): an OSError's errno, or the text of ArrayRecord's
    RuntimeError ("write() failed: No space left on device; writing FILE; ...")."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(error, (OSError, RuntimeError)) and os.strerror(errno.ENOSPC) in str(error)
