"""Fixed 2-D sine/cosine position embedding (DETR-style, normalised coordinates)."""
import math
from typing import Optional

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Sine position embedding of a (B, C, H, W) map; returns (B, 2 * num_pos_feats, H, W).

    Channel layout: the first ``num_pos_feats`` channels encode y, the rest x; inside each
    half, even channels are sin and odd channels cos of coordinate / temperature^(2i/d).
    With ``normalize`` the cumulative coordinates (1..H over valid pixels) are divided by
    their maximum and multiplied by ``scale`` (2*pi by default). ``mask`` (B, H, W) bool
    marks padding (True = padded); None means no padding. Output is float32 (no params).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: Optional[float] = None,
        eps: float = 1e-6,
    ):
        super().__init__()
        if num_pos_feats <= 0 or num_pos_feats % 2 != 0:
            raise ValueError(f"PositionEmbeddingSine: num_pos_feats must be a positive even number, got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = float(temperature)
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else float(scale)
        self.eps = eps

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"PositionEmbeddingSine expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        if mask is None:
            not_mask = torch.ones((b, h, w), dtype=torch.float32, device=x.device)
        else:
            if mask.shape != (b, h, w):
                raise ValueError(f"PositionEmbeddingSine: mask shape {tuple(mask.shape)} != {(b, h, w)}")
            not_mask = (~mask.bool()).to(torch.float32)
        y = not_mask.cumsum(1)
        xx = not_mask.cumsum(2)
        if self.normalize:
            y = y / (y[:, -1:, :] + self.eps) * self.scale
            xx = xx / (xx[:, :, -1:] + self.eps) * self.scale
        idx = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        freq = self.temperature ** (2 * torch.div(idx, 2, rounding_mode="floor") / self.num_pos_feats)
        py = y[..., None] / freq  # (B, H, W, F)
        px = xx[..., None] / freq
        # interleave: channel 2i = sin, channel 2i+1 = cos
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((py, px), dim=3).permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale:.4f}"
        )
