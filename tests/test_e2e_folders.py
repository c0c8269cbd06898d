"""Synced folders end to end, with real agent processes over a real broker and coordinator.

Each test runs two ``atrius agent`` processes (one in a bug reproduction) whose configs list one folder with
the id ``textures``; the two devices keep it at different local paths.  Trees are compared by
content hash, leaving out the names the folder ignores and the agent's own temp files.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote, urlparse

import blake3
import pytest
from brokers import REPO_ROOT, MqttProbe, atrius_env
from e2e import Device, HubNet, MosquittoNet, content_hash, random_bytes, wait_until

FOLDER_ID = "textures"
EMPTY_HASH = blake3.blake3(b"").hexdigest()
TIMEOUT = 20.0
Net = HubNet | MosquittoNet


# --- helpers ----------------------------------------------------------------------------------------------


class FolderDevice(Device):
    """A Device whose config lists one synced folder (``textures``) at ``folder_rel``."""

    def __init__(self, root: Path, name: str, url: str, folder_rel: str, *, ignore: Iterable[str] = ("*.tmp", "build/"),
                 extra: str = "") -> None:
        super().__init__(root, name, url, {})
        self.folder = self.dir / folder_rel
        self.ignore = list(ignore)
        self.config.write_text(
            f"device: {name}\nspace: game\nbroker:\n  url: {url}\n{extra}"
            f"folders:\n  - path: {folder_rel}\n    id: {FOLDER_ID}\n    ignore: {json.dumps(self.ignore)}\n"
        )
        self.state_dir = self.dir / ".atrius" / name

    def f(self, rel: str) -> Path:
        return self.folder / rel

    def put(self, rel: str, data: bytes) -> str:
        p = self.f(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:
            fh.write(data)
        return blake3.blake3(data).hexdigest()

    def mark(self) -> int:
        """The current length of the log: pass to since() to read what was logged after now."""
        return len(self.log())

    def since(self, mark: int) -> str:
        return self.log()[mark:]

    def snapshots_of(self, rel: str) -> list[Path]:
        d = self.state_dir / "snapshots" / quote(f"{FOLDER_ID}/{rel}", safe="")
        return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


BUILTIN_IGNORES = ("*.conflict-*", "*.swp", "*~", ".#*", "~$*", ".DS_Store", "._*", "Thumbs.db", "desktop.ini")
"""The built-in ignores a test touches (agent.ignore has the full list): left out of every tree compared."""


def _internal(name: str) -> bool:
    return ".atrius-" in name or name.startswith(".case-probe")


def tree(root: Path, exclude: Iterable[str] = ()) -> dict[str, str]:
    """rel posix path -> content hash ("dir" for folders), without excluded or internal names."""
    pats = [*exclude, *BUILTIN_IGNORES]
    out: dict[str, str] = {}

    def skipped(rel: str, name: str, is_dir: bool) -> bool:
        if _internal(name):
            return True
        for p in pats:
            if p.endswith("/"):
                if is_dir and fnmatch.fnmatch(name, p[:-1]):
                    return True
            elif fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel, p):
                return True
        return False

    def walk(path: Path, prefix: str) -> None:
        for e in sorted(os.scandir(path), key=lambda e: e.name):
            rel = f"{prefix}{e.name}"
            if e.is_symlink():
                out[rel] = "link"
            elif e.is_dir():
                if not skipped(rel, e.name, True):
                    out[rel] = "dir"
                    walk(Path(e.path), rel + "/")
            elif not skipped(rel, e.name, False):
                out[rel] = content_hash(Path(e.path)) or "gone"

    if root.is_dir():
        walk(root, "")
    return out


def show(d: dict[str, str]) -> str:
    return "\n".join(f"  {k}  {v[:8]}" for k, v in sorted(d.items()))


def wait_trees_equal(a: FolderDevice, b: FolderDevice, exclude: Iterable[str] = ("*.tmp", "build/"),
                     timeout: float = TIMEOUT, what: str = "trees equal") -> dict[str, str]:
    ex = list(exclude)

    def same() -> bool:
        return tree(a.folder, ex) == tree(b.folder, ex)

    try:
        wait_until(same, timeout, what, interval=0.05)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n--- {a.name} ---\n{show(tree(a.folder, ex))}\n--- {b.name} ---\n{show(tree(b.folder, ex))}"
            f"\n--- {a.name} log ---\n{a.log()[-2500:]}\n--- {b.name} log ---\n{b.log()[-2500:]}"
        ) from None
    return tree(a.folder, ex)


def wait_content(dev: FolderDevice, rel: str, digest: str | None, timeout: float = TIMEOUT) -> None:
    """Until ``rel`` in dev's folder has ``digest`` (None: until it is gone)."""
    wait_until(lambda: content_hash(dev.f(rel)) == digest, timeout,
               f"{rel} on {dev.name} to be {digest and digest[:12]}\n--- log ---\n{dev.log()[-2500:]}")


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "atrius_cli", *args], cwd=REPO_ROOT, env=atrius_env(),
                          capture_output=True, text=True, timeout=timeout)


