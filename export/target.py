"""Who owns an export target: the exporter replaces only a folder it wrote, and deletes only files it wrote.

A bundle folder carries a marker, ``.edge-bundle``, that only edge writes (its first line is the
bundle format id and version), and a manifest listing every other file. A target is replaceable
when it does not exist, is an empty folder, or is a bundle: marker (or, for bundles written before
markers, a manifest whose format id and exporter are edge's) and nothing in it that its manifest
does not list. Anything else is refused, naming what is in the way: a web app with its own
``manifest.json``, a bundle a user put notes into, a folder holding the model being exported.

Replacing removes exactly the files the previous manifest lists (plus the manifest and the marker),
never a whole tree: a file that appeared in the folder meanwhile is kept.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

from edge.errors import EdgeError
from edge.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, MAX_MANIFEST_BYTES

MARKER = ".edge-bundle"
MARKER_TEXT = (f"{FORMAT} {FORMAT_VERSION}\n"
               "Written by edge-export. The next export to this folder replaces the files the manifest lists.\n")
SHOWN = 4  # names quoted in a refusal
BUNDLE_NAMES = (MANIFEST_NAME, "tokenizer.json", MARKER)


class TargetError(EdgeError, FileExistsError):
    """The export target is not edge's to replace (a FileExistsError too, for callers that catch that)."""


def looks_written_by_edge(folder: Path) -> bool:
    """A working folder of an export (``.NAME.tmp-*``): it starts with the marker; one from an edge
    version before markers holds nothing but bundle-kind files (or nothing)."""
    if _has_marker(folder):
        return True
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return False
    return all(p.is_file() and not p.is_symlink() and (p.suffix in (".onnx", ".bin") or p.name in BUNDLE_NAMES)
               for p in entries)


def write_marker(folder: Path) -> None:
    (Path(folder) / MARKER).write_text(MARKER_TEXT, encoding="utf-8")


def _has_marker(folder: Path) -> bool:
    try:
        with open(folder / MARKER, encoding="utf-8") as f:
            return f.readline().split(" ")[0] == FORMAT
    except (OSError, UnicodeDecodeError):
        return False


def _manifest_files(folder: Path) -> tuple[set[str] | None, str]:
    """(names the manifest lists, "") for an edge manifest, else (None, why not)."""
    path = folder / MANIFEST_NAME
    try:
        if path.is_symlink() or not path.is_file():
            return None, f"no {MANIFEST_NAME}"
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return None, f"{MANIFEST_NAME} is larger than any edge manifest"
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None, f"{MANIFEST_NAME} is not an edge manifest (not JSON)"
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None, f"{MANIFEST_NAME} is not an edge manifest (format is not {FORMAT!r})"
    files = data.get("files")
    if not isinstance(files, dict) or not all(isinstance(n, str) and _plain(n) for n in files):
        return None, f"{MANIFEST_NAME} has no valid files list"
    if not _has_marker(folder) and (data.get("exporter") or {}).get("name") != "edge":
        return None, f"no {MARKER} marker and {MANIFEST_NAME} was not written by edge-export"
    return set(files), ""


def _plain(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(p.parts) and not p.is_absolute() and ".." not in p.parts and "\\" not in name


def _allowed(listed: Iterable[str]) -> set[str]:
    """Listed files, the manifest, the marker, and the folders the listed files sit in."""
    names = {MANIFEST_NAME, MARKER}
    for n in listed:
        p = PurePosixPath(n)
        names.add(p.as_posix())
        names.update(q.as_posix() for q in p.parents if q.as_posix() != ".")
    return names


def _entries(folder: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [(rel / n).as_posix() for n in sorted(dirs) + sorted(files)]
    return out


def _quote(names: Sequence[str], folder: Path) -> str:
    shown = [n + ("/" if (folder / n).is_dir() and not (folder / n).is_symlink() else "") for n in names[:SHOWN]]
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(shown) + more


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_target(target: Path, sources: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse (TargetError) a target that is not edge's to replace; see the module doc."""
    target = Path(target).absolute()
    if target.is_symlink():
        raise TargetError(f"{target}: is a symbolic link; give the folder it points to, or another path "
                          f"(refusing to replace a link)")
    real = target.resolve()
    for src in sources:
        s = Path(src).absolute().resolve()
        if _inside(s, real):
            raise TargetError(f"{target}: contains the model being exported ({s}); choose an output folder "
                              f"outside it (refusing to overwrite)")
    if not target.exists():
        return
    if not target.is_dir():
        raise TargetError(f"{target}: exists and is not an edge bundle (a file); refusing to overwrite it")
    entries = _entries(target)
    if not entries:
        return
    listed, why = _manifest_files(target)
    if listed is None:
        raise TargetError(f"{target}: exists and is not an edge bundle; refusing to overwrite it ({why}; it holds "
                          f"{_quote(entries, target)})")
    foreign = [e for e in entries if e not in _allowed(listed)]
    if foreign:
        raise TargetError(f"{target}: an edge bundle, but it holds files edge did not write: "
                          f"{_quote(foreign, target)}; move them out or choose another folder (refusing to "
                          f"overwrite)")


def check_writable_parent(target: Path) -> None:
    """The nearest existing folder above ``target`` must be writable (a read-only file system or
    a folder without write permission is found now, before the model is loaded)."""
    p = Path(target).absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise EdgeError(f"{target}: cannot be created: {p} is not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        ro = ""
        try:
            ro = " (read-only file system)" if os.statvfs(p).f_flag & os.ST_RDONLY else ""
        except (OSError, AttributeError):
            pass
        raise EdgeError(f"{target}: cannot write into {p}{ro}; expected a writable folder")


def remove_bundle(folder: Path) -> list[str]:
    """Remove what an (old) bundle's manifest lists, the manifest and the marker, then the folder if
    that emptied it. Returns what was left (files edge did not write), removing none of them."""
    folder = Path(folder)
    listed, _ = _manifest_files(folder)
    for name in sorted(listed or ()) + [MANIFEST_NAME, MARKER]:
        p = folder / name
        try:
            if p.is_symlink() or p.is_file():
                p.unlink()
        except FileNotFoundError:
            pass
    for name in sorted(_allowed(listed or ()), key=lambda n: -n.count("/")):  # now-empty subfolders
        p = folder / name
        if p.is_dir() and not p.is_symlink():
            try:
                p.rmdir()
            except OSError:
                pass
    try:
        folder.rmdir()
    except FileNotFoundError:
        return []
    except OSError:
        return _entries(folder)
    return []


def warn_kept(folder: Path, kept: Sequence[str]) -> None:
    if kept:
        print(f"edge-export: warning: {folder}: kept {_quote(list(kept), folder)} (not written by edge; they "
              f"appeared while the bundle was replaced)", file=sys.stderr)


def umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it to read it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def follow_umask(folder: Path) -> None:
    """A new bundle folder gets the permissions any new folder gets (mkdtemp makes it 0700)."""
    os.chmod(folder, 0o777 & ~umask())
