"""CUDA-graph capture around a backend (``HMStack(cuda_graph=True)``): :class:`CudaGraphs`.

A window is hundreds of small launches, each costing the host microseconds; a CUDA graph
records them once and replays them as one. :func:`torch.cuda.make_graphed_callables` captures a
window's forward and backward; the wrapper keeps one capture per kind of window, in itself
(copies and pickles start empty), and drops them when the parameters move.

It needs a backend that never reads a value back to the host inside a window (Triton's), and
captures only windows with gradients and without oracle ``boundaries`` (others run uncaptured),
keyed by batch, length, dtype, autocast dtype, estimator rule and which inputs need gradients:
a new key is captured on first sight (three warm-up runs), at most :data:`MAX_CAPTURES`.
Parameters must be updated in place (every ``torch.optim`` optimizer does); the slope is read
from the estimator's buffer, so annealing needs no new capture. The hidden states returned are
the graph's static tensors, valid until the next replay (the loss reads them before that); the
rest are copies. Sampling steps are captured too, one graph per batch size.

Status: written without a GPU (the CPU interpreter cannot run CUDA graphs), so ``cuda_graph`` is
off by default until ``bench/gpu_checks.sh`` has measured it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hmrnn_lightning.engine.backend import Backend
from hmrnn_lightning.engine.plan import WindowPlan, flatten_states, kernel_mode, matmul_dtype, unflatten_states, window_outputs
from hmrnn_lightning.states import LayerState

#: The most captures one wrapper keeps (training windows, the last short window of an epoch, steps).
MAX_CAPTURES = 4


class _Window(nn.Module):
    """A backend's window as a module whose parameters are the plan's, so that the graphed
    backward returns their gradients. Never registered under the stack (not in checkpoints)."""

    def __init__(self, inner: Backend, plan: WindowPlan) -> None:
        super().__init__()
        self.inner, self.plan = inner, plan
        self.weights = nn.ParameterList([p for p in plan.flat_weights() if isinstance(p, nn.Parameter)])

    def forward(self, x: Tensor, *flat_state: Tensor) -> tuple[Tensor, ...]:
        hidden, z_all, logits, final = self.inner.window(self.plan, x, unflatten_states(flat_state), None)
        return (*hidden, z_all, logits, *flatten_states(final))


def _without_cast_cache(mm_dtype: torch.dtype | None) -> torch.autocast:
    """The autocast in force (``mm_dtype``, or off) without its weight-cast cache: a cast cached
    while warming up or capturing would be read by every replay, and ``make_graphed_callables``
    refuses the cache."""
    return torch.autocast("cuda", dtype=mm_dtype or torch.bfloat16, enabled=mm_dtype is not None, cache_enabled=False)


class CudaGraphs(Backend):
    """``inner`` with its CUDA windows (with gradients) and steps captured and replayed.

    Args:
        inner: the backend whose work is captured; it must not synchronise with the host.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self._captures: dict = {}
        self._where: tuple | None = None
        self._hooks: list = []

    def __getstate__(self) -> dict:
        return {"inner": self.inner}  # captures and hooks belong to this object's tensors only

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["inner"])

    def why_not(self, stack, device: torch.device | None = None) -> str | None:
        return self.inner.why_not(stack, device)

    def _store(self, plan: WindowPlan) -> dict:
        """The captures, dropped when the plan's tensors move (a graph reads its tensors at the
        addresses they had at capture); the first call also hooks the parameters' gradients."""
        where = tuple(p.data_ptr() for p in plan.flat_weights()) + (plan.estimator.slope.data_ptr(),)
        if where != self._where:
            self._captures, self._where = {}, where
        if not self._hooks:
            # the graphed backward returns its own static buffers as the parameters' gradients,
            # and autograd adopts such a buffer as p.grad when that is None: the next replay would
            # overwrite it. A hook hands autograd a copy instead.
            self._hooks = [p.register_hook(torch.clone) for p in plan.flat_weights() if p.requires_grad]
        return self._captures

    def window(self, plan: WindowPlan, x: Tensor, state: list[LayerState], boundaries: Tensor | None):
        weights_need_grad = any(p.requires_grad for p in plan.flat_weights())
        if not (x.is_cuda and boundaries is None and torch.is_grad_enabled() and weights_need_grad):
            return self.inner.window(plan, x, state, boundaries)
        flat_state = [t.contiguous() for t in flatten_states(state)]
        mm_dtype = matmul_dtype(x)
        key = (tuple(x.shape), x.dtype, mm_dtype, kernel_mode(plan.estimator), x.requires_grad,
               tuple(t.requires_grad for t in flat_state))
        captures = self._store(plan)
        fn = captures.get(key)
        if fn is None:
            if len(captures) >= MAX_CAPTURES:
                return self.inner.window(plan, x, state, boundaries)
            sample = (x.detach().clone().requires_grad_(x.requires_grad),
                      *[t.detach().clone().requires_grad_(t.requires_grad) for t in flat_state])
            with _without_cast_cache(mm_dtype):
                fn = torch.cuda.make_graphed_callables(_Window(self.inner, plan), sample, allow_unused_input=True)
            captures[key] = fn
        with _without_cast_cache(mm_dtype):
            outs = fn(x, *flat_state)
        hidden, z_all, logits, final = window_outputs(outs, plan.num_layers)
        return hidden, z_all.clone(), logits.clone(), [LayerState(*(t.clone() for t in s)) for s in final]

    def step(self, plan: WindowPlan, x: Tensor, state: list[LayerState]):
        """One sampling step through a captured graph (one per batch size): the step copies ``x``
        and the state into the capture's static inputs, replays, and copies the outputs out, so
        what it returns stays valid after the next step."""
        if not x.is_cuda:
            return self.inner.step(plan, x, state)
        flat_state = flatten_states(state)
        mm_dtype = matmul_dtype(x)
        key = ("step", tuple(x.shape), x.dtype, mm_dtype, kernel_mode(plan.estimator))
        captures = self._store(plan)
        entry = captures.get(key)
        if entry is None:
            if len(captures) >= MAX_CAPTURES:
                return self.inner.step(plan, x, state)
            entry = captures[key] = self._capture_step(plan, x, flat_state, mm_dtype)
        graph, static_x, static_state, static_out = entry
        torch._foreach_copy_([static_x, *static_state], [x, *flat_state])
        graph.replay()
        outs = [torch.empty_like(t) for t in static_out]
        torch._foreach_copy_(outs, static_out)
        return window_outputs(outs, plan.num_layers)

    def _capture_step(self, plan: WindowPlan, x: Tensor, flat_state: list[Tensor], mm_dtype):
        def run(static_x, static_state):
            hidden, z_all, logits, final = self.inner.step(plan, static_x, unflatten_states(static_state))
            return [*hidden, z_all, logits, *flatten_states(final)]

        static_x, static_state = x.clone(), [t.clone() for t in flat_state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), _without_cast_cache(mm_dtype):  # warm-up: Triton compiles, the allocator settles
            for _ in range(2):
                run(static_x, static_state)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), _without_cast_cache(mm_dtype):
            static_out = run(static_x, static_state)
        return graph, static_x, static_state, static_out
