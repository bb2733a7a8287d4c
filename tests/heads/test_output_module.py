"""The gated output module's generation step (projections of copied layers are reused)."""

import torch

from hmrnn_lightning import HMStack, StepEstimator
from hmrnn_lightning.heads import MixtureDensityHead, SoftmaxHead


def test_step_reuses_projections_of_copied_layers_and_matches_forward():
    torch.manual_seed(0)
    stack = HMStack(5, [8, 7, 6], StepEstimator()).double().eval()
    with torch.no_grad():
        for cell in stack.cells:
            cell.bias[-1] = -0.3  # upper layers copy on many rows
    for head in (SoftmaxHead([8, 7, 6], 11, 9).double(), MixtureDensityHead([8, 7, 6], 3, 9).double()):
        projected_rows = []
        head.output_module.project[2].register_forward_hook(lambda m, args, out: projected_rows.append(args[0].shape[0]))
        x = torch.randn(4, 25, 5, dtype=torch.float64)
        state, cache, top_copies = None, None, 0
        for t in range(x.shape[1]):
            out = stack.step(x[:, t], state)
            projected_rows.clear()
            stepped, cache = head.step(out, cache)
            if t > 0:  # the first step has nothing to reuse
                top_copies_now = int((out.operations[:, 0, 2, 1] == 1).sum())
                assert sum(projected_rows) == 4 - top_copies_now  # only rows that did not copy
                top_copies += top_copies_now
            torch.testing.assert_close(stepped, head(out.hidden), rtol=1e-12, atol=1e-12)
            state = out.state
        assert top_copies > 20  # projections really were reused
