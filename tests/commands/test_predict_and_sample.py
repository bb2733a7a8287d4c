"""hmrnn predict (bits and boundaries per symbol) and hmrnn sample (top-k, several samples, no unknown symbol)."""

from __future__ import annotations

import math

import pytest
import torch

from hmrnn_lightning.cli import main
from hmrnn_lightning.data.vocab import UNK
from hmrnn_lightning.models.language_model import HMRNNLanguageModel


def _model(ckpt):
    return HMRNNLanguageModel.load_from_checkpoint(ckpt, map_location="cpu").eval()


def test_predict_writes_bits_and_boundaries_per_symbol(tiny_checkpoint, tmp_path, capsys):
    text = "the cat sat on the mat.\nabc def\n" * 3
    src = tmp_path / "in.txt"
    src.write_text(text)
    model = _model(tiny_checkpoint)
    text = "".join(c if c in model.vocab else "a" for c in text)  # keep to the model's symbols
    src.write_text(text)
    out = tmp_path / "pred.tsv"
    # windows of 7 symbols: the carried state must give the same numbers as one pass
    assert main(["predict", f"--ckpt_path={tiny_checkpoint}", f"--text={src}", f"--out={out}", "--window=7"]) == 0
    rows = [line.split("\t") for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0] == ["position", "symbol", "bits", "z1", "z2"]
    assert len(rows) == len(text) + 1
    assert rows[4][1] == " " and rows[24][1] == "\\n"
    ids = model.encode("\n" + text)

    def windows(carry: bool):
        """Bits and z per symbol through windows of 7, carrying the state or not."""
        state, logits, z = None, [], []
        with torch.no_grad():
            for b in range(0, ids.shape[1], 7):
                lg, res = model(ids[:, b : b + 7], state if carry else None)
                state = res.state
                logits.append(lg)
                z.append(res.boundaries)
        logp = torch.log_softmax(torch.cat(logits, 1)[0], -1)
        bits = -logp[:-1].gather(1, ids[0, 1:, None])[:, 0] / math.log(2)
        return bits, torch.cat(z, 1)[0, 1:, :2]

    got_bits = torch.tensor([float(r[2]) for r in rows[1:]])
    got_z = torch.tensor([[float(v) for v in r[3:]] for r in rows[1:]])
    bits, z = windows(carry=True)
    assert (got_bits - bits).abs().max() < 1e-3 and torch.equal(got_z, z)
    cold_bits, _ = windows(carry=False)
    assert (got_bits - cold_bits).abs().max() > 0.05  # the check above can tell a carried state from none
    mean = sum(float(r[2]) for r in rows[1:]) / len(text)
    printed = capsys.readouterr().out
    assert float(printed.split(" bits/symbol")[0].rsplit(" ", 1)[1]) == pytest.approx(mean, abs=1e-3)
    assert (out.stat().st_mode & 0o044) == 0o044  # readable by others under the usual umask


def test_predict_bad_input_is_one_line(tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("ok \u4e2d")
    with pytest.raises(SystemExit) as exc:
        main(["predict", f"--ckpt_path={tiny_checkpoint}", f"--text={src}", f"--out={tmp_path / 'p.tsv'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hmrnn: error:") and "does not know" in err[0]
    assert not (tmp_path / "p.tsv").exists() and not list(tmp_path.glob(".*.tmp"))


def test_sample_options(tiny_checkpoint, tmp_path, capsys):
    prime = tmp_path / "prime.txt"
    prime.write_text("ab")
    args = ["sample", f"--ckpt_path={tiny_checkpoint}", f"--prime_file={prime}", "--length=20", "--top_k=3",
            "--num_samples=3", "--seed=0", "--device=cpu"]
    assert main(args) == 0
    samples = capsys.readouterr().out.split("-" * 40 + "\n")
    assert len(samples) == 3 and all(s.startswith("ab") and len(s.rstrip("\n")) >= 22 for s in samples)
    assert len(set(samples)) > 1  # independent draws


def test_top_k_one_is_greedy(tiny_checkpoint):
    model = _model(tiny_checkpoint)
    torch.manual_seed(0)
    a = model.generate("ab", 15, 1.0, top_k=1)
    torch.manual_seed(1)
    assert model.generate("ab", 15, 1.0, top_k=1) == a


def test_sampling_never_emits_the_unknown_symbol(tiny_checkpoint):
    model = _model(tiny_checkpoint)
    assert UNK in model.vocab
    with torch.no_grad():  # make the unknown symbol by far the likeliest: it must still never come out
        model.head.logits.bias[model.vocab.index(UNK)] = 50.0
    torch.manual_seed(0)
    text = model.generate("ab", 300, temperature=2.0)
    assert UNK not in text and len(text) == 302


@pytest.mark.parametrize("bad, message", [
    (["--length", "-5"], "--length must be 0 or more, got -5"),
    (["--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
    (["--temperature", "-1"], "--temperature must be a finite number > 0, got -1.0"),
    (["--temperature", "nan"], "--temperature must be a finite number > 0, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number > 0, got inf"),
    (["--seed", str(2**70)], f"--seed must be from 0 to 2**64 - 1, got {2**70}"),
    (["--seed", "-1"], "--seed must be from 0 to 2**64 - 1, got -1"),
    (["--top_k", "0"], "--top_k must be positive, got 0"),
    (["--num_samples", "0"], "--num_samples must be positive, got 0"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device"),
])
def test_sample_bad_options_are_one_line(tiny_checkpoint, capsys, bad, message):
    with pytest.raises(SystemExit) as exc:
        main(["sample", f"--ckpt_path={tiny_checkpoint}", *bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hmrnn: error: {message}")


def test_a_tiny_temperature_samples_greedily(tiny_checkpoint, capsys):
    """1e-45 is a valid temperature: the likeliest symbol every time (as top_k 1), not a crash on inf / inf."""
    def sample(*extra):
        assert main(["sample", f"--ckpt_path={tiny_checkpoint}", "--prime=ab", "--length=30", *extra]) == 0
        return capsys.readouterr().out

    tiny = sample("--temperature=1e-45", "--seed=0")
    assert tiny == sample("--temperature=1e-45", "--seed=1") == sample("--top_k=1", "--seed=2")
    assert len(tiny.rstrip("\n")) == 32


@pytest.mark.parametrize("command", ["sample", "predict", "plot-boundaries"])
def test_truncated_checkpoint_is_one_line(command, tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(tiny_checkpoint.read_bytes()[:2000])
    text = tmp_path / "t.txt"
    text.write_text("ab")
    extra = {"sample": [], "predict": [f"--text={text}", f"--out={tmp_path / 'p.tsv'}"],
             "plot-boundaries": ["--text", "ab", f"--out={tmp_path / 'f.png'}"]}[command]
    assert main([command, f"--ckpt_path={bad}", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hmrnn: error: checkpoint ") and str(bad) in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt", "t.txt"]  # nothing written
