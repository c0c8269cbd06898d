"""The terminal UI with real processes: `atrius tui` and `atrius agent --tui`, with stdout a pipe
(plain log lines and a snapshot) and under a pseudo-terminal (the live screen on the alternate
screen, resized while it runs), each stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import REPO_ROOT, atrius_env
from e2e import Device, HubNet, MosquittoNet, content_hash, random_bytes, wait_synced, wait_until

FID = "art/hero.png"
FILES = {FID: "Art/hero.png"}
ROCK = "textures/env/rock.png"
FOLDER = "folders:\n  - path: Tex\n    id: textures\n"
BIG = 32 << 20
ALT_ON, ALT_OFF = "\x1b[?1049h", "\x1b[?1049l"
_RAW_LOG = re.compile(r"\d\d:\d\d:\d\d\.\d{3} (?:INFO|WARNING|ERROR) ")
"""A line of the stderr log format: must never be written over the live screen."""
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[()][0-9A-Za-z]|[=>78])")


def plain(text: str) -> str:
    """Terminal output without escape sequences, one screen line per line."""
    return _ANSI.sub("", text).replace("\r", "")


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "atrius_cli", *args], cwd=REPO_ROOT, env=atrius_env(),
                          capture_output=True, text=True, timeout=timeout)


def state_of(dev: Device, device: str) -> str | None:
    r = cli("status", "--config", str(dev.config), "--json")
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    st: dict[str, Any] = json.loads(r.stdout)
    return next((d["state"] for d in st["devices"] if d["device"] == device), None)


class Piped:
    """`atrius ARGS` with stdout a pipe (read by a thread) and stderr in a file."""

    def __init__(self, args: list[str], cwd: Path, stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as err:  # (the child keeps its own copy)
            self.proc = subprocess.Popen([sys.executable, "-m", "atrius_cli", *args], cwd=cwd, env=atrius_env(),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while data := os.read(fd, 65536):
            with self._lock:
                self._buf.extend(data)

    def out(self) -> str:
        with self._lock:
            return self._buf.decode(errors="replace")

    def err(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_out(self, pattern: str, timeout: float = 15) -> None:
        rx = re.compile(pattern, re.M)
        wait_until(lambda: rx.search(self.out()) or self.proc.poll() is not None, timeout,
                   f"{pattern!r} on stdout:\n{self.out()[-3000:]}\n--- stderr ---\n{self.err()[-2000:]}")
        assert rx.search(self.out()), f"exited {self.proc.returncode} without {pattern!r}:\n{self.out()[-3000:]}\n" \
                                      f"--- stderr ---\n{self.err()[-2000:]}"

    def interrupt(self, timeout: float = 20) -> int:
        """Ctrl-C: SIGINT, then the exit code (the output is read to its end)."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _winsize(rows: int, cols: int) -> bytes:
    return struct.pack("HHHH", rows, cols, 0, 0)


class PtyProc:
    """`atrius ARGS` on a pseudo-terminal of `rows` x `cols` (stdin, stdout and stderr), read by a thread."""

    def __init__(self, args: list[str], cwd: Path, rows: int, cols: int) -> None:
        env = atrius_env({"TERM": "xterm-256color"})
        for var in ("COLUMNS", "LINES", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
            env.pop(var, None)  # rich would take these over the terminal's own size and abilities
        argv = [sys.executable, "-m", "atrius_cli", *args]
        pid, fd = pty.fork()
        if pid == 0:  # the child: size the terminal, then become atrius
            try:
                fcntl.ioctl(1, termios.TIOCSWINSZ, _winsize(rows, cols))
                os.chdir(cwd)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.code: int | None = None
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: the child has gone and the terminal is closed
                return
            if not data:
                return
            with self._lock:
                self._buf.extend(data)

    def size(self) -> int:
        with self._lock:
            return len(self._buf)

    def out(self, start: int = 0) -> str:
        with self._lock:
            return bytes(self._buf[start:]).decode(errors="replace")

    def wait_screen(self, pred: Any, timeout: float, what: str, start: int = 0) -> None:
        wait_until(lambda: pred(plain(self.out(start))) or not self.running(), timeout,
                   f"{what} on the screen:\n{plain(self.out(start))[-4000:]}")
        assert pred(plain(self.out(start))), f"exited ({self.code}) before {what}:\n{plain(self.out(start))[-4000:]}"

    def running(self) -> bool:
        if self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code is None

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, _winsize(rows, cols))
        os.kill(self.pid, signal.SIGWINCH)

    def interrupt(self, timeout: float = 20) -> int:
        os.kill(self.pid, signal.SIGINT)
        wait_until(lambda: not self.running(), timeout, f"exit after SIGINT:\n{plain(self.out())[-3000:]}", 0.05)
        self._reader.join(5)
        assert self.code is not None
        return self.code

    def close(self) -> None:
        if self.running():
            os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
            self.code = os.waitstatus_to_exitcode(status)
        self._reader.join(5)
        os.close(self.fd)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubNet]:
    n = HubNet(tmp_path)
    n.start()
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture
def ui_procs() -> Iterator[list[Piped | PtyProc]]:
    """UI processes a test starts; any still running at the end is killed (by its pid)."""
    made: list[Piped | PtyProc] = []
    yield made
    for p in made:
        p.close()


