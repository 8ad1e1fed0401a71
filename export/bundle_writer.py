"""Write a bundle atomically: build it in a hidden sibling folder, then swap it into place.

An export killed at any moment leaves either the previous bundle or nothing at the target path,
plus at worst a hidden ``.<name>.tmp-*`` folder that the next export removes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from edge.manifest import MANIFEST_NAME, fsync_dir


def _clean_stale(target: Path) -> None:
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in target.parent.glob(f".{target.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def write_atomically(target: Path, fill: Callable[[Path], None]) -> Path:
    """``fill(tmp_dir)`` writes every file (the manifest last); then the folder replaces ``target``."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not (target / MANIFEST_NAME).is_file():
        if not target.is_dir() or any(target.iterdir()):
            raise FileExistsError(f"{target}: exists and is not an edge bundle; refusing to overwrite it")
    _clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        fill(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / "bundle")
        os.rename(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if (old / "bundle").exists() and not target.exists():
                os.rename(old / "bundle", target)  # the new bundle did not move in: put the old one back
            if not (old / "bundle").exists():
                shutil.rmtree(old, ignore_errors=True)
        raise
    return target
