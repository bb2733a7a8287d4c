"""A stack's backends and window plans in one object, :class:`FastPaths`, which the stack holds.

It keeps what is built once per stack (the plans, per device and product dtype; the CUDA-graph
captures inside its :class:`~hmrnn_lightning.engine.graphs.CudaGraphs`), and copies and pickles
of it start empty, so the stack need not know what it keeps.
"""

from __future__ import annotations

from torch import Tensor, nn

from hmrnn_lightning.engine.backend import Backend
from hmrnn_lightning.engine.graphs import CudaGraphs
from hmrnn_lightning.engine.plan import WindowPlan, matmul_dtype
from hmrnn_lightning.engine.self_check import triton_problem
from hmrnn_lightning.engine.sequence import SequenceBackend
from hmrnn_lightning.engine.triton_window import TritonBackend


#: The self-check's oracle: the sequence backend's own PyTorch loop, never the fused CPU kernels,
#: which run the Triton backend's loop and so would agree with a fault in it.
_ORACLE = SequenceBackend(fused=False)


class FastPaths:
    """The backends a stack can run (``sequence``, ``triton``, and ``triton`` captured in CUDA
    graphs) and its plans."""

    def __init__(self) -> None:
        self.sequence = SequenceBackend()
        self.triton = TritonBackend()
        self.graphed = CudaGraphs(self.triton)
        self._plans: dict[tuple, WindowPlan] = {}

    def __getstate__(self) -> dict:
        return {}  # plans point at the original's parameters, captures at its memory

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def backend(self, name: str, cuda_graph: bool = False) -> Backend:
        """``sequence`` or ``triton`` (captured when ``cuda_graph``)."""
        if name == "sequence":
            return self.sequence
        return self.graphed if cuda_graph else self.triton

    def plan(self, cells: nn.ModuleList, estimator: nn.Module, x: Tensor) -> WindowPlan:
        """The plan for ``x``'s device and product dtype, built on first use (and again if a
        parameter or the estimator was replaced)."""
        mm_dtype = matmul_dtype(x)
        identity = tuple(id(p) for p in cells.parameters()) + (id(estimator),)
        key = (x.device, mm_dtype)
        plan = self._plans.get(key)
        if plan is None or plan.identity != identity:
            plan = WindowPlan.build(cells, estimator, mm_dtype)
            plan.identity = identity
            self._plans[key] = plan
        return plan

    def triton_problem(self, plan: WindowPlan, x: Tensor) -> str | None:
        """The Triton backend's self-check for ``x``'s device and dtype (:mod:`~hmrnn_lightning.engine.self_check`)."""
        return triton_problem(self.triton, _ORACLE, plan, x)
