"""Atomic writes and folder locks (docs/design.md §10)."""
import subprocess
import sys
import time

import pytest

from pipeline.core import atomic
from pipeline.core.errors import UserError

from conftest import ROOT

HOLDER = """
import sys, time
from pipeline.core import atomic
with atomic.folder_lock(sys.argv[1], "test run"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_folder_locked_by_another_process_is_refused_until_it_ends(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match="another train_d run is writing"):
            with atomic.folder_lock(tmp_path, "train_d run"):
                pass
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    with atomic.folder_lock(tmp_path, "train_d run"):
        pass


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic.write_bytes(target, b"old")

    def broken_fsync(fd):
        raise OSError("disk full")
    monkeypatch.setattr(atomic.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