def pair(tmp_path: Path, net: Net, devices: list[Device], *, a_ignore: Iterable[str] = ("*.tmp", "build/"),
         b_ignore: Iterable[str] = ("*.tmp", "build/"), extra: str = "") -> tuple[FolderDevice, FolderDevice]:
    """alice keeps the folder at Assets/Textures, bob at Work/game/tex (different local paths)."""
    a = FolderDevice(tmp_path, "alice-pc", net.url, "Assets/Textures", ignore=a_ignore, extra=extra)
    b = FolderDevice(tmp_path, "bob-laptop", net.url, "Work/game/tex", ignore=b_ignore, extra=extra)
    devices += [a, b]
    return a, b


def nested_tree(dev: FolderDevice) -> dict[str, str]:
    """3 levels, 20 files, one empty folder (and one ignored file, one ignored folder)."""
    made: dict[str, str] = {}
    layout = {
        "": ["hero.png", "sky.png", "readme.txt"],
        "chars": ["a.png", "b.png", "c.png", "d.png"],
        "chars/faces": ["f1.png", "f2.png", "f3.png"],
        "chars/faces/hi-res": ["h1.png", "h2.png"],
        "env": ["grass.png", "rock.png", "water.png"],
        "env/props": ["crate.png", "barrel.png"],
        "env/props/old": ["x1.png", "x2.png", "x3.png"],
    }
    for folder, names in layout.items():
        for i, name in enumerate(names):
            rel = f"{folder}/{name}" if folder else name
            size = 200_000 if i == 0 else 3_000 + 97 * i
            made[rel] = dev.put(rel, random_bytes(size))
    assert len(made) == 20
    dev.f("env/empty-slot").mkdir(parents=True)
    dev.put("scratch.tmp", b"never sent")
    dev.put("build/out.png", b"never sent either")
    return made


def published_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "published" in line]


# --- 1. initial sync --------------------------------------------------------------------------------------


def test_initial_sync_of_a_nested_tree_at_different_local_paths(tmp_path: Path, net: Net,
                                                                devices: list[Device]) -> None:
    a, b = pair(tmp_path, net, devices)
    made = nested_tree(a)
    a.start()
    b.start()
    synced = wait_trees_equal(a, b)
    files = {k: v for k, v in synced.items() if v != "dir"}
    assert files == made
    assert synced["env/empty-slot"] == "dir" and not any(b.f("env/empty-slot").iterdir())
    assert {"chars", "chars/faces", "chars/faces/hi-res", "env", "env/props", "env/props/old"} <= synced.keys()
    assert not b.f("scratch.tmp").exists() and not b.f("build").exists()
    assert b.folder != a.folder and b.folder.is_dir()
    # the ids are the folder id plus the relative posix path, the same on both devices
    assert "textures/chars/faces/hi-res/h1.png: applied v1 from alice-pc" in b.log()
    assert "textures/env/empty-slot: folder created (from alice-pc)" in b.log()
    assert not b.temp_files() and not a.temp_files()


# --- 2. every kind of change, both ways -------------------------------------------------------------------


def _renamed_without_data(dst: FolderDevice, mark: int, new_rel: str, old_rel: str) -> None:
    text = dst.since(mark)
    assert re.search(rf"textures/{re.escape(new_rel)}: renamed from textures/{re.escape(old_rel)} \(v\d+ by "
                     rf"[a-z-]+\), no data transferred", text), f"no rename without data in {dst.name}'s log:\n{text}"
    assert f"textures/{new_rel}: applied" not in text, text


