"""Recurrent cells and stacks.

Where things live:
  * the UPDATE / COPY / FLUSH rule (eq. 2): :mod:`hmrnn_lightning.cells.operations`
  * pre-activation terms (eqs. 4-7) and the cell interface: :mod:`hmrnn_lightning.cells.base`
  * HM-LSTM layer: :mod:`hmrnn_lightning.cells.hm_lstm`; HM-RNN layer: :mod:`hmrnn_lightning.cells.hm_rnn`
  * the time loop over a sequence: :mod:`hmrnn_lightning.cells.stack` (the reference loop, and
    the choice of a fast path); the fast paths themselves: :mod:`hmrnn_lightning.engine`
  * LSTM baselines: :mod:`hmrnn_lightning.cells.lstm`
"""

from hmrnn_lightning.cells.base import CellStep, HMCell, LayerState
from hmrnn_lightning.cells.hm_lstm import HMLSTMCell
from hmrnn_lightning.cells.hm_rnn import HMRNNCell
from hmrnn_lightning.cells.lstm import LayerNormLSTMCell, LSTMStack
from hmrnn_lightning.cells.operations import COPY, FLUSH, OPERATION_NAMES, UPDATE, Operations, select_operations
from hmrnn_lightning.cells.stack import HMStack, RecurrentStack, StackOutput, State, detach_state

__all__ = [
    "COPY", "FLUSH", "UPDATE", "OPERATION_NAMES", "CellStep", "HMCell", "HMLSTMCell", "HMRNNCell",
    "HMStack", "LayerNormLSTMCell", "LayerState", "LSTMStack", "Operations", "RecurrentStack",
    "StackOutput", "State", "detach_state", "select_operations",
]
