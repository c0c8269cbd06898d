"""Atrius benchmark: raw paho throughput and round trip vs. agent-to-agent sync, through Mosquitto and the hub."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import IO, Any

import blake3
import paho.mqtt
import rawmqtt

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
OUT = BENCH / "out"
KIB, MIB = 1024, 1024 * 1024
MB = 1_000_000
"""Throughput figures are in MB/s = 10^6 bytes per second; sizes are in KiB/MiB."""

HOST = "127.0.0.1"
RETAINED_GRACE = 1.0
"""Seconds to wait after both agents logged ``connected to`` (they wait out retained messages)."""
POLL = 0.001
"""Seconds between os.stat() calls while waiting for B's file to be replaced."""
SMALL_SIZE = 10 * KIB
SMALL_TIMEOUT = 10.0
SMALL_PAUSE = 0.1
"""Unmeasured pause between two small-file saves, so each save is a separate edit."""
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
E2E_AIM = 0.5
SMALL_AIM_MS = 50.0
LOG_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|\bError\b|\bWarning\b")


class BenchError(RuntimeError):
    """A bench step that failed or did not finish in time; the message says which."""


class Interrupted(BaseException):
    """SIGTERM received: unwind like Ctrl-C so every subprocess is stopped."""


@dataclass(frozen=True)
class Settings:
    quick: bool
    total: int
    samples: int
    payloads: tuple[int, ...] = (128 * KIB, 512 * KIB)
    raw_runs: int = 3
    raw_timeout: float = 120.0
    e2e_timeout: float = 120.0

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(quick=True, total=32 * MIB, samples=5, raw_runs=1, raw_timeout=60.0, e2e_timeout=60.0)
        return cls(quick=False, total=256 * MIB, samples=20)


# -- results -----------------------------------------------------------------------------------
@dataclass
class RawThroughput:
    payload_bytes: int
    messages: int
    seconds: float | None = None
    mb_s: float | None = None
    """The best run (the broker's ceiling here); every run is in ``runs_mb_s``."""
    runs_mb_s: list[float] = field(default_factory=list)
    received: int = 0
    lost: int = 0
    duplicates: int = 0
    wrong_size: int = 0
    publisher_acked: int = 0
    error: str | None = None


@dataclass
class Latency:
    samples_ms: list[float] = field(default_factory=list)
    median_ms: float | None = None
    p99_ms: float | None = None
    """Nearest-rank p99: with fewer than 100 samples this is the maximum."""
    error: str | None = None

    def finish(self) -> Latency:
        if self.samples_ms:
            xs = sorted(self.samples_ms)
            self.median_ms = statistics.median(xs)
            self.p99_ms = xs[max(0, math.ceil(0.99 * len(xs)) - 1)]
        return self


@dataclass
class Transfer:
    size_bytes: int
    seconds: float | None = None
    mb_s: float | None = None
    ratio_to_raw: float | None = None
    """mb_s divided by the raw 128 KiB baseline through the same broker."""
    agent_apply_ms: float | None = None
    """B's own ``applied ... in N ms`` figure (head received -> file replaced)."""
    a_published_ms: float | None = None
    """A's last ``published`` log line, in ms after the close (log stamps have 1 ms resolution)."""
    published_before_close: int = 0
    """Versions of the file A published while it was still being written (should be 0)."""
    wrong_versions: int = 0
    error: str | None = None


@dataclass
class LogFinding:
    log: str
    lines: list[str]


@dataclass
class BrokerResults:
    broker: str
    label: str
    coordinator: bool
    note: str = ""
    raw: list[RawThroughput] = field(default_factory=list)
    raw_rtt: Latency = field(default_factory=Latency)
    e2e: Transfer | None = None
    small: Latency = field(default_factory=Latency)
    small_ratio_to_raw_rtt: float | None = None
    peak_rss_mb: dict[str, float | None] = field(default_factory=dict)
    """Agents' peak RSS before and after the big transfer: memory must not grow with file size."""
    log_findings: list[LogFinding] = field(default_factory=list)
    error: str | None = None

    def failures(self) -> list[str]:
        out = [f"{self.broker}: {self.error}"] if self.error else []
        out += [f"{self.broker} raw {r.payload_bytes // KIB} KiB: {r.error}" for r in self.raw if r.error]
        if self.raw_rtt.error:
            out.append(f"{self.broker} raw round trip: {self.raw_rtt.error}")
        if self.e2e is not None and self.e2e.error:
            out.append(f"{self.broker} end-to-end: {self.e2e.error}")
        if self.small.error:
            out.append(f"{self.broker} small files: {self.small.error}")
        return out


