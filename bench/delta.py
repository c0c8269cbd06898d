"""Atrius delta bench: bytes on the wire for small edits of a big file, agent to agent, counted per message."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import rawmqtt
import run
from run import KIB, MB, MIB, BenchError, Processes

sys.path.insert(0, str(run.REPO))
from schemas.frames import FrameError, FrameStatus, decode_frame
from schemas.manifest import ENTRY_SIZE
from schemas.topics import TopicError, TopicKind, parse_topic

FILE = "big.bin"
QUIET = 0.5
"""Seconds without a message on the space before an edit starts, and after it is verified."""
QUIET_TIMEOUT = 15.0
SYNC_TIMEOUT = 180.0
EDIT_TIMEOUT = 90.0
LOG_TIMEOUT = 10.0
BLOCK = 128 * KIB
"""Block size of the fixed-block estimate (no rolling hash): what Syncthing picks for files < 256 MiB."""

# Cited figures, not measured by this script.
CITED_SYNCTHING_BYTES = 140_000
CITED_SYNCTHING_NOTE = "Syncthing 1.19 (rolling weak hash): 0.14 MB moved for a 100-byte insertion in a 32 MiB file"
CITED_FIXED_NOTE = ("fixed-block scheme without a rolling hash: re-sends every block after an insertion "
                    "(about half the file for a mid-file insertion)")
CITED_FASTCDC_KEPT = 99.9
CITED_FASTCDC_NOTE = "FastCDC at 64 KiB average chunk: keeps 99.9% of chunks after a small edit"


@dataclass(frozen=True)
class Settings:
    quick: bool
    size: int

    @classmethod
    def make(cls, quick: bool) -> Settings:
        return cls(quick=quick, size=(32 if quick else 128) * MIB)


# -- the edits ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    name: str
    label: str

    def apply(self, data: bytearray) -> int:
        """Change ``data`` in place; return the fixed-block estimate (bytes a scheme without rolling hash resends)."""
        size = len(data)
        mid = size // 2
        if self.name == "insert":
            data[mid:mid] = os.urandom(100)
            return len(data) - (mid // BLOCK) * BLOCK  # every block from the one holding the insertion on
        if self.name == "overwrite":
            data[mid:mid + 100] = os.urandom(100)
            return ((mid + 99) // BLOCK - mid // BLOCK + 1) * BLOCK
        if self.name == "append":
            data += os.urandom(MIB)
            return len(data) - (size // BLOCK) * BLOCK  # the old last (partial) block and the new ones
        if self.name == "head4k":
            data[:4 * KIB] = os.urandom(4 * KIB)
            return BLOCK
        raise ValueError(self.name)


EDITS = (
    Edit("insert", "100 B inserted in the middle"),
    Edit("overwrite", "100 B overwritten in the middle"),
    Edit("append", "1 MiB appended at the end"),
    Edit("head4k", "first 4 KiB overwritten"),
)


# -- the counting subscriber -----------------------------------------------------------------------------
PARTIES = ("devices", "coordinator")
KINDS = ("head", "presence", "request", "chunk", "page", "missing", "other")


class WireCounter:
    """Counts payload + topic bytes of every message the broker carries on ``atrius/v1/<space>/#``.

    Each publish is counted once (as the broker received it), whatever number of subscribers it goes
    out to.  Messages are split by party: "coordinator" is its own fetching (requests with
    ``requester: null``, frames on ``hub/data``, rpc); "devices" is the rest (heads, B's requests
    to A or to the hub, the frames that answer them, presence).  A data frame whose digest is a page
    hash of a head seen on the wire is a manifest page, otherwise a chunk (or a "missing" frame).
    """

    def __init__(self, port: int, space: str) -> None:
        self.space = space
        self.lock = threading.Lock()
        self.bytes: Counter[tuple[str, str]] = Counter()
        self.msgs: Counter[tuple[str, str]] = Counter()
        self.heads: list[dict[str, Any]] = []
        self.pages: set[str] = set()
        self.last_at = time.monotonic()
        self.client = rawmqtt._client("bench-delta-count")
        self.client.on_message = self._on
        rawmqtt._connect(self.client, run.HOST, port)
        rawmqtt._subscribe(self.client, f"atrius/v1/{space}/#")

    def _classify(self, topic: str, payload: bytes) -> tuple[str, str]:
        try:
            kind = parse_topic(topic).kind
        except TopicError:
            return "devices", "other"
        if kind is TopicKind.HEAD:
            with contextlib.suppress(ValueError):
                head = json.loads(payload)
                self.pages.update(head.get("manifest") or [])
                self.heads.append(head)
            return "devices", "head"
        if kind is TopicKind.PRESENCE:
            return "devices", "presence"
        if kind in (TopicKind.DEVICE_REQUEST, TopicKind.HUB_REQUEST):
            requester = "?"
            with contextlib.suppress(ValueError, AttributeError):
                requester = json.loads(payload).get("requester")
            return ("coordinator" if requester is None else "devices"), "request"
        if kind in (TopicKind.DEVICE_DATA, TopicKind.HUB_DATA):
            party = "coordinator" if kind is TopicKind.HUB_DATA else "devices"
            try:
                frame = decode_frame(payload)
            except FrameError:
                return party, "other"
            if frame.status is FrameStatus.MISSING:
                return party, "missing"
            return party, "page" if frame.hash in self.pages else "chunk"
        if kind in (TopicKind.HUB_RPC, TopicKind.RPC_REPLY):
            return "coordinator", "other"
        return "devices", "other"

    def _on(self, c: paho.Client, ud: Any, m: paho.MQTTMessage) -> None:
        n = len(m.payload) + len(m.topic.encode())
        with self.lock:
            key = self._classify(m.topic, bytes(m.payload))
            self.bytes[key] += n
            self.msgs[key] += 1
            self.last_at = time.monotonic()

    def reset(self) -> None:
        with self.lock:
            self.bytes.clear()
            self.msgs.clear()
            self.heads.clear()

    def snapshot(self) -> Wire:
        with self.lock:
            return Wire.of(self.bytes, self.msgs, list(self.heads))

    def wait_quiet(self, idle: float = QUIET, timeout: float = QUIET_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                last = self.last_at
            if time.monotonic() - last >= idle:
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        rawmqtt._close(self.client)


@dataclass
class Wire:
    total: int = 0
    devices: int = 0
    coordinator: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    """``party/kind`` -> bytes."""
    messages: dict[str, int] = field(default_factory=dict)
    heads: list[dict[str, Any]] = field(default_factory=list)
    """version, author, chunks, size and page count of every head carried."""

    @classmethod
    def of(cls, b: Counter[tuple[str, str]], m: Counter[tuple[str, str]], heads: list[dict[str, Any]]) -> Wire:
        return cls(
            total=sum(b.values()),
            devices=sum(v for (p, _), v in b.items() if p == "devices"),
            coordinator=sum(v for (p, _), v in b.items() if p == "coordinator"),
            by_kind={f"{p}/{k}": b[(p, k)] for p in PARTIES for k in KINDS if b[(p, k)]},
            messages={f"{p}/{k}": m[(p, k)] for p in PARTIES for k in KINDS if m[(p, k)]},
            heads=[{k: h.get(k) for k in ("file_id", "version", "author", "size", "chunks")}
                   | {"pages": len(h.get("manifest") or [])} for h in heads],
        )


# -- one measured edit -----------------------------------------------------------------------------------
@dataclass
class EditResult:
    edit: str
    label: str
    file_bytes: int
    """Size of the new version."""
    wire_bytes: int | None = None
    """Everything counted on the space from the close on A to B's file verified."""
    wire_devices: int | None = None
    wire_coordinator: int | None = None
    wire_after: int | None = None
    """Counted after B verified, until the space was quiet for QUIET s (the coordinator's pull, stragglers)."""
    wire_after_coordinator: int | None = None
    wire_by_kind: dict[str, int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)
    heads_seen: int = 0
    seconds: float | None = None
    """close() on A -> B's path is a new inode with A's BLAKE3."""
    a_published_ms: float | None = None
    b_apply_ms: float | None = None
    version: int | None = None
    chunks: int | None = None
    fetched: int | None = None
    reused: int | None = None
    resumed: int | None = None
    kept_pct: float | None = None
    manifest_bytes: int | None = None
    """The head's manifest: chunks * 36 bytes, in ``pages`` pages."""
    manifest_pages: int | None = None
    page_bytes_on_wire: int | None = None
    coordinator_stored: str | None = None
    fixed_block_estimate: int | None = None
    wrong_versions: int = 0
    error: str | None = None