def _exercise(src: FolderDevice, dst: FolderDevice, tag: str) -> None:
    """Each kind of local change on ``src`` arrives on ``dst``; names carry ``tag`` to keep directions apart."""
    # create: a file in a new subfolder two levels down, and one at the top
    src.put(f"{tag}-new/deeper/n1.png", random_bytes(120_000))
    src.put(f"{tag}-new/deeper/n2.png", random_bytes(9_000))
    src.put(f"{tag}-top.png", random_bytes(50_000))
    synced = wait_trees_equal(src, dst, what=f"{tag}: create")
    assert synced[f"{tag}-new/deeper"] == "dir"

    # modify
    h = src.put(f"{tag}-top.png", random_bytes(60_000))
    wait_until(lambda: content_hash(dst.f(f"{tag}-top.png")) == h, TIMEOUT, f"{tag}: modify")
    wait_trees_equal(src, dst, what=f"{tag}: modify")

    # file rename (into another folder)
    mark = dst.mark()
    os.rename(src.f(f"{tag}-top.png"), src.f(f"{tag}-new/top-renamed.png"))
    wait_trees_equal(src, dst, what=f"{tag}: file rename")
    assert not dst.f(f"{tag}-top.png").exists()
    wait_until(lambda: "no data transferred" in dst.since(mark), 5, f"{tag}: rename logged")
    _renamed_without_data(dst, mark, f"{tag}-new/top-renamed.png", f"{tag}-top.png")
    # (the modify above kept v1 in the snapshots; the rename itself is not a deletion there)
    assert not [p for p in dst.snapshots_of(f"{tag}-top.png") if "deleted" in p.name], "renamed, not deleted"

    # subfolder rename: every file in it moves, no data, and no empty old folder is left behind
    mark = dst.mark()
    os.rename(src.f(f"{tag}-new"), src.f(f"{tag}-moved"))
    wait_trees_equal(src, dst, what=f"{tag}: subfolder rename")
    assert not dst.f(f"{tag}-new").exists(), f"old folder left behind on {dst.name}"
    wait_until(lambda: dst.since(mark).count("no data transferred") >= 3, 5, f"{tag}: 3 renames logged")
    for rel in ("deeper/n1.png", "deeper/n2.png", "top-renamed.png"):
        _renamed_without_data(dst, mark, f"{tag}-moved/{rel}", f"{tag}-new/{rel}")
    assert "chunks fetched" not in dst.since(mark)

    # subfolder delete: the files go into the receiver's snapshots, the folders are removed
    kept = content_hash(dst.f(f"{tag}-moved/deeper/n1.png"))
    shutil.rmtree(src.f(f"{tag}-moved"))
    wait_trees_equal(src, dst, what=f"{tag}: subfolder delete")
    assert not dst.f(f"{tag}-moved").exists()
    snaps = [p for p in dst.snapshots_of(f"{tag}-moved/deeper/n1.png") if "deleted" in p.name]
    assert [content_hash(p) for p in snaps] == [kept]

    # empty folders: created (nested), then removed
    src.f(f"{tag}-empty/inner").mkdir(parents=True)
    wait_until(lambda: dst.f(f"{tag}-empty/inner").is_dir(), TIMEOUT, f"{tag}: empty folder created")
    wait_trees_equal(src, dst, what=f"{tag}: empty folder create")
    os.rmdir(src.f(f"{tag}-empty/inner"))
    wait_until(lambda: not dst.f(f"{tag}-empty/inner").exists(), TIMEOUT, f"{tag}: inner empty folder removed")
    os.rmdir(src.f(f"{tag}-empty"))
    wait_until(lambda: not dst.f(f"{tag}-empty").exists(), TIMEOUT, f"{tag}: empty folder removed")
    wait_trees_equal(src, dst, what=f"{tag}: empty folder delete")

    # delete one file of the initial tree
    victim = f"chars/{'a' if tag == 'ab' else 'b'}.png"
    kept = content_hash(dst.f(victim))
    src.f(victim).unlink()
    wait_until(lambda: not dst.f(victim).exists(), TIMEOUT, f"{tag}: delete {victim}")
    wait_trees_equal(src, dst, what=f"{tag}: delete")
    assert [content_hash(p) for p in dst.snapshots_of(victim)] == [kept]


