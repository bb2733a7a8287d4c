"""The machinery that runs an HM-LSTM stack fast; :mod:`hmrnn_lightning.cells` keeps the
equations, the states and the reference loop, which stays the test oracle.

Where things live:
  * the interface every fast path implements, and the one check of what they can run
    (:func:`~hmrnn_lightning.engine.plan.layout_problem`): :mod:`~hmrnn_lightning.engine.backend`
  * what a backend reads: the weight layout, the per-stack :class:`~hmrnn_lightning.engine.plan.WindowPlan`,
    the saved-tensor contract :class:`~hmrnn_lightning.engine.plan.WindowCache`: :mod:`~hmrnn_lightning.engine.plan`
  * the pointwise step in PyTorch, forward and backward: :mod:`~hmrnn_lightning.engine.pointwise`;
    the matrix products: :mod:`~hmrnn_lightning.engine.products`; the Triton kernels:
    :mod:`~hmrnn_lightning.engine.kernels`
  * the backends: :mod:`~hmrnn_lightning.engine.sequence` (the CPU's: hand-written backward, rows
    whose work is zero skipped; its ``step`` is generation), :mod:`~hmrnn_lightning.engine.triton_window`
    (the GPU's: dense, Triton kernels), :mod:`~hmrnn_lightning.engine.graphs` (CUDA-graph capture
    around a backend), :mod:`~hmrnn_lightning.engine.self_check` (the Triton backend's check on first use)
  * a stack's backends and plans: :mod:`~hmrnn_lightning.engine.paths`

The boundary rules (COPY keeps ``z``, the top layer's ``z``) are :mod:`hmrnn_lightning.cells.operations`'s.
The engine imports no estimator class: an estimator names its kernel rule (``kernel_mode``).
"""
