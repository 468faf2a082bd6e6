"""gpu-io's exceptions, and the mapping from the library's error kinds onto them.

Every exception gpu-io raises for an I/O or data problem is a ``gpuio.Error``; where Python has a
matching built-in exception the class also derives from it, so existing ``except`` clauses work:

============================  =====================================  ==================
library kind                  gpuio class                            also a
============================  =====================================  ==================
NotFound                      ``NotFoundError``                      FileNotFoundError
PermissionDenied              ``PermissionDeniedError``              PermissionError
IsADirectory                  ``IsADirectoryError``                  IsADirectoryError
Io                            ``IoError``                            OSError
NoSpace                       ``NoSpaceError``                       OSError
InvalidInput                  ``InvalidInputError``                  ValueError
UnexpectedEof                 ``UnexpectedEofError``                 EOFError
Unsupported                   ``UnsupportedError``                   NotImplementedError
Corrupt                       ``CorruptError``                       —
WouldBlock, RetriesExhausted  ``LimitError``                         —
OutOfMemory                   ``OutOfMemoryError`` (a LimitError)    MemoryError
Cancelled                     ``CancelledError``                     concurrent.futures.CancelledError
EngineStopped                 ``EngineStoppedError``                 RuntimeError
============================  =====================================  ==================

``str(e)`` is the library error's one-line message — the line the ``gpuio`` CLI prints — for
example ``read /data/x at offset 4096 (+4096 bytes): I/O error: Input/output error (os error 5)``.
The OSError subclasses carry ``errno`` (from the OS where there was one) and ``filename``.
"""

from __future__ import annotations

import concurrent.futures
import errno as _errno
from typing import Optional

__all__ = [
    "Error",
    "NotFoundError",
    "PermissionDeniedError",
    "IsDirectoryError",
    "IoError",
    "NoSpaceError",
    "InvalidInputError",
    "UnexpectedEofError",
    "UnsupportedError",
    "CorruptError",
    "LimitError",
    "OutOfMemoryError",
    "CancelledError",
    "EngineStoppedError",
    "from_parts",
]


class Error(Exception):
    """Base class of gpu-io's errors.

    Attributes: ``kind`` (the library's ErrorKind name, e.g. ``"Corrupt"``), ``message`` (the
    one-line text, also ``str(e)``), ``path``, ``offset`` and ``length`` (the byte range that failed,
    when known) and ``errno`` (the OS error number, when the error came from the OS).
    """

    kind: str = "Io"
    message: str = ""
    path: Optional[str] = None
    offset: Optional[int] = None
    length: Optional[int] = None

    def __str__(self) -> str:
        return self.message or super().__str__()


class NotFoundError(Error, FileNotFoundError):
    """The file does not exist (ENOENT)."""


class PermissionDeniedError(Error, PermissionError):
    """The OS refused access (EACCES, EPERM, EROFS), or a write to a file opened read-only."""


class IsDirectoryError(Error, IsADirectoryError):
    """A path names a directory where a file was needed (EISDIR)."""


class IoError(Error, OSError):
    """The device reported an I/O error, or another OS error (``errno`` says which)."""


class NoSpaceError(Error, OSError):
    """The device or filesystem is full (ENOSPC, EDQUOT, EFBIG)."""


class InvalidInputError(Error, ValueError):
    """An argument is out of range or inconsistent."""


class UnexpectedEofError(Error, EOFError):
    """An exact read reached the end of the file (or pack entry) before its last byte."""


class UnsupportedError(Error, NotImplementedError):
    """The platform, kernel, filesystem or device cannot do what was asked (no CUDA driver, no
    O_DIRECT with ``direct="on"``, ...). The message says what is missing."""


class CorruptError(Error):
    """Stored bytes fail a check: a checksum, a pack table, a safetensors header."""


class LimitError(Error):
    """A bound was reached: a memory budget or bounded queue is exhausted and the call asked not to
    wait (WouldBlock), or retries of a transient condition ran out (RetriesExhausted)."""


class OutOfMemoryError(LimitError, MemoryError):
    """An accelerator (device) memory allocation failed: the device is full."""


class CancelledError(Error, concurrent.futures.CancelledError):
    """The operation was cancelled before it completed."""


class EngineStoppedError(Error, RuntimeError):
    """The engine's thread stopped while work was outstanding."""


_CLASSES = {
    "NotFound": (NotFoundError, _errno.ENOENT),
    "PermissionDenied": (PermissionDeniedError, _errno.EACCES),
    "IsADirectory": (IsDirectoryError, _errno.EISDIR),
    "Io": (IoError, _errno.EIO),
    "NoSpace": (NoSpaceError, _errno.ENOSPC),
    "InvalidInput": (InvalidInputError, None),
    "UnexpectedEof": (UnexpectedEofError, None),
    "Unsupported": (UnsupportedError, None),
    "Corrupt": (CorruptError, None),
    "WouldBlock": (LimitError, None),
    "RetriesExhausted": (LimitError, None),
    "OutOfMemory": (OutOfMemoryError, None),
    "Cancelled": (CancelledError, None),
    "EngineStopped": (EngineStoppedError, None),
}


def from_parts(
    kind: str,
    message: str,
    errno: Optional[int] = None,
    path: Optional[str] = None,
    offset: Optional[int] = None,
    length: Optional[int] = None,
) -> Error:
    """Builds the exception for a library error (called by the extension module)."""
    cls, default_errno = _CLASSES.get(kind, (IoError, _errno.EIO))
    if issubclass(cls, OSError):
        code = errno if errno is not None else default_errno
        exc = cls(code, message) if code is not None else cls(message)
        exc.filename = path
    else:
        exc = cls(message)
    exc.kind = kind
    exc.message = message
    exc.path = path
    exc.offset = offset
    exc.length = length
    if not isinstance(exc, OSError):
        exc.errno = errno  # type: ignore[attr-defined]
    return exc
