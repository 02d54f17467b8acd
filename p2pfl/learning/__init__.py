"""Models, datasets and the ``Learner`` contract (pure numpy, no scikit-learn).

``p2pfl.learning.prepare`` (dataset preparation for tooling) is deliberately not imported
here: peer processes import this package and must stay free of scikit-learn.
"""

from __future__ import annotations

from p2pfl.learning.base import Evaluation, Learner, flatten, unflatten
from p2pfl.learning.data import Dataset, check_compatible, load_dataset
from p2pfl.learning.factory import build_learner
from p2pfl.learning.models import MLP, SoftmaxRegression

__all__ = [
    "MLP",
    "Dataset",
    "Evaluation",
    "Learner",
    "SoftmaxRegression",
    "build_learner",
    "check_compatible",
    "flatten",
    "load_dataset",
    "unflatten",
]
