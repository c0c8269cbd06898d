"""Unit tests for schemas/paths.py: relative paths inside a folder, folder file ids, parents, case clashes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.names import MAX_FILE_ID
from schemas.paths import MAX_SEGMENT_BYTES, case_clashes, check_relative, folder_file_id, parents, split_file_id

HOSTILE = [
    pytest.param("", id="empty"),
    pytest.param("..", id="dotdot"),
    pytest.param(".", id="dot"),
    pytest.param("../x", id="parent"),
    pytest.param("a/../../x", id="parent-in-the-middle"),
    pytest.param("a/..", id="parent-at-the-end"),
    pytest.param("/abs", id="absolute"),
    pytest.param("/", id="root"),
    pytest.param("a//b", id="empty-segment"),
    pytest.param("a/", id="trailing-slash"),
    pytest.param("./a", id="dot-segment"),
    pytest.param("a/./b", id="dot-in-the-middle"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a\rb", id="carriage-return"),
    pytest.param("a\tb", id="tab"),
    pytest.param("\x1b[2Jx", id="escape"),
    pytest.param("a\x7f", id="del"),
    pytest.param("a\x85b", id="c1-control"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("..\\..\\x", id="windows-parent"),
    pytest.param("C:\\x", id="windows-drive"),
    pytest.param("x" * (MAX_SEGMENT_BYTES + 1), id="256-byte-segment"),
    pytest.param("a/" + "x" * (MAX_SEGMENT_BYTES + 1) + "/b", id="256-byte-inner-segment"),
    pytest.param("é" * 128, id="256-bytes-of-utf8-in-128-characters"),
    pytest.param("a/" * 300 + "b", id="longer-than-a-file-id"),
]


@pytest.mark.parametrize("rel", HOSTILE)
def test_check_relative_rejects_hostile_paths(rel: str) -> None:
    with pytest.raises(ValueError):
        check_relative(rel)


@pytest.mark.parametrize(
    "rel",
    [
        "a.png",
        "a/b/c.png",
        "Sub Dir/Hero.PNG",
        "ü/ß.png",
        "日本語/ファイル.txt",
        "emoji 🎨.png",
        ".hidden",
        "..double-dot-prefix",
        "a..b",
        "...",
        " leading and trailing ",
        "x" * MAX_SEGMENT_BYTES,
        "é" * 127,  # 254 bytes
        "a/" + "x" * MAX_SEGMENT_BYTES,
    ],
)
def test_check_relative_accepts_ordinary_names(rel: str) -> None:
    assert check_relative(rel) == rel


def test_segment_limit_counts_utf8_bytes_not_characters() -> None:
    check_relative("€" * 85)  # 255 bytes
    with pytest.raises(ValueError, match="255 bytes"):
        check_relative("€" * 85 + "x")  # 256 bytes in 86 characters
    check_relative("🎨" * 63 + "xyz")  # 4-byte characters: 255 bytes
    with pytest.raises(ValueError, match="255 bytes"):
        check_relative("🎨" * 64)


# -- folder_file_id ----------------------------------------------------------------------------------


def test_folder_file_id_joins_with_a_slash() -> None:
    assert folder_file_id("textures", "a.png") == "textures/a.png"
    assert folder_file_id("assets/tex", "sub/a.png") == "assets/tex/sub/a.png"
    assert folder_file_id("tex", "ü/ß.png") == "tex/ü/ß.png"


@pytest.mark.parametrize("rel", HOSTILE)
def test_folder_file_id_rejects_hostile_relative_paths(rel: str) -> None:
    with pytest.raises(ValueError):
        folder_file_id("textures", rel)


def test_folder_file_id_holds_the_whole_id_to_the_file_id_limit() -> None:
    folder = "f" * 200
    rel = "/".join(["x" * 200] * 2)
    assert len(folder) + 1 + len(rel) > MAX_FILE_ID
    with pytest.raises(ValueError):
        folder_file_id(folder, rel)


# -- split_file_id --------------------------------------------------------------------------------------


def test_split_file_id_finds_the_folder() -> None:
    assert split_file_id("textures/a.png", ["audio", "textures"]) == ("textures", "a.png")
    assert split_file_id("textures/sub/a.png", ["textures"]) == ("textures", "sub/a.png")
    assert split_file_id("assets/tex/a.png", ["assets/tex"]) == ("assets/tex", "a.png")


def test_split_file_id_takes_the_longest_matching_folder_in_any_order() -> None:
    for ids in (["tex", "tex/sub"], ["tex/sub", "tex"]):
        assert split_file_id("tex/sub/a.png", ids) == ("tex/sub", "a.png")
        assert split_file_id("tex/a.png", ids) == ("tex", "a.png")
        assert split_file_id("tex/subway/a.png", ids) == ("tex", "subway/a.png")


@pytest.mark.parametrize(
    "file_id",
    [
        "textures",  # the folder itself is not a file inside it
        "textures/",
        "texturesX/a.png",  # a prefix of the name is not a parent folder
        "tex/a.png",
        "other/textures/a.png",
        "Textures/a.png",  # ids are case-sensitive
        "",
    ],
)
def test_split_file_id_outside_every_folder_is_none(file_id: str) -> None:
    assert split_file_id(file_id, ["textures"]) is None


def test_split_file_id_without_folders_is_none() -> None:
    assert split_file_id("a/b", []) is None


@pytest.mark.parametrize(
    "rest",
    ["../x", "a/../../x", "/abs", "a//b", "./a", "a\x00b", "a\nb", "a\\b", "..", "x" * (MAX_SEGMENT_BYTES + 1)],
)
def test_split_file_id_with_an_invalid_relative_path_is_none(rest: str) -> None:
    assert split_file_id(f"textures/{rest}", ["textures"]) is None
    # also when a shorter folder id would match too
    assert split_file_id(f"tex/sub/{rest}", ["tex", "tex/sub"]) is None


@given(rel=st.lists(st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=20), min_size=1,
                    max_size=4).map("/".join))
def test_split_file_id_inverts_folder_file_id(rel: str) -> None:
    try:
        fid = folder_file_id("tex/sub", rel)
    except ValueError:
        assert split_file_id(f"tex/sub/{rel}", ["tex", "tex/sub"]) is None
        return
    assert split_file_id(fid, ["tex", "tex/sub", "other"]) == ("tex/sub", rel)


# -- parents -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("a.png", []),
        ("a/b.png", ["a"]),
        ("a/b/c.png", ["a/b", "a"]),
        ("x/y/z/w", ["x/y/z", "x/y", "x"]),
        ("ü/ß/f", ["ü/ß", "ü"]),
    ],
)
def test_parents_innermost_first(rel: str, expected: list[str]) -> None:
    assert parents(rel) == expected


# -- case_clashes ---------------------------------------------------------------------------------------


def test_case_clashes_groups_names_differing_only_in_case() -> None:
    assert case_clashes(["A/b.png", "a/b.png", "a/B.png", "c.png"]) == {"a/b.png": ["A/b.png", "a/B.png", "a/b.png"]}


def test_case_clashes_none() -> None:
    assert case_clashes([]) == {}
    assert case_clashes(["a", "b", "a/b", "ab"]) == {}


def test_case_clashes_ignores_repeats_of_one_name() -> None:
    assert case_clashes(["a.png", "a.png", "x"]) == {}


def test_case_clashes_uses_unicode_case_folding() -> None:
    assert case_clashes(["Straße", "STRASSE"]) == {"strasse": ["STRASSE", "Straße"]}
    assert case_clashes(["Über.txt", "über.txt"]) == {"über.txt": ["Über.txt", "über.txt"]}


def test_case_clashes_several_groups() -> None:
    got = case_clashes(["X", "x", "Y/z", "y/Z", "w"])
    assert got == {"x": ["X", "x"], "y/z": ["Y/z", "y/Z"]}