# -- subprocesses --------------------------------------------------------------------------------
class Processes:
    """Owns every subprocess of one broker's run; ``stop_all`` ends them newest first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.logs: dict[str, Path] = {}
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._files: list[IO[bytes]] = []
        self._stopped: set[int] = set()
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], *, capture_stdout: bool = False) -> subprocess.Popen[bytes]:
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed in stop_all
        self._files.append(log)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture_stdout else log, stderr=log,
            start_new_session=True,  # a Ctrl-C in the terminal reaches only us; we stop them in order
        )
        self._procs.append((name, proc))
        self.logs[name] = log_path
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; a captured stdout is left for its reader to drain."""
        self._stopped.add(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)

    def peak_rss_mb(self, name: str) -> float | None:
        """Peak resident memory (VmHWM) of a running subprocess, in MB; None where /proc has none."""
        for n, proc in self._procs:
            if n == name and proc.poll() is None:
                try:
                    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            return int(line.split()[1]) * 1024 / 1e6
                except OSError:
                    return None
        return None

    def check_running(self) -> None:
        """Raise if a subprocess we did not stop has exited (crashed, or killed by someone else)."""
        for name, proc in self._procs:
            if proc.pid not in self._stopped and proc.poll() is not None:
                raise BenchError(f"{name} exited unexpectedly (code {proc.returncode}): {_tail(self.logs[name], 3)}")

    def stop_all(self) -> None:
        while self._procs:
            _, proc = self._procs.pop()
            self.stop(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        for f in self._files:
            f.close()
        self._files.clear()


def atrius(*args: str) -> list[str]:
    return [sys.executable, "-m", "atrius_cli", *args]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 8) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def wait_for_log(procs: Processes, name: str, proc: subprocess.Popen[bytes], needle: str, timeout: float) -> None:
    path = procs.logs[name]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if needle in path.read_text(errors="replace"):
                return
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with code {proc.returncode}: {_tail(path)}")
        time.sleep(0.02)
    raise BenchError(f"{name} did not log {needle!r} within {timeout:.0f} s: {_tail(path)}")


def wait_for_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with code {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"{name} did not listen on {HOST}:{port} within {timeout:.0f} s")


def read_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise BenchError(f"{what}: nothing within {timeout:.0f} s")
    line = proc.stdout.readline().decode(errors="replace").strip()
    if not line:
        raise BenchError(f"{what}: the process exited (code {proc.wait(STOP_TIMEOUT)})")
    return line


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


def mosquitto_version(binary: str | None) -> str | None:
    if binary is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5).stdout
        m = re.search(r"mosquitto version (\S+)", out)
        return m.group(1) if m else None
    return None


# -- brokers and agents ----------------------------------------------------------------------------
def start_mosquitto(procs: Processes, work: Path, binary: str, extra: tuple[str, ...]) -> int:
    port = free_port()
    conf = work / "mosquitto.conf"
    lines = [f"listener {port} {HOST}", "allow_anonymous true", "persistence false", "log_dest stderr", *extra]
    conf.write_text("\n".join(lines) + "\n")
    proc = procs.start("mosquitto", [binary, "-c", str(conf)])
    wait_for_port(port, proc, "mosquitto", STARTUP_TIMEOUT)
    return port


def start_coordinator(procs: Processes, work: Path, port: int) -> None:
    proc = procs.start("coordinator", atrius("coordinator", "--broker", f"mqtt://{HOST}:{port}",
                                             "--data", str(work / "coordinator")))
    wait_for_log(procs, "coordinator", proc, "connected to", STARTUP_TIMEOUT)


