"""Reference for the ADVENT/IntraDA entropy map of docs/method.md §7, written as
ADVENT's separate ops: softmax, log2, mul, mean."""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .mode_distance import accumulate_dtype

EPS = 1e-30


def entropy_map(logits: Tensor, with_map: bool = True) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    """docs/method.md §7 for logits (B, C, H, W):

    - map[c] = -p_c log2(p_c + 1e-30) / log2(C), p = softmax over C
      (the discriminator's input), or None without ``with_map``;
    - pixel entropy = sum_c map[c] (B, H, W) (the entropy loss is its mean);
    - image score = mean of map over C, H, W (B,) (IntraDA's ranking).

    fp32 (fp64 for fp64 logits); differentiable by plain autograd.
    """
    C = logits.shape[1]
    p = torch.softmax(logits.to(accumulate_dtype(logits.dtype)), dim=1)
    m = -torch.mul(p, torch.log2(p + EPS)) / math.log2(C)
    return (m if with_map else None), m.sum(1), m.mean((1, 2, 3))
