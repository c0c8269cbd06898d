"""Pure path rules for synced folders: file ids <-> paths inside a folder, and name clashes.

A file inside a folder gets the id ``<folder id>/<path relative to the folder, posix form>``.
Ids from the wire are already checked by :func:`schemas.names.check_file_id` (relative, no
empty, ``.`` or ``..`` segment, no backslash, no control character); here a relative path is also
held to what every common file system can store.
"""

from __future__ import annotations

from collections.abc import Iterable

from schemas.names import check_file_id

MAX_SEGMENT_BYTES = 255
"""NAME_MAX on Linux, macOS and Windows (bytes of UTF-8 on the first two)."""


def check_relative(rel: str) -> str:
    """A path relative to a folder, posix form: the rules of a file id plus NAME_MAX per segment."""
    check_file_id(rel)
    for part in rel.split("/"):
        if len(part.encode()) > MAX_SEGMENT_BYTES:
            raise ValueError(f"path segment {part[:40]!r}... is longer than {MAX_SEGMENT_BYTES} bytes")
    return rel


def folder_file_id(folder_id: str, rel: str) -> str:
    return check_file_id(f"{folder_id}/{check_relative(rel)}")


def split_file_id(file_id: str, folder_ids: Iterable[str]) -> tuple[str, str] | None:
    """``(folder id, relative path)`` for an id inside one of the folders (the longest match), else None."""
    best: tuple[str, str] | None = None
    for fid in folder_ids:
        if file_id.startswith(fid + "/") and (best is None or len(fid) > len(best[0])):
            best = (fid, file_id[len(fid) + 1 :])
    if best is None:
        return None
    try:
        check_relative(best[1])
    except ValueError:
        return None
    return best


def parents(rel: str) -> list[str]:
    """The folders above ``rel``, innermost first: ``a/b/c.png`` -> [``a/b``, ``a``]."""
    parts = rel.split("/")[:-1]
    return ["/".join(parts[:i]) for i in range(len(parts), 0, -1)]


def case_clashes(paths: Iterable[str]) -> dict[str, list[str]]:
    """Paths that differ only in letter case, grouped by their case-folded form.

    Two such names are one file on a case-insensitive file system (Windows, macOS by default):
    writing both would make one overwrite the other.
    """
    groups: dict[str, set[str]] = {}
    for p in paths:
        groups.setdefault(p.casefold(), set()).add(p)
    return {k: sorted(v) for k, v in groups.items() if len(v) > 1}

