"""Unit tests for agent/ignore.py: gitignore-style folder patterns, the built-in ignores, compile_ignore."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.apply import is_temp_name, temp_path_for
from agent.ignore import BUILTIN_IGNORES, IgnoreRules, compile_ignore
from agent.sync import conflict_name

# -- user patterns (no built-ins) ---------------------------------------------------------------------


def rules(*patterns: str) -> IgnoreRules:
    return IgnoreRules(patterns, builtin=False)


@pytest.mark.parametrize(
    ("pattern", "ignored", "kept"),
    [
        pytest.param("*.tmp", ["x.tmp", "a/x.tmp", "a/b/.x.tmp"], ["x.tmp.png", "tmp", "xtmp"], id="star"),
        pytest.param("a*", ["a", "abc", "d/abc"], ["ba", "b/ba"], id="star-prefix"),
        pytest.param("?.bak", ["x.bak", "d/x.bak"], ["xy.bak", ".bak"], id="question-mark"),
        pytest.param("[ab].log", ["a.log", "b.log", "d/a.log"], ["c.log", "ab.log"], id="bracket"),
        pytest.param("[!a].log", ["b.log"], ["a.log"], id="negated-bracket"),
        pytest.param("**/cache/**", ["cache/x", "a/cache/x", "a/b/cache/c/d"], ["cache", "cachex/y"],
                     id="double-star-both-sides"),
        pytest.param("docs/**/*.md", ["docs/a.md", "docs/x/y/a.md"], ["a.md", "other/docs/a.md", "docs/a.txt"],
                     id="double-star-middle"),
        pytest.param("/root.txt", ["root.txt"], ["a/root.txt"], id="leading-slash-anchors"),
        pytest.param("sub/x.txt", ["sub/x.txt"], ["a/sub/x.txt"], id="inner-slash-anchors"),
        pytest.param("name", ["name", "a/name", "a/b/name"], ["names", "aname"], id="plain-name-anywhere"),
    ],
)
def test_gitignore_patterns(pattern: str, ignored: list[str], kept: list[str]) -> None:
    r = rules(pattern)
    for rel in ignored:
        assert r.ignored(rel), rel
    for rel in kept:
        assert not r.ignored(rel), rel


def test_trailing_slash_matches_folders_only() -> None:
    r = rules("build/")
    assert r.ignored("build", is_dir=True)
    assert r.ignored("a/build", is_dir=True)
    assert not r.ignored("build")  # a file named build
    assert r.ignored("build/x.o")  # a file inside
    assert r.ignored("a/build/x.o")


def test_re_include_with_bang() -> None:
    r = rules("*.tmp", "!keep.tmp")
    assert r.ignored("x.tmp")
    assert not r.ignored("keep.tmp")
    assert not r.ignored("a/keep.tmp")


def test_the_last_matching_pattern_wins() -> None:
    assert rules("!keep.tmp", "*.tmp").ignored("keep.tmp")
    assert not rules("*.tmp", "!keep.tmp").ignored("keep.tmp")


def test_comments_and_blank_lines_are_no_patterns() -> None:
    r = rules("# a comment", "", "   ")
    assert not r.ignored("# a comment")
    assert not r.ignored("x")


def test_escaped_hash_is_a_pattern() -> None:
    assert rules("\\#*#").ignored("#autosave#")


def test_no_patterns_ignore_nothing() -> None:
    assert not rules().ignored("x")
    assert not rules().ignored_path("a/b/c")


def test_user_patterns_are_kept() -> None:
    assert IgnoreRules(["*.tmp", "build/"]).user == ("*.tmp", "build/")


# -- ignored_path: a file under an ignored folder --------------------------------------------------------


def test_a_file_under_an_ignored_folder_is_ignored() -> None:
    r = rules("build/")
    assert r.ignored_path("build/x.o")
    assert r.ignored_path("build/deep/er/x.o")
    assert r.ignored_path("a/build/x.o")
    assert not r.ignored_path("build")  # a file named build
    assert not r.ignored_path("builder/x.o")


def test_a_file_under_a_folder_ignored_by_name_is_ignored() -> None:
    r = rules("node_modules")
    assert r.ignored_path("node_modules/pkg/index.js")
    assert r.ignored_path("a/node_modules/x")


def test_a_file_under_an_ignored_folder_cannot_be_re_included() -> None:
    """As in git: a file inside an excluded folder stays excluded whatever a later '!' says."""
    r = rules("build/", "!build/keep.txt")
    assert r.ignored_path("build/other.txt")
    assert r.ignored_path("build/keep.txt")


def test_ignored_path_checks_the_name_itself() -> None:
    r = rules("*.tmp")
    assert r.ignored_path("a/b/x.tmp")
    assert r.ignored_path("x.tmp/y.png")  # a folder matching the pattern hides what it holds
    assert not r.ignored_path("a/b/x.png")


def test_folder_only_pattern_does_not_ignore_a_file_of_that_name_deep_down() -> None:
    r = rules("cache/")
    assert not r.ignored_path("a/b/cache")
    assert r.ignored_path("a/b/cache/x")


# -- built-in ignores --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rel",
    [
        ".hero.png.atrius-0af3c2d1.tmp",
        "sub/.hero.png.atrius-0af3c2d1.tmp",
        "hero.conflict-bob-20240101-120000.png",
        "a/b/Makefile.conflict-bob-20240101-120000",
        "hero.conflict-bob-20240101-120000-2.png",
        "x.swp", ".x.swp", ".x.swo", ".x.swx", "a/.notes.txt.swp",  # vim
        "notes.txt~", "a/notes.txt~", ".#notes.txt",  # emacs backup and lock
        "~$report.docx", "a/~$budget.xlsx",  # Office owner files
        "movie.mp4.crdownload",
        ".DS_Store", "a/b/.DS_Store", "._hero.png",  # macOS
        "Thumbs.db", "a/Thumbs.db", "ehthumbs.db", "desktop.ini", "a/desktop.ini",  # Windows
        ".atrius/alice-pc/state.db", "sub/.atrius/x",  # agent state
        ".Trashes/x", "$RECYCLE.BIN/x", ".fseventsd/x", ".Spotlight-V100/x",
    ],
)
def test_builtin_ignores(rel: str) -> None:
    assert IgnoreRules([]).ignored_path(rel)
    assert not IgnoreRules([], builtin=False).ignored_path(rel)


@pytest.mark.parametrize(
    "rel",
    [
        "hero.png",
        "a/b/hero.png",
        "hero.png.atrius-0af3.tmp",  # not hidden: not one of our temp names
        ".hero.png.atrius-0af3.tmp.png",
        "x.tmp",
        "swp",
        "x.swp.png",
        "conflict.png",
        "my-conflict-notes.txt",
        "~report.docx",
        "DS_Store",
        "Thumbs.db.png",
        ".atrius",  # a file of that name (the rule is for folders)
        "atrius/x",
        ".gitignore",
        ".hidden",
    ],
)
def test_builtin_ignores_keep_ordinary_files(rel: str) -> None:
    assert not IgnoreRules([]).ignored_path(rel)


def test_builtin_ignores_emacs_autosave_files() -> None:
    assert IgnoreRules([]).ignored_path("#notes.txt#")


def test_builtin_ignores_folders_as_folders() -> None:
    r = IgnoreRules([])
    assert r.ignored(".atrius", is_dir=True)
    assert r.ignored("a/.atrius", is_dir=True)
    assert r.ignored("$RECYCLE.BIN", is_dir=True)


def test_builtin_ignores_apply_beside_user_patterns() -> None:
    r = IgnoreRules(["*.psd"])
    assert r.ignored_path("art.psd")
    assert r.ignored_path(".DS_Store")
    assert not r.ignored_path("art.png")


def test_a_user_pattern_can_re_include_a_builtin() -> None:
    r = IgnoreRules(["!keep.swp"])
    assert r.ignored_path("x.swp")
    assert not r.ignored_path("keep.swp")


def test_the_agents_real_temp_and_conflict_names_are_ignored(tmp_path: Path) -> None:
    r = IgnoreRules([])
    for name in ("hero.png", "Makefile", ".bashrc", "archive.tar.gz", "ü ß.png"):
        temp = temp_path_for(tmp_path / "sub" / name)
        assert is_temp_name(temp.name)
        assert r.ignored_path(f"sub/{temp.name}"), temp.name
        copy = conflict_name(tmp_path / name, "bob", when=0.0)
        assert r.ignored_path(copy.name), copy.name


def test_builtin_ignores_compile() -> None:
    spec = compile_ignore(BUILTIN_IGNORES)
    assert spec.match_file(".DS_Store")


# -- compile_ignore -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["!", "\\"])
def test_compile_ignore_rejects_unreadable_patterns_with_value_error(pattern: str) -> None:
    with pytest.raises(ValueError):
        compile_ignore([pattern])


def test_compile_ignore_rejects_non_strings_with_value_error() -> None:
    with pytest.raises(ValueError):
        compile_ignore([3])  # type: ignore[list-item]


def test_ignore_rules_reject_a_bad_pattern() -> None:
    with pytest.raises(ValueError):
        IgnoreRules(["*.tmp", "!"])


def test_compile_ignore_accepts_ordinary_patterns() -> None:
    spec = compile_ignore(["*.tmp", "build/", "/root", "!keep.tmp", "**/x/**", "[a-z]?.log", "# comment", ""])
    assert spec.match_file("a.tmp")
    assert not spec.match_file("keep.tmp")
