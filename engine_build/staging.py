"""The staging folder a build makes its artifact in: inside the output folder, on the output's own file system.

A finished artifact is moved into place file by file with ``os.replace``, which is atomic, but only within
one file system. ``--output`` is often a mount point (``/artifacts`` on a Docker or Kubernetes volume) or a
symlink to another file system; a staging folder beside it, as before, made the last step fail with
'Invalid cross-device link' after all the work. Inside it, the moves never cross a file system.

A build holds an exclusive ``flock`` on its staging folder while it runs, taken before the folder gets its
``.building-`` name (made as ``.making-*``, locked, then renamed: the lock stays with the folder). So every
``.building-*`` folder no build holds is a killed build's (SIGKILL, the OOM killer), and the next build into
the same output removes it at once; a ``.making-*`` folder only once it is a minute old (its maker may be
between the two steps). The lock holds between builds on one host. Output folders a failed build made
(parents included) are removed again while empty.
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
MAKING = ".making-"
ABANDONED_AFTER_S = 60     # a .making-* folder untouched this long was left between its mkdir and its lock


@contextlib.contextmanager
def staging_folder(output: Path) -> Iterator[Path]:
    """A fresh staging folder inside ``output`` (made, with its parents, if missing), held while inside;
    removed on the way out whatever happens, and the folders this made too if nothing was published."""
    made = _missing(output)
    name = uuid.uuid4().hex[:8]
    # named before they are made, so that an interrupt at any point after this line leaves no folder
    making, staging = output / f"{MAKING}{name}", output / f"{PREFIX}{name}"
    held = -1
    try:
        for attempt in range(1, 6):
            try:
                output.mkdir(parents=True, exist_ok=True)
                remove_abandoned(output)
                making.mkdir(mode=0o700)
                break
            except FileNotFoundError:   # a build beside this one that had made (part of) the output removed it,
                if attempt == 5:        # empty, between the two steps: make it again
                    raise
        held = os.open(making, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)   # no other build locks a .making-* folder
        making.rename(staging)
        yield staging
    finally:
        for folder in (staging, making):
            shutil.rmtree(folder, ignore_errors=True)
        if held >= 0:
            os.close(held)
        for folder in made:   # only while empty: not once an artifact is published
            with contextlib.suppress(OSError):
                folder.rmdir()


def _missing(output: Path) -> list[Path]:
    """The folders making ``output`` will make, deepest first: those it leads to (``new/../old/out`` leads to
    ``old``, which may be there already), and those the path passes through on the way (``new``)."""
    where = output.resolve()
    missing = [folder for folder in (where, *where.parents) if not folder.exists()]
    return missing + [folder for folder in output.parents if ".." not in folder.parts and not folder.exists()
                      and folder.resolve() not in missing]


def remove_abandoned(output: Path) -> list[Path]:
    """Remove the staging folders in ``output`` of builds that were killed; returns them."""
    removed = [folder for folder in output.glob(f"{PREFIX}*") if _unheld(folder) and _removed(folder)]
    removed += [folder for folder in output.glob(f"{MAKING}*") if _old(folder) and _removed(folder)]
    if removed:
        log.info("removed %d staging folder(s) of builds that were killed: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def _unheld(folder: Path) -> bool:
    """No build holds ``folder`` (its lock, taken and let go at once here, was free)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:   # gone meanwhile, or not a folder of ours
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:   # a running build's
        return False
    finally:
        os.close(fd)


def _old(folder: Path) -> bool:
    try:
        return time.time() - folder.lstat().st_mtime >= ABANDONED_AFTER_S and folder.is_dir()
    except OSError:
        return False


def _removed(folder: Path) -> bool:
    shutil.rmtree(folder, ignore_errors=True)
    return not folder.exists()