def _last(pat: re.Pattern[str], path: Path) -> re.Match[str] | None:
    last = None
    for m in pat.finditer(path.read_text(errors="replace")):
        last = m
    return last


def wait_last(pat: re.Pattern[str], path: Path, timeout: float) -> re.Match[str] | None:
    deadline = time.monotonic() + timeout
    while True:
        m = _last(pat, path)
        if m is not None or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def applied_pattern(version: int) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(FILE)}: applied v{version} from dev-a \((.*?); (\d+) chunks fetched, "
                      r"(\d+) reused, (\d+) resumed\) in (\d+) ms")


def stored_pattern(space: str, version: int) -> re.Pattern[str]:
    return re.compile(rf"stored {re.escape(space)}/{re.escape(FILE)} v{version} from dev-a \((\d+) chunks, "
                      r"(\d+) fetched\)")


def measure_edit(edit: Edit, data: bytearray, pair: run.Pair, procs: Processes, counter: WireCounter,
                 space: str, hub: bool) -> EditResult:
    if not counter.wait_quiet():
        raise BenchError(f"the space was not quiet for {QUIET} s within {QUIET_TIMEOUT:.0f} s before {edit.name}")
    counter.reset()
    estimate = edit.apply(data)
    res = EditResult(edit.name, edit.label, len(data), fixed_block_estimate=estimate)
    try:
        arrival = run.write_and_wait(pair.a(FILE), pair.b(FILE), bytes(data), EDIT_TIMEOUT, procs)
    except BenchError as exc:
        res.error = str(exc)
        return res
    at_verify = counter.snapshot()
    res.seconds, res.wrong_versions = arrival.seconds, arrival.wrong_versions
    res.wire_bytes, res.wire_devices, res.wire_coordinator = at_verify.total, at_verify.devices, at_verify.coordinator
    mine = [h for h in at_verify.heads if h.get("file_id") == FILE and h.get("author") == "dev-a"]
    res.heads_seen = len(mine)
    if not mine:
        res.error = "no head of dev-a was counted on the wire"
        return res
    head = mine[-1]
    res.version, res.chunks, res.manifest_pages = head["version"], head["chunks"], head["pages"]
    res.manifest_bytes = head["chunks"] * ENTRY_SIZE
    problems = []
    m = wait_last(applied_pattern(res.version), procs.logs["agent-b"], LOG_TIMEOUT)
    if m is None:
        problems.append(f"no 'applied v{res.version}' line in B's log")
    else:
        res.fetched, res.reused, res.resumed, res.b_apply_ms = (int(m[2]), int(m[3]), int(m[4]), float(m[5]))
        moved = res.fetched + res.reused + res.resumed
        res.kept_pct = 100.0 * res.reused / moved if moved else None
    if hub:
        s = wait_last(stored_pattern(space, res.version), procs.logs["hub"], EDIT_TIMEOUT)
        if s is None:
            problems.append(f"the hub did not log 'stored ... v{res.version}'")
        else:
            res.coordinator_stored = f"{s[1]} chunks, {s[2]} fetched"
    counter.wait_quiet()
    settled = counter.snapshot()
    res.wire_after = settled.total - at_verify.total
    res.wire_after_coordinator = settled.coordinator - at_verify.coordinator
    res.wire_by_kind, res.messages = settled.by_kind, settled.messages
    res.page_bytes_on_wire = sum(v for k, v in settled.by_kind.items() if k.endswith("/page"))
    published = [t - arrival.closed_wall for t in run.log_times(procs.logs["agent-a"], f"{FILE}: published v",
                                                                arrival.closed_wall)]
    if published:
        res.a_published_ms = published[-1] * 1000
    if res.heads_seen != 1:
        problems.append(f"A published {res.heads_seen} heads for one edit")
    res.error = "; ".join(problems) or None
    return res