def bottom_borders(screen: str, width: int) -> int:
    """Panel bottom lines exactly `width` columns wide (a frame laid out for that width)."""
    return sum(1 for ln in screen.split("\n") if len(ln) == width and ln.startswith("╰") and ln.endswith("╯"))


# -- atrius tui, stdout a pipe ---------------------------------------------------------------------------------
def test_tui_plain_mode_prints_the_space_and_its_news(
    tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device], ui_procs: list[Piped | PtyProc]
) -> None:
    a = Device(tmp_path, "alice-pc", net.url, FILES, extra=FOLDER)
    b = Device(tmp_path, "bob-laptop", net.url, FILES, extra=FOLDER)
    devices += [a, b]
    v1 = a.write(FID, b"first")
    rock_a, rock_b = (d.dir / "Tex" / "env" / "rock.png" for d in (a, b))
    rock_a.parent.mkdir(parents=True)
    rock_a.write_bytes(b"rock" * 1000)
    a.start()
    b.start()
    wait_synced(b, FID, v1)
    wait_until(lambda: content_hash(rock_b) == content_hash(rock_a), 20, f"the folder file on bob\n{b.log()[-3000:]}")

    t0 = time.monotonic()
    tui = Piped(["tui", "--config", str(a.config)], cwd=a.dir, stderr_path=tmp_path / "tui.err")
    ui_procs.append(tui)
    tui.wait_out(rf"^  file {re.escape(ROCK)}: v1 ", timeout=15)
    took = time.monotonic() - t0
    out = tui.out()
    assert re.search(rf"^\d\d:\d\d:\d\d connected to {re.escape(net.url)}$", out, re.M), out
    assert "space game: 2 of 2 device(s) online, 2 file(s)" in out, out
    for dev in (a, b):
        assert re.search(rf"^  device {dev.name} \(\S+\): online since \d\d:\d\d:\d\d$", out, re.M), out
    assert re.search(rf"^  file {re.escape(FID)}: v1 5 B by alice-pc", out, re.M), out
    assert re.search(rf"^  file {re.escape(ROCK)}: v1 3\.9 KiB by alice-pc", out, re.M), out
    assert "textures/env:" not in out  # a folder entry is not a file row
    print(f"the snapshot was printed {took:.1f} s after start")

    # news while it watches: a new version is told, in plain lines
    v2 = a.write(FID, b"second version")
    wait_synced(b, FID, v2)
    tui.wait_out(rf"^\d\d:\d\d:\d\d {re.escape(FID)}: new version v2 from alice-pc \(14 B\)$", timeout=10)

    assert tui.interrupt() == 0, tui.err()
    out = tui.out()
    assert "\x1b[" not in out, out  # not a terminal: no escape sequences
    assert out.count("space game:") == 1
    assert "Traceback" not in tui.err(), tui.err()
    assert a.proc.running and b.proc.running  # the watcher changes nothing for the agents


# -- atrius tui on a terminal --------------------------------------------------------------------------------
def test_tui_on_a_terminal_uses_the_alternate_screen_and_follows_resizes(
    tmp_path: Path, hub: HubNet, devices: list[Device], ui_procs: list[Piped | PtyProc]
) -> None:
    a = Device(tmp_path, "alice-pc", hub.url, FILES)
    b = Device(tmp_path, "bob-laptop", hub.url, FILES)  # its agent is not running: the tui watches from it
    devices += [a, b]
    a.write(FID, b"first")
    a.start()

    tui = PtyProc(["tui", "--config", str(b.config)], cwd=b.dir, rows=30, cols=100)
    ui_procs.append(tui)
    tui.wait_screen(lambda s: "alice-pc" in s and FID in s and "● connected" in s, 15,
                    "alice and her file, connected")
    assert tui.out().startswith(ALT_ON), repr(tui.out()[:200])  # nothing printed before the screen
    assert bottom_borders(plain(tui.out()), 100) >= 3  # laid out for 100 columns

    mark = tui.size()
    tui.resize(20, 70)
    tui.wait_screen(lambda s: bottom_borders(s, 70) >= 2 and "alice-pc" in s, 10, "a frame 70 columns wide",
                    start=mark)
    assert tui.running()
    mark = tui.size()
    time.sleep(1.3)  # it keeps drawing after the resize (at least once a second)
    assert tui.size() > mark and tui.running()

    assert tui.interrupt() == 0, plain(tui.out())[-3000:]
    out = tui.out()
    assert out.count(ALT_ON) == 1 and out.rindex(ALT_OFF) > out.index(ALT_ON), repr(out[-500:])
    after = plain(out[out.rindex(ALT_OFF):])
    assert "while the screen was open" in after and "Traceback" not in out, after
    assert not _RAW_LOG.search(plain(out)), plain(out)[-3000:]


