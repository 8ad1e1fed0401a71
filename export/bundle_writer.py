"""Write a bundle atomically: build it in a hidden sibling folder, then swap it into place.

An export killed at any moment leaves either the previous bundle or nothing at the target path,
plus at worst a hidden ``.<name>.tmp-<pid>-*`` folder that the next export removes.

Only a target edge wrote is replaced (export/target.py: the ``.edge-bundle`` marker, nothing in it
the manifest does not list, not holding the model being exported); the replaced bundle's listed
files are removed one by one, never a whole tree. A working folder starts with the marker, so a
stale one is recognisably edge's. The new bundle folder gets the umask's permissions.

Several exports may write the same target at once (two processes, two threads): each builds in its
own working folder (``tempfile.mkdtemp``: pid + random suffix), which it holds an exclusive
``flock`` on from creation to removal, so the stale-folder cleanup of another export only removes
folders whose owner is gone (a lock dies with its process) and never one still being written. The
swap itself (old bundle aside, new bundle in) runs under a lock on the parent folder, so swaps of
concurrent exports never interleave: each export either installs its complete bundle (the last
swap wins) or fails with a clear error; the target never holds a mix of two bundles.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from edge.errors import EdgeError
from edge.manifest import fsync_dir

from edge.export.target import (check_target, follow_umask, looks_written_by_edge, remove_bundle, warn_kept,
                                 write_marker)

try:
    import fcntl
except ImportError:  # no flock (Windows): no cleanup of other exports' folders, unlocked swap
    fcntl = None  # type: ignore[assignment]

SWAP_LOCK_TIMEOUT_S = 120.0  # a swap is two renames; waiting longer means something is stuck
_BUSY = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


def _open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _try_lock(fd: int) -> bool:
    """Exclusive flock without waiting: False if another open file (process, thread) holds it."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in _BUSY:
            return False
        raise
    return True


def _stale_folders(target: Path) -> list[Path]:
    # .tmp-*: working folders (this version and older ones); .old-*: older versions' swap folders
    return [*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")]


def _clean_stale(target: Path) -> None:
    """Remove the working folders of exports that are gone (killed, crashed): a folder whose lock
    can be taken has no live owner. Folders of exports still running are left alone."""
    if fcntl is None:
        return
    for stale in _stale_folders(target):
        if stale.is_symlink() or not stale.is_dir():
            continue
        try:
            fd = _open_dir(stale)
        except OSError:
            continue  # removed meanwhile (its owner finished) or unreadable: not ours to touch
        try:
            if _try_lock(fd):  # held until removed: its owner cannot be mid-start (see _working_folder)
                _remove_stale(stale)
        except OSError:
            pass
        finally:
            os.close(fd)


def _remove_stale(stale: Path) -> None:
    """A dead export's folder: a working folder (``.tmp-``) is edge's when it starts with the marker
    (or is still empty) and goes whole; a swap folder (``.old-``) holds a replaced bundle, of which
    only the listed files go."""
    if ".old-" in stale.name:
        inner = stale / "bundle"
        if inner.is_dir() and not inner.is_symlink():
            remove_bundle(inner)
        try:
            stale.rmdir()
        except OSError:
            pass
    elif looks_written_by_edge(stale):
        shutil.rmtree(stale, ignore_errors=True)


def _owned_folder(target: Path, kind: str) -> tuple[Path, int | None]:
    """A new hidden ``.<name>.<kind>-<pid>-<random>`` folder next to ``target``, locked by this
    export until it closes the returned descriptor (None where there is no flock)."""
    for _ in range(100):
        folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))
        if fcntl is None:
            return folder, None
        try:
            fd = _open_dir(folder)
        except FileNotFoundError:
            continue  # another export's cleanup took it before we locked it: make another
        # locked, and still the folder at that path (a cleanup may have locked and removed it in
        # the moment between mkdtemp and flock): then it is ours until we remove it
        if _try_lock(fd):
            try:
                st, here = os.fstat(fd), os.stat(folder)
                if (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino):
                    return folder, fd
            except FileNotFoundError:
                pass
        os.close(fd)
    raise OSError(f"{target.parent}: cannot create a working folder for the export (removed by another process each time)")


@contextmanager
def _swap_lock(parent: Path) -> Iterator[None]:
    """Exclusive lock on the parent folder for the swap (no lock file is left behind)."""
    if fcntl is None:
        yield
        return
    fd = _open_dir(parent)
    try:
        deadline = time.monotonic() + SWAP_LOCK_TIMEOUT_S
        while not _try_lock(fd):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{parent}: another process has held the bundle swap lock for over "
                                   f"{SWAP_LOCK_TIMEOUT_S:.0f} s; is another edge-export stuck writing there?")
            time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # releases the lock


def _swap(tmp: Path, target: Path) -> None:
    """Move ``target`` (if any) into a hidden ``.old-`` folder, then ``tmp`` to ``target`` and remove
    the old one; if the second rename fails, put the old bundle back."""
    old, old_fd, done = None, None, False
    try:
        try:
            if target.exists():
                old, old_fd = _owned_folder(target, "old")
                os.rename(target, old / "bundle")
            os.rename(tmp, target)
        except BaseException as e:  # also an interrupt (Ctrl-C, SIGTERM) between the two renames
            if old is not None and (old / "bundle").exists() and not target.exists():
                os.rename(old / "bundle", target)  # the new bundle did not move in: put the old one back
            if isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                # only without the swap lock (no flock here, or an older exporter beside this one)
                raise FileExistsError(f"{target}: another export installed a bundle there at the same moment; this "
                                      "export's bundle was not installed (the other one is there, complete)") from None
            raise
        done = True
    finally:
        if old is not None and (done or not (old / "bundle").exists()):
            _discard_replaced(old, target)  # the replaced bundle (never one put back)
        if old_fd is not None:
            os.close(old_fd)


def _discard_replaced(old: Path, target: Path) -> None:
    kept = remove_bundle(old / "bundle") if (old / "bundle").is_dir() else []
    try:
        old.rmdir()
    except OSError:
        warn_kept(old / "bundle", kept)


class BundleWriteError(EdgeError, OSError):
    """The file system refused the bundle (full, read-only, permissions); the target is unchanged."""


def write_atomically(target: Path, fill: Callable[[Path], None], sources: Sequence[str | os.PathLike] = ()) -> Path:
    """``fill(tmp_dir)`` writes every file (the manifest last); then the folder replaces ``target``.
    ``sources``: the files/folders being exported, which the target must not contain.

    Concurrent calls for the same target (threads or processes) are safe: each builds its own
    bundle; they are swapped in one at a time and the last one to finish stays."""
    target = Path(target).absolute()
    check_target(target, sources)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(target)
        tmp, tmp_fd = _owned_folder(target, "tmp")
    except OSError as e:
        raise BundleWriteError(f"{target}: cannot write the bundle here ({e.strerror or e})") from None
    try:
        write_marker(tmp)  # first: a stale working folder is then recognisably edge's
        fill(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        follow_umask(tmp)
        with _swap_lock(target.parent):
            check_target(target, sources)  # again: something else may have been put there meanwhile
            _swap(tmp, target)
            fsync_dir(target.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already if it became the bundle
        if isinstance(e, OSError) and not isinstance(e, EdgeError):
            where = f" at {e.filename}" if e.filename else ""
            raise BundleWriteError(f"{target}: writing the bundle failed{where}: {e.strerror or e}; the previous "
                                   f"contents of {target.name} are unchanged") from None
        raise
    finally:
        if tmp_fd is not None:
            os.close(tmp_fd)  # after the swap it locks the new bundle's folder (harmless) until here
    return target
