"""A lost DDP rank is one line naming it, not gloo's traceback."""

from __future__ import annotations

import os
import signal
import time
import types
from pathlib import Path

import pytest

from hmrnn_lightning.callbacks import LostRank
from hmrnn_lightning.callbacks.lost_rank import is_lost_peer
from tests.helpers import fit_subprocess as fit
from tests.helpers import step_checkpoints as checkpoints


def test_recognises_what_gloo_and_nccl_say_and_nothing_else():
    assert is_lost_peer(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4100"))
    assert is_lost_peer(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] ... Connection reset by peer"))
    assert not is_lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_lost_peer(ValueError("Connection closed by peer"))


def test_one_line_naming_the_other_rank_then_exit(tmp_path, monkeypatch, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    trainer = types.SimpleNamespace(world_size=2, global_rank=0, loggers=[], default_root_dir=str(tmp_path))
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.delenv("HMRNN_DEBUG", raising=False)
    LostRank().on_exception(trainer, None, RuntimeError("Connection closed by peer [127.0.0.1]:1"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hmrnn: error: rank 1 of 2 stopped during training")
    assert f"resume with: hmrnn fit --resume {tmp_path}" in err and exits == [1]
    LostRank().on_exception(types.SimpleNamespace(world_size=1), None, RuntimeError("Connection closed by peer"))
    LostRank().on_exception(trainer, None, RuntimeError("a bug"))
    assert capsys.readouterr().err == "" and exits == [1]  # one process, or another error: left alone


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the rank's process through /proc")
def test_sigkill_of_rank_1_leaves_rank_0_with_one_line(tmp_path):
    run = tmp_path / "run"
    proc = fit(run, "--trainer.strategy=ddp", "--trainer.devices=2", "--data.init_args.num_chars=6000",
               "--trainer.max_epochs=3", wait=False)
    deadline = time.monotonic() + 1800
    while not checkpoints(run):  # training is under way on both ranks
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rank1 = [p for p in _children(proc.pid) if "hmrnn" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=1800)
    assert proc.returncode != 0
    assert "Traceback" not in out, out[-3000:]
    assert "rank 1" in out  # ours, or Lightning's own line when its watcher stops rank 0 first
    mine = [line for line in out.splitlines() if line.startswith("hmrnn: error:")]
    assert len(mine) <= 1 and all("rank 1 of 2 stopped" in line for line in mine)