def start_hub(procs: Processes, work: Path) -> int:
    port = free_port()
    proc = procs.start("hub", atrius("hub", "--host", HOST, "--port", str(port), "--data", str(work / "hub")))
    # No TCP probe: amqtt logs an ERROR for a connection that sends nothing.  Its coordinator
    # connecting means the broker listens.
    wait_for_log(procs, "hub", proc, "connected to", STARTUP_TIMEOUT)
    return port


@dataclass(frozen=True)
class Variant:
    """One broker set-up to measure through; ``coordinator`` adds `atrius coordinator` beside Mosquitto."""

    name: str
    label: str
    hub: bool
    coordinator: bool
    note: str
    mosquitto_conf: tuple[str, ...] = ()


NODELAY = ("set_tcp_nodelay true",)
VARIANTS = (
    Variant("mosquitto", "mosquitto", hub=False, coordinator=True,
            note="stock Mosquitto (set_tcp_nodelay false, i.e. Nagle on) + `atrius coordinator` + 2 agents"),
    Variant("mosquitto-nodelay", "mosq nodelay", hub=False, coordinator=True, mosquitto_conf=NODELAY,
            note="Mosquitto with `set_tcp_nodelay true` + `atrius coordinator` + 2 agents"),
    Variant("mosquitto-nodelay-solo", "mosq nodelay solo", hub=False, coordinator=False, mosquitto_conf=NODELAY,
            note="Mosquitto with `set_tcp_nodelay true` + 2 agents, no coordinator"),
    Variant("hub", "hub (amqtt)", hub=True, coordinator=True,
            note="`atrius hub` (embedded amqtt 0.12.1 + coordinator in one process) + 2 agents"),
)


@dataclass(frozen=True)
class Pair:
    """Two agents, A and B, syncing big.bin and small.bin."""

    a_dir: Path
    b_dir: Path

    def a(self, name: str) -> Path:
        return self.a_dir / name

    def b(self, name: str) -> Path:
        return self.b_dir / name


def start_agents(procs: Processes, work: Path, port: int, space: str) -> Pair:
    dirs = {}
    for dev in ("a", "b"):
        d = work / f"dev-{dev}"
        d.mkdir(parents=True)
        (d / "agent.yaml").write_text(
            f"device: dev-{dev}\nspace: {space}\nbroker: {{url: \"mqtt://{HOST}:{port}\"}}\n"
            f"state_dir: {d / 'state'}\nfiles:\n"
            "  - {path: big.bin, id: big.bin}\n  - {path: small.bin, id: small.bin}\n")
        dirs[dev] = d
    started = [(f"agent-{dev}", procs.start(f"agent-{dev}", atrius("agent", "--config", str(d / "agent.yaml"))))
               for dev, d in dirs.items()]
    for name, proc in started:
        wait_for_log(procs, name, proc, "connected to", STARTUP_TIMEOUT)
    time.sleep(RETAINED_GRACE)
    return Pair(dirs["a"], dirs["b"])


