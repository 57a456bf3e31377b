"""Temporary stores are never left behind: removed at close, at exit, on SIGTERM, and (after a SIGKILL) by the
next process that makes one; a SIGTERM handler the application set is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from blockrt import tempdirs

CHILD_TIMEOUT_S = 120

# a child that spills a model into a temporary store, says where, and waits to be signalled
CHILD = textwrap.dedent("""
    import signal, sys, time, torch
    sys.path.insert(0, {tests!r})
    import blockrt
    from models import build_toy
    if {own_handler!r}:
        signal.signal(signal.SIGTERM, lambda s, f: (print("own handler", flush=True), sys.exit(7)))
    model, inputs = build_toy(0)
    rt = blockrt.run(model, budget=10**9)
    rt(**inputs)
    print(rt._tmpdir, flush=True)
    time.sleep(60)
""")


def spawn(tmp_path: Path, own_handler: bool = False) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    code = CHILD.format(tests=str(Path(__file__).parent), own_handler=own_handler)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    store = Path(line)
    assert store.is_dir() and store.parent == tmp_path and store.name.startswith(f"blockrt-{proc.pid}-"), line
    return proc, store


def test_sigterm_removes_the_temporary_store(tmp_path):
    proc, store = spawn(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(CHILD_TIMEOUT_S) == 128 + signal.SIGTERM
    assert not store.exists() and not list(tmp_path.glob("blockrt-*"))


def test_an_application_sigterm_handler_is_kept(tmp_path):
    proc, store = spawn(tmp_path, own_handler=True)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(CHILD_TIMEOUT_S) == 7  # its handler ran (sys.exit(7)); exit cleanup then removed the store
    assert "own handler" in proc.stdout.read()
    assert not store.exists()


def test_after_sigkill_the_next_temporary_store_removes_the_orphan(tmp_path, monkeypatch):
    proc, store = spawn(tmp_path)
    proc.kill()
    proc.wait(CHILD_TIMEOUT_S)
    assert store.exists()  # nothing runs on SIGKILL
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    mine = tempdirs.create()
    try:
        assert not store.exists() and Path(mine).exists()
    finally:
        tempdirs.remove(mine)
    assert not list(tmp_path.glob("blockrt-*"))


def test_the_default_sigterm_action_is_restored(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    a, b = tempdirs.create(), tempdirs.create()
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    tempdirs.remove(a)
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # b still needs it
    tempdirs.remove(b)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("name", ["blockrt-1-x", "blockrt-abc", "other-1-x"])
def test_orphans_are_only_dead_processes_dirs(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"blockrt-{dead.pid}-y").mkdir()
    (tmp_path / f"blockrt-{os.getpid()}-z").mkdir()
    removed = tempdirs.remove_orphans(str(tmp_path))
    assert [Path(p).name for p in removed] == [f"blockrt-{dead.pid}-y"]
    assert d.exists() and (tmp_path / f"blockrt-{os.getpid()}-z").exists()