# -- atrius agent --tui, stdout a pipe --------------------------------------------------------------------------
def test_agent_tui_plain_mode_syncs_logs_and_stops_cleanly(
    tmp_path: Path, hub: HubNet, devices: list[Device], ui_procs: list[Piped | PtyProc]
) -> None:
    a = Device(tmp_path, "alice-pc", hub.url, FILES)
    b = Device(tmp_path, "bob-laptop", hub.url, FILES)  # run below as `agent --tui`, not by Device
    devices.append(a)
    v1 = a.write(FID, random_bytes(200_000))
    a.start()

    bob = Piped(["agent", "--config", str(b.config), "--tui"], cwd=b.dir, stderr_path=tmp_path / "bob.err")
    ui_procs.append(bob)
    wait_synced(b, FID, v1, timeout=20)
    bob.wait_out(rf"^\d\d:\d\d:\d\d {re.escape(FID)}: applied v1 from alice-pc \(195\.3 KiB; ", timeout=10)
    bob.wait_out(r"^space game: 2 of 2 device\(s\) online, 1 file\(s\)$", timeout=10)
    out = bob.out()
    assert re.search(r"^\d\d:\d\d:\d\d connected to ", out, re.M), out
    assert re.search(rf"^  file {re.escape(FID)}: v1 195\.3 KiB by alice-pc", out, re.M), out
    assert "\x1b[" not in out and "INFO" not in out, out  # plain lines: time and text (level only if not INFO)
    wait_until(lambda: state_of(a, b.name) == "online", 10, "status to show bob online", interval=0.3)

    assert bob.interrupt() == 0, bob.err()
    assert "Traceback" not in bob.err() + bob.out(), bob.err()
    wait_until(lambda: state_of(a, b.name) == "offline", 10, "status to show bob offline after Ctrl-C",
               interval=0.3)
    saved = json.loads((b.dir / ".atrius" / b.name / "state.json").read_text())
    assert saved["synced"][FID]["hash"] == v1 and saved["synced"][FID]["version"] == 1, saved
    assert content_hash(b.path(FID)) == v1


# -- atrius agent --tui on a terminal, a big file arriving ------------------------------------------------------
def test_agent_tui_on_a_terminal_shows_a_live_transfer(
    tmp_path: Path, hub: HubNet, devices: list[Device], ui_procs: list[Piped | PtyProc]
) -> None:
    a = Device(tmp_path, "alice-pc", hub.url, FILES)
    b = Device(tmp_path, "bob-laptop", hub.url, FILES)
    devices.append(a)
    a.start()

    bob = PtyProc(["agent", "--config", str(b.config), "--tui"], cwd=b.dir, rows=40, cols=120)
    ui_procs.append(bob)
    bob.wait_screen(lambda s: "● connected" in s and "alice-pc" in s, 15, "bob connected, alice online")
    time.sleep(1.0)  # bob's start-up reconcile
    mark = bob.size()
    big = a.write(FID, random_bytes(BIG))
    wait_synced(b, FID, big, timeout=60)

    def transfer_line(s: str) -> bool:  # (the bar, the percentage, the rate once two samples are in)
        return any("↓ bob-laptop" in ln and re.search(r"\d+%.*iB/s", ln) for ln in s.split("\n"))

    bob.wait_screen(lambda s: "live transfers" in s and transfer_line(s), 10, "bob's transfer with a percentage",
                    start=mark)
    bob.wait_screen(lambda s: any(FID in ln and "in sync" in ln and "v1" in ln for ln in s.split("\n")), 10,
                    f"{FID} v1 in sync in the files panel", start=mark)
    bob.wait_screen(lambda s: "applied v1 from alice-pc" in s, 10, "the agent's log in the events panel", start=mark)
    assert content_hash(b.path(FID)) == big

    assert bob.interrupt() == 0, plain(bob.out())[-3000:]
    out = bob.out()
    assert ALT_ON in out and out.rindex(ALT_OFF) > out.rindex(ALT_ON)
    assert "Traceback" not in out and not _RAW_LOG.search(plain(out)), plain(out)[-3000:]


def test_tui_and_agent_tui_with_a_bad_config_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_text("device: bob-laptop\nspace: game\nbroker:\n  url: mqtt://127.0.0.1:1\ncolour: blue\nfiles: []\n")
    for args in (["tui", "--config", str(tmp_path / "missing.yaml")], ["tui", "--config", str(bad)],
                 ["agent", "--config", str(bad), "--tui"]):
        r = cli(*args)
        assert r.returncode == 2, (args, r.returncode, r.stdout, r.stderr)
        assert "config error" in r.stderr and "Traceback" not in r.stderr and "\x1b[" not in r.stdout, r
    assert "colour" in r.stderr and "line 5" in r.stderr, r.stderr
