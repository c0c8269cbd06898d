"""Unit tests for agent/config.py: load_config on YAML files in tmp_path; every error names key and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from agent.config import ConfigError, FileEntry, FolderEntry, load_config


def write(tmp_path: Path, text: str, name: str = "agent.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# -- a valid config -----------------------------------------------------------------------------------


def test_valid_config(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        device: alice-pc
        space: my-game
        broker:
          url: mqtts://broker.example:8884
          username: alice-pc
          password: secret
          ca_file: certs/ca.pem
        files:
          - path: Art/hero.png
            id: art/hero.png
          - path: ./Audio/theme.ogg
          - path: Scenes//level1.scene
        """,
    )
    cfg = load_config(path)
    assert cfg.source == path.absolute()
    assert cfg.device == "alice-pc"
    assert cfg.space == "my-game"
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.tls) == ("broker.example", 8884, True)
    assert cfg.username == "alice-pc"
    assert cfg.password == "secret"
    assert cfg.ca_file == str(tmp_path / "certs/ca.pem")
    assert [f.file_id for f in cfg.files] == ["art/hero.png", "Audio/theme.ogg", "Scenes/level1.scene"]
    assert [f.path for f in cfg.files] == [
        tmp_path / "Art/hero.png",
        tmp_path / "Audio/theme.ogg",
        tmp_path / "Scenes/level1.scene",
    ]
    assert cfg.state_dir == tmp_path / ".atrius" / "alice-pc"
    assert cfg.by_id("art/hero.png") == cfg.files[0]
    assert cfg.by_id("nope") is None


def test_id_defaults_to_the_path_as_written(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        device: a
        space: s
        files:
          - path: Art/Sub Dir/Hero.PNG
        """,
    )
    (entry,) = load_config(path).files
    assert entry.file_id == "Art/Sub Dir/Hero.PNG"


def test_paths_are_relative_to_the_config_file_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "proj").mkdir()
    path = write(
        tmp_path / "proj",
        """
        device: a
        space: s
        state_dir: state/here
        files:
          - path: x.bin
        """,
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config("proj/agent.yaml")
    assert cfg.source == path
    assert cfg.files[0].path == tmp_path / "proj" / "x.bin"
    assert cfg.state_dir == tmp_path / "proj" / "state" / "here"
    assert cfg.resolve("proj/x.bin") == cfg.files[0]  # a local path on the command line, relative to the cwd
    assert cfg.resolve("x.bin") == cfg.files[0]  # the file id
    assert cfg.resolve("other.bin") is None


def test_config_reached_through_dotdot_still_maps_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`atrius lock /abs/proj/x.bin --config ../proj/agent.yaml` must find the file."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "elsewhere").mkdir()
    write(tmp_path / "proj", "device: a\nspace: s\nfiles:\n  - path: x.bin\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config("../proj/agent.yaml")
    assert cfg.resolve(str(tmp_path / "proj" / "x.bin")) == cfg.files[0]
    assert cfg.resolve("../proj/x.bin") == cfg.files[0]
    assert cfg.files[0].path == tmp_path / "proj" / "x.bin"


def test_absolute_path_with_id(tmp_path: Path) -> None:
    target = tmp_path / "abs" / "file.bin"
    path = write(
        tmp_path,
        f"""
        device: a
        space: s
        state_dir: {tmp_path / "st"}
        files:
          - path: {target}
            id: shared/file.bin
        """,
    )
    cfg = load_config(path)
    assert cfg.files[0].path == target
    assert cfg.files[0].file_id == "shared/file.bin"
    assert cfg.state_dir == tmp_path / "st"


def test_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "device: a\nspace: s\nfiles:\n  - path: f\n")
    cfg = load_config(path)
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.tls) == ("127.0.0.1", 1883, False)
    assert cfg.username is None
    assert cfg.password is None
    assert cfg.ca_file is None


# -- errors name the key and the line ----------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        device: alice-pc
        space: my-game
        colour: blue
        files:
          - path: Art/hero.png
        """,
    )
    msg = load_error(path)
    assert "line 3" in msg
    assert "colour" in msg
    assert "unknown key" in msg
    assert str(path) in msg