# -- measurements ------------------------------------------------------------------------------------
def raw_throughput(procs: Processes, port: int, payload: int, s: Settings) -> RawThroughput:
    """The best of ``s.raw_runs`` runs; losses, duplicates and errors are summed over all of them."""
    best = RawThroughput(payload, s.total // payload)
    errors = []
    for _ in range(s.raw_runs):
        r = raw_once(procs, port, payload, s)
        if r.mb_s is not None:
            best.runs_mb_s.append(round(r.mb_s, 1))
            if best.mb_s is None or r.mb_s > best.mb_s:
                best.mb_s, best.seconds, best.received, best.publisher_acked = r.mb_s, r.seconds, r.received, \
                    r.publisher_acked
        best.lost += r.lost
        best.duplicates += r.duplicates
        best.wrong_size += r.wrong_size
        if r.error:
            errors.append(r.error)
    best.error = "; ".join(errors) or None
    return best


class SubscriberReader(threading.Thread):
    """Reads the raw subscriber's stdout: ``n <count>`` lines feed the FlowGate, ``result <json>`` ends it."""

    def __init__(self, proc: subprocess.Popen[bytes], gate: rawmqtt.FlowGate) -> None:
        super().__init__(name="raw-sub-reader", daemon=True)
        self.proc = proc
        self.gate = gate
        self.result: dict[str, Any] | None = None

    def run(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:  # ends at EOF, when the subscriber exits
            kind, _, rest = raw.decode(errors="replace").strip().partition(" ")
            if kind == "n":
                self.gate.on_delivered(int(rest))
            elif kind == "result":
                self.result = json.loads(rest)


def raw_once(procs: Processes, port: int, payload: int, s: Settings) -> RawThroughput:
    count = s.total // payload
    res = RawThroughput(payload, count)
    topic = f"bench/raw/{uuid.uuid4().hex[:8]}"
    name = f"raw-sub-{payload // KIB}k"
    sub = procs.start(name, [sys.executable, str(BENCH / "rawmqtt.py"), "sub", "--host", HOST, "--port", str(port),
                             "--topic", topic, "--count", str(count), "--size", str(payload),
                             "--timeout", str(s.raw_timeout)], capture_stdout=True)
    gate = rawmqtt.FlowGate(rawmqtt.WINDOW, rawmqtt.ahead_limit(payload))
    reader = SubscriberReader(sub, gate)
    try:
        if (line := read_line(sub, STARTUP_TIMEOUT, "raw subscriber start")) != "ready":
            raise BenchError(f"raw subscriber: {line}")
        reader.start()
        pub = rawmqtt.publish_stream(HOST, port, topic, count, payload, s.raw_timeout, gate)
        res.publisher_acked = pub.acked
        reader.join(s.raw_timeout + 30)
        report = reader.result
        if report is None:
            raise BenchError(f"raw subscriber: no result (exit code {sub.poll()})")
        if "error" in report:
            raise BenchError(f"raw subscriber: {report['error']}")
        got = rawmqtt.SubResult(**report)
        res.received, res.duplicates, res.wrong_size = got.unique, got.duplicates, got.wrong_size
        res.lost = count - got.unique
        if got.last_at is not None and got.unique:
            res.seconds = got.last_at - pub.started_at
            res.mb_s = got.unique * payload / res.seconds / MB
        problems = []
        if pub.acked_at is None:
            problems.append(f"publisher timed out after {s.raw_timeout:.0f} s ({pub.acked}/{count} acked)")
        if res.lost:
            problems.append(f"{res.lost} of {count} messages never arrived" + (" (timeout)" if got.timed_out else ""))
        if res.wrong_size:
            problems.append(f"{res.wrong_size} messages had the wrong size")
        res.error = "; ".join(problems) or None
    except (BenchError, rawmqtt.RawError, ValueError) as exc:
        res.error = str(exc)
    finally:
        procs.stop(sub)
        if reader.is_alive():
            reader.join(STOP_TIMEOUT)
        assert sub.stdout is not None
        sub.stdout.close()
    return res


def raw_round_trip(port: int, s: Settings) -> Latency:
    lat = Latency()
    try:
        rtts = rawmqtt.round_trips(HOST, port, f"bench/rtt/{uuid.uuid4().hex[:8]}", SMALL_SIZE, s.samples, 10.0)
        lat.samples_ms = [x * 1000 for x in rtts]
    except rawmqtt.RawError as exc:
        lat.error = str(exc)
    return lat.finish()


def file_hash(path: Path) -> str:
    return str(blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path).hexdigest())


def identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class Arrival:
    seconds: float
    """From the writer's close() on A to B's path being a new inode with A's content."""
    wrong_versions: int
    """New inodes on B whose content was not the final one (e.g. a partial version A published)."""
    closed_wall: float
    """time.time() at the close, to place agent log lines on the same time line."""


def write_and_wait(src: Path, dst: Path, data: bytes, timeout: float, procs: Processes) -> Arrival:
    """Write+close ``data`` on A, then wait for it on B.

    B's path is polled with os.stat every POLL seconds; on each new inode it is hashed once (not
    counted in the figure) and a mismatch keeps the wait going.  Every ~50 polls the broker and
    agent processes are checked, so a crash ends the wait at once.
    """
    digest = blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()
    seen = identity(dst)
    wrong = 0
    polls = 0
    with open(src, "wb") as fh:
        fh.write(data)
    closed = time.perf_counter()
    closed_wall = time.time()
    deadline = closed + timeout
    while True:
        now_id = identity(dst)
        if now_id is not None and now_id != seen:
            arrived = time.perf_counter()
            try:
                if file_hash(dst) == digest:
                    return Arrival(arrived - closed, wrong, closed_wall)
            except OSError:
                pass  # replaced again while we looked
            wrong += 1
            seen = now_id
        if time.perf_counter() > deadline:
            raise BenchError(f"timeout: {dst.name} did not arrive on B within {timeout:.0f} s"
                             + (f" ({wrong} wrong versions seen)" if wrong else ""))
        polls += 1
        if polls % 50 == 0:
            procs.check_running()
        time.sleep(POLL)


def e2e_transfer(pair: Pair, procs: Processes, s: Settings, raw_mb_s: float | None) -> Transfer:
    res = Transfer(s.total)
    data = os.urandom(s.total)
    try:
        arrival = write_and_wait(pair.a("big.bin"), pair.b("big.bin"), data, s.e2e_timeout, procs)
    except BenchError as exc:
        res.error = str(exc)
        return res
    res.seconds, res.wrong_versions = arrival.seconds, arrival.wrong_versions
    res.mb_s = s.total / arrival.seconds / MB
    if raw_mb_s:
        res.ratio_to_raw = res.mb_s / raw_mb_s
    time.sleep(0.2)  # let the agents' log lines land
    found = re.findall(r"big\.bin: applied v\d+ from dev-a \(.*\) in (\d+) ms",
                       procs.logs["agent-b"].read_text(errors="replace"))
    res.agent_apply_ms = float(found[-1]) if found else None
    published = [t - arrival.closed_wall for t in log_times(procs.logs["agent-a"], "big.bin: published v",
                                                            arrival.closed_wall)]
    res.published_before_close = sum(1 for dt_ in published if dt_ < 0)
    if published:
        res.a_published_ms = published[-1] * 1000
    return res


def log_times(path: Path, needle: str, ref: float) -> list[float]:
    """Epoch times of the log lines containing ``needle`` (agent logs stamp HH:MM:SS.mmm, local time)."""
    day = dt.datetime.fromtimestamp(ref).astimezone()
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"(\d\d):(\d\d):(\d\d)\.(\d{3}) ", line)
        if m is None or needle not in line:
            continue
        h, mi, sec, ms = (int(g) for g in m.groups())
        t = day.replace(hour=h, minute=mi, second=sec, microsecond=ms * 1000).timestamp()
        t += 86_400 * round((ref - t) / 86_400)  # the nearest day to ``ref``, for runs across midnight
        out.append(t)
    return out


