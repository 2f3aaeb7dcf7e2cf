"""Host-side helpers shared by the Triton launchers: per-pixel tensors viewed as
(batch, channel, pixel) with strides, and the padded channel block size."""
import torch
import triton


def pixel_view(t: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) or (N, D) viewed as (B, D, P) in place (copies only when
    H and W cannot be merged)."""
    if t.dim() == 2:
        return t.t().unsqueeze(0)
    return t.reshape(t.shape[0], t.shape[1], t.shape[2] * t.shape[3])


def channel_block(D: int) -> int:
    """D padded to a power of two, at least 16 (tl.dot's smallest size)."""
    return max(16, triton.next_power_of_2(D))
