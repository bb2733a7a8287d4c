"""Long first-time work says what it caches where, and shows a tqdm bar on a terminal."""

from __future__ import annotations

import io
import logging
import sys

from hmrnn_lightning.data import SyntheticDataModule
from hmrnn_lightning.data.iam import read_lines
from tests.helpers import write_iam_tree


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_first_build_names_what_is_cached_where(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    dm = SyntheticDataModule(num_chars=2000, batch_size=2, seq_len=10, cache_dir=str(tmp_path))
    dm.setup()
    lines = [r.getMessage() for r in caplog.records if "caching it in" in r.getMessage()]
    assert lines == [f"hmrnn: preparing the synthetic corpus once; caching it in {dm.cache_path}"]
    caplog.clear()
    SyntheticDataModule(num_chars=2000, batch_size=2, seq_len=10, cache_dir=str(tmp_path)).setup()
    assert not [r for r in caplog.records if "caching it in" in r.getMessage()]  # built once, then silent


def test_iam_parse_shows_a_bar_on_a_terminal_only(tmp_path, monkeypatch):
    write_iam_tree(tmp_path, n_lines=12)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    lines, _ = read_lines(tmp_path / "lineStrokes")
    assert len(lines) == 12
    shown = terminal.getvalue()
    assert "parsing IAM-OnDB lines" in shown and "line/s" in shown  # tqdm's bar (redrawn every 0.1 s)
    piped = io.StringIO()  # not a terminal: no bar in logs
    monkeypatch.setattr(sys, "stderr", piped)
    read_lines(tmp_path / "lineStrokes")
    assert piped.getvalue() == ""
