"""Ignore rules for synced folders: the folder's gitignore-style patterns plus built-in ones.

Patterns follow .gitignore (``*``, ``**``, ``?``, ``[...]``, a trailing ``/`` for folders only,
a leading ``/`` to anchor at the folder, ``!`` to re-include), matched with ``pathspec``.  The
built-ins cover the agent's own temp files and conflict copies, and the swap, backup and metadata
files editors and operating systems leave beside real files.  A path that is ignored is never
sent, and a remote file at an ignored path is never written.
"""

from __future__ import annotations

from collections.abc import Iterable

import pathspec

BUILTIN_IGNORES: tuple[str, ...] = (
    ".*.atrius-*.tmp",  # the agent's own temp files (agent.apply.temp_path_for)
    "*.conflict-*",  # conflict copies: the history keeps their content
    "*.swp", "*.swo", "*.swx", ".*.sw?",  # vim
    "*~", ".#*", "\\#*#",  # emacs and others (a leading # would be a comment)
    "~$*",  # Office owner files
    "*.crdownload",  # unfinished downloads
    ".DS_Store", "._*", ".Spotlight-V100/", ".Trashes/", ".fseventsd/",  # macOS
    "Thumbs.db", "ehthumbs.db", "desktop.ini", "$RECYCLE.BIN/",  # Windows
    ".atrius/",  # agent state dirs (the default state_dir is .atrius/<device>)
)


def compile_ignore(patterns: Iterable[str]) -> pathspec.GitIgnoreSpec:
    """A matcher for gitignore-style patterns; ValueError for a pattern it cannot read."""
    try:
        return pathspec.GitIgnoreSpec.from_lines(list(patterns))
    except (ValueError, TypeError) as exc:
        raise ValueError(str(exc)) from exc


class IgnoreRules:
    """Whether a path relative to a folder (posix form) is ignored."""

    def __init__(self, patterns: Iterable[str], *, builtin: bool = True) -> None:
        self.user = tuple(patterns)
        self._spec = compile_ignore([*(BUILTIN_IGNORES if builtin else ()), *self.user])

    def ignored(self, rel: str, *, is_dir: bool = False) -> bool:
        return self._spec.match_file(rel + "/" if is_dir else rel)

    def ignored_path(self, rel: str, *, is_dir: bool = False) -> bool:
        """A path (a file, or a folder with ``is_dir``) whose own name or any folder above it is ignored."""
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if self.ignored("/".join(parts[:i]), is_dir=True):
                return True
        return self.ignored(rel, is_dir=is_dir)