def test_unknown_nested_key_in_second_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        device: alice-pc
        space: my-game
        broker:
          url: mqtt://127.0.0.1:1883
        files:
          - path: Art/hero.png
          - path: Audio/theme.ogg
            idd: audio/theme
        """,
    )
    msg = load_error(path)
    assert "line 8" in msg
    assert "files[1].idd" in msg
    assert "unknown key" in msg


def test_unknown_key_in_broker(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        device: a
        space: s
        broker:
          url: mqtt://h
          pasword: x
        files:
          - path: f
        """,
    )
    msg = load_error(path)
    assert "line 5" in msg
    assert "broker.pasword" in msg


@pytest.mark.parametrize("device", ['"alice pc"', "al/ice", '"a+b"', "..", "x" * 65, '"alice\\n"', '""'])
def test_bad_device_name(tmp_path: Path, device: str) -> None:
    path = write(tmp_path, f"space: s\nfiles:\n  - path: f\ndevice: {device}\n")
    msg = load_error(path)
    assert "line 4" in msg
    assert "device" in msg


def test_bad_space_name(tmp_path: Path) -> None:
    path = write(tmp_path, "device: a\nspace: my game\nfiles:\n  - path: f\n")
    msg = load_error(path)
    assert "line 2" in msg
    assert "space" in msg


def test_missing_device(tmp_path: Path) -> None:
    path = write(tmp_path, "space: s\nfiles:\n  - path: f\n")
    msg = load_error(path)
    assert "device" in msg
    assert "required" in msg.lower()


@pytest.mark.parametrize("url", ["http://x", "x:1883", "mqtt://", "mqtt://h:99999", "mqtt://h/path", "tcp://h:1883"])
def test_bad_broker_url(tmp_path: Path, url: str) -> None:
    path = write(
        tmp_path,
        f"""
        device: a
        space: s
        broker:
          username: u
          url: {url}
        files:
          - path: f
        """,
    )
    msg = load_error(path)
    assert "line 5" in msg
    assert "broker.url" in msg


def test_broker_url_message_names_the_url(tmp_path: Path) -> None:
    path = write(tmp_path, "device: a\nspace: s\nbroker:\n  url: http://x\nfiles:\n  - path: f\n")
    msg = load_error(path)
    assert "http://x" in msg
    assert "mqtt://" in msg


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        device: a
        space: s
        files:
          - path: f
            id: x: y
        """,
    )
    msg = load_error(path)
    assert "line 5" in msg
    assert "YAML" in msg


def test_malformed_yaml_bad_indentation(tmp_path: Path) -> None:
    path = write(tmp_path, "device: a\nspace: s\n  bad: indent\nfiles: []\n")
    msg = load_error(path)
    assert "line 3" in msg


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    msg = load_error(path)
    assert "empty" in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    msg = load_error(path)
    assert "mapping" in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    msg = load_error(path)
    assert "not found" in msg
    assert str(path) in msg


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(b"device: \xff\xfe\n")
    assert "agent.yaml" in load_error(path)


def test_duplicate_file_ids(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        device: a
        space: s
        files:
          - path: Art/hero.png
            id: hero
          - path: Art/other.png
            id: hero
        """,
    )
    msg = load_error(path)
    assert "line 6" in msg or "line 7" in msg
    assert "files[1]" in msg
    assert "'hero'" in msg
    assert "twice" in msg


def test_duplicate_default_ids(tmp_path: Path) -> None:
    path = write(tmp_path, "device: a\nspace: s\nfiles:\n  - path: a/b.png\n  - path: ./a/b.png\n")
    msg = load_error(path)
    assert "line 5" in msg
    assert "twice" in msg


def test_duplicate_paths_with_different_ids(tmp_path: Path) -> None:
    path = write(tmp_path, "device: a\nspace: s\nfiles:\n  - path: f\n    id: one\n  - path: f\n    id: two\n")
    msg = load_error(path)
    assert "line 6" in msg
    assert "files[1].path" in msg
    assert "twice" in msg


def test_no_files(tmp_path: Path) -> None:
    path = write(tmp_path, "device: a\nspace: s\n")
    msg = load_error(path)
    assert "files" in msg
    assert "folder" in msg  # the message offers both ways to fix it


