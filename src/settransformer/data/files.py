"""Every file the library writes goes through [`atomic_write`][settransformer.data.files.atomic_write]: the
old file or the whole new one.

[`atomic_write`][settransformer.data.files.atomic_write] (and
[`atomic_path`][settransformer.data.files.atomic_path] for writers that need a path, e.g. exporters) writes to
a temporary file beside the target, flushes and fsyncs it, then renames it over the target (``os.replace`` is
atomic on POSIX and Windows): a crash, ``kill -9``, a file-size limit or a full disk during the write leaves
the previous file intact and no temporary behind. Temporaries of writers that were killed are removed by the
next write of the same file.

Operating-system failures become a [`WriteError`][settransformer.data.files.WriteError] (an ``OSError``) with
one line that names the file and says what happened: ``disk full while writing X``, ``X is read-only``,
``permission denied writing X``. [`short`][settransformer.data.files.short] keeps values quoted in error
messages short. Caches the library fills itself go under
[`default_cache_dir`][settransformer.data.files.default_cache_dir] unless a task says otherwise, never
into a user's data folder.

Examples:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write(folder / "a.txt", lambda f: f.write(b"hello")).read_text()
    'hello'
    >>> write_text_atomic(folder / "b.txt", "hi").read_text()
    'hi'
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import reprlib
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "WriteError",
    "atomic_path",
    "atomic_write",
    "default_cache_dir",
    "file_in_the_way",
    "os_error_message",
    "short",
    "write_text_atomic",
]

SHORT = 200
"""The longest excerpt of a value that an error message quotes."""


def short(value: object, limit: int = SHORT, *, quote: bool = True) -> str:
    """``repr(value)`` cut to ``limit`` characters (with the full length), for error messages.

    ``quote=False`` takes a string as it is (another error's message quoted inside ours).

    >>> short("x" * 1000, 10)
    "'xxxxxxxx... (1002 characters)"
    >>> short("points contain NaN", quote=False)
    'points contain NaN'
    """
    if isinstance(value, str) and not quote:
        text = value
    elif isinstance(value, (str, bytes, float, bool, type(None))):
        text = repr(value)
    elif isinstance(value, int):  # repr refuses integers of more than 4300 digits
        return repr(value) if value.bit_length() < 600 else f"an integer of {value.bit_length()} bits"
    else:
        # Containers are shown a few levels deep: never expanded whole, since YAML aliases can make a
        # 300-byte file a value whose full repr has hundreds of millions of characters.
        text = _SHORT_REPR.repr(value)
        return text if len(text) <= limit else f"{text[: limit - 1]}..."
    if len(text) <= limit:
        return text
    return f"{text[: limit - 1]}... ({len(text)} characters)"


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel = 3
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = _SHORT_REPR.maxlong = SHORT


class WriteError(OSError):
    """Writing a file failed for a reason the user can fix (full disk, read-only folder...).

    Its message is one line naming the file; the CLI prints it and exits with 2.
    """


def os_error_message(err: OSError, path: str | Path, doing: str = "writing") -> str:
    """One line for an operating-system error met while ``doing`` ``path``.

    >>> import errno
    >>> os_error_message(OSError(errno.ENOSPC, "No space left on device"), "runs/x/checkpoint.pt")
    'disk full while writing runs/x/checkpoint.pt'
    """
    code = err.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"disk full while {doing} {path}"
    if code == errno.EROFS:
        return f"{path} is read-only (a read-only file system)"
    if code in (errno.EACCES, errno.EPERM):
        return f"{path} is read-only (permission denied while {doing} it)"
    if code == errno.EFBIG:
        return f"file too large while {doing} {path} (a file-size limit)"
    reason = err.strerror or str(err) or type(err).__name__
    return f"{path}: {doing} it failed ({reason})"


def _os_error_of(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind ``exc``: itself, or one it was raised from (``torch.save`` reports a
    full disk as a ``RuntimeError`` raised while handling the ``OSError``)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed over ``path`` when the block ends without error.

    For writers that take a file name (``torch.onnx.export``, ``torch.jit.save``). The file is
    fsynced before the rename; on any error it is removed and ``path`` is left as it was.
    Operating-system errors become a [`WriteError`][settransformer.data.files.WriteError] naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temporary(path)
        os.close(fd)
    except OSError as e:
        raise WriteError(os_error_message(e, path)) from None
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        os_err = _os_error_of(e)
        if os_err is not None and not isinstance(e, WriteError):
            raise WriteError(os_error_message(os_err, path)) from None
        raise
    _fsync_dir(path.parent)
    _remove_stale_temporaries(path)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(f)`` on a binary file that replaces ``path`` atomically once it is complete.

    Returns ``path``. Raises [`WriteError`][settransformer.data.files.WriteError] (one line naming ``path``)
    for a full disk, a read-only folder or another operating-system error; other errors of ``write``
    propagate.
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
    return path


def file_in_the_way(path: str | Path) -> Path | None:
    """The first of ``path``'s parent folders that exists as a file, so that ``path`` cannot be
    written (its folders are made as it is written); ``None`` when there is none. Checked before
    the work that produces an output, not when it is written.

    Examples:
        >>> import tempfile
        >>> file = Path(tempfile.mkdtemp()) / "afile"
        >>> _ = file.write_text("")
        >>> file_in_the_way(file / "out.csv") == file, file_in_the_way(file.parent / "new" / "out.csv")
        (True, None)
    """
    return next((p for p in reversed(Path(path).parents) if p.exists() and not p.is_dir()), None)


def default_cache_dir() -> Path:
    """Where the library's caches go by default (the MoG benchmark, the digits baselines, sampled
    ``.off`` meshes): ``$SETTRANSFORMER_CACHE`` if set, else ``~/.cache/settransformer``.

    Examples:
        >>> import os
        >>> os.environ["SETTRANSFORMER_CACHE"] = "/tmp/st-cache"
        >>> default_cache_dir()
        PosixPath('/tmp/st-cache')
        >>> del os.environ["SETTRANSFORMER_CACHE"]
    """
    env = os.environ.get("SETTRANSFORMER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "settransformer"


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see
    [`atomic_write`][settransformer.data.files.atomic_write])."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new file ``.<name>.<pid>-<random>-<host>.tmp`` beside ``path`` (same file system, so the
    rename is atomic), created with mode 0o666 so the umask applies as for ``open(path, "wb")``.
    The pid and host let a later write tell the temporaries of killed writers from live ones."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}-{_HOST}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # 1 in 4 billion: draw another name
            continue


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of ``path`` whose writer (a process on this host) no longer exists."""
    if os.name != "posix":
        return
    prefix = f".{path.name}."
    for tmp in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        pid, _, rest = tmp.name[len(prefix) : -len(".tmp")].partition("-")
        if not pid.isdigit() or rest.partition("-")[2] != _HOST or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:  # it exists but is not ours to signal: leave its file alone
            pass


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
