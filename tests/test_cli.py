"""The atrius command line as a user meets it: help, config errors with their line, exit codes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from brokers import REPO_ROOT, agent_proc, atrius_env, free_port


def run(*args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "atrius_cli", *args], cwd=cwd or REPO_ROOT, env=atrius_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_help_and_version() -> None:
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("hub", "broker", "coordinator", "agent", "demo"):
        assert cmd in r.stdout
    r = run("agent", "--help")
    assert r.returncode == 0 and "example: atrius agent --config" in r.stdout
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("atrius ")


def test_usage_error_exit_2() -> None:
    r = run("agent")
    assert r.returncode == 2 and "--config" in r.stderr


def _one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_config_errors_name_key_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("device: a\nspace: s\nfiles:\n  - path: x.bin\n    colour: red\n")
    r = run("agent", "--config", str(cfg))
    assert r.returncode == 2
    line = _one_line_error(r)
    assert "line 5" in line and "files[0].colour" in line and "unknown key" in line

    cfg.write_text("device: a\nspace: s\nbroker:\n  url: http://example.org\nfiles:\n  - path: x.bin\n")
    line = _one_line_error(run("agent", "--config", str(cfg)))
    assert "line 4" in line and "broker.url" in line and "mqtt://" in line

    cfg.write_text("device: a\nspace: s\nfiles: [\n  - path: x\n")
    r = run("agent", "--config", str(cfg))
    assert r.returncode == 2 and "invalid YAML" in _one_line_error(r)

    cfg.write_text("device: a\nspace: s\nfolders:\n  - path: Textures\n  - path: Textures/sub\n")
    line = _one_line_error(run("agent", "--config", str(cfg)))
    assert "line 5" in line and "folders[1]" in line and "overlaps" in line

    r = run("agent", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "not found" in _one_line_error(r)


def test_unreachable_broker_is_reported_and_retried(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    port = free_port()  # nothing listens here
    cfg.write_text(f"device: a\nspace: s\nbroker:\n  url: mqtt://127.0.0.1:{port}\nfiles:\n  - path: x.bin\n")
    (tmp_path / "x.bin").write_bytes(b"keep me")
    proc = agent_proc(cfg).start()
    try:
        proc.wait_for_log(rf"cannot reach broker mqtt://127.0.0.1:{port}; retrying", timeout=15)
        time.sleep(2)
        assert proc.running, "the agent must keep retrying, not exit"
        assert proc.log_text().count("cannot reach broker") == 1, "one line per outage, not one per retry"
    finally:
        assert proc.stop() == 0
    assert (tmp_path / "x.bin").read_bytes() == b"keep me"
    assert "Traceback" not in proc.log_text()


def test_hub_port_in_use_exit_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("hub", "--port", str(port), "--data", str(tmp_path / "d"))
    assert r.returncode == 1
    assert "cannot listen on 127.0.0.1" in _one_line_error(r)


def test_init_writes_a_starter_config_that_loads(tmp_path: Path) -> None:
    from agent.config import load_config
    from agent.init import device_name

    r = run("init", "--broker", "mqtt://studio-server:1884", "--space", "my-game", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "atrius agent --config agent.yaml" in r.stdout
    cfg = load_config(tmp_path / "agent.yaml")
    assert cfg.device == device_name() and cfg.space == "my-game"
    assert (cfg.broker.host, cfg.broker.port) == ("studio-server", 1884)
    assert [f.folder_id for f in cfg.folders] == ["assets"]
    text = (tmp_path / "agent.yaml").read_text()
    assert text.count("#") > 10  # commented, not bare
    # Never overwrites by accident; --force does.
    before = text
    r = run("init", "--device", "other-pc", cwd=tmp_path)
    assert r.returncode == 2 and "exists" in _one_line_error(r) and "--force" in r.stderr
    assert (tmp_path / "agent.yaml").read_text() == before
    r = run("init", "--device", "other-pc", "--force", "-o", "cfg/b.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    again = load_config(tmp_path / "cfg" / "b.yaml")
    assert again.device == "other-pc" and str(again.broker) == "mqtt://127.0.0.1:1883"


def test_init_refuses_bad_values(tmp_path: Path) -> None:
    r = run("init", "--broker", "http://example.org", cwd=tmp_path)
    assert r.returncode == 2 and "mqtt://" in _one_line_error(r)
    r = run("init", "--device", "bad name!", cwd=tmp_path)
    assert r.returncode == 2 and "not a valid name" in _one_line_error(r)
    assert not (tmp_path / "agent.yaml").exists()


def test_device_name_from_host() -> None:
    from agent.init import device_name

    assert device_name("Alice's MacBook Pro.local") == "Alice-s-MacBook-Pro"
    assert device_name("ws-07.studio.lan") == "ws-07"
    assert device_name("???") == "device"
    assert len(device_name("x" * 100)) == 64