@pytest.mark.parametrize("empty", ["files: []\nfolders: []\n", "files: []\n", "folders: []\n"])
def test_neither_files_nor_folders(tmp_path: Path, empty: str) -> None:
    path = write(tmp_path, "device: a\nspace: s\n" + empty)
    msg = load_error(path)
    assert "files" in msg
    assert "folders" in msg


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ("path: ../outside.png", "files[0].path"),
        ("path: a/b.png\n    id: ../x", "files[0].id"),
        ("path: a/b.png\n    id: /abs", "files[0].id"),
        ("path: a/b.png\n    id: 'a//b'", "files[0].id"),
    ],
)
def test_invalid_file_ids(tmp_path: Path, entry: str, key: str) -> None:
    path = write(tmp_path, f"device: a\nspace: s\nfiles:\n  - {entry}\n")
    msg = load_error(path)
    assert key in msg
    assert "line 4" in msg or "line 5" in msg


def test_absolute_path_needs_an_id(tmp_path: Path) -> None:
    path = write(tmp_path, f"device: a\nspace: s\nfiles:\n  - path: {tmp_path / 'x.bin'}\n")
    msg = load_error(path)
    assert "line 4" in msg
    assert "id" in msg


def test_a_folder_listed_as_a_file(tmp_path: Path) -> None:
    (tmp_path / "Assets").mkdir()
    path = write(tmp_path, "device: a\nspace: s\nfiles:\n  - path: Assets\n")
    msg = load_error(path)
    assert "line 4" in msg
    assert "folder" in msg


def test_password_env_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATRIUS_TEST_PW", "s3cret")
    path = write(
        tmp_path,
        """
        device: a
        space: s
        broker:
          url: mqtt://h
          password_env: ATRIUS_TEST_PW
        files:
          - path: f
        """,
    )
    assert load_config(path).password == "s3cret"


def test_password_env_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATRIUS_TEST_PW", raising=False)
    path = write(
        tmp_path,
        """
        device: a
        space: s
        broker:
          url: mqtt://h
          password_env: ATRIUS_TEST_PW
        files:
          - path: f
        """,
    )
    msg = load_error(path)
    assert "line 5" in msg
    assert "broker.password_env" in msg
    assert "ATRIUS_TEST_PW" in msg


def test_password_and_password_env_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATRIUS_TEST_PW", "x")
    path = write(
        tmp_path,
        """
        device: a
        space: s
        broker:
          password: y
          password_env: ATRIUS_TEST_PW
        files:
          - path: f
        """,
    )
    msg = load_error(path)
    assert "line 5" in msg
    assert "not both" in msg


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "device: a\nspace: s\nkeep_snapshots: many\nfiles:\n  - path: f\n")
    msg = load_error(path)
    assert "line 3" in msg
    assert "keep_snapshots" in msg


def test_files_must_be_a_list(tmp_path: Path) -> None:
    path = write(tmp_path, "device: a\nspace: s\nfiles:\n  path: f\n")
    msg = load_error(path)
    assert "files" in msg
    assert "line 3" in msg or "line 4" in msg


# -- folders ------------------------------------------------------------------------------------------------


def test_folders(tmp_path: Path) -> None:
    (tmp_path / "Assets" / "Textures").mkdir(parents=True)
    path = write(
        tmp_path,
        """
        device: a
        space: s
        folders:
          - path: Assets/Textures
            id: textures
            ignore: ["*.tmp", "build/", "!keep.tmp"]
          - path: ./Audio//Music/
          - path: Scenes
        """,
    )
    cfg = load_config(path)
    assert cfg.files == ()
    assert cfg.folders == (
        FolderEntry("textures", tmp_path / "Assets" / "Textures", ("*.tmp", "build/", "!keep.tmp")),
        FolderEntry("Audio/Music", tmp_path / "Audio" / "Music", ()),  # need not exist yet
        FolderEntry("Scenes", tmp_path / "Scenes", ()),
    )


