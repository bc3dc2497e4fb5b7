"""Files that appear whole or not at all, and the one check that a path lies inside given folders."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator, Union

_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_file(dest: Union[str, os.PathLike], mode: str = "wb") -> Iterator[IO]:
    """Yield a file handle; on success it is flushed, fsynced and renamed onto `dest`, on failure removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + dest.name + ".", suffix=".part", dir=str(dest.parent))
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def within(path: Union[str, os.PathLike], roots) -> bool:
    """True when `path`, with symlinks and '..' resolved, is one of `roots` or lies under one of them."""
    real = os.path.realpath(path)
    for root in roots:
        if not root:
            continue
        base = os.path.realpath(root).rstrip(os.sep)
        if real == base or real.startswith(base + os.sep):
            return True
    return False