def small_latency(pair: Pair, procs: Processes, s: Settings) -> Latency:
    lat = Latency()
    try:
        for _ in range(s.samples):
            arrival = write_and_wait(pair.a("small.bin"), pair.b("small.bin"), os.urandom(SMALL_SIZE), SMALL_TIMEOUT,
                                     procs)
            lat.samples_ms.append(arrival.seconds * 1000)
            time.sleep(SMALL_PAUSE)
    except BenchError as exc:
        lat.error = f"sample {len(lat.samples_ms) + 1}: {exc}"
    return lat.finish()


def problem_lines(procs: Processes) -> list[LogFinding]:
    out = []
    for name, path in procs.logs.items():
        with contextlib.suppress(OSError):
            lines = [ln for ln in path.read_text(errors="replace").splitlines() if LOG_PROBLEM.search(ln)]
            if lines:
                out.append(LogFinding(name, lines[:200]))
    return out


def run_broker(v: Variant, work: Path, s: Settings, log_out: Path) -> BrokerResults:
    """Everything measured through one broker set-up; its subprocesses are stopped before returning."""
    res = BrokerResults(v.name, v.label, coordinator=v.coordinator, note=v.note)
    procs = Processes(work / "logs")
    print(f"\n== {v.label}: {v.note}", flush=True)
    try:
        if v.hub:
            port = start_hub(procs, work)
        else:
            binary = mosquitto_binary()
            if binary is None:
                raise BenchError("mosquitto binary not found")
            port = start_mosquitto(procs, work, binary, v.mosquitto_conf)
        for payload in s.payloads:
            r = raw_throughput(procs, port, payload, s)
            res.raw.append(r)
            print(f"   raw {payload // KIB} KiB x {r.messages}: {_fmt(r.mb_s, 1)} MB/s (runs: {r.runs_mb_s})"
                  + (f"  FAILED: {r.error}" if r.error else ""), flush=True)
        res.raw_rtt = raw_round_trip(port, s)
        print(f"   raw round trip {SMALL_SIZE // KIB} KiB: median {_fmt(res.raw_rtt.median_ms, 2)} ms", flush=True)
        if v.coordinator and not v.hub:
            start_coordinator(procs, work, port)
        pair = start_agents(procs, work, port, f"bench-{v.name}")
        for agent in ("agent-a", "agent-b"):
            res.peak_rss_mb[f"{agent} before"] = procs.peak_rss_mb(agent)
        res.e2e = e2e_transfer(pair, procs, s, res.raw[0].mb_s if res.raw else None)
        for agent in ("agent-a", "agent-b"):
            res.peak_rss_mb[f"{agent} after"] = procs.peak_rss_mb(agent)
        print(f"   end-to-end {s.total // MIB} MiB: {_fmt(res.e2e.seconds, 2)} s, {_fmt(res.e2e.mb_s, 1)} MB/s"
              + (f"  FAILED: {res.e2e.error}" if res.e2e.error else ""), flush=True)
        procs.check_running()
        res.small = small_latency(pair, procs, s)
        if res.small.median_ms is not None and res.raw_rtt.median_ms:
            res.small_ratio_to_raw_rtt = res.small.median_ms / res.raw_rtt.median_ms
        print(f"   small {SMALL_SIZE // KIB} KiB x {s.samples}: median {_fmt(res.small.median_ms, 1)} ms"
              + (f"  FAILED: {res.small.error}" if res.small.error else ""), flush=True)
    except BenchError as exc:
        res.error = str(exc)
        print(f"   FAILED: {exc}", flush=True)
    finally:
        procs.stop_all()
        res.log_findings = problem_lines(procs)
        dest = log_out / v.name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(procs.log_dir, dest)
    return res


