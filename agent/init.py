"""``atrius init``: write a commented starter agent.yaml for this device."""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

from schemas.mqtt import BrokerUrl, BrokerUrlError

log = logging.getLogger("atrius.cli")

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"

TEMPLATE = """\
# Atrius agent config for {device}, written by `atrius init`.  Paths are relative to this file.
# Unknown keys are an error (the message names the key and its line).  Reference: README.md.

{device_line}# unique within the space: [A-Za-z0-9._-], at most 64
{space_line}# devices in one space sync together

broker:
{broker_line}# `atrius hub` on the machine that keeps the history, or Mosquitto
  # username: {device}
  # password_env: ATRIUS_PASSWORD  # or password: ...; read from this environment variable
  # ca_file: certs/ca.pem          # for mqtts:// with a private CA

# What to sync.  Folders sync recursively (new files, edits, deletions, renames, empty folders);
# a file inside gets the id "<folder id>/<path inside the folder>", the same on every device.
folders:
  - path: Assets                 # created if missing
    id: assets
    ignore: ["*.tmp", "build/"]  # .gitignore syntax, on top of the built-in ignores

# Single files, anywhere:
# files:
#   - path: Levels/level1.scene
#     id: levels/level1.scene

# state_dir: .atrius/{device}      # default: .atrius/<device> beside this file
# keep_snapshots: 10             # earlier versions kept per file in state_dir/snapshots
# encryption_key_file: space.key # end-to-end encryption arrives in a later release
"""


class InitError(ValueError):
    """The starter config cannot be written (exit code 2)."""


def device_name(host: str | None = None) -> str:
    """A valid device name from the host name: other characters become '-', at most 64."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", (host or socket.gethostname()).split(".")[0]).strip("-.")
    return name[:64] or "device"


def render(device: str, space: str, broker: str) -> str:
    def line(text: str) -> str:  # comments line up at column 34
        return text + " " * max(1, 33 - len(text))

    return TEMPLATE.format(device=device, device_line=line(f"device: {device}"), space_line=line(f"space: {space}"),
                           broker_line=line(f"  url: {broker}"))


def write_starter(path: Path, *, broker: str | None, space: str, device: str | None, force: bool) -> Path:
    url = broker or DEFAULT_BROKER
    try:
        BrokerUrl.parse(url)
    except BrokerUrlError as exc:
        raise InitError(str(exc)) from exc
    name = device or device_name()
    for what, value in (("device", name), ("space", space)):
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value) or value in {".", ".."}:
            raise InitError(f"{what} {value!r} is not a valid name: use 1-64 of A-Z a-z 0-9 . _ -")
    if path.exists() and not force:
        raise InitError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(name, space, url), encoding="utf-8")
    return path


def main_init(output: str, *, broker: str | None, space: str, device: str | None, force: bool) -> int:
    path = Path(output).expanduser().absolute()
    try:
        write_starter(path, broker=broker, space=space, device=device, force=force)
    except InitError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("writing %s: %s", path, exc.strerror or exc)
        return 1
    print(f"wrote {path} for device {device or device_name()}; edit what to sync, then run:\n"
          f"  atrius agent --config {output}")
    return 0
