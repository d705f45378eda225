"""Writes that a crash, a kill or a full disk cannot leave half done: the reader sees the old file
or the new one. The temporary file sits beside its target because a rename is atomic only within
one file system."""
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# the permissions open() and mkdir() give (mkstemp's and mkdtemp's are owner-only); the umask is
# read once, at import, because it can only be read by setting it
UMASK = _read_umask()
FILE_MODE, DIR_MODE = 0o666 & ~UMASK, 0o777 & ~UMASK


def atomic_write(path, write: Callable[[BinaryIO], None]) -> None:
    """write(f) into a temporary file beside path, fsync it, then rename it over path.

    On failure (an exception or KeyboardInterrupt) the temporary file is removed and path is
    untouched; the file gets the permissions open() would give.
    """
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def atomic_write_text(path, text: str) -> None:
    """atomic_write for a str (UTF-8)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
