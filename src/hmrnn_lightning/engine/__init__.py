"""The machinery that runs an HM-LSTM stack fast; :mod:`hmrnn_lightning.cells` keeps the
equations, the states and the reference loop (the test oracle).

* :mod:`.backend`: the interface of a fast path; :mod:`.plan`: the weight layout, the per-stack
  ``WindowPlan`` (each norm's own eps), the saved-tensor contract ``WindowCache``, and
  ``layout_problem``, the one check of which cells the fast paths run;
* :mod:`.pointwise` (the step's pointwise part in PyTorch), :mod:`.products`, :mod:`.kernels` (Triton);
* backends: :mod:`.sequence` (the CPU's; its ``step`` is generation; where it can, its window
  runs :mod:`.triton_window`'s loop with :mod:`.cpu_fused`'s C++ step kernels), :mod:`.triton_window` (the
  GPU's), :mod:`.graphs` (CUDA-graph capture around a backend), :mod:`.self_check` (Triton's
  check on first use); :mod:`.paths`: a stack's backends and plans.

The boundary rules are :mod:`hmrnn_lightning.cells.operations`'s; estimators name their kernel
rule (``kernel_mode``), so the engine imports no estimator class.
"""