# -- report --------------------------------------------------------------------------------------------
def print_problems(findings: list[tuple[str, list[LogFinding]]], failures: list[str]) -> None:
    """Warning/error lines found in each set-up's process logs, then the failures, if any."""
    for name, found in findings:
        for finding in found:
            print(f"\n{name}/{finding.log}.log: {len(finding.lines)} warning/error line(s):")
            for ln in finding.lines[:10]:
                print(f"    {ln}")
    if failures:
        print("\nFAILURES:\n  " + "\n  ".join(failures))

def _fmt(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _aim(ok: bool | None) -> str:
    return "" if ok is None else ("  ok" if ok else "  MISSED")


def table(results: list[BrokerResults], s: Settings) -> str:
    n = s.samples
    rows: list[tuple[str, list[str]]] = []
    for i, payload in enumerate(s.payloads):
        count = s.total // payload
        rows.append((f"raw {payload // KIB} KiB x {count}, best of {s.raw_runs} [MB/s]",
                     [_fmt(r.raw[i].mb_s, 1) + (" FAIL" if r.raw[i].error else "") if len(r.raw) > i else "-"
                      for r in results]))
    rows.append(("raw lost / duplicated messages",
                 [f"{sum(x.lost for x in r.raw)} / {sum(x.duplicates for x in r.raw)}" if r.raw else "-"
                  for r in results]))
    rows.append((f"raw round trip {SMALL_SIZE // KIB} KiB, median of {n} [ms]",
                 [_fmt(r.raw_rtt.median_ms, 2) for r in results]))
    rows.append((f"e2e {s.total // MIB} MiB close(A) -> verified(B) [s]",
                 [_fmt(r.e2e.seconds, 2) if r.e2e and r.e2e.seconds else "FAIL" for r in results]))
    rows.append(("e2e throughput [MB/s]", [_fmt(r.e2e.mb_s if r.e2e else None, 1) for r in results]))
    rows.append((f"e2e / raw {s.payloads[0] // KIB} KiB (aim >= {E2E_AIM})",
                 [_fmt(r.e2e.ratio_to_raw if r.e2e else None, 2)
                  + _aim(None if not r.e2e or r.e2e.ratio_to_raw is None else r.e2e.ratio_to_raw >= E2E_AIM)
                  for r in results]))
    rows.append(("  close -> A's last 'published' (A's log) [ms]",
                 [_fmt(r.e2e.a_published_ms if r.e2e else None, 0) for r in results]))
    rows.append(("  B's 'applied ... in' (B's log) [ms]",
                 [_fmt(r.e2e.agent_apply_ms if r.e2e else None, 0) for r in results]))
    rows.append(("  versions A published before the close", [str(r.e2e.published_before_close) if r.e2e else "-"
                                                            for r in results]))
    rows.append(("  other versions seen on B before the final one",
                 [str(r.e2e.wrong_versions) if r.e2e else "-" for r in results]))
    rows.append((f"small {SMALL_SIZE // KIB} KiB save -> applied, median [ms] (aim < {SMALL_AIM_MS:.0f})",
                 [_fmt(r.small.median_ms, 1) + _aim(None if r.small.median_ms is None
                                                    else r.small.median_ms < SMALL_AIM_MS) for r in results]))
    rows.append((f"small p99 (n={n}: p99 = max) [ms]", [_fmt(r.small.p99_ms, 1) for r in results]))
    rows.append(("small median / raw round trip median", [_fmt(r.small_ratio_to_raw_rtt, 1) for r in results]))
    for agent, role in (("agent-a", "sender A"), ("agent-b", "receiver B")):
        rows.append((f"peak RSS of {role} before / after the big transfer [MB]",
                     [" / ".join(_fmt(r.peak_rss_mb.get(f"{agent} {when}"), 0) for when in ("before", "after"))
                      for r in results]))
    width = max(len(name) for name, _ in rows) + 2
    cols = [max(len(r.label), *(len(v[i]) for _, v in rows)) + 2 for i, r in enumerate(results)]
    lines = ["".ljust(width) + "".join(r.label.rjust(c) for r, c in zip(results, cols, strict=True))]
    lines.append("-" * (width + sum(cols)))
    lines += [name.ljust(width) + "".join(v.rjust(c) for v, c in zip(vals, cols, strict=True)) for name, vals in rows]
    return "\n".join(lines)


def environment(mosq: str | None) -> dict[str, Any]:
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "paho_mqtt": paho.mqtt.__version__,
        "amqtt": version("amqtt"),
        "mosquitto": mosquitto_version(mosq),
    }


