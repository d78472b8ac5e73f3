"""Atomic file writes: a hidden temp file in the same folder, then a rename.

Readers that list a folder (the Flink file source, the ETL's landing scan, the forget job)
skip names that start with ``.``, so they never see a half-written file; ``os.replace`` then
puts the new content in place of the old whole, or not at all. The temp file sits in the
target's own folder so that the rename never crosses a file system.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a hidden temp path next to ``path``; renames it onto ``path`` when the block ends.

    Args:
        path: The file to write. Its folder is created if missing.

    Yields:
        ``<folder>/.<name>.tmp``, for the caller to write (by hand or through a library).

    Raises:
        Whatever the block raises, after removing the temp file; ``path`` is left as it was.

    Example:
        >>> with atomic_path(target) as tmp:  # doctest: +SKIP
        ...     pq.write_table(table, tmp)
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_lines(path: Path, lines: Iterable[str]) -> None:
    """Writes ``lines`` to ``path`` atomically, one at a time (no joined string in memory).

    Args:
        path: The file to write.
        lines: The lines, each with its own line ending (as ``readlines`` returns them); a
            generator is consumed while writing.
    """
    with atomic_path(path) as tmp, tmp.open("w") as fh:
        fh.writelines(lines)
