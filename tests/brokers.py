"""Test helpers that run real processes: Mosquitto, and the atrius CLI (broker, hub, agent); no mocks."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCALHOST = "127.0.0.1"
_POLL_S = 0.05
_LOG_TAIL_CHARS = 4000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def _listening_per_proc(port: int) -> bool | None:
    """Whether some socket LISTENs on `port` per /proc/net/tcp{,6}; None where there is no /proc."""
    found_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                lines = fh.readlines()[1:]
        except OSError:
            continue
        found_table = True
        for line in lines:
            fields = line.split()
            # fields[1] is local "ADDR:PORT" in hex, fields[3] the state; 0A is LISTEN
            if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False if found_table else None


def _port_open(port: int, host: str = LOCALHOST) -> bool:
    """Whether a TCP connect to host:port would succeed.

    On Linux this reads the LISTEN table instead of connecting: amqtt logs every connection that closes
    without sending CONNECT as an ERROR, which would litter the broker logs the tests read.
    """
    listening = _listening_per_proc(port) if host == LOCALHOST else None
    if listening is not None:
        return listening
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 10.0, host: str = LOCALHOST) -> None:
    """Wait until a TCP connect to host:port would succeed; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not _port_open(port, host):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")
        time.sleep(_POLL_S)


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "<no log file>"
    return text[-_LOG_TAIL_CHARS:]


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, wait up to `timeout` s, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def _kill(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.kill()
    return proc.wait()


# --- Mosquitto ------------------------------------------------------------------------------------------


def find_mosquitto() -> str | None:
    """The mosquitto binary on PATH or at /usr/sbin/mosquitto, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_in_ci(reason: str) -> NoReturn:
    """Something a test needs is not here: fail when $CI is set (CI must run it), skip otherwise."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; required in CI", pytrace=False)
    pytest.skip(reason)


