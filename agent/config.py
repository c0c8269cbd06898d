"""Loads and validates the agent's YAML config; every error names the key and its line."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.ignore import compile_ignore
from schemas.mqtt import BrokerUrl, BrokerUrlError
from schemas.names import DeviceName, SpaceName, check_file_id
from schemas.paths import folder_file_id, split_file_id


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file, line and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerSection(_Strict):
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    password_env: str | None = None
    ca_file: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        try:
            BrokerUrl.parse(v)
        except BrokerUrlError as exc:
            raise ValueError(str(exc)) from exc
        return v


class FileSection(_Strict):
    path: Annotated[str, Field(min_length=1)]
    id: str | None = None


class FolderSection(_Strict):
    path: Annotated[str, Field(min_length=1)]
    id: str | None = None
    ignore: list[str] = []


class AgentSection(_Strict):
    device: DeviceName
    space: SpaceName
    broker: BrokerSection = BrokerSection()
    state_dir: str | None = None
    encryption_key_file: str | None = None
    files: list[FileSection] = []
    folders: list[FolderSection] = []
    keep_snapshots: Annotated[int, Field(ge=0, le=1000)] = 10
    settle_ms: Annotated[int, Field(ge=0, le=60_000)] = 300
    rescan_seconds: Annotated[float, Field(gt=0, le=86_400)] = 30.0


@dataclass(frozen=True)
class FileEntry:
    file_id: str
    path: Path


@dataclass(frozen=True)
class FolderEntry:
    folder_id: str
    path: Path
    ignore: tuple[str, ...] = ()

    def file_id(self, path: Path) -> str | None:
        """The id of a path inside this folder, or None."""
        try:
            rel = path.relative_to(self.path)
        except ValueError:
            return None
        if not rel.parts:
            return None
        try:
            return folder_file_id(self.folder_id, rel.as_posix())
        except ValueError:
            return None

    def path_of(self, rel: str) -> Path:
        return self.path.joinpath(*rel.split("/"))


@dataclass(frozen=True)
class AgentConfig:
    source: Path
    device: str
    space: str
    broker: BrokerUrl
    username: str | None
    password: str | None
    ca_file: str | None
    state_dir: Path
    files: tuple[FileEntry, ...]
    folders: tuple[FolderEntry, ...]
    keep_snapshots: int
    settle_ms: int
    rescan_seconds: float

    def by_id(self, file_id: str) -> FileEntry | None:
        return next((f for f in self.files if f.file_id == file_id), None)

    def folder_of(self, file_id: str) -> tuple[FolderEntry, str] | None:
        """The folder a file id lies in, and its path relative to that folder."""
        hit = split_file_id(file_id, [f.folder_id for f in self.folders])
        if hit is None:
            return None
        folder = next(f for f in self.folders if f.folder_id == hit[0])
        return folder, hit[1]

    def resolve(self, name: str) -> FileEntry | None:
        """A FILE_ID argument: a logical id, or a local path that maps to one (files inside a
        listed folder included)."""
        entry = self.by_id(name)
        if entry is not None:
            return entry
        inside = self.folder_of(name)
        if inside is not None:
            return FileEntry(name, inside[0].path_of(inside[1]))
        p = Path(os.path.normpath(Path(name).expanduser().absolute()))
        entry = next((f for f in self.files if f.path == p), None)
        if entry is not None:
            return entry
        for folder in self.folders:
            file_id = folder.file_id(p)
            if file_id is not None:
                return FileEntry(file_id, p)
        return None


def _line_map(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value if isinstance(key, yaml.ScalarNode) else str(key)
            out[(*path, k)] = key.start_mark.line + 1
            _line_map(value, (*path, k), out)
            out[(*path, k)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, (*path, i), out)


def _line_of(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int:
    while loc and loc not in lines:
        loc = loc[:-1]
    return lines.get(loc, 1)


def _key_name(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


_READABLE = {
    "extra_forbidden": "unknown key",
    "missing": "required key missing",
    "model_type": "should be a mapping of keys (key: value lines)",
    "model_attributes_type": "should be a mapping of keys (key: value lines)",
}
"""pydantic error types whose own message would name our classes or read oddly in a config error."""


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    src = Path(os.path.normpath(Path(path).expanduser().absolute()))
    try:
        text = src.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{src}: config file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{src}: cannot read config: {exc}") from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "?"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{src}:{where}: invalid YAML: {problem}") from exc
    if data is None:
        raise ConfigError(f"{src}: config is empty (needs at least device, space and files)")
    if not isinstance(data, dict):
        raise ConfigError(f"{src}:line 1: the config must be a mapping of keys")
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _line_map(node, (), lines)
    try:
        section = AgentSection.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        msg = _READABLE.get(err["type"], err["msg"].removeprefix("Value error, "))
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{src}:line {_line_of(loc, lines)}: {_key_name(loc)}: {msg}{more}") from exc
    return _build(src, section, lines)


def _build(src: Path, s: AgentSection, lines: dict[tuple[Any, ...], int]) -> AgentConfig:
    base = src.parent

    def fail(loc: tuple[Any, ...], msg: str) -> ConfigError:
        return ConfigError(f"{src}:line {_line_of(loc, lines)}: {_key_name(loc)}: {msg}")

    if s.encryption_key_file is not None:
        raise fail(("encryption_key_file",), "end-to-end encryption is not supported yet in this release")
    if not s.files and not s.folders:
        raise fail(("files",), "list at least one file (under 'files:') or folder (under 'folders:') to sync")
    folders = _folders(s, base, fail)
    password = s.broker.password
    if s.broker.password_env is not None:
        if password is not None:
            raise fail(("broker", "password_env"), "give password or password_env, not both")
        password = os.environ.get(s.broker.password_env)
        if password is None:
            raise fail(("broker", "password_env"), f"environment variable {s.broker.password_env} is not set")
    entries: list[FileEntry] = []
    seen_ids: dict[str, int] = {}
    seen_paths: dict[Path, int] = {}
    for i, f in enumerate(s.files):
        p = Path(f.path).expanduser()
        full = Path(os.path.normpath((p if p.is_absolute() else base / p).absolute()))
        file_id = f.id if f.id is not None else PurePosixPath(Path(f.path)).as_posix()
        if f.id is None and Path(f.path).is_absolute():
            raise fail(("files", i, "path"), "an absolute path needs an explicit 'id'")
        try:
            check_file_id(file_id)
        except ValueError as exc:
            raise fail(("files", i, "id" if f.id is not None else "path"), str(exc)) from exc
        if file_id in seen_ids:
            raise fail(("files", i), f"file id {file_id!r} is listed twice (first as files[{seen_ids[file_id]}])")
        if full in seen_paths:
            raise fail(("files", i, "path"), f"{full} is listed twice (first as files[{seen_paths[full]}])")
        if full.is_dir():
            raise fail(("files", i, "path"), f"{full} is a folder; list folders under 'folders:'")
        for folder in folders:
            if folder.path == full or folder.path in full.parents:
                raise fail(("files", i, "path"), f"{full} is inside the folder {folder.folder_id!r}, "
                                                 "which syncs it already")
            if file_id.startswith(folder.folder_id + "/"):
                raise fail(("files", i, "id" if f.id is not None else "path"),
                           f"file id {file_id!r} lies inside the id of folder {folder.folder_id!r}")
        seen_ids[file_id] = i
        seen_paths[full] = i
        entries.append(FileEntry(file_id, full))
    state = Path(s.state_dir).expanduser() if s.state_dir else Path(".atrius") / s.device
    state_dir = Path(os.path.normpath((state if state.is_absolute() else base / state).absolute()))
    ca = s.broker.ca_file
    if ca is not None and not Path(ca).is_absolute():
        ca = str(base / ca)
    return AgentConfig(
        source=src,
        device=s.device,
        space=s.space,
        broker=BrokerUrl.parse(s.broker.url),
        username=s.broker.username,
        password=password,
        ca_file=ca,
        state_dir=state_dir,
        files=tuple(entries),
        folders=tuple(folders),
        keep_snapshots=s.keep_snapshots,
        settle_ms=s.settle_ms,
        rescan_seconds=s.rescan_seconds,
    )


def _folders(s: AgentSection, base: Path, fail: Callable[[tuple[Any, ...], str], ConfigError]) -> list[FolderEntry]:
    out: list[FolderEntry] = []
    for i, f in enumerate(s.folders):
        p = Path(f.path).expanduser()
        full = Path(os.path.normpath((p if p.is_absolute() else base / p).absolute()))
        if f.id is None and p.is_absolute():
            raise fail(("folders", i, "path"), "an absolute path needs an explicit 'id'")
        folder_id = f.id if f.id is not None else PurePosixPath(Path(f.path)).as_posix().strip("/")
        try:
            check_file_id(folder_id)
        except ValueError as exc:
            raise fail(("folders", i, "id" if f.id is not None else "path"), str(exc)) from exc
        if full.exists() and not full.is_dir():
            raise fail(("folders", i, "path"), f"{full} is a file; list single files under 'files:'")
        if full.is_symlink():
            raise fail(("folders", i, "path"), f"{full} is a symbolic link; give the real folder")
        for j, other in enumerate(out):
            if other.folder_id == folder_id:
                raise fail(("folders", i), f"folder id {folder_id!r} is listed twice (first as folders[{j}])")
            if folder_id.startswith(other.folder_id + "/") or other.folder_id.startswith(folder_id + "/"):
                raise fail(("folders", i, "id"), f"folder id {folder_id!r} overlaps folder id {other.folder_id!r}")
            if full == other.path or other.path in full.parents or full in other.path.parents:
                raise fail(("folders", i, "path"), f"{full} overlaps folders[{j}] ({other.path})")
        for k, pattern in enumerate(f.ignore):
            try:
                compile_ignore([pattern])
            except ValueError as exc:
                raise fail(("folders", i, "ignore", k), f"bad ignore pattern {pattern!r}: {exc}") from exc
        out.append(FolderEntry(folder_id, full, tuple(f.ignore)))
    return out
