"""Small builders shared by tests."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from hmrnn_lightning import HMRNNLanguageModel, HMStack, SoftmaxHead, StepEstimator
from hmrnn_lightning.cells.base import LayerState


def random_state(batch: int, hidden: int, z: float) -> LayerState:
    return LayerState(torch.randn(batch, hidden), torch.randn(batch, hidden), torch.full((batch,), float(z)))


def tiny_model(vocab_size: int = 11, hidden: int = 16, layers: int = 3, estimator=None, **kwargs) -> HMRNNLanguageModel:
    stack = functools.partial(HMStack, hidden_sizes=[hidden] * layers, estimator=estimator or StepEstimator())
    return HMRNNLanguageModel(
        vocab_size=vocab_size, stack=stack, head=functools.partial(SoftmaxHead, embed_dim=hidden),
        embedding_dim=kwargs.pop("embedding_dim", 8), **kwargs,
    )


ROOT = Path(__file__).resolve().parents[1]
# the quickstart shrunk to seconds: a 2 x 12 HM-LSTM on 6,000 synthetic characters
TINY = [
    "--config", str(ROOT / "configs" / "quickstart.yaml"),
    "--data.init_args.num_chars=6000", "--data.init_args.batch_size=4", "--data.init_args.seq_len=20",
    "--model.init_args.embedding_dim=8",
    "--model.init_args.stack.init_args.hidden_sizes=[12, 12]",
    "--model.init_args.boundary_entropy_target=[0.155]",  # the quickstart names two boundary layers; this stack has one
    "--model.init_args.head.init_args.embed_dim=12",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu",
]


def tiny(tmp_path, *extra):
    """``TINY`` writing its run folder and cache under ``tmp_path``."""
    return TINY + [f"--trainer.default_root_dir={tmp_path}", f"--data.init_args.cache_dir={tmp_path / 'cache'}", *extra]


EVERY = 5  # steps between the periodic checkpoints of RESUMABLE
# 3000 symbols: 2700 of training in 4 streams of 675, 33 windows of 20 per epoch; a CSV log of
# every step and a checkpoint every EVERY steps, so that runs can be killed and compared step by step
RESUMABLE = [
    "--config", str(ROOT / "configs" / "quickstart.yaml"),
    "--seed_everything=0",
    "--data.init_args.num_chars=3000", "--data.init_args.batch_size=4", "--data.init_args.seq_len=20",
    "--model.init_args.embedding_dim=8",
    "--model.init_args.stack.init_args.hidden_sizes=[12, 12]",
    "--model.init_args.boundary_entropy_target=[0.155]",
    "--model.init_args.head.init_args.embed_dim=12",
    "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1", "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
    f"--trainer.callbacks.every_n_train_steps={EVERY}",
    "--trainer.callbacks.save_top_k=-1",
    "--trainer.callbacks.filename=step{step}",
]


def fit_subprocess(root: Path, *extra: str, wait: bool = True) -> subprocess.Popen:
    """``hmrnn fit`` of ``RESUMABLE`` in a subprocess through the installed console script (the real
    entry point), one thread, its run under ``root``; with ``wait`` it must exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled",
           "HMRNN_CACHE_DIR": str(root.parent / "cache"), "PYTHONUNBUFFERED": "1"}
    script = Path(sys.executable).with_name("hmrnn")
    entry = [sys.executable, str(script)] if script.is_file() else [sys.executable, "-m", "hmrnn_lightning.cli"]
    cmd = [*entry, "fit", *RESUMABLE,
           f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=1800)
        assert proc.returncode == 0, out[-3000:]
    return proc


def step_checkpoints(root: Path) -> list[Path]:
    """The periodic ``step*.ckpt`` files written anywhere under ``root``."""
    return sorted(root.rglob("step*.ckpt"))


def write_iam_tree(root, n_lines=30, rng=None):
    """A small IAM-OnDB-like folder: ``n_lines`` random stroke files, one truncated XML file,
    one with no points, and an empty ``splits`` folder."""
    rng = rng or np.random.default_rng(0)
    folder = root / "lineStrokes" / "a01" / "a01-000"
    folder.mkdir(parents=True)
    for k in range(n_lines):
        strokes = []
        x, y = 1000.0, 1000.0
        for _ in range(int(rng.integers(3, 6))):
            pts = []
            for _ in range(int(rng.integers(20, 40))):
                x, y = x + rng.normal(3, 2), y + rng.normal(0, 2)
                pts.append(f'<Point x="{x:.0f}" y="{y:.0f}" time="0"/>')
            strokes.append('<Stroke colour="black">' + "".join(pts) + "</Stroke>")
        (folder / f"a01-000u-{k:02d}.xml").write_text("<WhiteboardCaptureSession><StrokeSet>" + "".join(strokes) + "</StrokeSet></WhiteboardCaptureSession>")
    (folder / "a01-000u-98.xml").write_text("<WhiteboardCaptureSession><StrokeSet>")  # truncated
    (folder / "a01-000u-99.xml").write_text("<WhiteboardCaptureSession><StrokeSet></StrokeSet></WhiteboardCaptureSession>")
    (root / "splits").mkdir()
    return root

# --- the fast paths against the reference loop (tests/engine) ---------------------------------


