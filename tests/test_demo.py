"""`atrius demo`, the tour `make demo` runs: a real hub and three real agents, the story told in
plain lines when stdout is not a terminal, a summary, an SVG of the screen, and nothing left behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_demo_tells_the_whole_story_and_cleans_up(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    svg = tmp_path / "tui.svg"
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "atrius_cli", "demo", "--screenshot", str(svg)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    took = time.monotonic() - t0
    out = done.stdout
    print(f"demo took {took:.1f} s")
    assert done.returncode == 0, out[-3000:] + done.stderr[-2000:]
    assert "Traceback" not in out + done.stderr
    # the plain-line screen: the state found, then the story as it happens
    assert "space demo: 3 of 3 device(s) online" in out
    for device in ("alice-pc", "bob-laptop", "carol-studio"):
        assert f"device {device}" in out
    assert "art/hero.png: new file v1 from alice-pc (8.0 MiB)" in out
    assert "art/env/rock.png: new file v1 from alice-pc" in out
    assert 'art/hero.png: locked by alice-pc ("repainting the armour")' in out
    assert "WARNING art/hero.png: a conflict copy is beside bob-laptop's file" in out
    assert "art/hero.png: unlocked (was alice-pc's)" in out
    assert "carol-studio is offline" in out and "carol-studio is online" in out
    assert "art/hero.png: v1 restored by alice-pc as v4" in out
    # the summary, step by step
    summary = out[out.index("Atrius tour finished"):]
    steps = re.findall(r"^  (\d)\. ", summary, re.M)
    assert steps == ["1", "2", "3", "4", "5", "6"], summary
    assert re.search(r"read-only on bob-laptop and carol-studio \d+ ms later", summary)
    assert re.search(r"kept as Art/hero\.conflict-bob-laptop-\d{8}-\d{6}\.png on bob-laptop", summary)
    assert "read-only again: True" in summary
    assert re.search(r"1 chunks fetched, \d+ reused", summary), "v2 (100 bytes changed) travels as a delta"
    assert "caught up on v3" in summary
    assert re.search(r"seen on the screen: 7 new version\(s\), 1 lock\(s\), 1 conflict\(s\), 0 error\(s\)", summary)
    # the screenshot is the real screen: panels, the locked file read-only on bob-laptop
    text = svg.read_text()
    assert text.startswith("<svg") and "</svg>" in text
    for needle in ("devices", "live&#160;transfers", "files", "events", "art/hero.png", "alice-pc", "read-only"):
        assert needle in text, needle
    # its temporary folder is gone
    root = re.search(r"running, each in its own folder under (\S+)", out)
    assert root is not None
    assert not Path(root.group(1)).exists()
