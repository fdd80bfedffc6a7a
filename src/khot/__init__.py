"""khot: top-k for PyTorch, exact, differentiable and sampled.

>>> import torch, khot
>>> khot.topk_mask(torch.tensor([0.3, 0.9, 0.1, 0.5]), 2)
tensor([False,  True, False,  True])
"""

from . import nn
from .exact import keep_topk, select_topk, topk_mask

__all__ = ["topk_mask", "keep_topk", "select_topk", "nn"]
__version__ = "0.1.0"
