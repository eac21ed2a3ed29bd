"""Reading operator-supplied files (policy, bundle manifest) without trusting them.

`read_regular_file` refuses anything that is not a regular file (a FIFO would block the
reader forever, a device could stream without end) and never reads more than
`max_bytes + 1` bytes, whatever the file claims or grows to while being read. Symlinks
are followed (Kubernetes mounts ConfigMaps through them) and the checks apply to the
target.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["FileRefused", "read_regular_file"]


class FileRefused(Exception):
    """The path is readable but not acceptable: not a regular file, or too large.

    Attributes:
        expected: what was expected ("a regular file", "at most N bytes").
        found: what was found ("a FIFO", "more than N bytes").
    """

    def __init__(self, expected: str, found: str) -> None:
        super().__init__(f"expected {expected}, found {found}")
        self.expected = expected
        self.found = found


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def read_regular_file(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The bytes of the regular file `path`, at most `max_bytes` of them.

    Raises:
        FileRefused: not a regular file, or longer than `max_bytes`.
        OSError: cannot be opened or read (missing, permissions, ...).
    """
    # O_NONBLOCK: opening a FIFO for reading must not wait for a writer
    fd = os.open(Path(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "a special file")
            raise FileRefused("a regular file", kind)
        chunks: list[bytes] = []
        left = max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise FileRefused(f"at most {max_bytes} bytes", f"more than {max_bytes} bytes")
    return data
