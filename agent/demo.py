"""``atrius demo``: the tour.  An embedded hub and three devices on this machine, the live screen
(watching the space as bob-laptop sees it), and a scripted story narrated in its event log: a
texture arriving everywhere, a lock making it read-only, a forced edit kept as a conflict copy, a
device going offline and catching up, and a restore.  It exits by itself with a summary (in well
under a minute on 2 cores) unless ``--forever``; it removes its temporary folder on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import blake3

from agent.commands import human_size
from agent.config import load_config
from agent.events import Level, LogBridge, LogLine, QueueSink
from agent.status import hash_or_none as _hash
from agent.view import SpaceView

SPACE = "demo"
FOLDER, FOLDER_ID = "Art", "art"
TEXTURE = "art/hero.png"
SCENE = "levels/level1.scene"
DEVICES = ("alice-pc", "bob-laptop", "carol-studio")
WATCHER = "bob-laptop"
"""The device whose view the screen shows (its files' local state: read-only, conflict...)."""
SCREENSHOT_STEP = 2
PAUSE = 0.8
"""Seconds between the steps of the story, to let a human see each one on the screen."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


class _Proc:
    """An ``atrius`` subprocess with its log in a file."""

    def __init__(self, name: str, args: list[str], log: Path, cwd: Path) -> None:
        self.name, self.args, self.log, self.cwd = name, args, log, cwd
        self.p = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as fh:
            return subprocess.Popen([sys.executable, "-m", "atrius_cli", *self.args], cwd=self.cwd,
                                    stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=_env(),
                                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        return self.p.poll() is None

    def restart(self) -> None:
        self.p = self._spawn()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when the demo process dies, even by SIGKILL, so
    no device or hub outlives the tour."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _writable(path: Path) -> bool:
    try:
        return bool(os.stat(path).st_mode & 0o200)
    except OSError:
        return False


class DemoFailed(RuntimeError):
    pass


@dataclass
class Step:
    title: str
    outcome: str = ""
    seconds: float = 0.0


class Tour:
    """Runs the hub, the devices and the story; tells the screen what happens."""

    def __init__(self, root: Path, sink: QueueSink, size: int) -> None:
        self.root = root
        self.sink = sink
        self.size = size
        self.procs: dict[str, _Proc] = {}
        self.port = _free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.steps: list[Step] = []
        self.snap: Callable[[], None] | None = None
        """Called once, after the lock step (the screenshot: a lock held, a file read-only)."""

    # -- narration ---------------------------------------------------------------------------------
    def say(self, text: str, level: Level = Level.INFO) -> None:
        self.sink.emit(LogLine(f"▶ {text}", level))

    def dir(self, device: str) -> Path:
        return self.root / device

    def config(self, device: str) -> Path:
        return self.dir(device) / "agent.yaml"

    def texture(self, device: str) -> Path:
        return self.dir(device) / FOLDER / "hero.png"

    async def wait(self, pred: Callable[[], bool], what: str, timeout: float = 30.0) -> float:
        t0 = time.perf_counter()
        while not await asyncio.to_thread(pred):
            if time.perf_counter() - t0 > timeout:
                raise DemoFailed(f"timed out after {timeout:.0f} s waiting for {what}")
            await asyncio.sleep(0.01)
        return time.perf_counter() - t0

    async def atrius(self, *args: str, lines: int = 3) -> tuple[int, str]:
        """Run an ``atrius`` command as a user would; its output goes to the event log."""
        self.say("$ atrius " + " ".join(a if " " not in a else f"'{a}'" for a in args))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "atrius_cli", *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=_env(), cwd=self.root)
        out, _ = await proc.communicate()
        text = out.decode(errors="replace").strip()
        for line in text.splitlines()[:lines]:
            self.say(f"  {line}")
        return proc.returncode or 0, text

    async def step(self, title: str, body: Callable[[Step], Awaitable[None]]) -> None:
        s = Step(title)
        self.steps.append(s)
        self.say(f"{len(self.steps)}. {title}")
        t0 = time.perf_counter()
        await body(s)
        s.seconds = time.perf_counter() - t0
        self.say(f"   {s.outcome}")
        await asyncio.sleep(PAUSE)
        if len(self.steps) == SCREENSHOT_STEP and self.snap is not None:
            self.snap()

    # -- set-up ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        hub = _Proc("hub", ["hub", "--host", "127.0.0.1", "--port", str(self.port), "--data", str(self.root / "hub")],
                    self.root / "hub.log", self.root)
        self.procs["hub"] = hub
        await self.wait(lambda: "hub listening" in hub.text() or not hub.running(), "the hub to listen", 20)
        if not hub.running():
            raise DemoFailed(f"the hub did not start: {hub.text().strip()[-300:]}")
        self.say(f"hub (embedded amqtt broker + coordinator) listening on {self.url}")
        for name in DEVICES:
            d = self.dir(name)
            (d / FOLDER).mkdir(parents=True)
            self.config(name).write_text(
                f"device: {name}\nspace: {SPACE}\nbroker:\n  url: {self.url}\n"
                f"files:\n  - path: Levels/level1.scene\n    id: {SCENE}\n"
                f"folders:\n  - path: {FOLDER}\n    id: {FOLDER_ID}\n")
            self.procs[name] = _Proc(name, ["agent", "--config", str(self.config(name))], self.root / f"{name}.log", d)
        for name in DEVICES:
            p = self.procs[name]
            await self.wait(lambda p=p: "connected to" in p.text() or not p.running(), f"{name} to connect", 20)
            if not p.running():
                raise DemoFailed(f"{name} did not start: {p.text().strip()[-300:]}")
        self.say(f"devices {', '.join(DEVICES)} are running, each in its own folder under {self.root}")
        await asyncio.sleep(PAUSE)

    def watch_config(self) -> Path:
        return self.config(WATCHER)

    # -- the story ---------------------------------------------------------------------------------------
    async def story(self) -> None:
        others = [d for d in DEVICES if d != "alice-pc"]
        data = os.urandom(self.size)
        v1 = blake3.blake3(data).hexdigest()

        async def arrive(s: Step) -> None:
            scene = os.urandom(96 * 1024)
            (self.dir("carol-studio") / "Levels").mkdir(exist_ok=True)
            (self.dir("carol-studio") / "Levels" / "level1.scene").write_bytes(scene)
            scene_hash = blake3.blake3(scene).hexdigest()
            env = self.dir("alice-pc") / FOLDER / "env"
            env.mkdir()
            extra = {env / "rock.png": os.urandom(1 << 20), env / "grass.png": os.urandom(384 << 10)}
            for path, content in extra.items():
                path.write_bytes(content)
            tmp = self.texture("alice-pc").with_name("hero.png~")  # (an ignored name, like an editor's temp)
            tmp.write_bytes(data)
            os.replace(tmp, self.texture("alice-pc"))  # an editor's save: the file appears whole
            took = max([await self.wait(lambda d=d: _hash(self.texture(d)) == v1, f"{TEXTURE} on {d}")
                        for d in others])
            for path, content in extra.items():
                rel = path.relative_to(self.dir("alice-pc"))
                digest = blake3.blake3(content).hexdigest()
                for d in others:
                    await self.wait(lambda d=d, rel=rel, digest=digest: _hash(self.dir(d) / rel) == digest,
                                    f"{rel} on {d}")
            for d in ("alice-pc", "bob-laptop"):
                await self.wait(lambda d=d: _hash(self.dir(d) / "Levels" / "level1.scene") == scene_hash,
                                f"{SCENE} on {d}")
            s.outcome = (f"{TEXTURE} ({human_size(self.size)}) is on {' and '.join(others)}, verified by BLAKE3, "
                         f"{took * 1000:.0f} ms after alice's save; so are art/env/ and {SCENE}")

        await self.step(f"alice-pc saves {TEXTURE} and art/env/; carol-studio saves {SCENE}", arrive)

        async def lock(s: Step) -> None:
            code, _ = await self.atrius("lock", TEXTURE, "--config", str(self.config("alice-pc")),
                                        "--note", "repainting the armour")
            if code != 0:
                raise DemoFailed(f"atrius lock exited {code}")
            t0 = time.perf_counter()
            for d in others:
                await self.wait(lambda d=d: not _writable(self.texture(d)), f"{TEXTURE} read-only on {d}")
            s.outcome = (f"locked by alice-pc; read-only on {' and '.join(others)} "
                         f"{(time.perf_counter() - t0) * 1000:.0f} ms later")

        await self.step("alice-pc locks the texture", lock)

        async def forced(s: Step) -> None:
            path = self.texture("bob-laptop")
            os.chmod(path, 0o644)
            with open(path, "r+b") as fh:
                fh.write(os.urandom(4096))
            copies: list[Path] = []

            def kept() -> bool:
                copies[:] = sorted(path.parent.glob("hero.conflict-bob-laptop-*.png"))
                return bool(copies) and _hash(path) == v1

            await self.wait(kept, "bob's edit to be kept as a conflict copy")
            s.outcome = (f"bob's edit is not published: it is kept as {FOLDER}/{copies[0].name} on bob-laptop, "
                         f"and hero.png is back to alice's v1 (read-only again: {not _writable(path)})")

        await self.step("bob-laptop edits it anyway (chmod +w, save)", forced)

        v2_data = bytearray(data)
        mid = self.size // 2
        v2_data[mid:mid + 100] = os.urandom(100)
        v2 = blake3.blake3(bytes(v2_data)).hexdigest()

        async def edit_and_unlock(s: Step) -> None:
            with open(self.texture("alice-pc"), "r+b") as fh:
                fh.seek(mid)
                fh.write(v2_data[mid:mid + 100])
            took = max([await self.wait(lambda d=d: _hash(self.texture(d)) == v2, f"v2 on {d}") for d in others])
            code, _ = await self.atrius("unlock", TEXTURE, "--config", str(self.config("alice-pc")))
            if code != 0:
                raise DemoFailed(f"atrius unlock exited {code}")
            for d in others:
                await self.wait(lambda d=d: _writable(self.texture(d)), f"{TEXTURE} writable again on {d}")
            fetched = re.findall(r"applied v2 from alice-pc \(([^)]*)\)", self.procs["bob-laptop"].text())
            s.outcome = (f"v2 reached everyone in {took * 1000:.0f} ms ({fetched[-1] if fetched else 'delta'}); "
                         "unlocked: writable everywhere again")

        await self.step("alice-pc paints 100 bytes (v2) and unlocks", edit_and_unlock)

        v3_data = bytearray(v2_data)
        v3_data[:100] = os.urandom(100)
        v3 = blake3.blake3(bytes(v3_data)).hexdigest()

        async def offline(s: Step) -> None:
            carol = self.procs["carol-studio"]
            await asyncio.to_thread(carol.stop)
            self.say("  carol-studio's agent stopped (laptop lid closed)")
            with open(self.texture("alice-pc"), "r+b") as fh:
                fh.write(v3_data[:100])
            await self.wait(lambda: _hash(self.texture("bob-laptop")) == v3, "v3 on bob-laptop")
            self.say("  alice-pc saved v3 while carol-studio was away; bob-laptop has it")
            await asyncio.sleep(PAUSE)
            carol.restart()
            took = await self.wait(lambda: _hash(self.texture("carol-studio")) == v3, "carol-studio to catch up")
            s.outcome = f"carol-studio came back and caught up on v3 {took:.1f} s after its agent started"

        await self.step("carol-studio goes offline; alice-pc saves v3", offline)

        async def restore(s: Step) -> None:
            t0 = time.perf_counter()
            code, _ = await self.atrius("restore", TEXTURE, "--version", "1", "--config", str(self.config("alice-pc")))
            if code != 0:
                raise DemoFailed(f"atrius restore exited {code}")
            for d in DEVICES:
                await self.wait(lambda d=d: _hash(self.texture(d)) == v1, f"v1 back on {d}")
            s.outcome = (f"v1's content is the newest version (v4) on every device, {time.perf_counter() - t0:.1f} s "
                         "after typing the command (the command itself included)")

        await self.step("alice-pc restores v1", restore)

        code, text = await self.atrius("versions", TEXTURE, "--config", str(self.config("alice-pc")), lines=6)
        if code != 0:
            raise DemoFailed(f"atrius versions exited {code}: {text[-200:]}")

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            p.stop()


async def _tour(forever: bool, size: int, screenshot: str | None) -> int:
    from agent.cli import _log_to
    from agent.ui import SNAPSHOT_AFTER, Screen, export_svg
    from agent.watch import SpaceWatch

    root = Path(tempfile.mkdtemp(prefix="atrius-demo-"))
    loop = asyncio.get_running_loop()
    sink = QueueSink(loop)
    tour = Tour(root, sink, size)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    view = SpaceView(SPACE, WATCHER, broker=tour.url)
    screen = Screen(view, sink)
    ui = asyncio.create_task(screen.run(stop), name="ui")
    bridge = LogBridge(sink, logging.WARNING)  # the screen owns the terminal: problems go to its event log
    log_to = _log_to(bridge)
    log_to.__enter__()
    watch_task: asyncio.Task[None] | None = None
    t0 = time.perf_counter()
    failed: str | None = None
    interrupted = False
    shot_taken = False

    def snap() -> None:
        nonlocal shot_taken
        if screenshot:
            view.expire(time.monotonic())
            export_svg(view, screenshot, title="atrius demo: the live screen, as bob-laptop sees the space")
            shot_taken = True

    tour.snap = snap
    try:
        await tour.start()
        watch = SpaceWatch(load_config(tour.watch_config()), sink)
        watch_task = asyncio.create_task(watch.run(stop), name="watch")
        await asyncio.sleep(SNAPSHOT_AFTER + 0.2)  # the state found is on the screen (and in plain output)
        story = asyncio.create_task(tour.story(), name="story")
        halt = asyncio.create_task(stop.wait())
        await asyncio.wait({story, halt}, return_when=asyncio.FIRST_COMPLETED)
        halt.cancel()
        if not story.done():
            story.cancel()
            interrupted = True
        else:
            story.result()
            tour.say(f"tour finished in {time.perf_counter() - t0:.1f} s", Level.INFO)
            if forever:
                tour.say(f"still running (Ctrl-C to quit): edit files under {root}/<device>/{FOLDER} "
                         f"or use `atrius ... --config {root}/<device>/agent.yaml`")
                await stop.wait()
            else:
                await asyncio.sleep(1.5)  # the last events reach the screen
    except DemoFailed as exc:
        failed = str(exc)
        tour.say(f"demo failed: {exc}", Level.ERROR)
        await asyncio.sleep(1.0)
    finally:
        # Whatever happened (a failed step, Ctrl-C, a closed stdout), the devices and the hub stop
        # and the temporary folder goes.
        try:
            if screenshot and not shot_taken:
                snap()
        finally:
            stop.set()
            for task in (watch_task, ui):
                if task is not None:
                    with contextlib.suppress(Exception):
                        await task
            log_to.__exit__(None, None, None)
            tour.stop()
            logs = {name: p.text() for name, p in tour.procs.items()}
            shutil.rmtree(root, ignore_errors=True)
    took = time.perf_counter() - t0
    try:
        _summary(tour, view, took, failed, logs, screenshot, interrupted=interrupted)
    except BrokenPipeError:  # nobody reads stdout any more (e.g. `atrius demo | head`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (so the flush at exit does not complain either)
    return 0 if failed is None else 1


def _summary(tour: Tour, view: SpaceView, took: float, failed: str | None, logs: dict[str, str],
             screenshot: str | None, *, interrupted: bool = False) -> None:
    outcome = f"FAILED: {failed}" if failed else "interrupted (Ctrl-C)" if interrupted else "finished"
    print(f"\nAtrius tour {outcome} in {took:.1f} s "
          f"(hub + {len(DEVICES)} devices on {tour.url})")
    for i, s in enumerate(tour.steps, 1):
        print(f"  {i}. {s.title} ({s.seconds:.1f} s)")
        if s.outcome:
            print(f"     {s.outcome}")
    t = view.totals
    print(f"  seen on the screen: {t.versions} new version(s), {t.locks} lock(s), {t.conflicts} conflict(s), "
          f"{t.errors} error(s)")
    if screenshot:
        print(f"  screenshot of the screen (after step {SCREENSHOT_STEP}, or at the end): {screenshot}")
    if failed:
        for name, text in logs.items():
            print(f"--- {name} log (last lines) ---\n{text[-1500:]}")
    else:
        print("Try it on two machines: README.md, \"Quick start\".")


def main_demo(*, forever: bool, size: int, screenshot: str | None = None) -> int:
    return asyncio.run(_tour(forever, size, screenshot))
