"""Mask2Former's multi-scale masked-attention transformer decoder (METHOD.md §5).

Tensors are batch-first inside this module: queries (B, Q, C), memories (B, HW, C).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from . import TRANSFORMER_DECODER_REGISTRY
from .position_encoding import PositionEmbeddingSine


def _with_pos(x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return x if pos is None else x + pos


def _xavier_matrices(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Query self-attention + residual + LayerNorm (post-norm, or pre-norm if normalize_before)."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(self, tgt: torch.Tensor, query_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = _with_pos(x, query_pos)
        out = self.self_attn(q, k, value=x, need_weights=False)[0]
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Queries attend to a memory (optionally masked) + residual + LayerNorm.

    ``memory_mask``: bool (B * nhead, Q, HW), True = the query may NOT attend to that key.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: Optional[torch.Tensor] = None,
        pos: Optional[torch.Tensor] = None,
        query_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if memory_mask is not None and memory_mask.dtype != torch.bool:
            raise TypeError(f"CrossAttentionLayer: memory_mask must be bool, got {memory_mask.dtype}")
        x = self.norm(tgt) if self.normalize_before else tgt
        out = self.multihead_attn(
            query=_with_pos(x, query_pos),
            key=_with_pos(memory, pos),
            value=memory,
            attn_mask=memory_mask,
            need_weights=False,
        )[0]
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    """Linear-ReLU-Linear feed-forward + residual + LayerNorm."""

    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        out = self.linear2(self.dropout(F.relu(self.linear1(x))))
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP: num_layers must be >= 1, got {num_layers}")
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def compute_attention_mask(
    mask_logits: torch.Tensor, target_size: Sequence[int], num_heads: int
) -> torch.Tensor:
    """Masked-attention mask from mask logits (B, Q, H, W) -> bool (B * num_heads, Q, h*w).

    Logits are resized bilinearly to ``target_size`` (h, w); a key is masked (True) where
    sigmoid(logit) < 0.5, i.e. logit < 0. A query whose keys would all be masked is
    un-masked entirely (it attends everywhere), so softmax never sees an empty row.
    Index of the first dim is b * num_heads + head (nn.MultiheadAttention's layout).
    """
    if mask_logits.dim() != 4:
        raise ValueError(f"compute_attention_mask: expected (B, Q, H, W) logits, got {tuple(mask_logits.shape)}")
    resized = F.interpolate(mask_logits.detach(), size=tuple(target_size), mode="bilinear", align_corners=False)
    masked = resized.flatten(2) < 0  # (B, Q, hw); sigmoid(z) < 0.5 <=> z < 0
    masked = masked & ~masked.all(dim=-1, keepdim=True)
    b, q, hw = masked.shape
    return masked.unsqueeze(1).expand(b, num_heads, q, hw).reshape(b * num_heads, q, hw)


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Learnable queries refined by ``dec_layers`` blocks of masked cross-attention,
    self-attention and FFN, round robin over the multi-scale features (lowest resolution
    first). ``dec_layers`` = MASK_FORMER.DEC_LAYERS - 1; predictions: one on the learnable
    queries plus one after each block.
    """

    @configurable
    def __init__(
        self,
        in_channels: int,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
        dropout: float = 0.0,
        deep_supervision: bool = True,
        num_feature_levels: int = 3,
    ):
        super().__init__()
        if dec_layers < 0:
            raise ValueError(f"MultiScaleMaskedTransformerDecoder: dec_layers must be >= 0, got {dec_layers}")
        if hidden_dim % nheads != 0:
            raise ValueError(f"MultiScaleMaskedTransformerDecoder: hidden_dim {hidden_dim} not divisible by nheads {nheads}")
        if hidden_dim % 2 != 0:
            raise ValueError(f"MultiScaleMaskedTransformerDecoder: hidden_dim must be even, got {hidden_dim}")
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.deep_supervision = deep_supervision

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)

        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                weight_init.c2_xavier_fill(conv)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Identity())

        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels: int) -> Dict:
        mf = cfg.MODEL.MASK_FORMER
        if mf.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 1, got {mf.DEC_LAYERS}")
        return {
            "in_channels": in_channels,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            # the prediction on the learnable queries counts as one of DEC_LAYERS outputs
            "dec_layers": mf.DEC_LAYERS - 1,
            "pre_norm": mf.PRE_NORM,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
            "dropout": mf.DROPOUT,
            "deep_supervision": mf.DEEP_SUPERVISION,
        }

    def forward(
        self, x: List[torch.Tensor], mask_features: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> Dict[str, object]:
        """x: ``num_feature_levels`` maps (B, C_in, h_i, w_i), lowest resolution first;
        mask_features: (B, mask_dim, H, W). ``mask`` is accepted for API compatibility and
        ignored (images are padded without padding masks).

        Returns {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H, W) float32 logits,
        "aux_outputs": list of the earlier predictions (empty without deep supervision)}.
        """
        del mask
        if len(x) != self.num_feature_levels:
            raise ValueError(
                f"MultiScaleMaskedTransformerDecoder expects {self.num_feature_levels} feature maps, got {len(x)}"
            )
        if mask_features.dim() != 4 or mask_features.shape[0] != x[0].shape[0]:
            raise ValueError(
                f"MultiScaleMaskedTransformerDecoder: mask_features must be (B, C, H, W) with B={x[0].shape[0]}, "
                f"got {tuple(mask_features.shape)}"
            )
        srcs, poss, sizes = [], [], []
        for i, feat in enumerate(x):
            sizes.append(tuple(feat.shape[-2:]))
            poss.append(self.pe_layer(feat).flatten(2).transpose(1, 2).to(feat.dtype))  # (B, hw, C)
            src = self.input_proj[i](feat).flatten(2).transpose(1, 2)
            srcs.append(src + self.level_embed.weight[i].to(src.dtype))

        bs = mask_features.shape[0]
        # A C-term dot product can leave fp16's range (65504): mask logits are taken in fp32.
        # One cast here, shared by every prediction (and kept once for backward), not one each.
        mask_features = mask_features.float()
        query_pos = self.query_embed.weight.unsqueeze(0).expand(bs, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(bs, -1, -1)

        classes, masks = [], []
        cls_i, mask_i, attn_mask = self._predict(output, mask_features, sizes[0])
        classes.append(cls_i)
        masks.append(mask_i)
        for i in range(self.num_layers):
            lvl = i % self.num_feature_levels
            output = self.transformer_cross_attention_layers[i](
                output, srcs[lvl], memory_mask=attn_mask, pos=poss[lvl], query_pos=query_pos
            )
            output = self.transformer_self_attention_layers[i](output, query_pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            cls_i, mask_i, attn_mask = self._predict(
                output, mask_features, sizes[(i + 1) % self.num_feature_levels]
            )
            classes.append(cls_i)
            masks.append(mask_i)

        aux = []
        if self.deep_supervision:
            aux = [{"pred_logits": c, "pred_masks": m} for c, m in zip(classes[:-1], masks[:-1])]
        return {"pred_logits": classes[-1], "pred_masks": masks[-1], "aux_outputs": aux}

    def _predict(
        self, output: torch.Tensor, mask_features: torch.Tensor, target_size: Tuple[int, int]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shared heads: class logits, mask logits and the next layer's attention mask."""
        decoded = self.decoder_norm(output)
        logits = self.class_embed(decoded)
        embed = self.mask_embed(decoded)
        # mask_features is fp32 (cast once in forward): the mask logits are fp32 under AMP too
        with torch.autocast(device_type=mask_features.device.type, enabled=False):
            mask_logits = torch.einsum("bqc,bchw->bqhw", embed.float(), mask_features)
        attn_mask = compute_attention_mask(mask_logits, target_size, self.num_heads)
        return logits, mask_logits, attn_mask
