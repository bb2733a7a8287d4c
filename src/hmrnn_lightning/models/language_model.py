"""Character-level language model: embedding -> recurrent stack -> head."""

from __future__ import annotations

import math
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from hmrnn_lightning.cells.base import LayerState
from hmrnn_lightning.cells.stack import RecurrentStack, StackOutput, State, detach_state
from hmrnn_lightning.estimators.base import BoundaryEstimator
from hmrnn_lightning.heads.base import Head
from hmrnn_lightning.models.common import (
    announce_stack_path, check_rate_target, clip_gradients_by_default, default_callbacks, entropy_guide, rate_penalty,
)
from hmrnn_lightning.metrics import BitsPerCharacter, BoundaryF1, BoundaryStatistics, EndNeighbourRates, SeparatorRates

StackFactory = Callable[[int], RecurrentStack]
HeadFactory = Callable[[list[int], int], Head]


class HMRNNLanguageModel(pl.LightningModule):
    """Next-character model of section 4.1, trained with stateful truncated BPTT.

    Batches are ``(inputs, targets)``, both ``[batch, time]`` symbol ids, cut in order from
    ``batch`` contiguous streams; the last state of a training batch (detached) starts the
    next one. The carried state is reset at the start of every training epoch and of every
    validation / test run, and carried across the batches of that run.

    The paper's recipe is the default: embedding 128 without nonlinearity, Adam with lr
    0.002, gradient norm clipped at 1, learning rate divided by 50 when validation NLL
    stops falling.

    Args:
        vocab_size: number of symbols (linked from the datamodule by the CLI).
        stack: builds the recurrent stack from the input size (the embedding size); in YAML a
            ``class_path`` with ``init_args`` minus ``input_size``, in Python e.g.
            ``functools.partial(HMStack, hidden_sizes=[512] * 3, estimator=StepEstimator())``.
        head: builds the head from the layer sizes and the vocabulary size.
        embedding_dim: size of the input embedding.
        lr: initial Adam learning rate.
        lr_decay_factor: divide the learning rate by this when validation BPC stops falling.
        lr_patience: validation runs without a new best before dividing, counted at every
            validation (every ``val_check_interval`` steps or every epoch). The paper divides
            "when the validation negative log-likelihood stopped decreasing"; 2 (divide after
            the third stale validation) keeps one noisy validation from dividing it, which
            patience 0 did.
        grad_clip_norm: clip the global gradient norm to this (None: no clipping);
            a Trainer ``gradient_clip_val`` overrides it.
        vocab: the symbols, stored in checkpoints so a model can be used without its data.
        boundary_tolerance: boundary F1 is logged exact and, when this is > 0, also allowing
            this many steps of offset (``boundary_f1_tol1/...``).
        boundary_rate_target: per boundary layer (bottom first) a firing rate to pull it
            towards, or None to leave a layer free; None (the default, and the paper: "we do not
            pose any constraint on the number of boundaries") adds nothing. Not in the paper: a
            research option against dead levels (a layer firing on almost every step or almost
            none, where the estimator's gradient is zero: it flows only where ``|a z~| < 1``).
            The penalty is ``boundary_rate_weight * sum_l (rate_l - target_l)^2``, ``rate_l`` the
            share of the window's steps whose logit is above 0 (where the detector fires), with
            a straight-through gradient of 1 for each logit's step: a sigmoid of the logit would
            vanish on saturated logits as the estimator's gradient does. Logged as
            ``train/rate_penalty``.
        boundary_rate_weight: the penalty's weight against the next-symbol NLL (nats).
        boundary_entropy_target: per boundary layer (bottom first) the share of each training
            window's positions, those where the model's own next-symbol entropy is highest, that
            the layer's boundary logit is pulled towards (binary cross-entropy; None leaves a
            layer free). None (the default, and the paper) adds nothing. Not in the paper: a
            self-supervised signal (the model's own uncertainty, detached) that says *where* to
            fire, where the rate target only says how often. In about 190 quickstart runs the
            likelihood alone put a layer on the word ends (F1 >= 0.9) in one seed of three at
            best; the model's most uncertain positions are the ends of words and phrases (what
            follows is least known there), and with this target layer 1 landed on the word ends
            in all ten seeds tried (F1 0.975-0.999; docs/quickstart_search.md, seventh attempt),
            as did layer 2 on PTB in five of five (docs/study.md). The entropy is the head's
            outputs read as next-symbol logits. The shares are a prior on how often a layer
            fires; far from the text's word rate, F1 is capped by the excess firing.
            Logged as ``train/entropy_guide``.
        boundary_entropy_weight: its weight against the next-symbol NLL (nats).
    """

    def __init__(
        self,
        vocab_size: int,
        stack: StackFactory,
        head: HeadFactory,
        embedding_dim: int = 128,
        lr: float = 0.002,
        lr_decay_factor: float = 50.0,
        lr_patience: int = 2,
        grad_clip_norm: float | None = 1.0,
        vocab: list[str] | None = None,
        boundary_tolerance: int = 1,
        boundary_rate_target: list[float | None] | None = None,
        boundary_rate_weight: float = 1.0,
        boundary_entropy_target: list[float | None] | None = None,
        boundary_entropy_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if vocab_size <= 0:
            raise ValueError(f"HMRNNLanguageModel: vocab_size must be positive, got {vocab_size}")
        if vocab is not None and len(vocab) != vocab_size:
            raise ValueError(f"HMRNNLanguageModel: vocab has {len(vocab)} symbols but vocab_size is {vocab_size}")
        if embedding_dim <= 0:
            raise ValueError(f"HMRNNLanguageModel: embedding_dim must be positive, got {embedding_dim}")
        if lr <= 0 or lr_decay_factor < 1:
            raise ValueError(f"HMRNNLanguageModel: need lr > 0 and lr_decay_factor >= 1, got {lr}, {lr_decay_factor}")
        self.save_hyperparameters()  # under the CLI these are the resolved config, so checkpoints reload
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.stack = stack if isinstance(stack, RecurrentStack) else stack(embedding_dim)
        if not isinstance(self.stack, RecurrentStack):
            raise TypeError(f"HMRNNLanguageModel: stack must build a RecurrentStack, got {type(self.stack).__name__}")
        if self.stack.input_size != embedding_dim:
            raise ValueError(
                f"HMRNNLanguageModel: the stack takes {self.stack.input_size} input features, the embedding has {embedding_dim}"
            )
        self.head = head if isinstance(head, Head) else head(list(self.stack.hidden_sizes), vocab_size)
        self.vocab = list(vocab) if vocab is not None else None
        #: how the training data wrote its text (``{"datamodule": class path, "options": {...}}``), so
        #: text given to the model is read the same way; from the datamodule while training, else the checkpoint
        self.text_reading: dict | None = None
        L = self.stack.num_layers
        self.train_bpc, self.val_bpc, self.test_bpc = BitsPerCharacter(), BitsPerCharacter(), BitsPerCharacter()
        self.val_boundaries, self.test_boundaries = BoundaryStatistics(L), BoundaryStatistics(L)
        self._carried: dict[str, State | None] = {"train": None, "val": None, "test": None}
        self._f1: dict[str, list[tuple[str, Metric]]] = {}
        self._separator_rates: dict[str, SeparatorRates | None] = {}
        boundary_layers = self.stack.num_layers - 1 if self.estimator is not None else 0
        check_rate_target(type(self).__name__, boundary_rate_target, boundary_rate_weight, boundary_layers)
        check_rate_target(type(self).__name__, boundary_entropy_target, boundary_entropy_weight, boundary_layers,
                          name="boundary_entropy")

    def rate_penalty(self, boundary_logits: Tensor) -> Tensor | None:
        """The ``boundary_rate_target`` penalty for a window's logits ``[B, T, L - 1]`` (None without one)."""
        return rate_penalty(boundary_logits, self.hparams.get("boundary_rate_target"), self.hparams.boundary_rate_weight)

    def entropy_guide(self, boundary_logits: Tensor, logits: Tensor) -> Tensor | None:
        """The ``boundary_entropy_target`` loss for a window (None without one)."""
        return entropy_guide(boundary_logits, logits, self.hparams.get("boundary_entropy_target"),
                             self.hparams.get("boundary_entropy_weight"))

    # -- model ---------------------------------------------------------------------------
    @property
    def estimator(self) -> BoundaryEstimator | None:
        return getattr(self.stack, "estimator", None)

    def forward(self, inputs: Tensor, state: State | None = None, boundaries: Tensor | None = None) -> tuple[Tensor, StackOutput]:
        """Logits ``[batch, time, vocab]`` and the stack's output for symbol ids ``[batch, time]``."""
        if inputs.dim() != 2:
            raise ValueError(f"HMRNNLanguageModel: expected symbol ids of shape [batch, time], got {tuple(inputs.shape)}")
        out = self.stack(self.embedding(inputs), state, boundaries)
        return self.head(out.hidden), out

    @property
    def has_boundaries(self) -> bool:
        """Whether the stack has boundary detectors (an HM stack of two layers or more); a stack
        without them (the LSTM baselines) logs no boundary rates, F1 or operation shares."""
        return self.estimator is not None and self.stack.num_layers > 1

    # -- truncated BPTT state --------------------------------------------------------------
    def _state_for(self, stage: str, batch_size: int) -> State | None:
        state = self._carried[stage]
        if state is not None and state[0].h.shape[0] != batch_size:
            state = None  # a shorter final batch starts fresh rather than failing
        return state

    def reset_carried_state(self, stage: str) -> None:
        """Start ``stage``'s next window from zeros (also used after a skipped non-finite step)."""
        self._carried[stage] = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The state restarts with the epoch's first window. Keyed on batch_idx rather than on the
        # epoch-start hook, because a run resumed mid-epoch also starts its epoch there and must
        # keep the carried state restored from the checkpoint.
        state = self._carried["train"]
        if batch_idx == 0 or state is None:
            self._carried["train"] = None
        elif state[0].h.device != self.device:  # restored from a checkpoint onto the CPU
            self._carried["train"] = [LayerState(*(t.to(self.device) for t in s)) for s in state]

    def on_validation_epoch_start(self) -> None:
        self._carried["val"] = None

    def on_test_epoch_start(self) -> None:
        self._carried["test"] = None

    def _run(self, batch: Any, stage: str) -> tuple[Tensor, StackOutput, Tensor | None, Tensor]:
        """Per-step NLL, the stack's output, the known boundaries (if the batch has them) and
        the logits. Batches are ``(inputs, targets)`` or ``(inputs, targets, known_boundaries)``."""
        inputs, targets, *rest = batch
        logits, out = self(inputs, self._state_for(stage, inputs.shape[0]))
        self._carried[stage] = detach_state(out.state)
        return self.head.nll(logits, targets), out, (rest[0] if rest else None), logits

    def _boundary_f1(self, stage: str, labels: Tensor) -> list[tuple[str, Metric]]:
        """Created on the first batch with known boundaries, named after the datamodule's levels:
        exact positions, and (when ``boundary_tolerance`` > 0) within that many steps, logged
        with a ``_tol{k}`` suffix. A layer that fires on the symbol after each word end (as the
        paper's Figure 3 shows) scores near 0 exactly and near 1 with tolerance 1; the rates on
        the symbols before and after each word end (:class:`EndNeighbourRates`, the ``word``
        level or the first) say which side it is."""
        metrics = self._f1.get(stage)
        if metrics is None:
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            levels = dm.boundary_levels() if dm is not None and hasattr(dm, "boundary_levels") else None
            if levels is None or len(levels) != labels.shape[-1]:
                levels = [f"level{k + 1}" for k in range(labels.shape[-1])]
            tolerances = sorted({0, self.hparams.boundary_tolerance})
            metrics = [
                ("" if tol == 0 else f"_tol{tol}", BoundaryF1(self.stack.num_layers - 1, levels, tol).to(labels.device))
                for tol in tolerances
            ]
            word = levels.index("word") if "word" in levels else 0
            metrics.append(("", EndNeighbourRates(self.stack.num_layers - 1, word).to(labels.device)))
            self._f1[stage] = metrics
        return metrics

    def _separator_metric(self, stage: str, device: torch.device) -> SeparatorRates | None:
        """Per-layer firing rates on separators and on other symbols; the separators are the
        datamodule's ``word_end_symbols`` (None without a datamodule or a vocabulary)."""
        if stage not in self._separator_rates:
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            symbols = getattr(dm, "word_end_symbols", None) if dm is not None else None
            ids = [self.vocab.index(s) for s in (symbols or ()) if self.vocab is not None and s in self.vocab]
            self._separator_rates[stage] = SeparatorRates(self.stack.num_layers - 1, ids).to(device) if ids else None
        return self._separator_rates[stage]

    # -- steps -------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """The loss, with the window's boundaries and operations (detached) for callbacks such
        as :class:`~hmrnn_lightning.callbacks.TrainingHealth` (the loss alone for a stack without boundaries)."""
        step_nll, out, _, logits = self._run(batch, "train")
        loss = step_nll.mean()
        total = loss
        if self.estimator is not None:
            aux = self.estimator.auxiliary_loss(out, step_nll.detach())
            if aux is not None:
                total = total + aux
                self.log("train/aux_loss", aux, batch_size=step_nll.shape[0])
            self.log("train/slope", self.estimator.slope, batch_size=step_nll.shape[0])
            penalty = self.rate_penalty(out.boundary_logits)
            if penalty is not None:
                total = total + penalty
                self.log("train/rate_penalty", penalty, batch_size=step_nll.shape[0])
            guide = self.entropy_guide(out.boundary_logits, logits)
            if guide is not None:
                total = total + guide
                self.log("train/entropy_guide", guide, batch_size=step_nll.shape[0])
        B = step_nll.shape[0]
        self.log("train/bpc", loss / math.log(2.0), prog_bar=True, batch_size=B)
        if not self.has_boundaries:
            return {"loss": total}
        rates = out.boundaries.float().mean(dim=(0, 1))
        for l in range(self.stack.num_layers - 1):
            self.log(f"train/boundary_rate/l{l + 1}", rates[l], batch_size=B)
        return {"loss": total, "boundaries": out.boundaries.detach(), "operations": out.operations.detach()}

    def _eval_step(self, batch: Any, stage: str, bpc: BitsPerCharacter, stats: BoundaryStatistics) -> None:
        step_nll, out, labels, _ = self._run(batch, stage)
        bpc.update(step_nll)
        if not self.has_boundaries:
            return
        stats.update(out.boundaries, out.operations)
        separators = self._separator_metric(stage, out.boundaries.device)
        if separators is not None:
            separators.update(out.boundaries, batch[0])
        if labels is not None:
            for _, metric in self._boundary_f1(stage, labels):
                metric.update(out.boundaries, labels)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_bpc, self.val_boundaries)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_bpc, self.test_boundaries)

    def _log_epoch(self, stage: str, bpc: BitsPerCharacter, stats: BoundaryStatistics) -> Tensor:
        # metrics are already reduced across ranks by torchmetrics, hence sync_dist=False
        value = bpc.compute()
        self.log(f"{stage}/bpc", value, prog_bar=True, sync_dist=False)
        self.log(f"{stage}/nll", value * math.log(2.0), sync_dist=False)
        separators = self._separator_rates.get(stage)
        metrics = [("", stats)] + self._f1.get(stage, []) + ([("", separators)] if separators is not None else [])
        metrics = metrics if self.has_boundaries else []
        for suffix, metric in metrics:
            for key, v in metric.compute().items():
                name, _, tag = key.partition("/")
                self.log(f"{stage}/{name}{suffix}/{tag}" if tag else f"{stage}/{key}{suffix}", v, sync_dist=False)
            metric.reset()
        bpc.reset()
        return value

    def on_validation_epoch_end(self) -> None:
        self._step_plateau(self._log_epoch("val", self.val_bpc, self.val_boundaries))

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_bpc, self.test_boundaries)

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        """Adam, and ``ReduceLROnPlateau`` on ``val/bpc`` stepped by the model at every validation
        (:meth:`_step_plateau`), not by Lightning (:meth:`lr_scheduler_step` ignores its calls)."""
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=1.0 / self.hparams.lr_decay_factor, patience=self.hparams.lr_patience
        )
        # Registered with Lightning so that checkpoints keep its state and LearningRateMonitor sees it.
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": plateau, "monitor": "val/bpc", "interval": "epoch", "strict": False},
        }

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Lightning's calls are ignored: it steps an ``interval: epoch`` scheduler at the end of a
        training epoch, which a run that validates every N steps may never reach (issue 21), and
        an ``interval: step`` one with a ``frequency`` counted in batches, which drifts from the
        validations (a last short epoch, ``val_check_interval`` as a fraction, accumulated
        gradients) and reads the validation before last. :meth:`_step_plateau` steps it instead."""

    def _step_plateau(self, value: Tensor) -> None:
        """One plateau step per validation during a fit, with that validation's BPC, however
        validation is scheduled (every N steps or every N epochs); not after the sanity check,
        nor in ``validate``."""
        trainer = self._trainer
        if trainer is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                config.scheduler.step(float(value))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients_by_default(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_fit_start(self) -> None:
        """Says which time loop the stack runs (:func:`announce_stack_path`)."""
        announce_stack_path(self)

    def configure_callbacks(self) -> list:
        """Fault detection and training-health logging on every run (:func:`default_callbacks`)."""
        return default_callbacks(self)

    def encode(self, text: str | list[str], what: str = "text") -> Tensor:
        """``[1, len(text)]`` symbol ids on the model's device for a text (one symbol per
        character) or a list of symbols; unknown symbols are an error."""
        if self.vocab is None:
            raise ValueError("HMRNNLanguageModel: this model has no vocabulary (train it with a datamodule)")
        index = {s: i for i, s in enumerate(self.vocab)}
        unknown = sorted({c for c in text if c not in index})
        if unknown:
            raise ValueError(f"the {what} contains symbols the model does not know: {unknown}")
        return torch.tensor([[index[c] for c in text]], device=self.embedding.weight.device)

    # -- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prime: str = "", length: int = 200, temperature: float = 1.0, top_k: int | None = None) -> str:
        """Read ``prime``, then sample ``length`` symbols one at a time, carrying the state.

        The unknown symbol (which stands for symbols unseen in training) is never sampled.
        With ``top_k``, each step samples among the ``top_k`` most likely symbols only.
        Needs the vocabulary (stored in checkpoints written by the CLI).
        """
        from hmrnn_lightning.data.vocab import UNK

        if self.vocab is None:
            raise ValueError("HMRNNLanguageModel.generate: this model has no vocabulary (train it with a datamodule)")
        if not (temperature > 0 and math.isfinite(temperature)):  # nan compares false
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if length < 0 or (top_k is not None and top_k <= 0):
            raise ValueError(f"need length >= 0 and top_k > 0, got {length}, {top_k}")
        banned = [i for i, sym in enumerate(self.vocab) if sym == UNK]
        # an empty prime starts after an end of line (the start of a sentence), else after symbol 0
        start = prime or ("\n" if "\n" in self.vocab else None)
        ids = self.encode(start, "prime") if start else torch.zeros(1, 1, dtype=torch.long, device=self.embedding.weight.device)
        was_training = self.training
        self.eval()
        logits, out = self(ids)
        state, produced, cache = out.state, [], None
        for _ in range(length):
            scores = logits[:, -1].float()
            scores[:, banned] = float("-inf")
            # the best score is 0 before dividing: a tiny temperature sends the others to -inf, never to nan
            scores = (scores - scores.max(-1, keepdim=True).values) / temperature
            if top_k is not None and top_k < scores.shape[-1]:
                kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            nxt = torch.multinomial(probs, 1)
            produced.append(int(nxt))
            out = self.stack.step(self.embedding(nxt[:, 0]), state)  # skips the work COPY leaves out
            (logits, cache), state = self.head.step(out, cache), out.state
        self.train(was_training)
        return prime + "".join(self.vocab[i] for i in produced)

    @torch.no_grad()
    def analyse(self, text: str) -> tuple[Tensor, Tensor]:
        """Boundaries ``[time, layers]`` and hidden-state norms ``[time, layers]`` for a text."""
        ids = self.encode(text, "text")
        was_training = self.training
        self.eval()
        _, out = self(ids)
        self.train(was_training)
        norms = torch.stack([h[0].norm(dim=-1) for h in out.hidden], -1)
        return out.boundaries[0].cpu(), norms.cpu()

    # -- checkpoints ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["hmrnn_vocab"] = self.vocab
        checkpoint["hmrnn_carried_state"] = self._carried_state_to_save()
        checkpoint["hmrnn_text"] = self._text_reading_to_save()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("hmrnn_vocab") is not None:
            self.vocab = list(checkpoint["hmrnn_vocab"])
        self.text_reading = checkpoint.get("hmrnn_text")
        self._carried["train"] = self._carried_state_to_load(checkpoint.get("hmrnn_carried_state"))

    def _text_reading_to_save(self) -> dict | None:
        """The training datamodule's class and its ``text_options()`` (see ``text_reading``)."""
        trainer = self._trainer  # the property raises when no trainer is attached
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is None or not callable(getattr(dm, "text_options", None)):
            return self.text_reading
        cls = type(dm)
        return {"datamodule": f"{cls.__module__}.{cls.__qualname__}", "options": dict(dm.text_options())}

    def _carried_state_to_save(self) -> dict | None:
        """The truncated-BPTT state carried into the next training window, so a run resumed
        mid-epoch continues exactly (Lightning saves the windows' position). Under DDP every rank
        carries the state of its own streams: they are gathered on a leading rank axis (every rank
        takes part in writing a checkpoint, so the collective is safe here)."""
        state = self._carried["train"]
        if state is None:
            return None
        world = self.trainer.world_size if self._trainer is not None else 1

        def gather(t: Tensor) -> Tensor:  # [world, ...]; torch's own collective (Lightning's all_gather warns)
            if world == 1:
                return t.unsqueeze(0)
            parts = [torch.empty_like(t) for _ in range(world)]
            torch.distributed.all_gather(parts, t.contiguous())
            return torch.stack(parts)

        return {"world_size": world, "layers": [tuple(gather(t).detach().cpu() for t in layer) for layer in state]}

    def _carried_state_to_load(self, saved: dict | None) -> State | None:
        if not isinstance(saved, dict):
            return None  # none saved (or an older checkpoint): the next window starts fresh
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        if saved["world_size"] != world:
            return None  # other devices cut other streams; the windows' position check says so
        return [LayerState(*(t[rank] for t in layer)) for layer in saved["layers"]]
