"""Two small I/O helpers used across the package: JSON-plain values and atomic file writes."""

from __future__ import annotations

import contextlib
import math
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["plain", "atomic_write"]


def plain(value: Any, *, finite: bool = False) -> Any:
    """``value`` as plain JSON types: mappings as dicts with str keys, tuples and arrays as
    lists, NumPy scalars as Python numbers, paths as strings.

    finite: NaN and inf become None (for ``json.dumps(..., allow_nan=False)``).
    Anything else raises TypeError naming the value.
    """
    if isinstance(value, Mapping):
        return {str(key): plain(item, finite=finite) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item, finite=finite) for item in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist(), finite=finite)
    if isinstance(value, np.generic):
        return plain(value.item(), finite=finite)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and finite and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"value {value!r} of type {type(value).__name__} is not JSON-able")


def atomic_write(path: str | os.PathLike, write: Callable[[IO], Any], *, text: bool = False,
                 durable: bool = False) -> Path:
    """Write a file so that a reader (or a crash) only ever sees the old or the new whole file.

    ``write(stream)`` fills a temporary file in the same folder, which then replaces ``path``
    (``os.replace``). durable: fsync the file before the rename and the folder after it.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # mode as open()'s
    try:
        with open(temporary, "x" if text else "xb", **({"newline": ""} if text else {})) as stream:
            write(stream)
            if durable:
                stream.flush()
                os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if durable:
        with contextlib.suppress(OSError):  # not every file system can open a folder
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    return path
