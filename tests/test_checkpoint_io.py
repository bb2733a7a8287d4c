"""Checkpoint saves are atomic: a kill or a failure during a save keeps the previous checkpoint whole."""

import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from hmrnn_lightning import checkpoint_io
from hmrnn_lightning.checkpoint_io import AtomicCheckpointIO

#: writes ``payload`` checkpoints of ~256 MB to argv[1] forever; prints "saved" after the first
WRITER = """
import sys, torch
from hmrnn_lightning.checkpoint_io import AtomicCheckpointIO
io = AtomicCheckpointIO()
payload = torch.zeros(64 * 2**20)
io.save_checkpoint({"step": 0, "w": payload}, sys.argv[1])
print("saved", flush=True)
step = 1
while True:
    io.save_checkpoint({"step": step, "w": payload + step}, sys.argv[1])
    step += 1
"""


def _other_filesystem_than_tmp() -> Path | None:
    """A writable folder on another filesystem than the system's temporary folder (a tmpfs)."""
    tmp_dev = os.stat(tempfile.gettempdir()).st_dev
    for candidate in (Path("/dev/shm"), Path("/run/shm")):
        if candidate.is_dir() and os.access(candidate, os.W_OK) and os.stat(candidate).st_dev != tmp_dev:
            return candidate
    return None


@pytest.mark.slow
def test_a_kill_during_a_save_on_another_filesystem_keeps_the_previous_checkpoint():
    """The failure the issue measured: the run folder on a tmpfs, the temporary folder on the
    disk, ``kill -9`` in the middle of writing. Lightning's own writer left a truncated file there."""
    other = _other_filesystem_than_tmp()
    if other is None:
        pytest.skip("no writable tmpfs on another filesystem than the temporary folder")
    folder = Path(tempfile.mkdtemp(dir=other, prefix="hmrnn-ckpt-test-"))
    try:
        target = folder / "last.ckpt"
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert proc.stdout.readline().strip() == "saved"
        whole = target.stat().st_size
        deadline = time.monotonic() + 60
        # kill once the next save is well under way: its hidden file holds part of the bytes
        while True:
            partial = [p for p in folder.glob(".last.ckpt.tmp-*") if 0 < p.stat().st_size < whole // 2]
            if partial:
                break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert target.stat().st_size == whole  # the old checkpoint, whole
        ckpt = torch.load(target, map_location="cpu", weights_only=True)
        assert ckpt["w"].numel() == 64 * 2**20 and float(ckpt["w"][0]) == ckpt["step"]
        # nothing left in the temporary folder; the hidden partial file beside the target is
        # removed by the next fit in that run folder (SaveAndLogConfig)
        assert not list(Path(tempfile.gettempdir()).glob("tmp*last.ckpt*"))
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


def test_a_failed_save_leaves_the_target_and_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)
    before = target.read_bytes()

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", full)
    with pytest.raises(OSError) as failed:
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, target)
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(target)  # the error names the checkpoint
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
