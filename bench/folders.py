"""Atrius folders bench: initial sync of many small files in many folders via Mosquitto, and an unchanged restart."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blake3
import paho.mqtt.client as paho
import rawmqtt
import run
from run import KIB, MB, BenchError, Processes

sys.path.insert(0, str(run.REPO))
from schemas.topics import TopicError, TopicKind, parse_topic

SPACE = "bench-folders"
FOLDER_ID = "tree"
POLL = 0.25
"""Seconds between looks at the logs and process counters while waiting."""
VERIFY_EVERY = 5.0
"""While B's log does not yet show every file applied, B's tree is still walked this often."""
PROGRESS_EVERY = 10.0
STALL = 180.0
"""The initial sync is declared stuck when nothing moved (A's publishes, B's applies, the
coordinator's records and stores, files verified on B) for this long."""
QUIET_WINDOW = 1.0
QUIET_CPU = 0.05
"""A restarted agent is idle once it used less than this share of one core for QUIET_WINDOW s."""
RESTART_TIMEOUT = 300.0
COORD_STORE_WAIT = 300.0
"""After B has everything: how long to wait for the coordinator to store every file before stopping."""
COORD_STALL = 60.0
"""... unless it stored nothing for this long."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
SKIP_FRAMES = {"main_agent", "<module>", "FileTask.run", "FolderTask.run"}
"""Frames left out of the profile summary: they hold the whole event loop (or imports)."""
STAMP = re.compile(r"(\d\d):(\d\d):(\d\d)\.(\d{3}) ")
PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")


@dataclass(frozen=True)
class Settings:
    files: int
    folders: int
    min_kib: int
    max_kib: int
    seed: int
    timeout: float
    late: bool
    """B starts only after A published the whole tree (B then gets the heads as retained messages)."""

    def sizes(self) -> list[int]:
        rnd = random.Random(self.seed)
        return [rnd.randint(self.min_kib * KIB, self.max_kib * KIB) for _ in range(self.files)]


# -- the tree ------------------------------------------------------------------------------------------
def make_tree(root: Path, s: Settings) -> dict[str, tuple[int, str]]:
    """``s.files`` random files spread evenly over ``s.folders`` folders; rel path -> (size, BLAKE3)."""
    out: dict[str, tuple[int, str]] = {}
    for i, size in enumerate(s.sizes()):
        rel = f"d{i % s.folders:04d}/f{i:06d}.bin"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(size)
        path.write_bytes(data)
        out[rel] = (size, blake3.blake3(data).hexdigest())
    return out


def walk_files(root: Path) -> dict[str, os.stat_result]:
    out: dict[str, os.stat_result] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                out[os.path.relpath(p, root)] = os.stat(p)
    return out


class TreeCheck:
    """Which of A's files are on B with A's content: each new (inode, mtime) on B is hashed once."""

    def __init__(self, root: Path, expected: dict[str, tuple[int, str]]) -> None:
        self.root = root
        self.expected = expected
        self.verified: set[str] = set()
        self.seen: dict[str, tuple[int, int]] = {}
        self.wrong = 0
        self.extra: set[str] = set()

    def look(self) -> int:
        for rel, st in walk_files(self.root).items():
            want = self.expected.get(rel)
            if want is None:
                self.extra.add(rel)
                continue
            key = (st.st_ino, st.st_mtime_ns)
            if rel in self.verified and self.seen.get(rel) == key:
                continue
            self.seen[rel] = key
            self.verified.discard(rel)
            if st.st_size != want[0]:
                continue
            try:
                ok = blake3.blake3(max_threads=1).update_mmap(self.root / rel).hexdigest() == want[1]
            except OSError:
                continue
            if ok:
                self.verified.add(rel)
            else:
                self.wrong += 1
        return len(self.verified)

    @property
    def complete(self) -> bool:
        return len(self.verified) == len(self.expected)


# -- logs, processes, the wire ----------------------------------------------------------------------------
class LogTail:
    """Reads a growing log incrementally; counts lines per pattern and keeps the stamp of the last one."""

    def __init__(self, path: Path, patterns: dict[str, str], day_ref: float) -> None:
        self.path = path
        self.patterns = {k: re.compile(v) for k, v in patterns.items()}
        self.counts: Counter[str] = Counter()
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self._offset = 0
        self._rest = b""
        self._day = dt.datetime.fromtimestamp(day_ref).astimezone()
        self._ref = day_ref

    def _stamp(self, line: str) -> float | None:
        m = STAMP.match(line)
        if m is None:
            return None
        h, mi, sec, ms = (int(g) for g in m.groups())
        t = self._day.replace(hour=h, minute=mi, second=sec, microsecond=ms * 1000).timestamp()
        return t + 86_400 * round((self._ref - t) / 86_400)

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except OSError:
            return
        self._offset += len(data)
        data = self._rest + data
        lines = data.split(b"\n")
        self._rest = lines.pop()
        for raw in lines:
            line = raw.decode(errors="replace")
            for name, rx in self.patterns.items():
                if rx.search(line):
                    self.counts[name] += 1
                    t = self._stamp(line)
                    if t is not None:
                        self.first.setdefault(name, t)
                        self.last[name] = t


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_mb(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


class WireWatch:
    """Counts heads, chunk requests and presence on the space (not the data frames: they would double
    the broker's load).  Heads per (author, kind); requests per requester ("coordinator" for None)."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.heads: Counter[tuple[str, str]] = Counter()
        self.head_ids: dict[str, set[str]] = {}
        self.requests: Counter[str] = Counter()
        self.last_head_at: dict[str, float] = {}
        self.messages = 0
        self.client = rawmqtt._client("bench-folders-watch")
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on
        rawmqtt._connect(self.client, run.HOST, port)
        root = f"atrius/v1/{SPACE}"
        for flt in (f"{root}/files/+/head", f"{root}/dev/+/req", f"{root}/hub/req"):
            self._subscribe0(flt)

    def _subscribe0(self, topic: str) -> None:
        """QoS 0: Mosquitto sends it at once, outside the QoS 1 window and max_queued_messages, so a
        burst of heads is counted in full even when this process lags behind."""
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic, qos=0)
        if not done.wait(10.0):
            raise BenchError(f"subscribing to {topic}: no SUBACK")

    def _on(self, c: paho.Client, ud: Any, m: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages += 1
        if m.retain:
            return  # a retained copy delivered at subscribe time, not a new publish
        try:
            kind = parse_topic(m.topic).kind
            doc = json.loads(m.payload) if m.payload else None
        except (TopicError, ValueError):
            return
        if not isinstance(doc, dict):
            return
        now = time.time()
        with self.lock:
            if kind is TopicKind.HEAD:
                author = str(doc.get("author"))
                self.heads[(author, str(doc.get("kind", "file")))] += 1
                self.head_ids.setdefault(author, set()).add(str(doc.get("file_id")))
                self.last_head_at[author] = now
            elif kind in (TopicKind.DEVICE_REQUEST, TopicKind.HUB_REQUEST):
                self.requests[str(doc.get("requester") or "coordinator")] += 1

    def reset(self) -> None:
        with self.lock:
            self.heads.clear()
            self.head_ids.clear()
            self.requests.clear()
            self.last_head_at.clear()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"heads": {f"{a}/{k}": n for (a, k), n in sorted(self.heads.items())},
                    "heads_total": sum(self.heads.values()),
                    "distinct_heads": {a: len(ids) for a, ids in sorted(self.head_ids.items())},
                    "requests": dict(sorted(self.requests.items()))}

    def close(self) -> None:
        rawmqtt._close(self.client)


class Profiler:
    """``--profile``: py-spy samples each agent and the coordinator during each phase (raw folded
    stacks, one file per process and phase); the report lists the Atrius functions that took most."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.out_dir = out_dir
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.exe = exe if enabled and os.access(exe, os.X_OK) else None
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.files: dict[str, Path] = {}
        if enabled and self.exe is None:
            print("   --profile: py-spy not found; not profiling", flush=True)
        elif enabled:
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)

    def start(self, label: str, pid: int) -> None:
        if self.exe is None:
            return
        path = self.out_dir / f"{label}.txt"
        proc = subprocess.Popen([self.exe, "record", "-p", str(pid), "-f", "raw", "-o", str(path), "--nonblocking"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.running.append((label, proc))
        self.files[label] = path

    def stop(self) -> None:
        """py-spy writes its file on SIGINT."""
        for _label, proc in self.running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for _label, proc in self.running:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.running.clear()

    def summary(self, top: int = 10) -> dict[str, list[tuple[float, str]]]:
        """Per profile: the Atrius functions (agent/, broker/, schemas/) with the largest share of
        samples, inclusive of what they call."""
        out: dict[str, list[tuple[float, str]]] = {}
        for label, path in self.files.items():
            inc: Counter[str] = Counter()
            total = 0
            with contextlib.suppress(OSError):
                for line in path.read_text().splitlines():
                    stack, _, n = line.rpartition(" ")
                    if not n.isdigit():
                        continue
                    total += int(n)
                    seen = set()
                    for frame in stack.split(";"):
                        m = re.match(r"(.+?) \((?:.*/)?((?:agent|broker|schemas)/[^:]+):(\d+)\)$", frame)
                        if m and m[1] not in SKIP_FRAMES and (key := f"{m[2]}:{m[1]}") not in seen:
                            seen.add(key)
                            inc[key] += int(n)
            if total:
                out[label] = [(100.0 * n / total, k) for k, n in inc.most_common(top)]
        return out


# -- results ------------------------------------------------------------------------------------------
@dataclass
class Initial:
    files: int
    bytes: int
    folders: int
    started_at: float = 0.0
    """Epoch of A's start: every ``_s`` figure counts from here."""
    a_connected_s: float | None = None
    a_last_published_s: float | None = None
    """A's start -> A's last ``published v`` line (the scan and publish of the whole tree)."""
    a_published: int = 0
    a_published_folders: int = 0
    coord_recorded: int = 0
    coord_last_recorded_s: float | None = None
    """A's start -> the coordinator's last ``recorded ... by dev-a`` (it has seen every head)."""
    wire_heads_a: int = 0
    b_started_s: float | None = None
    b_applied: int = 0
    b_last_applied_s: float | None = None
    b_verified: int = 0
    b_complete_s: float | None = None
    """A's start -> every file on B with A's BLAKE3 (checked by walking B's tree)."""
    b_only_s: float | None = None
    """B's start -> every file on B."""
    files_per_s: float | None = None
    mb_s: float | None = None
    coord_stored: int = 0
    coord_last_stored_s: float | None = None
    missing_on_b: int = 0
    missing_head_not_on_wire: int = 0
    """Of the files missing on B: their head never crossed the broker (A did not get it out)."""
    missing_head_on_wire: int = 0
    """Of the files missing on B: their head crossed the broker, B did not apply it (never got it?)."""
    cpu_s: dict[str, float | None] = field(default_factory=dict)
    peak_rss_mb: dict[str, float | None] = field(default_factory=dict)
    wire: dict[str, Any] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


@dataclass
class Restart:
    who: str
    connected_s: float | None = None
    idle_s: float | None = None
    """Process start -> the start of the first QUIET_WINDOW in which it used < QUIET_CPU of a core,
    after its connect plus the retained grace: its start-up look is done."""
    cpu_s: float | None = None
    files_read: int | None = None
    """Files of its tree whose atime moved (set to 0 before the restart): files it opened to hash."""
    published: int = 0
    """Heads published while it started (file and folder), counted on the wire: nobody else changes
    anything meanwhile, so they are its own (re-)announcements, whatever author they name."""
    published_by_author: dict[str, int] = field(default_factory=dict)
    requested: int = 0
    """Chunk requests it sent (fetches), counted on the wire."""
    log_published: int = 0
    log_applied: int = 0
    peak_rss_mb: float | None = None
    error: str | None = None


@dataclass
class Baselines:
    cp_s: float | None = None
    """cp -r of A's tree to a new folder on the same disk (page cache warm, as for the agents), median of 3."""
    cp_runs: list[float] = field(default_factory=list)
    cp_sync_s: float | None = None
    """cp -r, then sync of that file system: the copy durable, as the agents make each file (fsync)."""
    rsync_s: float | None = None
    walk_stat_s: float | None = None
    walk_stat_runs: list[float] = field(default_factory=list)


# -- the run ------------------------------------------------------------------------------------------
def agent_config(d: Path, device: str, port: int, tree: Path) -> Path:
    cfg = d / "agent.yaml"
    cfg.write_text(f"device: {device}\nspace: {SPACE}\nbroker: {{url: \"mqtt://{run.HOST}:{port}\"}}\n"
                   f"state_dir: {d / 'state'}\nfolders:\n  - path: {tree}\n    id: {FOLDER_ID}\n")
    return cfg


def time_cmd(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def baselines_copy(src: Path, scratch: Path) -> Baselines:
    b = Baselines()
    dst = scratch / "cp-copy"
    subprocess.run(["sync"], check=False)  # start from clean pages: the tree was just written
    for _ in range(3):
        b.cp_runs.append(time_cmd(["cp", "-r", str(src), str(dst)]))
        shutil.rmtree(dst)
    b.cp_s = statistics.median(b.cp_runs)
    subprocess.run(["sync"], check=False)
    b.cp_sync_s = time_cmd(["sh", "-c", f"cp -r '{src}' '{dst}' && sync -f '{dst}'"])
    shutil.rmtree(dst)
    if rsync := shutil.which("rsync"):
        b.rsync_s = time_cmd([rsync, "-a", f"{src}/", str(dst)])
        shutil.rmtree(dst)
    return b


def baseline_walk(root: Path, b: Baselines) -> None:
    for _ in range(3):
        t0 = time.perf_counter()
        walk_files(root)
        b.walk_stat_runs.append(time.perf_counter() - t0)
    b.walk_stat_s = statistics.median(b.walk_stat_runs)


def initial_sync(procs: Processes, work: Path, port: int, expected: dict[str, tuple[int, str]], s: Settings,
                 wire: WireWatch, prof: Profiler) -> tuple[Initial, dict[str, Any]]:
    total = sum(v[0] for v in expected.values())
    res = Initial(len(expected), total, s.folders)
    a_dir, b_dir = work / "dev-a", work / "dev-b"
    a_cfg = agent_config(a_dir, "dev-a", port, a_dir / "tree")
    b_cfg = agent_config(b_dir, "dev-b", port, b_dir / "tree")
    check = TreeCheck(b_dir / "tree", expected)
    servers = {name: proc.pid for name, proc in procs._procs if name in ("mosquitto", "coordinator")}
    cpu0 = {"agent-a": 0.0, "agent-b": 0.0, **{n: cpu_seconds(p) for n, p in servers.items()}}
    t0 = res.started_at = time.time()
    a = procs.start("agent-a", run.atrius("agent", "--config", str(a_cfg)))
    tails = {
        "a": LogTail(procs.logs["agent-a"], {"connected": r"connected to", "published": r": published v\d+ \(",
                                             "folder": r"published folder entry"}, t0),
        "coord": LogTail(procs.logs["coordinator"], {"recorded": rf"recorded {SPACE}/\S+ v\d+ by dev-a",
                                                     "stored": rf"stored {SPACE}/\S+ v\d+ from dev-a"}, t0),
    }
    prof.start("initial-agent-a", a.pid)
    prof.start("initial-coordinator", servers["coordinator"])
    run.wait_for_log(procs, "agent-a", a, "connected to", run.STARTUP_TIMEOUT)
    if s.late:  # B joins a space that already holds the whole tree
        while tails["a"].counts["published"] < len(expected):
            if time.time() > t0 + s.timeout:
                raise BenchError(f"A published {tails['a'].counts['published']:,} of {len(expected):,} files "
                                 f"within {s.timeout:.0f} s")
            procs.check_running()
            time.sleep(POLL)
            tails["a"].poll()
        time.sleep(2.0)
    b = procs.start("agent-b", run.atrius("agent", "--config", str(b_cfg)))
    prof.start("initial-agent-b", b.pid)
    res.b_started_s = time.time() - t0
    tails["b"] = LogTail(procs.logs["agent-b"], {"connected": r"connected to", "applied": r": applied v\d+ from dev-a",
                                                 "created": r"folder created"}, t0)
    pids = {"agent-a": a.pid, "agent-b": b.pid, **servers}
    deadline = t0 + s.timeout
    next_progress = time.time() + PROGRESS_EVERY
    next_verify = 0.0
    moved_at, last_marks = time.time(), None

    def rel(t: float | None) -> float | None:
        return None if t is None else t - t0

    while True:
        for t in tails.values():
            t.poll()
        now = time.time()
        applied = tails["b"].counts["applied"]
        if applied >= len(expected) or now >= next_verify:
            check.look()
            next_verify = time.time() + VERIFY_EVERY
            if check.complete:
                res.b_complete_s = time.time() - t0
                print(f"   every file on B {res.b_complete_s:.1f} s after A's start", flush=True)
                break
        marks = (tails["a"].counts["published"], applied, tails["coord"].counts["recorded"],
                 tails["coord"].counts["stored"], len(check.verified))
        if marks != last_marks:
            moved_at, last_marks = now, marks
        if now >= next_progress:
            next_progress = now + PROGRESS_EVERY
            cpu = {n: cpu_seconds(p) for n, p in pids.items()}
            row = {"t": round(now - t0, 1), "a_published": marks[0], "b_applied": marks[1],
                   "coord_recorded": marks[2], "coord_stored": marks[3], "b_verified": marks[4],
                   "cpu_s": {n: round(c - (cpu0[n] or 0), 1) if c is not None else None for n, c in cpu.items()},
                   "rss_mb": {n: proc_status_mb(p, "VmRSS") for n, p in pids.items()}}
            res.timeline.append(row)
            print(f"   t={row['t']:6.1f} s  A published {marks[0]:,}  coord recorded {marks[2]:,} stored "
                  f"{marks[3]:,}  B applied {marks[1]:,} verified {marks[4]:,}  cpu s "
                  + " ".join(f"{n}={v}" for n, v in row["cpu_s"].items()), flush=True)
        try:
            procs.check_running()
        except BenchError as exc:
            res.error = str(exc)
            break
        if now > deadline:
            res.error = f"timeout: B had {len(check.verified):,} of {len(expected):,} files after {s.timeout:.0f} s"
            break
        if now - moved_at > STALL:
            res.error = (f"stuck: nothing moved for {STALL:.0f} s; B had {len(check.verified):,} of "
                         f"{len(expected):,} files")
            break
        time.sleep(POLL)
    if res.b_complete_s is not None:
        res.files_per_s = len(expected) / res.b_complete_s
        res.mb_s = total / res.b_complete_s / MB
        res.b_only_s = res.b_complete_s - res.b_started_s
    # Let the coordinator finish storing (it pulls after a delay) before anything is stopped.
    store_deadline = time.time() + (COORD_STORE_WAIT if res.error is None else 0)
    stored, moved_at = -1, time.time()
    while tails["coord"].counts["stored"] < len(expected) and time.time() < store_deadline:
        if tails["coord"].counts["stored"] != stored:
            stored, moved_at = tails["coord"].counts["stored"], time.time()
        elif time.time() - moved_at > COORD_STALL:
            print(f"   the coordinator stopped storing at {stored:,} of {len(expected):,} files", flush=True)
            break
        time.sleep(POLL)
        tails["coord"].poll()
    prof.stop()
    time.sleep(1.0)  # last log lines, the last state save
    for t in tails.values():
        t.poll()
    res.a_connected_s = rel(tails["a"].first.get("connected"))
    res.a_published, res.a_published_folders = tails["a"].counts["published"], tails["a"].counts["folder"]
    res.a_last_published_s = rel(tails["a"].last.get("published"))
    res.coord_recorded = tails["coord"].counts["recorded"]
    res.coord_last_recorded_s = rel(tails["coord"].last.get("recorded"))
    res.coord_stored = tails["coord"].counts["stored"]
    res.coord_last_stored_s = rel(tails["coord"].last.get("stored"))
    res.b_applied = tails["b"].counts["applied"]
    res.b_last_applied_s = rel(tails["b"].last.get("applied"))
    res.b_verified = len(check.verified)
    res.cpu_s = {n: (round(c - (cpu0[n] or 0), 2) if c is not None else None)
                 for n, c in ((n, cpu_seconds(p)) for n, p in pids.items())}
    res.peak_rss_mb = {n: proc_status_mb(p, "VmHWM") for n, p in pids.items()}
    res.wire = wire.snapshot()
    res.wire_heads_a = res.wire["distinct_heads"].get("dev-a", 0)
    if not check.complete:
        with wire.lock:
            on_wire = set(wire.head_ids.get("dev-a", set()))
        missing = [rel_ for rel_ in expected if rel_ not in check.verified]
        res.missing_on_b = len(missing)
        res.missing_head_on_wire = sum(1 for rel_ in missing if f"{FOLDER_ID}/{rel_}" in on_wire)
        res.missing_head_not_on_wire = res.missing_on_b - res.missing_head_on_wire
    return res, {"a": a, "b": b, "a_cfg": a_cfg, "b_cfg": b_cfg}


def reset_atimes(root: Path) -> int:
    n = 0
    for rel_, st in walk_files(root).items():
        os.utime(root / rel_, ns=(0, st.st_mtime_ns))
        n += 1
    return n


def restart(procs: Processes, name: str, device: str, cfg: Path, tree: Path, wire: WireWatch,
            prof: Profiler) -> Restart:
    """Start the agent again on an unchanged tree; wait for it to go idle."""
    res = Restart(device)
    reset_atimes(tree)
    wire.reset()
    t0 = time.time()
    proc = procs.start(name, run.atrius("agent", "--config", str(cfg)))
    prof.start(name, proc.pid)
    tail = LogTail(procs.logs[name], {"connected": r"connected to", "published": r": published (v\d+|folder|deletion)",
                                      "applied": r": (applied v\d+|deleted by|renamed from|folder created)"}, t0)
    window: list[tuple[float, float]] = []
    deadline = t0 + RESTART_TIMEOUT
    while True:
        time.sleep(0.1)
        tail.poll()
        now, cpu = time.time(), cpu_seconds(proc.pid)
        if cpu is None or proc.poll() is not None:
            res.error = f"{name} exited (code {proc.poll()}): {run._tail(procs.logs[name], 3)}"
            break
        window.append((now, cpu))
        while window and now - window[0][0] > QUIET_WINDOW + 0.05:
            window.pop(0)
        connected = tail.first.get("connected")
        if connected is not None and res.connected_s is None:
            res.connected_s = connected - t0
        if (connected is not None and now - QUIET_WINDOW > connected + 0.7 + 0.1
                and now - window[0][0] >= QUIET_WINDOW * 0.95
                and (cpu - window[0][1]) / (now - window[0][0]) < QUIET_CPU):
            res.idle_s = window[0][0] - t0
            break
        if now > deadline:
            res.error = f"{name} did not go idle within {RESTART_TIMEOUT:.0f} s"
            break
    res.cpu_s = cpu_seconds(proc.pid)
    res.peak_rss_mb = proc_status_mb(proc.pid, "VmHWM")
    prof.stop()
    time.sleep(0.5)  # anything it publishes right after going idle still counts
    tail.poll()
    res.log_published, res.log_applied = tail.counts["published"], tail.counts["applied"]
    snap = wire.snapshot()
    res.published = snap["heads_total"]
    res.published_by_author = snap["heads"]
    res.requested = snap["requests"].get(device, 0)
    res.files_read = sum(1 for st in walk_files(tree).values() if st.st_atime_ns != 0)
    return res


@dataclass
class StatusCheck:
    """``atrius status --json`` run against a device: how many files it lists, by local state."""

    seconds: float | None = None
    files: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    coordinator: bool | None = None
    error: str | None = None


def status_check(cfg: Path) -> StatusCheck:
    res = StatusCheck()
    t0 = time.perf_counter()
    try:
        done = subprocess.run(run.atrius("status", "--config", str(cfg), "--json"), cwd=run.REPO, capture_output=True,
                              timeout=300, env=dict(os.environ, PYTHONPATH=str(run.REPO)))
    except subprocess.TimeoutExpired:
        res.error = "no answer within 300 s"
        return res
    res.seconds = time.perf_counter() - t0
    try:
        doc = json.loads(done.stdout)
    except ValueError:
        res.error = f"exit {done.returncode}: {done.stderr.decode(errors='replace').strip()[-300:]}"
        return res
    files = doc.get("files", [])
    res.files = len(files)
    res.by_state = dict(Counter(str(f.get("local")) for f in files).most_common())
    res.coordinator = doc.get("coordinator")
    return res


def log_problems(log_dir: Path) -> dict[str, list[tuple[int, str]]]:
    """Warning/error lines of every process log, grouped by shape (paths, hashes and numbers folded):
    log name -> [(count, first example)], most frequent first."""
    out: dict[str, list[tuple[int, str]]] = {}
    for path in sorted(log_dir.glob("*.log")):
        counts: Counter[str] = Counter()
        example: dict[str, str] = {}
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if PROBLEM.search(line):
                    shape = re.sub(r"\S*/\S*|\b[0-9a-f]{12,}\b|\d+", "#", line[13:])[:160]
                    counts[shape] += 1
                    example.setdefault(shape, line[:240])
        if counts:
            out[path.stem] = [(n, example[k]) for k, n in counts.most_common(6)]
    return out


def mosquitto_drops(path: Path) -> list[tuple[float, str]]:
    """Mosquitto's 'Outgoing messages are being dropped for client X' lines: (epoch, client)."""
    out = []
    with contextlib.suppress(OSError):
        for m in re.finditer(r"^(\d+): Outgoing messages are being dropped for client (\S+?)\.?$",
                             path.read_text(errors="replace"), re.M):
            out.append((float(m[1]), m[2]))
    return out


# -- report -------------------------------------------------------------------------------------------
def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:,.1f}x"


def table(s: Settings, ini: Initial, base: Baselines, restarts: list[Restart], status: StatusCheck | None) -> str:
    mb = ini.bytes / MB
    rows: list[tuple[str, str]] = [
        ("tree", f"{ini.files:,} files in {ini.folders:,} folders, {s.min_kib}-{s.max_kib} KiB, {mb:,.1f} MB"),
        ("A start -> connected [s]", _f(ini.a_connected_s, 2)),
        ("A start -> A's last 'published' (scan + publish) [s]", _f(ini.a_last_published_s)),
        ("  files published by A (log) / folder entries", f"{ini.a_published:,} / {ini.a_published_folders:,}"),
        ("  A's heads counted on the wire (distinct)", f"{ini.wire_heads_a:,}"),
        ("A start -> coordinator's last 'recorded' (all heads seen) [s]", _f(ini.coord_last_recorded_s)
         + f"  ({ini.coord_recorded:,} of {ini.files + ini.folders:,} heads)"),
        ("A start -> B started [s]", _f(ini.b_started_s, 2)),
        ("A start -> B's last 'applied' (B's log) [s]", _f(ini.b_last_applied_s)),
        ("A start -> every file verified on B [s]", _f(ini.b_complete_s)
         + ("" if ini.error is None else f"  FAILED ({ini.b_verified:,} of {ini.files:,})")),
        *([("  missing on B: head never on the wire / head on the wire, not applied",
            f"{ini.missing_head_not_on_wire:,} / {ini.missing_head_on_wire:,}")] if ini.missing_on_b else []),
        ("  files/s  |  MB/s", f"{_f(ini.files_per_s, 0)}  |  {_f(ini.mb_s, 2)}"),
        ("B start -> every file verified on B [s]", _f(ini.b_only_s)),
        ("baseline: cp -r of the tree, same disk [s]", _f(base.cp_s, 2)),
        ("  initial sync / cp -r", _ratio(ini.b_complete_s, base.cp_s)),
        ("baseline: cp -r + sync -f (durable copy) [s]", _f(base.cp_sync_s, 2)),
        ("  initial sync / (cp -r + sync)", _ratio(ini.b_complete_s, base.cp_sync_s)),
    ]
    if base.rsync_s is not None:
        rows += [("baseline: rsync -a, same disk [s]", _f(base.rsync_s, 2)),
                 ("  initial sync / rsync -a", _ratio(ini.b_complete_s, base.rsync_s))]
    rows += [
        ("A start -> coordinator's last 'stored' [s]", _f(ini.coord_last_stored_s)
         + f"  ({ini.coord_stored:,} stored)"),
        ("CPU during the initial sync [s]: A / B / coordinator / mosquitto",
         " / ".join(_f(ini.cpu_s.get(n)) for n in ("agent-a", "agent-b", "coordinator", "mosquitto"))),
        ("peak RSS (VmHWM) after the initial sync [MB]: A / B / coordinator / mosquitto",
         " / ".join(_f(ini.peak_rss_mb.get(n), 0) for n in ("agent-a", "agent-b", "coordinator", "mosquitto"))),
        ("baseline: os.walk + os.stat of the tree, median of 3 [s]", _f(base.walk_stat_s, 3)),
    ]
    if restarts and ini.error:
        rows.append(("restarts below: B's tree is incomplete (the initial sync got stuck)",
                     f"{ini.b_verified:,} of {ini.files:,} files"))
    for r in restarts:
        rows += [
            (f"restart {r.who} (unchanged): start -> connected [s]", _f(r.connected_s, 2)),
            (f"restart {r.who}: start -> idle (start-up look done) [s]", _f(r.idle_s, 2)
             + ("" if r.error is None else f"  FAILED: {r.error}")),
            ("  idle / os.walk+stat", _ratio(r.idle_s, base.walk_stat_s)),
            ("  CPU [s] / peak RSS [MB]", f"{_f(r.cpu_s)} / {_f(r.peak_rss_mb, 0)}"),
            ("  files read (hashed) / heads published / chunk requests",
             f"{_f(r.files_read, 0)} / {r.published:,} / {r.requested:,}"),
            ("  log: published / applied lines", f"{r.log_published} / {r.log_applied}"),
        ]
    if status is not None:
        rows.append(("atrius status --json on B after its restart", status.error or (
            f"{status.files:,} files listed in {_f(status.seconds)} s: "
            + ", ".join(f"{n:,} {k}" for k, n in status.by_state.items()))))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(k.ljust(width) + v for k, v in rows)


def git_commit() -> str | None:
    """The commit measured (with ``+dirty`` when agent/, broker/ or schemas/ differ from it)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=run.REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "agent", "broker", "schemas"], cwd=run.REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    return None


def _interrupt(signum: int, frame: object) -> None:
    raise run.Interrupted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--folders", type=int, default=500)
    ap.add_argument("--min-kib", type=int, default=4)
    ap.add_argument("--max-kib", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds allowed for the initial sync")
    ap.add_argument("--b-joins-late", action="store_true",
                    help="start B only after A published the whole tree (B gets the heads as retained messages)")
    ap.add_argument("--profile", action="store_true",
                    help="sample the agents and the coordinator with py-spy (bench/out/profiles/folders/)")
    ap.add_argument("--mosquitto-conf", action="append", default=[], metavar="LINE",
                    help="an extra mosquitto.conf line, e.g. 'max_queued_messages 0' (repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (trees, state dirs) for a look")
    ap.add_argument("--out", type=Path, default=run.OUT / "folders.json")
    args = ap.parse_args(argv)
    if args.files < 1 or args.folders < 1 or not 1 <= args.min_kib <= args.max_kib:
        ap.error("need --files >= 1, --folders >= 1, 1 <= --min-kib <= --max-kib")
    s = Settings(args.files, args.folders, args.min_kib, args.max_kib, args.seed, args.timeout, args.b_joins_late)
    binary = run.mosquitto_binary()
    if binary is None:
        print("mosquitto binary not found", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_out = args.out.parent / "logs" / "folders"
    work = Path(tempfile.mkdtemp(prefix="atrius-bench-folders-"))
    procs = Processes(work / "logs")
    wire: WireWatch | None = None
    failures: list[str] = []
    ini: Initial | None = None
    extra: dict[str, Any] = {}
    problems: dict[str, list[tuple[int, str]]] = {}
    base = Baselines()
    restarts: list[Restart] = []
    status: StatusCheck | None = None
    prof = Profiler(args.out.parent / "profiles" / "folders", args.profile)
    commit = git_commit()
    print(f"Atrius folders bench (commit {commit}, {dt.datetime.now().astimezone().isoformat(timespec='seconds')}): "
          f"{s.files:,} files in {s.folders:,} folders, {s.min_kib}-{s.max_kib} KiB; "
          f"{os.cpu_count()} CPUs, Mosquitto {run.mosquitto_version(binary)} "
          f"({'; '.join((*run.NODELAY, *args.mosquitto_conf))}); work dir {work}",
          flush=True)
    try:
        t0 = time.perf_counter()
        expected = make_tree(work / "dev-a" / "tree", s)
        (work / "dev-b" / "tree").mkdir(parents=True)
        print(f"   tree made in {time.perf_counter() - t0:.1f} s: "
              f"{sum(v[0] for v in expected.values()) / MB:,.1f} MB", flush=True)
        base = baselines_copy(work / "dev-a" / "tree", work)
        print(f"   baseline cp -r: {base.cp_s:.2f} s (runs {', '.join(f'{x:.2f}' for x in base.cp_runs)}), "
              f"cp -r + sync: {base.cp_sync_s:.2f} s" + (f", rsync -a: {base.rsync_s:.2f} s" if base.rsync_s else ""),
              flush=True)
        port = run.start_mosquitto(procs, work, binary, (*run.NODELAY, *args.mosquitto_conf))
        run.start_coordinator(procs, work, port)
        wire = WireWatch(port)
        print("== initial sync (A has the tree, B starts empty" + (" once A published it all)" if s.late else ")"),
              flush=True)
        ini, extra = initial_sync(procs, work, port, expected, s, wire, prof)
        if ini.error:
            failures.append(f"initial sync: {ini.error}")
            print(f"   FAILED: {ini.error}", flush=True)
        if ini.coord_stored < ini.files:
            failures.append(f"the coordinator stored {ini.coord_stored:,} of {ini.files:,} files")
        if ini.error is None or ini.error.startswith(("stuck", "timeout")):
            # (after a stuck initial sync the restarts still run, on the files B has: see the table)
            baseline_walk(work / "dev-b" / "tree", base)
            print("== restart B (A and B stopped, B started again, tree unchanged)", flush=True)
            procs.stop(extra["b"])
            procs.stop(extra["a"])
            r = restart(procs, "agent-b-restart", "dev-b", extra["b_cfg"], work / "dev-b" / "tree", wire, prof)
            restarts.append(r)
            print(f"   idle after {_f(r.idle_s, 2)} s; read {r.files_read} files, published {r.published}, "
                  f"requested {r.requested}" + (f"  FAILED: {r.error}" if r.error else ""), flush=True)
            status = status_check(extra["b_cfg"])
            print(f"   atrius status --json on B: {status.error or status.by_state}", flush=True)
            print("== restart A (B online, tree unchanged)", flush=True)
            r = restart(procs, "agent-a-restart", "dev-a", extra["a_cfg"], work / "dev-a" / "tree", wire, prof)
            restarts.append(r)
            print(f"   idle after {_f(r.idle_s, 2)} s; read {r.files_read} files, published {r.published}, "
                  f"requested {r.requested}" + (f"  FAILED: {r.error}" if r.error else ""), flush=True)
            failures += [f"restart {r.who}: {r.error}" for r in restarts if r.error]
            failures += [f"restart {r.who}: published {r.published} heads, sent {r.requested} requests"
                         for r in restarts if r.published or r.requested]
    except (KeyboardInterrupt, run.Interrupted):
        print("\ninterrupted; subprocesses stopped", file=sys.stderr)
        return 130
    except (BenchError, rawmqtt.RawError) as exc:
        failures.append(str(exc))
        print(f"   FAILED: {exc}", flush=True)
    finally:
        prof.stop()
        if wire is not None:
            wire.close()
        procs.stop_all()
        problems = log_problems(procs.log_dir)
        shutil.rmtree(log_out, ignore_errors=True)
        shutil.copytree(procs.log_dir, log_out)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if ini is not None:
        print("\n" + table(s, ini, base, restarts, status))
    print("\nMB = 10^6 bytes. Times from A's process start; B starts once A logged 'connected to'. "
          "'idle': first 1 s window after connect + retained grace in which the agent used < 5% of a core.")
    for name, kinds in problems.items():
        print(f"\n{name}.log: warning/error lines, by kind (count, first one):")
        for n, example in kinds:
            print(f"  {n:6d}  {example}")
    drops = mosquitto_drops(log_out / "mosquitto.log")
    if drops:
        t0 = ini.started_at if ini is not None else 0.0
        print("\nMosquitto dropped outgoing messages (max_queued_messages) for:\n  " + "\n  ".join(
            f"{client} at +{at - t0:.0f} s" for at, client in drops))
    profiles = prof.summary()
    for label, top in profiles.items():
        print(f"\npy-spy {label}: Atrius functions by share of samples (inclusive):")
        for pct, key in top:
            print(f"  {pct:5.1f}%  {key}")
    if failures:
        print("\nFAILURES:\n  " + "\n  ".join(failures))
    doc = {
        "commit": commit,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "mosquitto": run.mosquitto_version(binary),
        "settings": asdict(s),
        "mosquitto_conf": [*run.NODELAY, *args.mosquitto_conf],
        "initial": asdict(ini) if ini else None,
        "baselines": asdict(base),
        "restarts": [asdict(r) for r in restarts],
        "status_on_b": asdict(status) if status else None,
        "mosquitto_drops": [{"at": at, "client": c} for at, c in drops],
        "profiles": profiles,
        "log_problems": problems,
        "failures": failures,
    }
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\nfigures: {args.out}; process logs: {log_out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
