"""Atomic writes: every file and directory ptqkit writes goes through here.

- `write_bytes` / `write_text` / `write_json`: the data goes to a new temporary file next to the
  target (created with O_EXCL | O_NOFOLLOW, so a planted symlink is never written through),
  fsynced, then renamed over the target (a rename replaces a symlink, never follows it) and the
  directory is fsynced. A target that is a symbolic link is refused (OutputPathError).
- `DirectoryBuild` (`build_directory`): a directory is built aside in `.NAME.tmp-PID-TOKEN` next
  to it and swapped in once, with an atomic exchange where the OS has one (Linux renameat2
  RENAME_EXCHANGE), so the target is always the complete old directory or the complete new one.
- `exclusive_lock`: fcntl.flock on `.NAME.lock` next to the target, not blocking: a second writer
  gets OutputPathError naming the process that holds it. The lock file is removed on release.
- `clean_leftovers`: temporaries (`.NAME.tmp-PID-*`, `.NAME.old-PID-*`) of dead processes are
  removed; a directory moved aside by a process that died before its swap is put back.
- `check_output_dir`: refuses the current directory and its parents, "" and symbolic links.

Temporary names record the writer's pid, so that leftovers of live processes are never touched.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ptqkit.core.errors import OutputPathError

__all__ = [
    "DirectoryBuild",
    "build_directory",
    "check_output_dir",
    "clean_leftovers",
    "copy_entry",
    "exclusive_lock",
    "file_sha256",
    "prepare_output",
    "fsync_path",
    "swap_in",
    "write_bytes",
    "write_json",
    "write_text",
]

logger = logging.getLogger(__name__)

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_TEMPORARY = re.compile(r"^\..+\.((tmp|old)-\d+-[0-9a-f]+|lock)$")  # ptqkit's temporaries and lock files: never carried
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 8 MiB chunks (a symlink is not followed)."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _temp_name(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _refuse_symlink(path: Path) -> None:
    if path.is_symlink():
        raise OutputPathError(
            f"{path} is a symbolic link (to {os.readlink(path)!r}); ptqkit does not write through symbolic links: remove it"
        )


def fsync_path(path: str | Path) -> None:
    """fsync a file or directory by path (without following a symlink)."""
    flags = os.O_RDONLY | _CLOEXEC | (os.O_DIRECTORY if Path(path).is_dir() else _NOFOLLOW)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})  # the disk refused a write


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file + fsync + rename; no symlink is followed)."""
    path = Path(path)
    _refuse_symlink(path)
    clean_leftovers(path)
    tmp = _temp_name(path, "tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            _refuse_symlink(path)  # planted while we wrote: still refused, never followed
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise OutputPathError(f"cannot write {path}: {exc.strerror}; {path.name} is unchanged") from exc
    fsync_path(path.parent)
    return path


def write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> Path:
    """`write_bytes` of `text` encoded."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: str | Path, data: Any, **dumps: Any) -> Path:
    """`write_text` of `json.dumps(data, **dumps)` plus a newline (dumps defaults to indent=2)."""
    dumps.setdefault("indent", 2)
    return write_text(path, json.dumps(data, **dumps) + "\n")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(target: str | Path) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` and `.NAME.old-PID-*` next to `target` left by dead processes;
    returns what was removed. If `target` is missing and a dead process had moved the previous
    directory aside (`.NAME.old-PID-*`), that directory is put back first."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        match = pattern.match(name)
        if match is None or _pid_alive(int(match.group(2))):
            continue
        entry = parent / name
        if match.group(1) == "old" and not os.path.lexists(target) and entry.is_dir() and not entry.is_symlink():
            os.rename(entry, target)
            logger.warning("restored %s, moved aside by process %s that died before its swap", target, match.group(2))
        if os.path.lexists(entry):
            _remove(entry)
        removed.append(entry)
    if removed:
        logger.info("removed %d leftover temporaries of dead processes next to %s", len(removed), target)
    return removed


# ---- locks ------------------------------------------------------------------------------------
_held: dict[str, tuple[int, int]] = {}  # lock path -> (thread id, depth): re-entrant in one thread
_held_guard = threading.Lock()


def _busy(target: Path, lock_path: Path, fd: int | None) -> OutputPathError:
    holder = ""
    if fd is not None:
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            pass
    who = f"process {holder}" if holder else "another process"
    return OutputPathError(
        f"{target} is being written by {who} (lock {lock_path}); wait for it to finish or choose another output"
    )


@contextmanager
def exclusive_lock(target: str | Path, *, blocking: bool = False) -> Iterator[Path]:
    """Hold an exclusive flock on `.NAME.lock` next to `target` (OutputPathError if another
    process holds it; with `blocking`, wait for it instead). Re-entrant within one thread. The lock file is unlinked
    before the lock is released, so none is left behind."""
    target = Path(os.path.abspath(target))
    lock_path = target.with_name(f".{target.name}.lock")
    key = os.path.abspath(lock_path)
    me = threading.get_ident()
    with _held_guard:
        owner = _held.get(key)
        if owner is not None:
            if owner[0] != me:
                raise _busy(target, lock_path, None)
            _held[key] = (me, owner[1] + 1)
    if owner is not None:
        try:
            yield lock_path
        finally:
            with _held_guard:
                _held[key] = (me, _held[key][1] - 1)
        return
    fd = _acquire(target, lock_path, blocking)
    with _held_guard:
        _held[key] = (me, 1)
    try:
        yield lock_path
    finally:
        with _held_guard:
            del _held[key]
        try:
            os.unlink(lock_path)
        except OSError:
            pass
        os.close(fd)  # releases the flock


def _acquire(target: Path, lock_path: Path, blocking: bool) -> int:
    try:
        import fcntl
    except ImportError:  # not POSIX: no inter-process lock
        return os.open(os.devnull, os.O_RDONLY)
    for _ in range(100):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
        except FileNotFoundError:
            raise OutputPathError(f"cannot write {target}: its parent directory {lock_path.parent} does not exist") from None
        except NotADirectoryError:
            raise OutputPathError(f"cannot write {target}: {lock_path.parent} is not a directory") from None
        except OSError as exc:
            raise OutputPathError(f"cannot write {target}: {exc.strerror} ({lock_path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            error = _busy(target, lock_path, fd)
            os.close(fd)
            raise error from None
        try:
            same = os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder unlinked after we opened it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise OutputPathError(f"cannot lock {target}: {lock_path} keeps being replaced")


# ---- output directories -----------------------------------------------------------------------
def check_output_dir(target: str | Path) -> Path:
    """`target` as a Path, refused (OutputPathError) if it is "", the current directory or one of
    its parents, or a symbolic link. It may exist (a directory) or not."""
    raw = os.fspath(target)
    if not raw.strip():
        raise OutputPathError("output directory '' is empty: name a new directory, e.g. runs/my-model")
    path = Path(raw).expanduser()
    real = Path(os.path.realpath(path))
    cwd = Path(os.path.realpath(os.getcwd()))
    if real == cwd or real in cwd.parents:
        raise OutputPathError(
            f"output directory {raw!r} is the current directory or one of its parents; ptqkit writes into a "
            "directory of its own: name a new or empty one, e.g. runs/my-model"
        )
    _refuse_symlink(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"output directory {raw!r} exists and is not a directory")
    return path


def copy_entry(src: Path, dst: Path) -> None:
    """Carry `src` into `dst`: files hard-linked (copied where links fail), symbolic links
    re-created as links (never followed), directories recursively."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        os.mkdir(dst)
        shutil.copymode(src, dst)
        for child in src.iterdir():
            copy_entry(child, dst / child.name)
    else:
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the system or file system has none."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if function(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def swap_in(tmp: str | Path, target: str | Path) -> None:
    """Put the directory `tmp` at `target` in one step. An existing `target` is exchanged with
    `tmp` atomically (tmp then holds the old directory, for the caller to remove); where the OS
    cannot exchange, the old directory is renamed aside (`.NAME.old-PID-*`) first and removed after."""
    tmp, target = Path(tmp), Path(target)
    if os.path.lexists(target):
        _refuse_symlink(target)
        if not _renameat2(tmp, target, _RENAME_EXCHANGE):
            old = _temp_name(target, "old")
            os.rename(target, old)
            os.rename(tmp, target)
            _remove(old)
    elif not _renameat2(tmp, target, _RENAME_NOREPLACE):
        os.rename(tmp, target)
    fsync_path(target.parent if str(target.parent) else ".")



class DirectoryBuild:
    """A directory being built aside: `path` is the temporary directory, `target` the final one.
    Use through `build_directory`; call `commit()` (or `swap_in(build.path, build.target)`) once."""

    def __init__(self, target: Path, previous_mode: int | None) -> None:
        self.target = target
        self.path = _temp_name(target, "tmp")
        os.mkdir(self.path, 0o777)
        if previous_mode is not None:
            os.chmod(self.path, previous_mode)  # the directory keeps its mode

    def carry(self, keep: Callable[[Path], bool]) -> list[str]:
        """Carry the entries of the existing target for which `keep(entry)` is true and that the
        build does not hold already (hard links; symlinks as symlinks), except ptqkit's own
        temporaries and lock files; returns their names."""
        carried: list[str] = []
        if not self.target.is_dir():
            return carried
        for entry in sorted(self.target.iterdir()):
            if os.path.lexists(self.path / entry.name) or _TEMPORARY.match(entry.name) or not keep(entry):
                continue
            copy_entry(entry, self.path / entry.name)
            carried.append(entry.name)
        return carried

    def commit(self) -> None:
        """fsync every file and directory of the build (symlinks are not followed), then swap it in."""
        for directory, _, names in os.walk(self.path):
            for name in names:
                if not os.path.islink(os.path.join(directory, name)):
                    fsync_path(os.path.join(directory, name))
            fsync_path(directory)
        swap_in(self.path, self.target)


def _refuse_foreign(target: Path, owned: Callable[[Path], bool]) -> None:
    _refuse_symlink(target)
    entries = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if entries and not owned(target):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputPathError(
            f"output directory {str(target)!r} is not empty ({shown}) and was not written by ptqkit; "
            "ptqkit never deletes or rewrites files it did not create: choose a new or empty directory"
        )


def prepare_output(target: str | Path, *, owned: Callable[[Path], bool] | None = None, try_lock: bool = False) -> Path:
    """`check_output_dir(target)`, with its parent created; with `owned`, a non-empty `target`
    that `owned` rejects is refused too; with `try_lock`, one that another process is writing
    (the lock is released again). All failures are OutputPathError: check before long work."""
    target = check_output_dir(target)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputPathError(f"cannot write {target}: a parent of it is a file, not a directory") from None
    except OSError as exc:
        raise OutputPathError(f"cannot write {target}: {exc.strerror} ({exc.filename})") from None
    if owned is not None:
        _refuse_foreign(target, owned)
    if try_lock:
        with exclusive_lock(target):
            pass
    return target


@contextmanager
def build_directory(
    target: str | Path, *, owned: Callable[[Path], bool] = lambda path: True, lock: bool = True, blocking: bool = False
) -> Iterator[DirectoryBuild]:
    """Build the directory `target` aside and swap it in once (`DirectoryBuild.commit`).

    Checks `target` (`check_output_dir`), takes `exclusive_lock(target, blocking=blocking)`
    (unless `lock=False`: the caller holds it), removes leftovers of dead processes, and refuses an existing non-empty
    `target` for which `owned(target)` is false (a directory ptqkit did not create is never
    rebuilt). Whatever is left at the temporary path on exit (an uncommitted build, or the old
    directory after the exchange) is removed."""
    target = prepare_output(target)
    with exclusive_lock(target, blocking=blocking) if lock else _nothing():
        clean_leftovers(target)
        previous_mode = None
        if target.is_dir():
            _refuse_foreign(target, owned)
            previous_mode = stat.S_IMODE(target.stat().st_mode)
        try:
            build = DirectoryBuild(target, previous_mode)
        except OSError as exc:
            raise OutputPathError(f"cannot write {target}: {exc.strerror} ({exc.filename})") from None
        try:
            yield build
        except OSError as exc:
            if exc.errno not in _WRITE_ERRNOS:
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            raise OutputPathError(f"cannot write {target}: {exc.strerror}{where}; {target} is unchanged") from exc
        finally:
            if os.path.lexists(build.path):
                _remove(build.path)


@contextmanager
def _nothing() -> Iterator[None]:
    yield None
