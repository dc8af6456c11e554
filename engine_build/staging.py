"""The staging folder a build makes its artifact in: inside the output folder, on the output's own file system.

A finished artifact is moved into place file by file with ``os.replace``, which is atomic, but only within
one file system. ``--output`` is often a mount point (``/artifacts`` on a Docker or Kubernetes volume) or a
symlink to another file system; a staging folder beside it, as before, made the last step fail with
'Invalid cross-device link' after all the work. Inside it, the moves never cross a file system.

A build holds an exclusive ``flock`` on its staging folder while it runs. A build killed where it could not
clean up (SIGKILL, the OOM killer) leaves its folder behind, unheld: the next build into the same output
removes it. A folder created the moment before is spared (its maker may not hold it yet).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)
PREFIX = ".building-"
ABANDONED_AFTER_S = 60     # an unheld staging folder untouched this long is a killed build's


@contextlib.contextmanager
def staging_folder(output: Path) -> Iterator[Path]:
    """A fresh staging folder inside ``output`` (made, with its parents, if missing), held while inside;
    removed on the way out whatever happens, and ``output`` too if this made it and nothing was published."""
    made_output = not output.is_dir()
    # named before it is made, so that an interrupt at any point after this line leaves no folder
    staging = output / f"{PREFIX}{uuid.uuid4().hex[:8]}"
    held = -1
    try:
        output.mkdir(parents=True, exist_ok=True)
        remove_abandoned(output)
        staging.mkdir(mode=0o700)
        held = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if held >= 0:
            os.close(held)
        if made_output:
            with contextlib.suppress(OSError):   # only while empty: not once an artifact is published
                output.rmdir()


def remove_abandoned(output: Path) -> list[Path]:
    """Remove the staging folders in ``output`` that no build holds and none touched for a while; returns them."""
    removed = []
    for folder in output.glob(f"{PREFIX}*"):
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:   # gone meanwhile, or not a folder of ours
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if time.time() - os.fstat(fd).st_mtime < ABANDONED_AFTER_S:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        except BlockingIOError:   # a running build's
            continue
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d staging folder(s) of builds that were killed: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed
