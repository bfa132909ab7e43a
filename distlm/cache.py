"""Content-addressed cache directories that are all-or-nothing.

A build happens in a private temporary sibling and is renamed into place only when
complete (marked by a COMPLETE file), so a crash or a concurrent build never leaves a
half-written directory that a later run would trust.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE).is_file()


@contextlib.contextmanager
def building(final: Path) -> Iterator[Path]:
    """Yields a private build dir; on success marks it complete and renames it to `final`
    (keeping another process's copy if that one got there first); on failure removes it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 mode would carry over to a cache shared by every node and user.
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        (tmp / COMPLETE).touch()  # last: its presence means everything else is written
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left to remove after a successful rename


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished build into place; if another process got there first, keep theirs."""
    if final.exists() and not is_complete(final):
        # Only complete dirs are ever published, so this one is foreign or broken: set it aside.
        stale = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):  # another process moved it already
            os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not is_complete(final):
            raise
        log.info("another process built %s first: using its copy", final)
