"""The atrius command line as a user meets it: help, config errors with their line, exit codes."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from brokers import REPO_ROOT, agent_proc, atrius_env, free_port, hub_proc

from agent import __version__
from atrius_cli import build_parser


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


# --- help, version, every subcommand ------------------------------------------------------------------


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SUBCOMMANDS = sorted(_subparsers())
CONTRACT = {"hub", "broker", "coordinator", "agent", "tui", "status", "lock", "unlock", "versions", "restore",
            "init", "demo"}


def test_every_contract_command_is_there() -> None:
    assert set(SUBCOMMANDS) >= CONTRACT
    r = run("--help")
    assert r.returncode == 0
    for cmd in SUBCOMMANDS:
        assert re.search(rf"^\s+{cmd}\s+\S", r.stdout, re.M), f"{cmd} missing from atrius --help"
    assert "example: atrius " in r.stdout and "exit codes:" in r.stdout


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_subcommand_help_has_an_example(cmd: str) -> None:
    r = run(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: atrius {cmd}")
    assert f"example: atrius {cmd}" in r.stdout
    assert r.stderr == ""


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_option_has_help_with_its_default(cmd: str) -> None:
    parsers = {"atrius": build_parser(), cmd: _subparsers()[cmd]}
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            what = f"atrius {name if name != 'atrius' else ''} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{what} has no help text"
            if not action.option_strings:
                continue
            assert action.required or "default" in action.help, f"{what}: help does not give the default"
            if action.required:
                assert "required" in action.help, f"{what}: help does not say it is required"


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"atrius {__version__}"
    assert re.fullmatch(r"atrius \d+\.\d+\.\d+\S*", r.stdout.strip())


# --- usage errors: exit 2, one readable line, no traceback ---------------------------------------------


@pytest.mark.parametrize(("args", "needle"), [
    ([], "required: COMMAND"),
    (["nosuchcmd"], "invalid choice"),
    (["agent"], "--config"),
    (["tui"], "--config"),
    (["status"], "--config"),
    (["lock", "art/hero.png"], "--config"),
    (["versions", "--config", "agent.yaml"], "FILE_ID"),
    (["restore", "art/hero.png", "--config", "agent.yaml"], "--version"),
    (["restore", "art/hero.png", "--version", "0", "--config", "agent.yaml"], "at least 1"),
    (["lock", "art/hero.png", "--config", "agent.yaml", "--ttl", "banana"], "'banana' is not a duration"),
    (["lock", "art/hero.png", "--config", "agent.yaml", "--ttl", "0"], "positive"),
    (["coordinator"], "--broker"),
    (["hub", "--port", "99999"], "1-65535"),
    (["broker", "--port", "http"], "not a port number"),
    (["status", "--config", "agent.yaml", "--jsn"], "unrecognized arguments: --jsn"),
])
def test_usage_errors_exit_2(args: list[str], needle: str, tmp_path: Path) -> None:
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("atrius") and "error:" in last and needle in last, r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize(("args", "needle"), [
    (["coordinator", "--broker", "http://x"], "must start with mqtt:// or mqtts://"),
    (["coordinator", "--broker", "mqtt://host:notaport"], "notaport"),
    (["hub", "--keep-versions", "banana"], "--keep-versions 'banana'"),
    (["hub", "--keep-days", "big-game=-1"], "--keep-days"),
    (["--log-file", "no/such/dir/atrius.log", "status", "--config", "agent.yaml"], "cannot write the log file"),
    (["init", "--space", "my game"], "not a valid name"),
])
def test_bad_values_exit_2_with_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    r = run(*args, cwd=tmp_path, timeout=15)
    assert r.returncode == 2, r.stderr
    assert needle in _one_line_error(r)
    assert not (tmp_path / ".atrius-hub").exists()


# --- config errors, for every command that reads the agent config ---------------------------------------

CONFIG_COMMANDS = [["agent"], ["agent", "--tui"], ["tui"], ["status"], ["versions", "art/x.png"],
                   ["restore", "art/x.png", "--version", "2"], ["lock", "art/x.png"], ["unlock", "art/x.png"]]

CONFIG_ERRORS = {
    "unknown top-level key": ("device: a\nspace: s\ncolour: red\nfiles:\n  - path: x.bin\n",
                              ["line 3", "colour", "unknown key"]),
    "unknown broker key": ("device: a\nspace: s\nbroker:\n  url: mqtt://127.0.0.1:1\n  usename: bob\n"
                           "files:\n  - path: x.bin\n", ["line 5", "broker.usename", "unknown key"]),
    "http url": ("device: a\nspace: s\nbroker:\n  url: http://x\nfiles:\n  - path: x.bin\n",
                 ["line 4", "broker.url", "'http://x'", "mqtt://"]),
    "port not a number": ("device: a\nspace: s\nfiles:\n  - path: x.bin\nbroker:\n  url: mqtt://host:notaport\n",
                          ["line 6", "broker.url", "notaport"]),
}


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=" ".join)
@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_errors_exit_2_naming_key_and_line(command: list[str], case: str, tmp_path: Path) -> None:
    text, needles = CONFIG_ERRORS[case]
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(text)
    r = run(*command, "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    line = _one_line_error(r)
    assert f"{cfg}:line " in line
    for needle in needles:
        assert needle in line, line
    assert "Value error" not in line and "Section" not in line  # no pydantic internals
    assert r.stdout == ""


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=" ".join)
def test_missing_config_file_exit_2(command: list[str], tmp_path: Path) -> None:
    r = run(*command, "--config", "nope.yaml", cwd=tmp_path)
    assert r.returncode == 2
    line = _one_line_error(r)
    assert f"{tmp_path / 'nope.yaml'}: config file not found" in line


def test_config_error_with_verbose_is_still_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("device: a\nspace: s\nfiles:\n  - x.bin\n")
    for args in (["-v", "status"], ["-v", "agent"]):
        r = run(*args, "--config", str(cfg), cwd=tmp_path)
        assert r.returncode == 2
        line = [ln for ln in r.stderr.splitlines() if "config error" in ln]
        assert len(line) == 1 and "line 4: files[0]: should be a mapping of keys" in line[0], r.stderr
        assert "Traceback" not in r.stderr


# --- runtime errors of one-shot commands: exit 1, one line; -v and --log-file ---------------------------


def _start(args: Sequence[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "atrius_cli", *args], cwd=cwd, env=atrius_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_unreachable_broker_one_shot_exit_1_and_logging(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: a\nspace: s\nbroker:\n  url: mqtt://127.0.0.1:{port}\nfiles:\n  - path: x.bin\n")
    debug_log, info_log = tmp_path / "debug.log", tmp_path / "info.log"
    started = time.monotonic()
    procs = {  # concurrently: each waits ~5 s for the broker
        "status": _start(["status", "--config", str(cfg)], tmp_path),
        "versions": _start(["versions", "x.bin", "--config", str(cfg)], tmp_path),
        "verbose": _start(["-v", "--log-file", str(debug_log), "versions", "x.bin", "--config", str(cfg)], tmp_path),
        "log-file": _start(["--log-file", str(info_log), "lock", "x.bin", "--config", str(cfg)], tmp_path),
    }
    done = {name: _finish(p) for name, p in procs.items()}
    assert time.monotonic() - started < 20
    for name in ("status", "versions", "log-file"):
        r = done[name]
        assert r.returncode == 1, (name, r.stderr)
        assert _one_line_error(r) == f"atrius: cannot reach broker mqtt://127.0.0.1:{port} within 5 s"
    # -v: debug lines with times and logger names on stderr and in the file, still no traceback
    r = done["verbose"]
    assert r.returncode == 1
    assert re.search(r"^\d\d:\d\d:\d\d\.\d{3} DEBUG ", r.stderr, re.M), r.stderr
    assert "Traceback" not in r.stderr
    text = debug_log.read_text()
    assert " DEBUG " in text and f"cannot reach broker mqtt://127.0.0.1:{port}" in text
    # --log-file without -v: the full log in the file, no debug lines
    text = info_log.read_text()
    assert f"ERROR   atrius.agent: cannot reach broker mqtt://127.0.0.1:{port} within 5 s" in text
    assert " DEBUG " not in text


def test_agent_verbose_and_log_file(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: a\nspace: s\nbroker:\n  url: mqtt://127.0.0.1:{port}\nfiles:\n  - path: x.bin\n")
    debug_log, info_log = tmp_path / "debug.log", tmp_path / "info.log"
    verbose = agent_proc(cfg, global_args=["-v", "--log-file", str(debug_log)], log_path=tmp_path / "v.out")
    cfg_b = tmp_path / "b.yaml"  # a second device, so the two agents do not share a state dir
    cfg_b.write_text(cfg.read_text().replace("device: a", "device: b"))
    quiet = agent_proc(cfg_b, global_args=["--log-file", str(info_log)], log_path=tmp_path / "q.out")
    verbose.start()
    quiet.start()
    try:
        verbose.wait_for_log("cannot reach broker", timeout=15)
        quiet.wait_for_log("cannot reach broker", timeout=15)
    finally:
        assert verbose.stop() == 0  # SIGTERM by pid: a clean stop
        assert quiet.stop() == 0
    assert " DEBUG " in verbose.log_text()
    text = debug_log.read_text()
    assert " DEBUG " in text and "cannot reach broker" in text
    text = info_log.read_text()
    assert "cannot reach broker" in text and " DEBUG " not in text
    assert text == quiet.log_text()  # the file holds what stderr shows
    for proc in (verbose, quiet):
        assert "Traceback" not in proc.log_text()


def test_bad_file_id_exit_1_without_a_broker(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: a\nspace: s\nbroker:\n  url: mqtt://127.0.0.1:{free_port()}\nfiles:\n  - path: x.bin\n")
    outside = str(tmp_path.parent / "elsewhere.png")
    for args in (["versions", outside], ["lock", outside], ["restore", outside, "--version", "1"]):
        r = run(*args, "--config", str(cfg), cwd=tmp_path, timeout=10)
        assert r.returncode == 1, r.stderr
        assert "is neither a listed file nor a valid file id" in _one_line_error(r)


def test_unknown_file_id_exit_1_against_a_hub(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: a\nspace: s\nbroker:\n  url: mqtt://127.0.0.1:{port}\nfiles:\n  - path: x.bin\n")
    with hub_proc(port, tmp_path / "hub").start():
        procs = [_start([*args, "--config", str(cfg)], tmp_path) for args in
                 (["versions", "nosuch/file.png"], ["restore", "nosuch/file.png", "--version", "1"],
                  ["lock", "nosuch/file.png"])]
        done = [_finish(p) for p in procs]
    for r in done:
        assert r.returncode == 1, r.stderr
        assert "nosuch/file.png" in _one_line_error(r)


# --- init and the example config ------------------------------------------------------------------------


def _config_keys() -> list[str]:
    """Every key agent/config.py accepts, as the README names them (broker.url, files[].path, ...)."""
    from agent.config import AgentSection, BrokerSection, FileSection, FolderSection

    keys = list(AgentSection.model_fields)
    for model, prefix in ((BrokerSection, "broker."), (FileSection, "files[]."), (FolderSection, "folders[].")):
        keys += [prefix + field for field in model.model_fields]
    return keys


def test_init_comments_out_auth_tls_and_encryption(tmp_path: Path) -> None:
    from agent.config import load_config

    r = run("init", "--device", "alice-pc", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "agent.yaml").read_text()
    for key in ("username", "password_env", "ca_file", "encryption_key_file", "state_dir", "keep_snapshots"):
        assert re.search(rf"^\s*# {key}: ", text, re.M), f"{key} is not offered commented out"
    cfg = load_config(tmp_path / "agent.yaml")
    assert (cfg.username, cfg.password, cfg.ca_file) == (None, None, None)
    r = run("init", "--device", "alice-pc", "--broker", "mqtt://host:notaport", "--force", cwd=tmp_path)
    assert r.returncode == 2 and "notaport" in _one_line_error(r)


def test_example_config_loads_and_shows_every_key() -> None:
    from agent.config import load_config

    path = REPO_ROOT / "config" / "agent.yaml"
    cfg = load_config(path)
    assert (cfg.username, cfg.password, cfg.ca_file) == (None, None, None)  # auth and TLS commented out
    assert cfg.files and cfg.folders
    text = path.read_text()
    for key in _config_keys():
        leaf = key.rsplit(".", 1)[-1]
        assert re.search(rf"^\s*(# )?(- )?{leaf}:", text, re.M), f"config/agent.yaml does not show {key}"
    for key in ("username", "password", "password_env", "ca_file", "encryption_key_file"):
        assert re.search(rf"^\s*# {key}:", text, re.M), f"{key} should be there commented out"


def test_readme_references_every_key_and_command() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    config_ref = readme.split("## Agent configuration reference", 1)[1].split("\n## ", 1)[0]
    for key in _config_keys():
        assert re.search(rf"^\| `{re.escape(key)}` \| ", config_ref, re.M), f"README config reference lacks {key}"
    cli_ref = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    for cmd in SUBCOMMANDS:
        assert f"`atrius {cmd}" in cli_ref, f"README CLI reference lacks atrius {cmd}"
    assert "`atrius agent --config FILE --tui`" in cli_ref
