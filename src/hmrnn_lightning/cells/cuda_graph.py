"""CUDA-graph capture of a training window on the Triton path (``HMStack(cuda_graph=True)``).

A window of the HM-LSTM is hundreds of small launches (per layer and step: up to three matrix
products and one kernel, forward and backward), each costing the host some microseconds. A
CUDA graph records them once and replays them as one launch, so the GPU no longer waits on
Python. :func:`torch.cuda.make_graphed_callables` captures the window's forward and backward
as one autograd function; this module keeps one capture per kind of window.

What it requires, and what happens otherwise:
  * the Triton path (:mod:`~hmrnn_lightning.cells.triton_window`), which is dense and never
    reads a value back to the host inside the window;
  * training with gradients and no oracle ``boundaries``: evaluation, sampling and oracle
    runs take the ordinary path;
  * a fixed window: batch, length, dtype, autocast dtype, estimator mode (a Bernoulli
    estimator samples in training and thresholds in eval) and which inputs need gradients
    form the key of a capture. A new key is captured on first sight (three warm-up runs, then
    the capture); the last, shorter window of an epoch is one more key. At most
    :data:`MAX_CAPTURES` are kept per stack; beyond that, windows run without a graph.
  * parameters updated in place (every ``torch.optim`` optimizer does), since the graph reads
    them where they were at capture; the slope is read from the estimator's buffer, so
    annealing needs no new capture.

Each capture holds its window's activations in its own memory pool, so memory grows with the
number of captures, not with replays. The hidden states returned are the graph's static
tensors, valid until the next replay (the loss reads them before that); boundaries, logits and
the final state are copies. Captures are dropped when the stack's tensors move, and parameter
gradients are handed to autograd as copies (:func:`_copy_gradients_out` says why).

Sampling (:meth:`HMStack.step`) is captured too, one graph per batch size
(:func:`graphed_step`).

Status: written and reviewed without a GPU (the CPU interpreter cannot run CUDA graphs), so
``cuda_graph`` is off by default until ``bench/gpu_checks.sh`` has measured it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hmrnn_lightning.cells.base import LayerState
from hmrnn_lightning.cells.hm_lstm_kernel import (
    estimator_mode, flatten_states, matmul_dtype, unflatten_states, window_outputs,
)

#: The most captures one stack keeps (training windows, plus the last short window of an epoch).
MAX_CAPTURES = 4


def _captures(stack) -> dict:
    """The stack's captures, kept in a plain attribute (not a submodule, so not in checkpoints;
    :meth:`HMStack.__getstate__` leaves it out of copies). They are dropped when the stack's
    tensors move (``.cuda()`` after Lightning's teardown moved the model to the CPU, ``.to``):
    a graph reads its tensors at the addresses they had when it was captured."""
    where = tuple(p.data_ptr() for p in stack.parameters()) + (stack.estimator.slope.data_ptr(),)
    store = stack.__dict__.get("_cuda_graphs")
    if store is None or store["where"] != where:
        store = stack.__dict__["_cuda_graphs"] = {"where": where, "entries": {}}
        _copy_gradients_out(stack)
    return store["entries"]


def _copy_gradients_out(stack) -> None:
    """The graphed backward returns its own static buffers as the parameters' gradients, and
    autograd would adopt such a buffer as ``p.grad`` when that is None; the next replay would
    then overwrite it, and with gradient accumulation add a gradient to itself. A hook on each
    parameter hands autograd a copy instead (once per parameter; a copy of the weights' size
    per step, small beside the window's work)."""
    if stack.__dict__.get("_grad_copy_hooks"):
        return
    stack.__dict__["_grad_copy_hooks"] = [p.register_hook(torch.clone) for p in stack.parameters() if p.requires_grad]


class _Window(nn.Module):
    """The window as a module whose parameters are the stack's, so the graphed backward returns
    their gradients. Not registered under the stack (that would put it in checkpoints)."""

    def __init__(self, stack) -> None:
        super().__init__()
        self.stack = stack

    def forward(self, x: Tensor, *flat_state: Tensor) -> tuple[Tensor, ...]:
        from hmrnn_lightning.cells.triton_window import window_forward

        hidden, z_all, logits, final = window_forward(self.stack, x, unflatten_states(flat_state), None)
        return (*hidden, z_all, logits, *flatten_states(final))


def _without_cast_cache(mm_dtype: torch.dtype | None) -> torch.autocast:
    """The autocast in force (``mm_dtype``, or off), without its weight-cast cache: a cast cached
    while warming up or capturing would be read by every replay, and
    ``make_graphed_callables`` refuses the cache."""
    return torch.autocast("cuda", dtype=mm_dtype or torch.bfloat16, enabled=mm_dtype is not None, cache_enabled=False)


def applies(stack, x: Tensor, boundaries: Tensor | None) -> bool:
    return x.is_cuda and stack.training and boundaries is None and torch.is_grad_enabled()


def graphed_window(stack, x: Tensor, state: list[LayerState]):
    """``window_forward(stack, x, state, None)`` through a captured graph; None when no capture
    can be made for this window (then the caller runs it without one)."""
    flat_state = [t.contiguous() for t in flatten_states(state)]
    mm_dtype = matmul_dtype(x)
    key = (tuple(x.shape), x.dtype, mm_dtype, estimator_mode(stack.estimator), x.requires_grad,
           tuple(t.requires_grad for t in flat_state))
    captures = _captures(stack)
    fn = captures.get(key)
    if fn is None:
        if len(captures) >= MAX_CAPTURES:
            return None
        sample = (x.detach().clone().requires_grad_(x.requires_grad),
                  *[t.detach().clone().requires_grad_(t.requires_grad) for t in flat_state])
        with _without_cast_cache(mm_dtype):
            fn = torch.cuda.make_graphed_callables(_Window(stack), sample, allow_unused_input=True)
        captures[key] = fn
    with _without_cast_cache(mm_dtype):
        outs = fn(x, *flat_state)
    # the hidden states are the graph's buffers until the next replay (the loss reads them
    # before then); the small outputs are copied, so they can be kept
    hidden, z_all, logits, final = window_outputs(outs, stack.num_layers)
    return hidden, z_all.clone(), logits.clone(), [LayerState(*(t.clone() for t in s)) for s in final]


def graphed_step(stack, x: Tensor, state: list[LayerState]):
    """One sampling step (``x`` ``[batch, input]``, no gradient) through a captured graph, as
    ``window_forward`` on a window of one step returns it; None when no capture can be made.

    Sampling is launch-bound: a step is a few small products and kernels per layer. The
    capture holds static input buffers; a step copies ``x`` and the state into them (one
    multi-tensor copy), replays, and copies the outputs out (one more), so what it returns
    stays valid after the next step."""
    from hmrnn_lightning.cells.triton_window import window_forward

    flat_state = flatten_states(state)
    mm_dtype = matmul_dtype(x)
    key = ("step", tuple(x.shape), x.dtype, mm_dtype, estimator_mode(stack.estimator))
    captures = _captures(stack)
    entry = captures.get(key)

    def run(static_x, static_state):
        hidden, z_all, logits, final = window_forward(stack, static_x.unsqueeze(1), unflatten_states(static_state), None)
        return [*hidden, z_all, logits, *flatten_states(final)]

    if entry is None:
        if len(captures) >= MAX_CAPTURES:
            return None
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
        entry = captures[key] = (graph, static_x, static_state, static_out)
    graph, static_x, static_state, static_out = entry
    torch._foreach_copy_([static_x, *static_state], [x, *flat_state])
    graph.replay()
    outs = [torch.empty_like(t) for t in static_out]
    torch._foreach_copy_(outs, static_out)
    return window_outputs(outs, stack.num_layers)


def forget(stack) -> None:
    """Drop a stack's captures (their memory pools go with them)."""
    stack.__dict__.pop("_cuda_graphs", None)
