"""Plumbing shared by the scripts of this folder: bad input is answered with one line on stderr
and a non-zero exit, never a traceback; files that matter are written atomically."""
import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import torch


class UsageError(ValueError):
    """A flag value or combination of flags that cannot work."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but an invalid argument prints one line ("prog: error: ...") instead of usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def run(main, args, expected_errors):
    """main(args); an exception of a type in expected_errors becomes 'prog: error: <message>', exit 1."""
    try:
        main(args)
    except expected_errors as error:
        lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        message = lines[0]
        if "Traceback" in str(error):
            # raised in a DataLoader worker: the message is the last line, after "module.ErrorType: "
            message = lines[-1].split(": ", 1)[-1]
        sys.exit(f"{sys.argv[0]}: error: {message}")
    except KeyboardInterrupt:
        sys.exit(130)


def pick_device(gpu: int) -> torch.device:
    """cuda:GPU when CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if not 0 <= gpu < torch.cuda.device_count():
        raise UsageError(f"--gpu {gpu}: there are {torch.cuda.device_count()} CUDA devices")
    return torch.device(f"cuda:{gpu}")


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

    Readers (and a crash) see the old file or the new one, never half of one; on failure the
    temporary file is removed and path is untouched. The temporary file is in path's own folder
    because a rename is only atomic within one file system; it gets the permissions open() would
    give (mkstemp's are owner-only).
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