def run_with_gradients(stack, head, x, y, state, seed, all_outputs=True):
    """Loss with every output of the stack in it (hidden, boundaries, logits, final state),
    so that every gradient path of the fast backward is exercised; returns the gradients of
    the parameters, the input and the initial state."""
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    state = [type(s)(*(t.clone().requires_grad_() for t in s)) for s in state]
    out = stack(x, state)
    step_nll = head.nll(head(out.hidden), y)
    loss = step_nll.mean()
    aux = stack.estimator.auxiliary_loss(out, step_nll.detach())
    if aux is not None:
        loss = loss + aux
    if all_outputs:
        weights = torch.linspace(0.1, 1.0, out.boundaries.numel(), dtype=x.dtype).view_as(out.boundaries)
        loss = loss + 0.1 * (weights * out.boundaries).sum() + 0.01 * out.boundary_logits.pow(2).mean()
        loss = loss + sum(0.1 * (s.h.sum() + s.c.pow(2).mean() + s.z.sum()) for s in out.state)
    stack.zero_grad()
    head.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in stack.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.clone()
    for l, s in enumerate(state):
        for name, t in zip("hcz", s):
            # None where nothing reads it (the top layer's z, without flush_gradient): a zero gradient
            grads[f"state{l}.{name}"] = t.grad.clone() if t.grad is not None else torch.zeros_like(t)
    return out, loss.detach(), grads


def normwise(rel):
    """|a - b|_max <= rel * |a|_max: for tensors whose entries span many magnitudes."""

    def check(actual, expected, msg=None):
        err = (actual - expected).abs().max().item()
        assert err <= rel * expected.abs().max().item() + 1e-12, (msg, err, expected.abs().max().item())

    return check


def close(tol):
    def check(actual, expected, msg=None):
        torch.testing.assert_close(actual, expected, **tol, msg=(lambda m: f"{msg}: {m}") if msg else None)

    return check


def compare(estimator, layer_norm, dtype, check, device="cpu", impl="sequence", all_outputs=True, boundary_bias=0.0,
            steps=30, reference_hook=None, **stack_options):
    torch.manual_seed(0)
    ref = HMStack(6, [16, 12, 10], estimator(slope=2.0), layer_norm=layer_norm, impl="reference", **stack_options)
    with torch.no_grad():
        for cell in ref.cells:
            cell.bias[-1] = boundary_bias  # 0: layer 1 fires on about 40% of steps, layers 2-3 copy on 37% and 69%
    head = SoftmaxHead([16, 12, 10], 9, 8)
    ref, head = ref.to(device, dtype), head.to(device, dtype)
    fast = copy.deepcopy(ref)
    fast.impl = impl
    assert fast.active_impl() == impl
    x, y = torch.randn(5, steps, 6, dtype=dtype, device=device), torch.randint(0, 9, (5, steps), device=device)
    state = [s.detach() for s in ref(torch.randn(5, 7, 6, dtype=dtype, device=device)).state]  # non-zero start, some z = 1
    if reference_hook is not None:  # e.g. the Bernoulli draws of the fast path, replayed
        with reference_hook():
            a, la, ga = run_with_gradients(ref, head, x, y, state, seed=1, all_outputs=all_outputs)
    else:
        a, la, ga = run_with_gradients(ref, head, x, y, state, seed=1, all_outputs=all_outputs)
    b, lb, gb = run_with_gradients(fast, head, x, y, state, seed=1, all_outputs=all_outputs)
    if ref.estimator.discrete:
        assert torch.equal(a.boundaries, b.boundaries)
    else:
        check(b.boundaries, a.boundaries, "boundaries")
    assert 0 < a.boundaries[..., :2].mean() < 1
    if boundary_bias == 0.0:
        assert a.operations[..., 1:, 1].mean() > 0.1  # upper layers copy on some rows
        assert a.operations[..., 0].mean() > 0.1 and a.operations[..., 2].mean() > 0.1  # and update, and flush
    for l, (ha, hb) in enumerate(zip(a.hidden, b.hidden)):
        check(hb, ha, f"h{l + 1}")
    check(b.boundary_logits, a.boundary_logits, "boundary logits")
    for l, (sa, sb) in enumerate(zip(a.state, b.state)):
        for name, ta, tb in zip("hcz", sa, sb):
            check(tb, ta, f"final state {name}{l + 1}")
    check(b.operations, a.operations, "operations")
    check(lb, la, "loss")
    assert ga.keys() == gb.keys()
    for name in ga:
        check(gb[name], ga[name], name)


def replay_bernoulli_draws(batch: int, layers: int, steps: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The kernel windows (Triton, and the fused CPU kernels) draw their Bernoulli noise as one
    ``torch.rand(T, L - 1, B)`` after the run's seed; the reference calls ``torch.bernoulli`` per
    step and layer. This makes the reference decide from the same uniform numbers: 1 where
    ``u < p``. For :func:`compare`'s ``reference_hook`` (its runs seed 1)."""

    @contextlib.contextmanager
    def hook():
        noise = torch.rand(steps, layers - 1, batch, generator=torch.Generator(device).manual_seed(1), device=device, dtype=dtype)
        calls = iter(range(steps * (layers - 1)))

        def bernoulli(p):
            n = next(calls)
            return (noise[n // (layers - 1), n % (layers - 1)].to(p.dtype) < p).to(p.dtype)

        original = torch.bernoulli
        torch.bernoulli = bernoulli
        try:
            yield
        finally:
            torch.bernoulli = original

    return hook