def test_folders_beside_files(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        device: a
        space: s
        files:
          - path: README.md
          - path: Art/hero.png
            id: art/hero.png
        folders:
          - path: Art/Textures
            id: art/textures
        """,
    )
    cfg = load_config(path)
    assert [f.file_id for f in cfg.files] == ["README.md", "art/hero.png"]
    assert [f.folder_id for f in cfg.folders] == ["art/textures"]


def test_folder_id_defaults_to_the_path_as_written(tmp_path: Path) -> None:
    path = write(tmp_path, "device: a\nspace: s\nfolders:\n  - path: Game Art/Ünï Textures\n")
    (folder,) = load_config(path).folders
    assert folder.folder_id == "Game Art/Ünï Textures"
    assert folder.path == tmp_path / "Game Art" / "Ünï Textures"


def test_folder_paths_are_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "proj").mkdir()
    write(tmp_path / "proj", "device: a\nspace: s\nfolders:\n  - path: tex\n")
    monkeypatch.chdir(tmp_path)
    (folder,) = load_config("proj/agent.yaml").folders
    assert folder.path == tmp_path / "proj" / "tex"


def test_absolute_folder_path_with_id(tmp_path: Path) -> None:
    target = tmp_path / "abs" / "tex"
    path = write(tmp_path, f"device: a\nspace: s\nfolders:\n  - path: {target}\n    id: shared/tex\n")
    (folder,) = load_config(path).folders
    assert folder == FolderEntry("shared/tex", target, ())


def test_folder_outside_the_config_dir_with_id(tmp_path: Path) -> None:
    (tmp_path / "proj").mkdir()
    path = write(tmp_path / "proj", "device: a\nspace: s\nfolders:\n  - path: ../shared\n    id: shared\n")
    (folder,) = load_config(path).folders
    assert folder.path == tmp_path / "shared"


def test_absolute_folder_path_needs_an_id(tmp_path: Path) -> None:
    path = write(tmp_path, f"device: a\nspace: s\nfolders:\n  - path: {tmp_path / 'tex'}\n")
    msg = load_error(path)
    assert "line 4" in msg
    assert "folders[0].path" in msg
    assert "id" in msg


@pytest.mark.parametrize(
    ("entry", "key", "line"),
    [
        ("path: ../outside", "folders[0].path", 4),
        ("path: .", "folders[0].path", 4),
        ("path: tex\n    id: ../x", "folders[0].id", 5),
        ("path: tex\n    id: /abs", "folders[0].id", 5),
        ("path: tex\n    id: 'a//b'", "folders[0].id", 5),
        ("path: tex\n    id: 'a/./b'", "folders[0].id", 5),
        ("path: tex\n    id: 'a\\b'", "folders[0].id", 5),
        ("path: tex\n    id: \"a\\tb\"", "folders[0].id", 5),
        ("path: tex\n    id: ''", "folders[0].id", 5),
    ],
)
def test_invalid_folder_ids(tmp_path: Path, entry: str, key: str, line: int) -> None:
    path = write(tmp_path, f"device: a\nspace: s\nfolders:\n  - {entry}\n")
    msg = load_error(path)
    assert key in msg
    assert f"line {line}" in msg


def test_folder_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "tex").write_bytes(b"x")
    path = write(tmp_path, "device: a\nspace: s\nfolders:\n  - path: tex\n    id: textures\n")
    msg = load_error(path)
    assert "line 4" in msg
    assert "folders[0].path" in msg
    assert "file" in msg


def test_folder_path_that_is_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    path = write(tmp_path, "device: a\nspace: s\nfolders:\n  - path: link\n")
    msg = load_error(path)
    assert "line 4" in msg
    assert "folders[0].path" in msg
    assert "link" in msg


def test_two_folders_with_the_same_id(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        device: a
        space: s
        folders:
          - path: A
            id: tex
          - path: B
            id: tex
        """,
    )
    msg = load_error(path)
    assert "folders[1]" in msg
    assert "line 6" in msg or "line 7" in msg
    assert "'tex'" in msg
    assert "twice" in msg


def test_two_folders_with_the_same_default_id(tmp_path: Path) -> None:
    path = write(tmp_path, "device: a\nspace: s\nfolders:\n  - path: tex\n  - path: ./tex/\n")
    msg = load_error(path)
    assert "folders[1]" in msg
    assert "line 5" in msg
    assert "twice" in msg


@pytest.mark.parametrize(("first", "second"), [("tex", "tex/sub"), ("tex/sub", "tex"), ("a/b", "a/b/c/d")])
def test_overlapping_folder_ids(tmp_path: Path, first: str, second: str) -> None:
    path = write(
        tmp_path,
        f"""
        device: a
        space: s
        folders:
          - path: One
            id: {first}
          - path: Two
            id: {second}
        """,
    )
    msg = load_error(path)
    assert "folders[1]" in msg
    assert "line 7" in msg
    assert "overlaps" in msg
    assert repr(first) in msg and repr(second) in msg


