"""The paper's 2D toy experiment: exact tree-mixture ground truth, toy log-density networks,
exact score-matching training, and the autoguidance vs CFG comparison (``autoguide-fast toy``).
"""

from __future__ import annotations

from .ground_truth import CLASSES, ExactDenoiser, GaussianMixture, ground_truth
from .network import ToyNet, load_toy_net, save_toy_net
from .training import MODELS, ToyModelSpec, train_toy_model

__all__ = [
    "CLASSES",
    "ExactDenoiser",
    "GaussianMixture",
    "MODELS",
    "ToyModelSpec",
    "ToyNet",
    "ground_truth",
    "load_toy_net",
    "save_toy_net",
    "train_toy_model",
]
