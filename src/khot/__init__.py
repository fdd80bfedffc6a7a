"""khot: top-k for PyTorch, exact, differentiable and sampled.

>>> import torch, khot
>>> khot.topk_mask(torch.tensor([0.3, 0.9, 0.1, 0.5]), 2)
tensor([False,  True, False,  True])
"""

from . import losses, metrics, nn
from ._backend import use_backend
from .exact import keep_topk, select_topk, topk_mask
from .relaxed import methods, soft_select, soft_topk
from .relaxed.sigmoid import sigmoid_topk
from .sampling import pips_sample, sample_khot

__all__ = ["topk_mask", "keep_topk", "select_topk", "sigmoid_topk", "soft_topk", "soft_select", "sample_khot", "pips_sample", "metrics", "nn", "use_backend", "methods", "losses"]
__version__ = "0.1.0"
