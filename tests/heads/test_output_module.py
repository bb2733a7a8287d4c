"""The gated output module's generation step (projections of copied layers are reused)."""

import math

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


def test_output_module_is_eqs_11_and_12_written_out():
    """Eq. 11: g^l = sigm(w^l . [h^1; ...; h^L]); eq. 12: h^e = ReLU(sum_l g^l W^e_l h^l).
    Computed here unit by unit from the module's weights, without its code."""
    from hmrnn_lightning.heads.output_module import GatedOutputModule

    torch.manual_seed(0)
    sizes, E = [3, 2, 4], 5
    module = GatedOutputModule(sizes, E).double()
    hidden = [torch.randn(sizes_l, dtype=torch.float64) for sizes_l in sizes]
    concat = [v for h in hidden for v in h.tolist()]
    expected = []
    for e in range(E):
        total = 0.0
        for l, h in enumerate(hidden):
            w_l = module.gates.weight[l].tolist()  # w^l
            g_l = 1.0 / (1.0 + math.exp(-sum(w * v for w, v in zip(w_l, concat))))
            W_l = module.project[l].weight  # W^e_l, [E, dim h^l]
            total += g_l * sum(W_l[e, j].item() * h[j].item() for j in range(sizes[l]))
        expected.append(max(0.0, total))
    got = module([h.view(1, 1, -1) for h in hidden]).view(-1)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert module.gates.bias is None  # eq. 11 has no bias term