def test_folder_ids_sharing_a_name_prefix_do_not_overlap(tmp_path: Path) -> None:
    path = write(tmp_path, "device: a\nspace: s\nfolders:\n  - path: tex\n  - path: texture\n  - path: tex2\n")
    assert [f.folder_id for f in load_config(path).folders] == ["tex", "texture", "tex2"]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param("Assets", "Assets/Textures", id="second-inside-first"),
        pytest.param("Assets/Textures", "Assets", id="first-inside-second"),
        pytest.param("Assets", "./Assets/", id="same-folder"),
        pytest.param("Assets", "Other/../Assets/Deep/er", id="inside-through-dotdot"),
    ],
)
def test_overlapping_folder_paths(tmp_path: Path, first: str, second: str) -> None:
    path = write(
        tmp_path,
        f"""
        device: a
        space: s
        folders:
          - path: {first}
            id: one
          - path: {second}
            id: two
        """,
    )
    msg = load_error(path)
    assert "folders[1].path" in msg
    assert "line 6" in msg
    assert "overlaps" in msg


def test_sibling_folder_paths_sharing_a_prefix_do_not_overlap(tmp_path: Path) -> None:
    path = write(tmp_path, "device: a\nspace: s\nfolders:\n  - path: Art\n  - path: Artwork\n")
    assert len(load_config(path).folders) == 2


def test_a_listed_file_inside_a_folder(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        device: a
        space: s
        files:
          - path: README.md
          - path: Assets/Textures/sub/hero.png
            id: hero.png
        folders:
          - path: Assets/Textures
            id: textures
        """,
    )
    msg = load_error(path)
    assert "files[1].path" in msg
    assert "line 5" in msg
    assert "'textures'" in msg
    assert "inside" in msg


def test_a_file_id_inside_a_folder_id(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        device: a
        space: s
        files:
          - path: Elsewhere/hero.png
            id: textures/hero.png
        folders:
          - path: Assets/Textures
            id: textures
        """,
    )
    msg = load_error(path)
    assert "files[0].id" in msg
    assert "line 5" in msg
    assert "'textures/hero.png'" in msg
    assert "'textures'" in msg


def test_a_default_file_id_inside_a_folder_id(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        device: a
        space: s
        files:
          - path: tex/hero.png
        folders:
          - path: Other
            id: tex
        """,
    )
    msg = load_error(path)
    assert "files[0].path" in msg
    assert "line 4" in msg


def test_a_file_id_sharing_a_prefix_with_a_folder_id_is_fine(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        device: a
        space: s
        files:
          - path: textures.txt
          - path: x/hero.png
            id: texturesX/hero.png
        folders:
          - path: Assets/Textures
            id: textures
        """,
    )
    cfg = load_config(path)
    assert [f.file_id for f in cfg.files] == ["textures.txt", "texturesX/hero.png"]


@pytest.mark.parametrize("pattern", ["!", "\\\\"])
def test_bad_ignore_pattern_names_its_index(tmp_path: Path, pattern: str) -> None:
    path = write(
        tmp_path,
        f"""
        device: a
        space: s
        folders:
          - path: tex
            ignore:
              - "*.tmp"
              - "{pattern}"
        """,
    )
    msg = load_error(path)
    assert "folders[0].ignore[1]" in msg
    assert "line 7" in msg


@pytest.mark.parametrize(
    ("entry", "key", "line"),
    [
        ("path: tex\n    ignore: '*.tmp'", "folders[0].ignore", 5),
        ("path: tex\n    ignore: [1, 2]", "folders[0].ignore[0]", 5),
        ("path: tex\n    idd: x", "folders[0].idd", 5),
        ("id: tex", "folders[0].path", 4),
        ("path: ''", "folders[0].path", 4),
    ],
)
def test_folder_entry_schema_errors(tmp_path: Path, entry: str, key: str, line: int) -> None:
    path = write(tmp_path, f"device: a\nspace: s\nfolders:\n  - {entry}\n")
    msg = load_error(path)
    assert key in msg
    assert f"line {line}" in msg


def test_folders_must_be_a_list(tmp_path: Path) -> None:
    path = write(tmp_path, "device: a\nspace: s\nfolders:\n  path: tex\n")
    msg = load_error(path)
    assert "folders" in msg
    assert "line 3" in msg or "line 4" in msg


# -- mapping ids and local paths through folders -------------------------------------------------------------


@pytest.fixture
def two_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "Assets" / "Textures").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return write(
        tmp_path,
        """
        device: a
        space: s
        files:
          - path: README.md
        folders:
          - path: Assets/Textures
            id: tex
          - path: Assets/More
            id: sounds/more
        """,
    )


