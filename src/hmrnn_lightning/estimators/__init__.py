"""Boundary estimators: how the binary boundary state z is produced and differentiated.

=============  ==========================================  =================================
name           forward                                     backward
=============  ==========================================  =================================
``step``       ``1[hard_sigm(a x) > 0.5]``                  straight-through hard sigmoid
``bernoulli``  ``~ Bernoulli(hard_sigm(a x))``              straight-through hard sigmoid
``soft``       ``hard_sigm(a x)``                           exact
``reinforce``  ``~ Bernoulli(hard_sigm(a x))``              score function, moving baseline
=============  ==========================================  =================================
"""

from hmrnn_lightning.estimators.base import BoundaryEstimator, hard_sigmoid, straight_through
from hmrnn_lightning.estimators.bernoulli import BernoulliEstimator
from hmrnn_lightning.estimators.reinforce import ReinforceEstimator
from hmrnn_lightning.estimators.soft import SoftEstimator
from hmrnn_lightning.estimators.step import StepEstimator

__all__ = [
    "BoundaryEstimator",
    "BernoulliEstimator",
    "ReinforceEstimator",
    "SoftEstimator",
    "StepEstimator",
    "hard_sigmoid",
    "straight_through",
]