def require_mosquitto() -> str:
    """The mosquitto binary; a missing one fails the test when $CI is set and skips it otherwise."""
    binary = find_mosquitto()
    if binary is None:
        missing_in_ci("mosquitto not installed (apt-get install mosquitto)")
    return binary


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "1m") mounted at ``path``, to fill up; unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        missing_in_ci("no mount(8) on this machine: cannot make a small tmpfs to fill")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        missing_in_ci(f"cannot mount a {size} tmpfs (needs root or CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


class MosquittoProc:
    """A private Mosquitto on a free port of 127.0.0.1, configured and logged in its own directory.

    persistence=True keeps retained messages and sessions across restart() and kill() (saved every second).
    extra_conf lines are appended to the generated mosquitto.conf (e.g. "max_queued_messages 10").
    """

    def __init__(
        self,
        work_dir: Path | str | None = None,
        *,
        persistence: bool = False,
        port: int | None = None,
        extra_conf: Sequence[str] = (),
        binary: str | None = None,
    ) -> None:
        self.binary = binary or find_mosquitto()
        if self.binary is None:
            raise FileNotFoundError("mosquitto binary not found")
        if work_dir is None:
            work_dir = tempfile.mkdtemp(prefix="atrius-mosquitto-")
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._port = port or free_port()
        self.persistence = persistence
        self.conf_path = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_conf(extra_conf)

    def _write_conf(self, extra_conf: Sequence[str]) -> None:
        lines = [
            f"listener {self._port} {LOCALHOST}",
            "allow_anonymous true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            # Recommended for Atrius (README): without it Mosquitto's Nagle delays small requests ~40 ms.
            "set_tcp_nodelay true",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to user 'mosquitto', who cannot write our tmp dir
        if self.persistence:
            store = self.dir / "store"
            store.mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {store}/", "autosave_interval 1"]
        else:
            lines.append("persistence false")
        lines += list(extra_conf)
        self.conf_path.write_text("\n".join(lines) + "\n")

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{LOCALHOST}:{self._port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 10.0) -> MosquittoProc:
        if self.running:
            raise RuntimeError(f"mosquitto already running on port {self._port}")
        assert self.binary is not None
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not _port_open(self._port):
            if self._proc.poll() is not None:
                code = self._proc.returncode
                raise RuntimeError(f"mosquitto exited with {code}:\n{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"mosquitto not listening on {self._port} after {timeout} s")
            time.sleep(_POLL_S)
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (Mosquitto saves its persistence file), wait, SIGKILL if it hangs."""
        return _terminate(self._proc, timeout) if self._proc else None

    def kill(self) -> int | None:
        return _kill(self._proc) if self._proc else None

    def restart(self, timeout: float = 10.0) -> MosquittoProc:
        """Stop and start again on the same port."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> MosquittoProc:
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the atrius CLI --------------------------------------------------------------------------------------


def atrius_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ plus `extra`, with the repo root first on PYTHONPATH and unbuffered output."""
    env = dict(os.environ)
    if extra:
        env.update(extra)
    paths = [str(REPO_ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_for_log(
    log_path: Path | str,
    pattern: str,
    timeout: float = 10.0,
    proc: subprocess.Popen[bytes] | None = None,
) -> re.Match[str]:
    """Poll a log file until the regex `pattern` matches; fails early if `proc` exits first."""
    path = Path(log_path)
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        match = regex.search(text)
        if match:
            return match
        if proc is not None and proc.poll() is not None:
            # one last read: the process may have written the line just before exiting
            text = path.read_text(errors="replace") if path.exists() else ""
            if match := regex.search(text):
                return match
            raise AssertionError(
                f"{pattern!r} not in log; process exited with {proc.returncode}:\n{text[-_LOG_TAIL_CHARS:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not in log after {timeout} s:\n{text[-_LOG_TAIL_CHARS:]}")
        time.sleep(_POLL_S)


class AtriusProc:
    """`python -m atrius_cli *args` as a subprocess with stdout and stderr in one log file.

    env holds variables added to os.environ (the repo root is always put on PYTHONPATH);
    python_args replaces `-m atrius_cli` (e.g. `-c CODE`).
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        cwd: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        log_path: Path | str | None = None,
        name: str = "atrius",
        python_args: Sequence[str] = ("-m", "atrius_cli"),
    ) -> None:
        self.args = [str(a) for a in args]
        self.python_args = list(python_args)
        self.cwd = Path(cwd) if cwd is not None else REPO_ROOT
        self.env = atrius_env(env)
        self.name = name
        if log_path is None:
            fd, tmp = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
            os.close(fd)
            log_path = tmp
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        return [sys.executable, *self.python_args, *self.args]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def start(self) -> AtriusProc:
        if self.running:
            raise RuntimeError(f"{self.name} already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def _require(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._proc

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to `timeout` s, then SIGKILL. Returns the exit code (-9 if killed)."""
        return _terminate(self._require(), timeout)

    def kill(self) -> int:
        """SIGKILL: the crash case."""
        return _kill(self._require())

    def send_signal(self, sig: int) -> None:
        self._require().send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit; subprocess.TimeoutExpired after `timeout` seconds."""
        return self._require().wait(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        return wait_for_log(self.log_path, pattern, timeout, proc=self._proc)

    def __enter__(self) -> AtriusProc:
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self.stop()


class ServerProc(AtriusProc):
    """An atrius process that listens for MQTT on 127.0.0.1:port (`broker` or `hub`); start() waits for it."""

    def __init__(
        self,
        args: Sequence[str],
        port: int,
        *,
        cwd: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        log_path: Path | str | None = None,
        name: str = "atrius",
        python_args: Sequence[str] = ("-m", "atrius_cli"),
    ) -> None:
        super().__init__(args, cwd=cwd, env=env, log_path=log_path, name=name, python_args=python_args)
        self.port = port

    @property
    def url(self) -> str:
        return f"mqtt://{LOCALHOST}:{self.port}"

    def start(self, wait: bool = True, timeout: float = 15.0) -> ServerProc:
        super().start()
        if wait:
            self.wait_listening(timeout)
        return self

    def wait_listening(self, timeout: float = 15.0) -> None:
        """Wait until the port accepts connections; fails early with the log if the process exits."""
        proc = self._require()
        deadline = time.monotonic() + timeout
        while not _port_open(self.port):
            if proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {proc.returncode} before listening on {self.port}:\n"
                    f"{self.log_text()[-_LOG_TAIL_CHARS:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} not listening on {self.port} after {timeout} s:\n"
                    f"{self.log_text()[-_LOG_TAIL_CHARS:]}"
                )
            time.sleep(_POLL_S)


def broker_proc(
    port: int,
    *,
    global_args: Sequence[str] = (),
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    log_path: Path | str | None = None,
) -> ServerProc:
    """`atrius [global_args] broker --host 127.0.0.1 --port P`, not yet started."""
    args = [*global_args, "broker", "--host", LOCALHOST, "--port", str(port)]
    return ServerProc(args, port, cwd=cwd, env=env, log_path=log_path, name=f"broker-{port}")


def hub_proc(
    port: int,
    data_dir: Path | str,
    *,
    global_args: Sequence[str] = (),
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    log_path: Path | str | None = None,
) -> ServerProc:
    """`atrius [global_args] hub --host 127.0.0.1 --port P --data D`, not yet started; logs beside D."""
    data = Path(data_dir)
    if log_path is None:
        log_path = data.parent / f"hub-{port}.log"
    args = [*global_args, "hub", "--host", LOCALHOST, "--port", str(port), "--data", str(data)]
    return ServerProc(args, port, cwd=cwd, env=env, log_path=log_path, name=f"hub-{port}")


def agent_proc(
    config: Path | str,
    *,
    global_args: Sequence[str] = (),
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    log_path: Path | str | None = None,
) -> AtriusProc:
    """`atrius [global_args] agent --config FILE`, not yet started; logs beside the config file."""
    cfg = Path(config)
    if log_path is None:
        log_path = cfg.with_suffix(".log")
    args = [*global_args, "agent", "--config", str(cfg)]
    workdir = cwd if cwd is not None else cfg.parent
    return AtriusProc(args, cwd=workdir, env=env, log_path=log_path, name=cfg.stem)


def amqtt_proc(port: int, *, log_path: Path | str | None = None) -> ServerProc:
    """broker.embedded.main_broker on 127.0.0.1:port in its own process, without the CLI, logging at INFO."""
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')\n"
        "from broker.embedded import main_broker\n"
        f"sys.exit(main_broker({LOCALHOST!r}, {port}))\n"
    )
    return ServerProc([], port, log_path=log_path, name=f"amqtt-{port}", python_args=["-c", code])


# --- raw MQTT clients ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One PUBLISH as a paho client saw it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    mid: int


class MqttProbe:
    """A raw paho 2.x client (CallbackAPIVersion.VERSION2) that records every message it receives.

    Blocking helpers wait for CONNACK, SUBACK and PUBACK so a test reads top to bottom.
    """

    def __init__(
        self,
        port: int,
        client_id: str = "",
        *,
        clean_session: bool = True,
        manual_ack: bool = False,
        host: str = LOCALHOST,
        keepalive: int = 60,
    ) -> None:
        self.host, self.port, self.keepalive = host, port, keepalive
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session
        )
        self.client.max_queued_messages_set(0)
        if manual_ack:
            self.client.manual_ack_set(True)
        self._cond = threading.Condition()
        self._messages: list[Received] = []
        self._acked_mids: set[int] = set()
        self.session_present: bool | None = None
        self._connack_rc: ReasonCode | None = None
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    # paho network-thread callbacks: record and notify, never block
    def _on_connect(self, _c: mqtt.Client, _u: object, flags: mqtt.ConnectFlags, rc: ReasonCode, _p: object) -> None:
        with self._cond:
            self.session_present = bool(flags.session_present)
            self._connack_rc = rc
            self._cond.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        rec = Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), bool(msg.dup), msg.mid)
        with self._cond:
            self._messages.append(rec)
            self._cond.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, _rcs: object, _p: object) -> None:
        with self._cond:
            self._acked_mids.add(mid)
            self._cond.notify_all()

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, _rc: object, _p: object) -> None:
        with self._cond:
            self._acked_mids.add(mid)
            self._cond.notify_all()

    def _wait(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(pred, timeout):
                raise AssertionError(f"{what} not seen within {timeout} s")

    def connect(self, timeout: float = 5.0) -> MqttProbe:
        self.client.connect(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()
        self._wait(lambda: self._connack_rc is not None, timeout, "CONNACK")
        assert self._connack_rc is not None and not self._connack_rc.is_failure, self._connack_rc
        return self

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> None:
        rc, mid = self.client.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        self._wait(lambda: mid in self._acked_mids, timeout, f"SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 5.0) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout)
        assert info.is_published(), f"no PUBACK for {topic} within {timeout} s"

    @property
    def messages(self) -> list[Received]:
        with self._cond:
            return list(self._messages)

    def wait_for(self, pred: Callable[[list[Received]], bool], timeout: float = 5.0) -> list[Received]:
        """Wait until pred(messages so far) holds; returns the messages."""
        self._wait(lambda: pred(self._messages), timeout, "expected messages")
        return self.messages

    def ack(self, mid: int, qos: int = 1) -> None:
        """Send the PUBACK for a message received with manual_ack=True."""
        self.client.ack(mid, qos)

    def pause(self) -> None:
        """Stop reading from the socket but keep the connection open (a stalled subscriber)."""
        self.client.loop_stop()

    def drop(self) -> None:
        """Close the socket without DISCONNECT: the broker sees a crashed client."""
        self.client.loop_stop()
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        """DISCONNECT cleanly and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


def barrier(receiver: MqttProbe, sender: MqttProbe, timeout: float = 5.0) -> None:
    """Return once `receiver` got a marker that `sender` published after everything before this call.

    Brokers send a session's queued and retained messages before they handle its next SUBSCRIBE, so
    everything the broker had for `receiver` has arrived once the marker has.
    """
    topic = f"atrius-test/barrier/{uuid.uuid4().hex}"
    receiver.subscribe(topic, qos=1)
    sender.publish(topic, b"barrier", qos=1)
    receiver.wait_for(lambda msgs: any(m.topic == topic for m in msgs), timeout)


def without_barriers(messages: Sequence[Received]) -> list[Received]:
    return [m for m in messages if not m.topic.startswith("atrius-test/barrier/")]