# -- one broker set-up ------------------------------------------------------------------------------------
@dataclass
class SetupResult:
    name: str
    note: str
    initial_seconds: float | None = None
    initial_chunks: int | None = None
    edits: list[EditResult] = field(default_factory=list)
    log_findings: list[run.LogFinding] = field(default_factory=list)
    error: str | None = None

    def failures(self) -> list[str]:
        return ([f"{self.name}: {self.error}"] if self.error else []) + \
            [f"{self.name} {e.edit}: {e.error}" for e in self.edits if e.error]


def run_setup(name: str, hub: bool, edits: tuple[Edit, ...], work: Path, s: Settings, log_out: Path) -> SetupResult:
    note = ("`atrius hub` (embedded amqtt + coordinator in one process) + 2 agents" if hub else
            "Mosquitto (set_tcp_nodelay true) + 2 agents, no coordinator")
    res = SetupResult(name, note)
    procs = Processes(work / "logs")
    space = f"bench-delta-{name}"
    counter: WireCounter | None = None
    print(f"\n== {name}: {note}", flush=True)
    try:
        if hub:
            port = run.start_hub(procs, work)
        else:
            binary = run.mosquitto_binary()
            if binary is None:
                raise BenchError("mosquitto binary not found")
            port = run.start_mosquitto(procs, work, binary, run.NODELAY)
        pair = run.start_agents(procs, work, port, space)
        data = bytearray(os.urandom(s.size))
        arrival = run.write_and_wait(pair.a(FILE), pair.b(FILE), bytes(data), SYNC_TIMEOUT, procs)
        res.initial_seconds = arrival.seconds
        if hub and wait_last(stored_pattern(space, 1), procs.logs["hub"], SYNC_TIMEOUT) is None:
            raise BenchError("the hub did not store v1")
        m = wait_last(re.compile(rf"{re.escape(FILE)}: published v\d+ \(.*?, (\d+) chunks\)"), procs.logs["agent-a"],
                      LOG_TIMEOUT)
        res.initial_chunks = int(m[1]) if m else None
        print(f"   initial {s.size // MIB} MiB: {arrival.seconds:.2f} s, {res.initial_chunks} chunks", flush=True)
        counter = WireCounter(port, space)
        for edit in edits:
            r = measure_edit(edit, data, pair, procs, counter, space, hub)
            res.edits.append(r)
            print(f"   {edit.label}: {_num(r.wire_bytes)} B on the wire in {run._fmt(r.seconds, 2)} s, "
                  f"{r.fetched} fetched / {r.reused} reused" + (f"  PROBLEM: {r.error}" if r.error else ""),
                  flush=True)
            procs.check_running()
    except BenchError as exc:
        res.error = str(exc)
        print(f"   FAILED: {exc}", flush=True)
    finally:
        if counter is not None:
            counter.close()
        procs.stop_all()
        res.log_findings = run.problem_lines(procs)
        dest = log_out / f"delta-{name}"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(procs.log_dir, dest)
    return res