def test_folder_of(two_folders: Path) -> None:
    cfg = load_config(two_folders)
    tex, more = cfg.folders
    assert cfg.folder_of("tex/a.png") == (tex, "a.png")
    assert cfg.folder_of("tex/sub/a.png") == (tex, "sub/a.png")
    assert cfg.folder_of("sounds/more/a.png") == (more, "a.png")
    for outside in ("tex", "sounds/more", "sounds/a.png", "README.md", "texture/a.png", "Assets/Textures/a.png",
                    "tex/../x", "tex//a", "tex/./a", "tex/" + "x" * 256):
        assert cfg.folder_of(outside) is None, outside


def test_resolve_a_folder_file_id(two_folders: Path, tmp_path: Path) -> None:
    cfg = load_config(two_folders)
    assert cfg.resolve("tex/sub/a.png") == FileEntry("tex/sub/a.png", tmp_path / "Assets/Textures/sub/a.png")
    assert cfg.resolve("sounds/more/b.png") == FileEntry("sounds/more/b.png", tmp_path / "Assets/More/b.png")
    assert cfg.resolve("README.md") == cfg.files[0]


def test_resolve_a_local_path_inside_a_folder(two_folders: Path, tmp_path: Path) -> None:
    cfg = load_config(two_folders)
    expected = FileEntry("tex/sub/a.png", tmp_path / "Assets" / "Textures" / "sub" / "a.png")
    assert cfg.resolve("Assets/Textures/sub/a.png") == expected  # relative to the cwd
    assert cfg.resolve(str(tmp_path / "Assets" / "Textures" / "sub" / "a.png")) == expected
    assert cfg.resolve("./Assets/Textures/../Textures/sub/a.png") == expected
    assert cfg.resolve("Assets/More/b.png") == FileEntry("sounds/more/b.png", tmp_path / "Assets" / "More" / "b.png")


def test_resolve_outside_every_folder_is_none(two_folders: Path, tmp_path: Path) -> None:
    cfg = load_config(two_folders)
    assert cfg.resolve("Assets/Textures") is None  # the folder itself
    assert cfg.resolve("tex") is None
    assert cfg.resolve("Assets/Other/a.png") is None
    assert cfg.resolve("Assets/TexturesX/a.png") is None
    assert cfg.resolve(str(tmp_path.parent / "elsewhere.png")) is None
    # not a valid id, so it is read as a local path (relative to the cwd): the listed README.md
    assert cfg.resolve("tex/../README.md") == cfg.files[0]
    assert cfg.resolve("tex/../Assets/Textures/a.png") == FileEntry("tex/a.png", tmp_path / "Assets/Textures/a.png")


def test_resolve_from_another_cwd(two_folders: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(two_folders)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    expected = FileEntry("tex/a.png", tmp_path / "Assets" / "Textures" / "a.png")
    assert cfg.resolve("../Assets/Textures/a.png") == expected
    assert cfg.resolve("tex/a.png") == expected  # an id does not depend on the cwd


def test_folder_entry_file_id_and_path_of(tmp_path: Path) -> None:
    folder = FolderEntry("tex", tmp_path / "T")
    assert folder.file_id(tmp_path / "T" / "a.png") == "tex/a.png"
    assert folder.file_id(tmp_path / "T" / "sub" / "ü ß.png") == "tex/sub/ü ß.png"
    assert folder.file_id(tmp_path / "T") is None  # the folder itself
    assert folder.file_id(tmp_path / "Other" / "a.png") is None
    assert folder.file_id(tmp_path / "TX" / "a.png") is None
    assert folder.file_id(tmp_path / "T" / ("x" * 256)) is None  # longer than any file system allows
    assert folder.file_id(tmp_path / "T" / "a\\b") is None  # not a portable name
    assert folder.file_id(tmp_path / "T" / "a\nb") is None
    assert folder.path_of("a.png") == tmp_path / "T" / "a.png"
    assert folder.path_of("sub/deep/a.png") == tmp_path / "T" / "sub" / "deep" / "a.png"


def test_folder_entry_round_trip(tmp_path: Path) -> None:
    folder = FolderEntry("assets/tex", tmp_path / "T")
    for rel in ("a.png", "sub/a.png", "ü/ß/日本.txt"):
        path = folder.path_of(rel)
        assert folder.file_id(path) == f"assets/tex/{rel}"