def method(s: Settings) -> dict[str, str]:
    return {
        "units": "MB/s = 10^6 bytes/s; sizes in KiB/MiB (2^10/2^20 bytes)",
        "raw_throughput": (
            f"paho-mqtt {paho.mqtt.__version__} (CallbackAPIVersion.VERSION2, MQTT 3.1.1) publisher in the bench "
            f"process -> broker -> paho subscriber in its own process, QoS 1, {s.total // MIB} MiB per payload size, "
            f"best of {s.raw_runs} run(s). "
            f"Flow control: at most {rawmqtt.WINDOW} unacknowledged publishes (the publisher waits for on_publish, "
            f"i.e. the broker's PUBACK; max_inflight_messages={rawmqtt.WINDOW}) and at most "
            f"{rawmqtt.ahead_limit(s.payloads[0])} ({s.payloads[0] // KIB} KiB) / "
            f"{rawmqtt.ahead_limit(s.payloads[-1])} ({s.payloads[-1] // KIB} KiB) messages ahead of what the "
            f"subscriber counted (reported out of band through a pipe every {rawmqtt.PROGRESS_EVERY} messages), "
            "because a PUBACK does not bound Mosquitto's queue to a lagging subscriber, which it silently "
            "truncates at max_queued_messages=1000. Time: first publish -> last message received by the "
            "subscriber, which counts distinct sequence numbers."
        ),
        "raw_round_trip": (
            f"{SMALL_SIZE // KIB} KiB QoS 1 message, publish() in one paho client -> on_message in another "
            f"(same process), one at a time, {s.samples} samples after 1 warm-up."
        ),
        "e2e": (
            f"{s.total // MIB} MiB of os.urandom written to device A's big.bin (write + close); time from close() "
            f"to B's big.bin having a new inode (os.stat every {POLL * 1000:.0f} ms) whose BLAKE3 equals A's (hashed "
            "once, not counted); the coordinator, where present, pulls the same version from A at the same time "
            f"(see variants). Ratio: e2e MB/s over the best raw {s.payloads[0] // KIB} KiB MB/s of the same "
            "broker (chunks average ~100 KiB)."
        ),
        "small": (
            f"{SMALL_SIZE // KIB} KiB random content rewritten {s.samples} times on A (write + close, each waits for "
            f"B, {SMALL_PAUSE * 1000:.0f} ms pause between); latency close(A) -> verified new inode on B. "
            "p99 is nearest-rank, so with fewer than 100 samples it is the maximum."
        ),
    }