def test_every_change_both_ways(tmp_path: Path, net: Net, devices: list[Device]) -> None:
    a, b = pair(tmp_path, net, devices)
    nested_tree(a)
    a.start()
    b.start()
    wait_trees_equal(a, b, what="initial")
    _exercise(a, b, "ab")
    _exercise(b, a, "ba")
    assert not a.temp_files() and not b.temp_files()
    for dev in (a, b):
        assert "Traceback" not in dev.log(), dev.log()[-3000:]


# --- 3. ignore rules --------------------------------------------------------------------------------------


def test_ignored_files_are_never_sent_and_never_written(tmp_path: Path, net: Net, devices: list[Device]) -> None:
    # bob ignores *.psd, alice does not
    a, b = pair(tmp_path, net, devices, b_ignore=["*.tmp", "build/", "*.psd"])
    a.put("base.png", random_bytes(5_000))
    a.start()
    b.start()
    wait_trees_equal(a, b, exclude=["*.tmp", "build/", "*.psd"], what="initial")

    a.put("x.tmp", b"scratch")
    a.put("sub/y.tmp", b"scratch too")
    a.put("sub/.DS_Store", b"finder")  # a built-in ignore
    a.put("sub/keep.png~", b"backup")  # a built-in ignore
    psd = a.put("art/poster.psd", random_bytes(30_000))
    b.put("local-only.psd", b"bob's own psd: ignored here, never sent")
    marker = a.put("art/marker.png", random_bytes(7_000))
    wait_until(lambda: content_hash(b.f("art/marker.png")) == marker, TIMEOUT, "marker on bob")
    b.wait_log(r"textures/art/poster\.psd: v1 from alice-pc not applied: art/poster\.psd matches an ignore "
               r"pattern here")
    wait_until(lambda: "stored game/textures/art/poster.psd v1 " in net.log_text(), TIMEOUT, "psd stored")
    assert content_hash(a.f("art/poster.psd")) == psd
    for rel in ("x.tmp", "sub/y.tmp", "sub/.DS_Store", "sub/keep.png~", "art/poster.psd"):
        assert not b.f(rel).exists(), rel
    assert not a.f("local-only.psd").exists()
    for text in (a.log(),):
        for fid in ("textures/x.tmp", "textures/sub/y.tmp", "textures/sub/.DS_Store", "textures/sub/keep.png~"):
            assert f"{fid}:" not in text, text
    assert "textures/local-only.psd" not in b.log() + a.log()
    for fid in ("textures/x.tmp", "textures/sub/y.tmp", "textures/local-only.psd"):
        r = cli("versions", fid, "--config", str(a.config))
        assert r.returncode != 0 and "no versions of" in r.stdout + r.stderr, (fid, r.stdout, r.stderr)
    # the refusal is sticky: bob does not retry (or log it again) on every rescan
    assert b.log().count("poster.psd matches an ignore pattern here") == 1
    wait_trees_equal(a, b, exclude=["*.tmp", "build/", "*.psd"], what="rest in sync")


# --- 4. restore a deleted file ----------------------------------------------------------------------------


