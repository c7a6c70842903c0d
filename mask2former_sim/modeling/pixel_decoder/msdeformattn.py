"""Mask2Former's pixel decoder: a multi-scale deformable-attention encoder over res3-res5
followed by a top-down FPN path down to stride 4 (METHOD.md §5).

All images of a batch are padded to one size without padding masks, so every level's
valid ratio is 1 (reference points are pixel centres normalised to [0, 1] per level).
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import nn

from mask2former_sim.modeling.ops import ms_deform_attn

from ..transformer_decoder.position_encoding import PositionEmbeddingSine
from . import PIXEL_DECODER_REGISTRY


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR): each query samples ``n_points``
    locations per head and level around its reference point and mixes them with softmax
    weights over levels*points.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4, impl: str = "auto"):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model {d_model} must be divisible by n_heads {n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.impl = impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on a ring of n_heads directions (one per head), the p-th point at
        distance p+1 (in pixels of each level, as offsets are divided by the level size);
        uniform attention weights; xavier value/output projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        dirs = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (M, 2)
        dirs = dirs / dirs.abs().max(dim=-1, keepdim=True).values  # on the unit square's border
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        bias = dirs[:, None, None, :] * scale[None, None, :, None]  # (M, 1, P, 2)
        bias = bias.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """query (N, Lq, C); reference_points (N, Lq, n_levels, 2) as (x, y) in [0, 1];
        value_input (N, S, C) with S = sum H_l*W_l; spatial_shapes (n_levels, 2) long (H, W);
        level_start_index (n_levels,) long; padding_mask (N, S) bool, True = padding.
        Returns (N, Lq, C)."""
        n, lq, c = query.shape
        s = value_input.shape[1]
        if c != self.d_model or value_input.shape[-1] != self.d_model:
            raise ValueError(f"MSDeformAttn: channel dim must be {self.d_model}, got query {c}, value {value_input.shape[-1]}")
        if spatial_shapes.shape != (self.n_levels, 2):
            raise ValueError(f"MSDeformAttn: spatial_shapes must be ({self.n_levels}, 2), got {tuple(spatial_shapes.shape)}")
        if reference_points.shape != (n, lq, self.n_levels, 2):
            raise ValueError(
                f"MSDeformAttn: reference_points must be {(n, lq, self.n_levels, 2)}, got {tuple(reference_points.shape)}"
            )
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        # offsets are in pixels of each level: normalise by (W_l, H_l)
        normalizer = spatial_shapes.flip(-1).to(reference_points.dtype)  # (L, 2) as (W, H)
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets.to(reference_points.dtype) / normalizer[None, None, None, :, None, :]
        )
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, impl=self.impl)
        return self.output_proj(out)


class MSDeformAttnEncoderLayer(nn.Module):
    """Deformable self-attention + FFN, each with residual and post-LayerNorm."""

    def __init__(
        self,
        d_model: int = 256,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        n_levels: int = 3,
        n_heads: int = 8,
        n_points: int = 4,
        impl: str = "auto",
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


def encoder_reference_points(
    spatial_shapes: Sequence[Tuple[int, int]], valid_ratios: torch.Tensor
) -> torch.Tensor:
    """Pixel-centre reference points (N, S, L, 2) as (x, y) in [0, 1].

    For a query at row i, column j of level l: ((j + 0.5) / (r_x,l W_l), (i + 0.5) / (r_y,l H_l)),
    then rescaled by every level's valid ratio. valid_ratios: (N, L, 2) as (r_x, r_y).
    """
    n = valid_ratios.shape[0]
    device, dtype = valid_ratios.device, valid_ratios.dtype
    points = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5)[None] / (valid_ratios[:, lvl, 1:2] * h)  # (N, h)
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5)[None] / (valid_ratios[:, lvl, 0:1] * w)  # (N, w)
        grid = torch.stack((xs[:, None, :].expand(n, h, w), ys[:, :, None].expand(n, h, w)), dim=-1)
        points.append(grid.reshape(n, h * w, 2))
    ref = torch.cat(points, dim=1)
    return ref[:, :, None, :] * valid_ratios[:, None, :, :]


class MSDeformAttnEncoder(nn.Module):
    """Stack of deformable encoder layers over flattened multi-scale maps, with a
    learnable per-level embedding added to the position embedding."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        num_levels: int = 3,
        num_points: int = 4,
        impl: str = "auto",
    ):
        super().__init__()
        self.d_model = d_model
        self.num_levels = num_levels
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        self.layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(d_model, dim_feedforward, dropout, num_levels, nhead, num_points, impl=impl)
            for _ in range(num_layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(
        self, srcs: List[torch.Tensor], pos_embeds: List[torch.Tensor], valid_ratios: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """srcs, pos_embeds: ``num_levels`` maps (N, C, H_l, W_l). valid_ratios (N, L, 2)
        defaults to ones (no padding). Returns memory (N, S, C), spatial_shapes (L, 2) long,
        level_start_index (L,) long."""
        if len(srcs) != self.num_levels or len(pos_embeds) != self.num_levels:
            raise ValueError(
                f"MSDeformAttnEncoder expects {self.num_levels} levels, got {len(srcs)} srcs / {len(pos_embeds)} pos"
            )
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], dim=1)
        pos_flat = torch.cat(
            [
                p.flatten(2).transpose(1, 2).to(src_flat.dtype) + self.level_embed[lvl].to(src_flat.dtype)
                for lvl, p in enumerate(pos_embeds)
            ],
            dim=1,
        )
        device = src_flat.device
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        sizes = spatial_shapes.prod(1)
        level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
        if valid_ratios is None:
            valid_ratios = torch.ones(src_flat.shape[0], self.num_levels, 2, device=device, dtype=torch.float32)
        ref = encoder_reference_points(shapes, valid_ratios)
        out = src_flat
        for layer in self.layers:
            out = layer(out, pos_flat, ref, spatial_shapes, level_start_index)
        return out, spatial_shapes, level_start_index


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Input projections (1x1 conv + GN) of the encoder features, the deformable encoder,
    a top-down FPN path (lateral 1x1 conv + GN, output 3x3 conv + GN + ReLU) from the
    encoder's finest level down to ``common_stride``, and a 1x1 conv to ``mask_dim``.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        conv_dim: int,
        mask_dim: int,
        norm: str,
        transformer_in_features: List[str],
        common_stride: int,
        transformer_n_points: int = 4,
        msda_impl: str = "auto",
    ):
        super().__init__()
        missing = [f for f in transformer_in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: encoder features {missing} are not backbone outputs {sorted(input_shape)}"
            )
        if conv_dim % 2 != 0:
            raise ValueError(f"MSDeformAttnPixelDecoder: CONVS_DIM must be even, got {conv_dim}")
        # encoder levels, lowest resolution (largest stride) first
        self.transformer_in_features = sorted(transformer_in_features, key=lambda k: -input_shape[k].stride)
        enc_strides = [input_shape[k].stride for k in self.transformer_in_features]
        min_enc_stride = min(enc_strides)
        # FPN levels: the remaining inputs between common_stride and the finest encoder level
        self.in_features = [
            k for k, v in sorted(input_shape.items(), key=lambda kv: -kv[1].stride)
            if k not in self.transformer_in_features and common_stride <= v.stride < min_enc_stride
        ]
        out_stride = input_shape[self.in_features[-1]].stride if self.in_features else min_enc_stride
        if out_stride != common_stride:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: COMMON_STRIDE={common_stride} but the finest available feature has "
                f"stride {out_stride}; backbone outputs: { {k: v.stride for k, v in input_shape.items()} }"
            )
        self.num_levels = len(self.transformer_in_features)
        self.common_stride = common_stride
        self.mask_dim = mask_dim
        self.conv_dim = conv_dim

        self.input_proj = nn.ModuleList()
        for k in self.transformer_in_features:
            conv = nn.Conv2d(input_shape[k].channels, conv_dim, kernel_size=1)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
            self.input_proj.append(nn.Sequential(conv, nn.GroupNorm(32, conv_dim)))

        self.transformer = MSDeformAttnEncoder(
            d_model=conv_dim,
            nhead=transformer_nheads,
            num_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            num_levels=self.num_levels,
            num_points=transformer_n_points,
            impl=msda_impl,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.mask_features)

        use_bias = norm == ""
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for k in self.in_features:
            lateral = Conv2d(
                input_shape[k].channels, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim)
            )
            output = Conv2d(
                conv_dim, conv_dim, kernel_size=3, padding=1, bias=use_bias,
                norm=get_norm(norm, conv_dim), activation=F.relu,
            )
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            self.lateral_convs.append(lateral)
            self.output_convs.append(output)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> Dict:
        ph = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in ph.IN_FEATURES},
            "transformer_dropout": ph.DROPOUT,
            "transformer_nheads": ph.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS,
            "transformer_dim_feedforward": ph.DIM_FEEDFORWARD,
            "transformer_enc_layers": ph.TRANSFORMER_ENC_LAYERS,
            "conv_dim": ph.CONVS_DIM,
            "mask_dim": ph.MASK_DIM,
            "norm": ph.NORM,
            "transformer_in_features": list(ph.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            "common_stride": ph.COMMON_STRIDE,
            "transformer_n_points": ph.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
            "msda_impl": ph.MSDA_IMPL,
        }

    def forward_features(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """features: backbone maps by name. Returns mask_features (B, mask_dim, H/s, W/s) at
        s = common_stride and the encoder outputs (B, conv_dim, h, w), lowest resolution first."""
        missing = [k for k in self.transformer_in_features + self.in_features if k not in features]
        if missing:
            raise KeyError(f"MSDeformAttnPixelDecoder.forward_features: missing features {missing}")
        srcs, poss = [], []
        for proj, k in zip(self.input_proj, self.transformer_in_features):
            x = features[k]
            srcs.append(proj(x))
            poss.append(self.pe_layer(x))
        memory, _, _ = self.transformer(srcs, poss)
        b = memory.shape[0]
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        outs = []
        for chunk, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes):
            outs.append(chunk.transpose(1, 2).reshape(b, self.conv_dim, h, w))
        multi_scale = list(outs)

        y = outs[-1]
        for k, lateral, output in zip(self.in_features, self.lateral_convs, self.output_convs):
            x = features[k]
            y = lateral(x) + F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            y = output(y)
        return self.mask_features(y), multi_scale

    def forward(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        return self.forward_features(features)
