"""Plain LSTM and LayerNorm-LSTM stacks: the paper's baseline rows, same interface as HMStack."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hmrnn_lightning.cells.base import LayerState
from hmrnn_lightning.cells.operations import UPDATE
from hmrnn_lightning.cells.stack import RecurrentStack, StackOutput, State


class LayerNormLSTMCell(nn.Module):
    """LSTM step with layer norm on the input and recurrent terms and on the cell (Ba et al. 2016).

    Args:
        input_size: input features.
        hidden_size: hidden units.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.input_proj = nn.Linear(input_size, 4 * hidden_size, bias=False)
        self.recurrent = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(4 * hidden_size))
        self.norm_input = nn.LayerNorm(4 * hidden_size)
        self.norm_recurrent = nn.LayerNorm(4 * hidden_size)
        self.norm_cell = nn.LayerNorm(hidden_size)
        with torch.no_grad():
            self.bias[:hidden_size].fill_(1.0)

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        s = self.norm_input(self.input_proj(x).float()) + self.norm_recurrent(self.recurrent(h).float()) + self.bias
        f, i, o, g = s.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(self.norm_cell(c))
        return h, c


class LSTMStack(RecurrentStack):
    """Stacked LSTM baseline that returns every layer's ``h`` like :class:`HMStack`.

    Without layer norm each layer is a one-layer ``nn.LSTM`` (cuDNN on GPU); with it, a
    Python loop over :class:`LayerNormLSTMCell`. Boundaries are all 0 and every step is an
    UPDATE, so the output module and metrics work unchanged.

    Args:
        input_size: features per input step.
        hidden_sizes: hidden size of each layer, bottom first.
        layer_norm: use the LayerNorm LSTM (the paper's "LayerNorm LSTM" rows).
    """

    def __init__(self, input_size: int, hidden_sizes: list[int], layer_norm: bool = False) -> None:
        super().__init__(input_size, hidden_sizes)
        self.layer_norm = layer_norm
        below = [self.input_size] + self.hidden_sizes[:-1]
        if layer_norm:
            self.layers = nn.ModuleList(LayerNormLSTMCell(i, h) for i, h in zip(below, self.hidden_sizes))
        else:
            self.layers = nn.ModuleList(nn.LSTM(i, h, batch_first=True) for i, h in zip(below, self.hidden_sizes))

    def forward(self, x: Tensor, state: State | None = None, boundaries: Tensor | None = None) -> StackOutput:
        state = self.check_input(x, state)
        B, T, _ = x.shape
        hidden, new_state = [], []
        inp = x
        for layer, s in zip(self.layers, state):
            if self.layer_norm:
                h, c, outs = s.h, s.c, []
                for t in range(T):
                    h, c = layer(inp[:, t], h, c)
                    outs.append(h)
                out = torch.stack(outs, 1)
            else:
                out, (h, c) = layer(inp, (s.h.unsqueeze(0).to(inp.dtype), s.c.unsqueeze(0).to(inp.dtype)))
                out, h, c = out.float(), h[0].float(), c[0].float()
            hidden.append(out)
            new_state.append(LayerState(h, c, s.z))
            inp = out
        L = self.num_layers
        ops = x.new_zeros(B, T, L, 3, dtype=torch.float32)
        ops[..., UPDATE] = 1.0
        return StackOutput(
            hidden=hidden,
            boundaries=x.new_zeros(B, T, L, dtype=torch.float32),
            boundary_logits=x.new_zeros(B, T, 0, dtype=torch.float32),
            operations=ops,
            state=new_state,
        )
