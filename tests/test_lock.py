import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from tme_pipeline.lock import OutputInUse, output_lock


def test_second_holder_refused_with_the_holder_named(tmp_path):
    with output_lock(tmp_path) as me:
        assert me["pid"] == os.getpid() and me["host"] == socket.gethostname()
        recorded = json.loads((tmp_path / ".tme.lock").read_text())
        assert recorded == me
        with pytest.raises(OutputInUse) as refused:
            with output_lock(tmp_path):
                pass
        message = str(refused.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message and me["started"] in message
    # released: the next run takes it without a warning, and the file names nobody
    assert (tmp_path / ".tme.lock").read_text() == ""
    with output_lock(tmp_path):
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = {"pid": pid, "host": "node7", "started": "2026-01-01T00:00:00+00:00"}
    (tmp_path / ".tme.lock").write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING, logger="tme_pipeline.lock"):
        with output_lock(tmp_path) as me:
            assert json.loads((tmp_path / ".tme.lock").read_text()) == me
    assert f"pid {pid} on host node7" in caplog.text and "taking over" in caplog.text


def test_lock_released_when_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom tme_pipeline.lock import output_lock\n"
         "with output_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputInUse, match=f"pid {holder.pid} "):
            with output_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(tmp_path) as me:  # SIGKILL left the file; the kernel freed the lock
        assert me["pid"] == os.getpid()


def test_a_hard_linked_copy_has_its_own_lock(tmp_path):
    """`cp -al OUT COPY` shares .tme.lock's inode; a run into the copy must not lock out OUT."""
    original, copy = tmp_path / "out", tmp_path / "copy"
    with output_lock(original):
        pass
    copy.mkdir()
    os.link(original / ".tme.lock", copy / ".tme.lock")
    with output_lock(copy):
        with output_lock(original):
            pass
        assert os.stat(copy / ".tme.lock").st_ino != os.stat(original / ".tme.lock").st_ino