def _rounded(x: Any) -> Any:
    """Floats to 4 decimals, so the JSON stays readable (times are ms or s, rates MB/s)."""
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="32 MiB and 5 samples instead of 256 MiB and 20")
    ap.add_argument("--only", choices=[v.name for v in VARIANTS], action="append", metavar="VARIANT",
                    help="measure through this broker set-up only (repeatable)")
    ap.add_argument("--out", type=Path, default=OUT / "results.json", help="where to write the JSON figures")
    args = ap.parse_args(argv)
    s = Settings.make(args.quick)
    variants = [v for v in VARIANTS if not args.only or v.name in args.only]
    env = environment(mosquitto_binary())
    print(f"Atrius bench ({'quick' if s.quick else 'full'}): {s.total // MIB} MiB, {s.samples} samples; "
          f"{env['cpus']} CPUs, Python {env['python']}, paho {env['paho_mqtt']}, amqtt {env['amqtt']}, "
          f"mosquitto {env['mosquitto']}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_out = args.out.parent / "logs"
    results: list[BrokerResults] = []
    work = Path(tempfile.mkdtemp(prefix="atrius-bench-"))
    try:
        for v in variants:
            results.append(run_broker(v, work / v.name, s, log_out))
    except (KeyboardInterrupt, Interrupted):
        print("\ninterrupted; subprocesses stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\n" + table(results, s))
    print()
    for r in results:
        print(f"{r.label}: {r.note}")
    print(f"Raw baseline: best of {s.raw_runs} run(s); flow control: at most {rawmqtt.WINDOW} unacknowledged QoS 1 "
          f"publishes (waits on on_publish/PUBACK) and at most {rawmqtt.ahead_limit(s.payloads[0])}/"
          f"{rawmqtt.ahead_limit(s.payloads[-1])} messages ahead of the subscriber's count (out of band).\n"
          "MB = 10^6 bytes.")
    failures = [f for r in results for f in r.failures()]
    print_problems([(r.broker, r.log_findings) for r in results], failures)
    doc = {
        "environment": env,
        "mode": "quick" if s.quick else "full",
        "settings": asdict(s),
        "method": method(s),
        "variants": {r.broker: r.note for r in results},
        "brokers": {r.broker: asdict(r) for r in results},
        "failures": failures,
    }
    args.out.write_text(json.dumps(_rounded(doc), indent=2) + "\n")
    print(f"\nfigures: {args.out}; process logs: {log_out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
