"""Signs of a coming collapse, logged during training: gradient norm, boundary rates, operations."""

from __future__ import annotations

import copy
import math
import statistics
import sys
from collections import deque
from typing import Literal

import lightning.pytorch as pl
import torch

from hmrnn_lightning.metrics.boundaries import BoundaryStatistics


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``tensors`` together, without overflow: in float64 (a float32 sum of
    squares is inf past a norm of about 1.8e19, with every entry finite); on devices without
    float64 (MPS) each tensor is divided by its largest entry first."""
    if tensors[0].device.type == "mps":
        norms = []
        for t in tensors:
            top = t.detach().abs().amax().float()
            norms.append(top * torch.linalg.vector_norm(t.detach().float() / top.clamp_min(1e-30)))
        top = torch.stack(norms).amax()
        return top * torch.linalg.vector_norm(torch.stack(norms) / top.clamp_min(1e-30))
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.detach(), dtype=torch.float64) for t in tensors]))


class TrainingHealth(pl.Callback):
    """Every ``every_n_steps`` optimizer steps, logs under ``health/``:

    * ``grad_norm``: the global gradient norm before clipping, of that step (growing by orders
      of magnitude is how an exploding recurrence shows itself before it overflows);
    * per layer, over the steps since the last log: ``boundary_rate/l{k}``,
      ``{update,copy,flush}_frac/l{k}`` and ``unnested/l{k}`` (:class:`BoundaryStatistics`). A
      layer whose boundary rate goes to 0 or 1 has stopped segmenting.

    It also watches for **collapse**: a layer with a boundary detector (every layer but the top
    one) whose boundary rate over the last ``collapse_window`` optimizer steps (their training
    windows pooled) is below ``collapse_rate`` or above ``1 - collapse_rate`` is a dead level of the
    hierarchy (never firing, the layer above never updates; always firing, it segments nothing).
    Pooled rather than window by window: a layer firing on 99.2% of the symbols has windows
    at 98.9% now and then, and a rule that every window be out of range missed it (PTB without
    separators, docs/study.md).
    It is said once per layer, as one warning line naming the layer and the step, and kept in
    :attr:`collapsed` (``{layer: step}``, layers numbered from 1) for ``hmrnn compare`` and
    ``hmrnn ablate``, whose tables count collapsed layers per seed.

    And for an **exploding gradient**: the global gradient norm (before clipping) of every step
    against the median of the previous ``explosion_history`` steps; when it is ``explosion_factor``
    times that median or more in ``explosion_steps`` of the last 10 steps, one warning line names
    the step, the norm and the median (kept in :attr:`exploded`). Clipping bounds such a step's
    length, not its direction: in the one case measured (PTB without separators, seed 1 of the CPU
    config, docs/study.md) the norm went from 0.5 to 370 within 16 steps and the loss rose from
    2.4 to 3.5 BPC in the next 100. Non-finite norms are left to :class:`FaultDetection`.

    With ``on_explosion="rollback"`` it also acts: it keeps the weights and optimizer state of
    every ``snapshot_every``-th step (the last three, none taken while spikes are recent), and at
    an explosion it restores the newest one taken at least ``snapshot_every`` steps before the
    first spike (the norm was already growing a few steps before it: three times the median six
    steps ahead, in the measured case), multiplies the learning rate by ``rollback_lr_factor`` and
    starts the next window from a zero state; each time in one warning line, at most
    ``max_rollbacks`` times (the next explosion is said once, and nothing is done). The batches
    since the snapshot are not replayed, and the steps count on (``max_steps`` includes the
    discarded ones). The first
    snapshot is taken once the norm has a full history (``explosion_history`` steps of the fit), so
    the turbulence of the first steps is only said: in PTB seed 1 of the CPU config (norms up to
    4.5e8 by step 52) and seed 6 without separators (up to 1.3e18 by step 109) it passed by
    itself, and rolling back inside it (tried) ended 0.027 BPC worse at step 1,199 in the first and
    spent every rollback before step 146 in the second (docs/study.md).

    Reads the boundaries and operations a training step returns (``"boundaries"`` and
    ``"operations"`` in its output dict); models that return only a loss get the gradient
    norm alone.

    Args:
        every_n_steps: log interval in optimizer steps.
        collapse_window: optimizer steps over which a layer's rate must be out of range to be
            called collapsed (none is judged before that many steps).
        collapse_rate: the range's edge: a rate below it or above ``1 - collapse_rate`` is out.
        explosion_factor: a step's gradient norm this many times the recent median is a spike.
        explosion_steps: spikes within 10 steps that make an explosion (1 to 10).
        explosion_history: steps whose median is the yardstick; none is judged before 50.
        on_explosion: ``warn`` (say it once) or ``rollback`` (restore a snapshot, as above).
        snapshot_every: optimizer steps between snapshots (``rollback`` only).
        rollback_lr_factor: each rollback multiplies the learning rate by this (0 < factor <= 1).
        max_rollbacks: rollbacks at most in one fit.
    """

    def __init__(self, every_n_steps: int = 200, collapse_window: int = 300, collapse_rate: float = 0.01,
                 explosion_factor: float = 10.0, explosion_steps: int = 3, explosion_history: int = 200,
                 on_explosion: Literal["warn", "rollback"] = "warn", snapshot_every: int = 50,
                 rollback_lr_factor: float = 0.5, max_rollbacks: int = 3) -> None:
        if every_n_steps < 1:
            raise ValueError(f"TrainingHealth: every_n_steps must be >= 1, got {every_n_steps}")
        if collapse_window < 1 or not 0 < collapse_rate < 0.5:
            raise ValueError(f"TrainingHealth: need collapse_window >= 1 and 0 < collapse_rate < 0.5, got {collapse_window}, {collapse_rate}")
        if explosion_factor <= 1 or not 1 <= explosion_steps <= 10 or explosion_history < 50:
            raise ValueError(f"TrainingHealth: need explosion_factor > 1, 1 <= explosion_steps <= 10 and explosion_history >= 50, "
                             f"got {explosion_factor}, {explosion_steps}, {explosion_history}")
        if on_explosion not in ("warn", "rollback"):
            raise ValueError(f"TrainingHealth: on_explosion must be 'warn' or 'rollback', got {on_explosion!r}")
        if snapshot_every < 1 or not 0 < rollback_lr_factor <= 1 or max_rollbacks < 0:
            raise ValueError(f"TrainingHealth: need snapshot_every >= 1, 0 < rollback_lr_factor <= 1 and max_rollbacks >= 0, "
                             f"got {snapshot_every}, {rollback_lr_factor}, {max_rollbacks}")
        self.every_n_steps = every_n_steps
        self.collapse_window, self.collapse_rate = collapse_window, collapse_rate
        self.explosion_factor, self.explosion_steps = explosion_factor, explosion_steps
        self.on_explosion, self.snapshot_every = on_explosion, snapshot_every
        self.rollback_lr_factor, self.max_rollbacks = rollback_lr_factor, max_rollbacks
        #: ``(step of the explosion, step restored)`` per rollback
        self.rollbacks: list[tuple[int, int]] = []
        #: collapsed layers (numbered from 1) and the step each was found at
        self.collapsed: dict[int, int] = {}
        #: the step an exploding gradient was reported at, or None
        self.exploded: int | None = None
        self._counts: dict[int, deque[tuple[int, int]]] = {}  # layer -> (boundaries, symbols) of its last windows
        self._stats: BoundaryStatistics | None = None
        self._grad_norm: float | None = None
        self._norms: deque[float] = deque(maxlen=explosion_history)  # recent finite norms, spikes left out
        self._first_snapshot: int = explosion_history  # the fit's first step with a full history (moved on a resume)
        self._spikes: deque[int] = deque()  # steps of the spikes among the last 10 (pruned every step)
        self._snapshots: deque[tuple[int, dict, list[dict]]] = deque(maxlen=3)  # (step, weights, optimizer states)
        self._rollback_due: tuple | None = None  # the snapshot to restore after this step
        self._out_of_rollbacks = False  # said that an explosion came after the last rollback allowed

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        while self._spikes and self._spikes[0] <= trainer.global_step - 10:  # only the last 10 steps' spikes count
            self._spikes.popleft()
        grads = [p.grad.detach() for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        norm = float(global_norm(grads))
        if trainer.global_step % self.every_n_steps == 0:
            self._grad_norm = norm
        self._watch_explosion(norm, trainer.global_step, trainer)

    def _watch_explosion(self, norm: float, step: int, trainer: pl.Trainer) -> None:
        if not math.isfinite(norm):
            return
        median = statistics.median(self._norms) if len(self._norms) >= 50 else None
        if median is None or norm < self.explosion_factor * median:
            self._norms.append(norm)
            return
        self._spikes.append(step)
        if len(self._spikes) < self.explosion_steps:
            return
        what, count = "clipping bounds each step's length, not its direction", len(self._spikes)
        if self.on_explosion == "rollback":
            # the newest snapshot at least one interval before the first spike: the norm grows for
            # a few steps before it (three times the median six steps ahead, in the measured case)
            usable = [snap for snap in self._snapshots if snap[0] <= self._spikes[0] - self.snapshot_every]
            if len(self.rollbacks) >= self.max_rollbacks:
                if self._out_of_rollbacks:
                    return
                self._out_of_rollbacks = True
                what = f"no rollback left (max_rollbacks: {self.max_rollbacks}); {what}"
            elif usable:
                self._rollback_due, what = usable[-1], f"rolling back to step {usable[-1][0]}"
                self._spikes.clear()
            elif self.exploded is not None:
                return
            else:
                what = f"no snapshot from {self.snapshot_every} steps before step {self._spikes[0]} to roll back to; {what}"
        elif self.exploded is not None:
            return
        if self.exploded is None:
            self.exploded = step
        if trainer.is_global_zero:
            sys.stderr.write(f"hmrnn: warning: the gradient is exploding at step {step}: norm {norm:.3g}, {norm / median:.3g}x "
                             f"the median of the {len(self._norms)} steps before ({median:.3g}), in {count} of the last "
                             f"10 steps; {what}\n")
            sys.stderr.flush()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_snapshot = trainer.global_step + self._norms.maxlen  # a resumed fit starts its history again

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self._snapshots.append((trainer.global_step, weights, [copy.deepcopy(o.state_dict()) for o in trainer.optimizers]))

    def _roll_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Restore the snapshot :meth:`_watch_explosion` chose, lower the rate, reset the carried state."""
        (restored, weights, optimizer_states), self._rollback_due = self._rollback_due, None
        while self._snapshots[-1][0] > restored:  # later ones hold the growth that led here
            self._snapshots.pop()
        pl_module.load_state_dict(weights)
        lrs = []
        for optimizer, state in zip(trainer.optimizers, optimizer_states):
            now = [group["lr"] for group in optimizer.param_groups]
            optimizer.load_state_dict(copy.deepcopy(state))
            for group, lr in zip(optimizer.param_groups, now):
                group["lr"] = lr * self.rollback_lr_factor
                lrs.append(group["lr"])
        reset = getattr(pl_module, "reset_carried_state", None)
        if reset is not None:
            reset("train")  # the state carried from the last window was made by the weights just dropped
        self.rollbacks.append((step, restored))
        if trainer.is_global_zero:
            sys.stderr.write(f"hmrnn: warning: rolled back at step {step} to the weights and optimizer state of step {restored}, "
                             f"learning rate now {', '.join(f'{lr:.3g}' for lr in lrs)} (rollback {len(self.rollbacks)} of at "
                             f"most {self.max_rollbacks})\n")
            sys.stderr.flush()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step - 1  # the optimizer step this batch took
        if self._rollback_due is not None:
            self._roll_back(trainer, pl_module, step)
        elif (self.on_explosion == "rollback" and trainer.global_step % self.snapshot_every == 0
              and trainer.global_step >= self._first_snapshot and not self._spikes):
            self._snapshot(trainer, pl_module)
        if isinstance(outputs, dict) and "boundaries" in outputs:
            boundaries, operations = outputs["boundaries"], outputs["operations"]
            if self._stats is None or self._stats.num_layers != boundaries.shape[-1]:
                self._stats = BoundaryStatistics(boundaries.shape[-1]).to(boundaries.device)
            self._stats.update(boundaries, operations)
            self._watch_collapse(boundaries, step, trainer)
        if step % self.every_n_steps:
            return
        metrics = {} if self._grad_norm is None else {"health/grad_norm": self._grad_norm}
        if self._stats is not None:
            metrics.update({f"health/{k}": float(v) for k, v in self._stats.compute().items()})
            self._stats.reset()
        self._grad_norm = None
        # straight to the loggers: these are interval summaries, not per-step values for
        # Lightning to cache and repeat at its own log_every_n_steps
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _watch_collapse(self, boundaries: torch.Tensor, step: int, trainer: pl.Trainer) -> None:
        """Per layer with a detector, the rate over its last ``collapse_window`` windows."""
        fired = (boundaries[..., :-1].detach() > 0.5).sum(dim=(0, 1)).tolist()  # the top layer has no detector
        symbols = boundaries.shape[0] * boundaries.shape[1]
        for layer, count in enumerate(fired, 1):
            window = self._counts.setdefault(layer, deque(maxlen=self.collapse_window))
            window.append((count, symbols))
            if layer in self.collapsed or len(window) < self.collapse_window:
                continue
            rate = sum(c for c, _ in window) / sum(n for _, n in window)
            if self.collapse_rate <= rate <= 1 - self.collapse_rate:
                continue
            self.collapsed[layer] = step
            side, edge = ("below", self.collapse_rate) if rate < self.collapse_rate else ("above", 1 - self.collapse_rate)
            if trainer.is_global_zero:
                sys.stderr.write(f"hmrnn: warning: layer {layer} collapsed at step {step}: its boundary rate over the last "
                                 f"{len(window)} steps was {rate:.1%}, {side} {edge:.0%}: a dead level of the hierarchy\n")
                sys.stderr.flush()