# -- report -----------------------------------------------------------------------------------------------
def _num(x: int | None) -> str:
    return "-" if x is None else f"{x:,}"


def _mb(x: int | None) -> str:
    return "-" if x is None else f"{x / MB:.3f}"


def table(setups: list[SetupResult], s: Settings) -> str:
    head = ("edit", "file [MiB]", "wire [MB]", "wire/file", "after [MB]", "time [s]", "fetched", "reused",
            "kept", "manifest [KB]", "pages on wire [KB]", "fixed-block est. [MB]")
    rows = []
    for st in setups:
        for e in st.edits:
            label = e.label if st.name == "solo" else f"{e.label} (via hub)"
            rows.append((
                label, f"{e.file_bytes / MIB:.2f}", _mb(e.wire_bytes),
                "-" if e.wire_bytes is None else f"{100 * e.wire_bytes / e.file_bytes:.3f}%",
                _mb(e.wire_after), run._fmt(e.seconds, 2), _num(e.fetched), _num(e.reused),
                "-" if e.kept_pct is None else f"{e.kept_pct:.2f}%",
                "-" if e.manifest_bytes is None else f"{e.manifest_bytes / 1000:.1f}",
                "-" if e.page_bytes_on_wire is None else f"{e.page_bytes_on_wire / 1000:.1f}",
                _mb(e.fixed_block_estimate)))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths, strict=True)))]
    out.append("-" * len(out[0]))
    out += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows]
    hub = next((st for st in setups if st.name == "hub"), None)
    if hub is not None:
        for e in hub.edits:
            out.append(f"\nvia hub, {e.label}: B's fetch + heads {_mb(e.wire_devices)} MB until B verified; "
                       f"coordinator's own pull {_mb(e.wire_coordinator)} MB until then + "
                       f"{_mb(e.wire_after_coordinator)} MB after (coordinator: {e.coordinator_stored})")
    return "\n".join(out)


