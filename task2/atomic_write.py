"""All-or-nothing writes: a crash or a full disk never leaves a half-written file or folder."""
import contextlib
import os
import shutil
from pathlib import Path


def temporary_path(path):
    """Where ``atomic_write`` writes ``path`` before renaming it: a hidden name in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def _remove(path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _fsync(path):
    """Flush ``path`` (a file or a folder's list of names) to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path):
    """Write the file or folder ``path`` all or nothing.

    Yields ``temporary_path(path)``, a fresh name in the same folder; what the body writes there
    (a file, or a folder with files in it) is fsynced and renamed to ``path``, replacing an older
    one, when the body returns, and removed when it raises. Files get the permissions the umask
    gives a new file: writers that go through a temporary file of their own (safetensors) leave 0600.
    """
    path = Path(path)
    tmp = temporary_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove(tmp)
    try:
        yield tmp
        file_mode = 0o666 & ~_umask()
        for written in [tmp, *tmp.rglob("*")]:
            if written.is_file():
                written.chmod(file_mode)
            _fsync(written)
        # os.replace cannot put a folder over a non-empty one; only a re-run of the same step gets here.
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        _remove(tmp)
        raise


def save_image_atomic(image, path):
    """Write a PIL image so that a crash never leaves a half-written file at ``path``."""
    with atomic_write(path) as tmp:
        image.save(tmp, format=Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG"))