def test_a_deleted_file_comes_back_with_restore(tmp_path: Path, net: Net, devices: list[Device]) -> None:
    a, b = pair(tmp_path, net, devices)
    original = a.put("x.png", random_bytes(180_000))
    a.put("other.png", random_bytes(2_000))
    a.start()
    b.start()
    wait_trees_equal(a, b, what="initial")
    wait_until(lambda: "stored game/textures/x.png v1 " in net.log_text(), TIMEOUT, "x.png v1 stored")

    a.f("x.png").unlink()
    a.wait_log(r"textures/x\.png: published deletion \(v2\)")
    wait_until(lambda: not b.f("x.png").exists(), TIMEOUT, "x.png deleted on bob")
    b.wait_log(r"textures/x\.png: deleted by alice-pc \(v2\); the local copy is kept in the snapshots")
    snaps = b.snapshots_of("x.png")
    assert [content_hash(p) for p in snaps] == [original], snaps
    wait_until(lambda: "deleted" in cli("versions", "textures/x.png", "--config", str(a.config)).stdout,
               TIMEOUT, "the deletion in the history", interval=0.3)
    r = cli("versions", "textures/x.png", "--config", str(b.config), "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert [(v["version"], v["deleted"]) for v in listed] == [(2, True), (1, False)], listed

    r = cli("restore", "textures/x.png", "--version", "1", "--config", str(a.config))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "restored as version 3" in r.stdout, r.stdout
    for dev in (a, b):
        wait_content(dev, "x.png", original)
    wait_trees_equal(a, b, what="after restore")
    listed = json.loads(cli("versions", "textures/x.png", "--config", str(a.config), "--json").stdout)
    assert listed[0]["version"] == 3 and listed[0]["restored_from"] == 1 and listed[0]["hash"] == original
    # the restore lands as an ordinary version: a later edit on bob reaches alice
    h = b.put("x.png", random_bytes(10_000))
    wait_until(lambda: content_hash(a.f("x.png")) == h, TIMEOUT, "edit after restore")


# --- 5. hostile paths -------------------------------------------------------------------------------------


def _head(file_id: str, *, author: str = "mallory", version: int = 1) -> bytes:
    """A valid-looking head of an empty file (no chunks to fetch: the receiver could write at once)."""
    return json.dumps({"file_id": file_id, "hash": EMPTY_HASH, "size": 0, "version": version, "author": author,
                       "time": time.time(), "chunks": 0, "manifest": [], "vector": {author: version}}).encode()


def _dir_head(file_id: str, *, version: int = 1, deleted: bool = False, author: str = "mallory") -> bytes:
    return json.dumps({"file_id": file_id, "hash": EMPTY_HASH, "size": 0, "version": version, "author": author,
                       "kind": "dir", "deleted": deleted, "time": time.time(), "vector": {author: version}}).encode()


def _listing(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def test_hostile_paths_are_refused(tmp_path: Path, net: Net, devices: list[Device]) -> None:
    outside = tmp_path / "outside-target"
    outside.mkdir()
    (outside / "evil.png").write_bytes(b"precious: must never be replaced or removed")
    before_outside = _listing(outside)
    a, b = pair(tmp_path, net, devices)
    a.put("ok.png", random_bytes(3_000))
    # on bob, "link" inside the folder is a symbolic link to a folder outside it
    b.folder.mkdir(parents=True)
    os.symlink(outside, b.f("link"), target_is_directory=True)
    # on alice, "link" is a real folder with a file in it: alice publishes textures/link/evil.png
    a.put("link/evil.png", random_bytes(20_000))
    a.start()
    b.start()
    b.wait_log(r"textures/link/evil\.png: v1 from alice-pc not applied: link is a symbolic link here; not followed")
    b.wait_log(r"folder textures: link is a symbolic link; skipped")
    wait_until(lambda: content_hash(b.f("ok.png")) == content_hash(a.f("ok.png")), TIMEOUT, "ok.png on bob")

    # raw heads on hostile topics (percent-encoded as the agents spell them, and not canonically encoded)
    port = urlparse(net.url).port
    assert port is not None
    probe = MqttProbe(port, client_id="hostile-probe").connect()
    try:
        hostile_ids = ["textures/../x", "textures/a/../../x", "textures//abs", "textures/./x", "/abs/x",
                       "textures/../../outside-target/evil.png", "textures\\..\\x"]
        for fid in hostile_ids:
            probe.publish(f"atrius/v1/game/files/{quote(fid, safe='')}/head", _head(fid), retain=True)
        # a valid id with a non-canonical encoding, and a slash that is not encoded at all
        probe.publish("atrius/v1/game/files/textures%2F%2E%2E%2Fx/head", _head("textures/../x"), retain=True)
        probe.publish("atrius/v1/game/files/textures%2f..%2fx/head", _head("textures/../x"), retain=True)
        probe.publish("atrius/v1/game/files/textures/../x/head", _head("textures/../x"), retain=True)
        # a valid topic whose payload names another (hostile) id
        probe.publish(f"atrius/v1/game/files/{quote('textures/fine.png', safe='')}/head", _head("textures/../x"),
                      retain=True)
        # a valid id under bob's symbolic link, as an empty file (nothing to fetch)
        probe.publish(f"atrius/v1/game/files/{quote('textures/link/empty.png', safe='')}/head",
                      _head("textures/link/empty.png"), retain=True)
        # the folder entry itself, claiming the link is a folder
        probe.publish(f"atrius/v1/game/files/{quote('textures/link/sub', safe='')}/head",
                      _dir_head("textures/link/sub"), retain=True)
        b.wait_log(r"textures/link/empty\.png: v1 from mallory not applied: link is a symbolic link here")
        # 9 topics the parser rejects, 1 head whose payload disagrees with its topic (the unencoded
        # slashes are not even a head topic: bob's subscription does not match it)
        wait_until(lambda: b.log().count("dropped") >= 10, TIMEOUT, f"bob drops the hostile heads:\n{b.log()[-3000:]}")
    finally:
        probe.close()

    # alice edits and deletes the file that bob cannot hold: still nothing outside the folder changes
    a.put("link/evil.png", random_bytes(21_000))
    a.f("link/evil.png").unlink()
    a.wait_log(r"textures/link/evil\.png: published deletion")

    # bob keeps syncing both ways
    h1 = a.put("after/one.png", random_bytes(40_000))
    wait_until(lambda: content_hash(b.f("after/one.png")) == h1, TIMEOUT, "a change after the attack")
    h2 = b.put("from-bob.png", random_bytes(8_000))
    wait_until(lambda: content_hash(a.f("from-bob.png")) == h2, TIMEOUT, "bob's change reaches alice")

    assert _listing(outside) == before_outside, _listing(outside)
    assert b.f("link").is_symlink()
    for p in (tmp_path / "x", tmp_path / "abs", b.dir / "x", b.dir / "Work" / "x", b.dir / "Work" / "game" / "x",
              Path("/abs/x"), a.dir / "x", a.dir / "Assets" / "x"):
        assert not p.exists(), p
    # nothing under bob's folder but what alice and bob really made (no 'x', 'abs', 'fine.png')
    names = set(tree(b.folder))
    assert names == {"ok.png", "link", "after", "after/one.png", "from-bob.png"}, names
    assert "stored game/textures/../" not in net.log_text() and "stored game//abs" not in net.log_text()
    for dev in (a, b):
        assert "Traceback" not in dev.log(), dev.log()[-3000:]
    assert "Traceback" not in net.log_text(), net.log_text()[-3000:]


# --- 6. changes while an agent is stopped; an unchanged restart publishes nothing -------------------------


def test_changes_while_stopped_and_an_unchanged_restart(tmp_path: Path, net: Net, devices: list[Device]) -> None:
    a, b = pair(tmp_path, net, devices, extra="rescan_seconds: 1\n")
    made = nested_tree(a)
    a.start()
    b.start()
    wait_trees_equal(a, b, what="initial")

    assert b.stop() == 0
    # while bob's agent is stopped: alice deletes one file and creates another (she is online) ...
    a.f("env/rock.png").unlink()
    h_a = a.put("env/new-from-alice.png", random_bytes(30_000))
    a.wait_log(r"textures/env/rock\.png: published deletion")
    a.wait_log(r"textures/env/new-from-alice\.png: published v1")
    # ... and bob's folder changes on disk with no agent watching: a delete, a create, a new empty folder
    kept = content_hash(b.f("chars/c.png"))
    b.f("chars/c.png").unlink()
    h_b = b.put("chars/faces/new-from-bob.png", random_bytes(25_000))
    b.f("made-offline").mkdir()
    os.rmdir(b.f("env/empty-slot"))
    b.start()
    synced = wait_trees_equal(a, b, what="after bob's restart")
    assert "env/rock.png" not in synced and "chars/c.png" not in synced
    assert synced["env/new-from-alice.png"] == h_a and synced["chars/faces/new-from-bob.png"] == h_b
    assert synced["made-offline"] == "dir" and "env/empty-slot" not in synced
    assert [content_hash(p) for p in a.snapshots_of("chars/c.png")] == [kept]
    assert made["env/rock.png"] in [content_hash(p) for p in b.snapshots_of("env/rock.png")]

    # an unchanged restart: the hash cache spares the hashing and nothing is published
    for dev, other in ((a, b), (b, a)):
        other_mark = other.mark()
        assert dev.stop() == 0
        mark = dev.mark()
        dev.start()
        # a change from the other device arrives: the restarted agent's start-up scan is behind it
        ping = f"ping-{dev.name}.png"
        h = other.put(ping, random_bytes(6_000))
        wait_content(dev, ping, h)
        time.sleep(2.5)  # two periodic rescans (rescan_seconds: 1)
        assert published_lines(dev.since(mark)) == [], dev.since(mark)
        assert [ln for ln in other.since(other_mark).splitlines() if "applied" in ln or "deleted by" in ln
                or "folder created" in ln or "folder removed" in ln] == [], other.since(other_mark)
        wait_trees_equal(a, b, what=f"after {dev.name}'s unchanged restart")


# --- ignored folders at run time, folder deletions under a symbolic link ---------------------------------


@pytest.mark.parametrize("net", ["hub"], indirect=True)
def test_an_ignored_folder_made_at_run_time_is_neither_published_nor_created(
    tmp_path: Path, net: Net, devices: list[Device]
) -> None:
    a, b = pair(tmp_path, net, devices)
    a.put("base.png", random_bytes(3_000))
    a.start()
    b.start()
    wait_trees_equal(a, b, what="initial")
    mark_a, mark_b = a.mark(), b.mark()
    a.put("build/out.png", random_bytes(4_000))
    a.put("sub/build/deep.png", random_bytes(4_000))
    marker = a.put("sub/marker.png", random_bytes(5_000))
    wait_until(lambda: content_hash(b.f("sub/marker.png")) == marker, TIMEOUT, "marker on bob")
    b.wait_log(r"textures/sub/marker\.png: applied")
    problems = []
    if "textures/build" in a.since(mark_a) or "textures/sub/build" in a.since(mark_a):
        problems.append(f"alice published an ignored folder:\n{a.since(mark_a)}")
    # a remote folder entry at a path bob ignores is never created (whoever sends it)
    port = urlparse(net.url).port
    assert port is not None
    probe = MqttProbe(port, client_id="ignored-dir-probe").connect()
    try:
        probe.publish(f"atrius/v1/game/files/{quote('textures/assets/build', safe='')}/head",
                      _dir_head("textures/assets/build"), retain=True)
        probe.publish(f"atrius/v1/game/files/{quote('textures/after.png', safe='')}/head", _head("textures/after.png"),
                      retain=True)
    finally:
        probe.close()
    wait_until(lambda: b.f("after.png").exists(), TIMEOUT, "after.png on bob")
    for rel in ("build", "sub/build", "assets/build"):
        if b.f(rel).exists():
            problems.append(f"{rel} was created on bob")
    assert not problems, "\n".join(problems) + f"\n--- bob ---\n{b.since(mark_b)}"


@pytest.mark.parametrize("net", ["hub"], indirect=True)
def test_a_folder_deletion_under_a_symbolic_link_removes_nothing_outside(
    tmp_path: Path, net: Net, devices: list[Device]
) -> None:
    outside = tmp_path / "outside-target"
    (outside / "sub-empty").mkdir(parents=True)
    b = FolderDevice(tmp_path, "bob-laptop", net.url, "Work/game/tex")
    devices.append(b)
    b.folder.mkdir(parents=True)
    os.symlink(outside, b.f("link"), target_is_directory=True)
    b.start()
    port = urlparse(net.url).port
    assert port is not None
    probe = MqttProbe(port, client_id="rmdir-probe").connect()
    try:
        probe.publish(f"atrius/v1/game/files/{quote('textures/link/sub-empty', safe='')}/head",
                      _dir_head("textures/link/sub-empty", version=2, deleted=True), retain=True)
        probe.publish(f"atrius/v1/game/files/{quote('textures/marker.png', safe='')}/head",
                      _head("textures/marker.png"), retain=True)
    finally:
        probe.close()
    wait_until(lambda: b.f("marker.png").exists(), TIMEOUT, f"marker on bob\n{b.log()[-2000:]}")
    assert (outside / "sub-empty").is_dir(), f"a folder outside the synced folder was removed:\n{b.log()}"