def method(s: Settings) -> dict[str, str]:
    return {
        "units": "MB = 10^6 bytes, KB = 10^3 bytes; file sizes in MiB",
        "setup": (f"solo: a private Mosquitto (set_tcp_nodelay true) and two agents A and B, no coordinator, so every "
                  f"byte counted moved between the two devices. A {s.size // MIB} MiB os.urandom file is written on "
                  "A and synced to B first (not counted). hub: `python -m atrius_cli hub` (embedded amqtt + "
                  "coordinator) and the same two agents; the coordinator also pulls every new version from A."),
        "wire": ("a paho subscriber on atrius/v1/<space>/# (QoS 1) counts len(payload) + len(topic) of every message "
                 "(each publish once, not once per receiver; MQTT fixed headers not counted), from the moment the "
                 f"space had been quiet for {QUIET} s before the edit to B's file verified ('wire'); 'after' is what "
                 f"came after that until the space was quiet for {QUIET} s again (the coordinator finishing its "
                 "pull, stragglers). Pages: data frames whose digest is a page hash of a head on the wire."),
        "edit": ("the whole new content is written to A's file (open 'wb', write, close) — the same content an "
                 "in-place edit would leave; time is close() on A to B's path being a new inode whose BLAKE3 "
                 "equals A's (os.stat every 1 ms; hashed once, not counted). fetched/reused come from B's log line "
                 "'applied vN ... (X chunks fetched, Y reused, Z resumed)'; kept = reused / (fetched + reused + "
                 "resumed). Manifest = head.chunks * 36 bytes."),
        "fixed_block_estimate": (f"arithmetic, not measured: bytes a scheme with fixed {BLOCK // KIB} KiB blocks and "
                                 "no rolling hash resends: every block from the insertion point on; the block(s) "
                                 "an overwrite touches; the old last block plus the appended data."),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="32 MiB file instead of 128 MiB")
    ap.add_argument("--out", type=Path, default=run.OUT / "delta.json", help="where to write the JSON figures")
    args = ap.parse_args(argv)
    s = Settings.make(args.quick)
    env = run.environment(run.mosquitto_binary())
    print(f"Atrius delta bench ({'quick' if s.quick else 'full'}): {s.size // MIB} MiB file; {env['cpus']} CPUs, "
          f"Python {env['python']}, paho {env['paho_mqtt']}, amqtt {env['amqtt']}, mosquitto {env['mosquitto']}",
          flush=True)
    signal.signal(signal.SIGTERM, run._interrupt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_out = args.out.parent / "logs"
    setups: list[SetupResult] = []
    work = Path(tempfile.mkdtemp(prefix="atrius-delta-"))
    try:
        setups.append(run_setup("solo", False, EDITS, work / "solo", s, log_out))
        setups.append(run_setup("hub", True, EDITS[:1], work / "hub", s, log_out))
    except (KeyboardInterrupt, run.Interrupted):
        print("\ninterrupted; subprocesses stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\n" + table(setups, s))
    half = s.size // 2
    print(f"\nCited figures (not measured here):\n  - {CITED_SYNCTHING_NOTE} "
          f"({CITED_SYNCTHING_BYTES / MB:.2f} MB).\n  - {CITED_FIXED_NOTE}: ~{half // MIB} MiB for this "
          f"{s.size // MIB} MiB file.\n  - {CITED_FASTCDC_NOTE}.")
    print(f"\n'wire' = payload + topic bytes of every message on the space until B verified; 'after' = counted after "
          f"that until {QUIET} s of quiet. 'fixed-block est.' = arithmetic for {BLOCK // KIB} KiB blocks without "
          "a rolling hash. Manifest = chunks x 36 B.")
    failures = [f for st in setups for f in st.failures()]
    run.print_problems([(st.name, st.log_findings) for st in setups], failures)
    doc = {
        "environment": env,
        "mode": "quick" if s.quick else "full",
        "settings": asdict(s),
        "method": method(s),
        "cited_not_measured": {"syncthing_1_19": CITED_SYNCTHING_NOTE, "fixed_block": CITED_FIXED_NOTE,
                               "fastcdc": CITED_FASTCDC_NOTE},
        "setups": {st.name: asdict(st) for st in setups},
        "failures": failures,
    }
    args.out.write_text(json.dumps(run._rounded(doc), indent=2) + "\n")
    print(f"\nfigures: {args.out}; process logs: {log_out}/delta-*")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
