"""Backbones, pixel decoder and masked-attention transformer decoder (tiny sizes, CPU)."""
import math

import mask2former_sim  # noqa: F401  (Pillow shim before detectron2)
import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone

from mask2former_sim.config import get_default_cfg
from mask2former_sim.modeling.backbone import TimmSwinBackbone
from mask2former_sim.modeling.pixel_decoder import MSDeformAttn, build_pixel_decoder
from mask2former_sim.modeling.pixel_decoder.msdeformattn import encoder_reference_points
from mask2former_sim.modeling.transformer_decoder import PositionEmbeddingSine, build_transformer_decoder
from mask2former_sim.modeling.transformer_decoder import masked_attention_decoder as mad
from mask2former_sim.modeling.transformer_decoder.masked_attention_decoder import (
    CrossAttentionLayer,
    compute_attention_mask,
)

STAGES = ["res2", "res3", "res4", "res5"]


def _resnet_cfg(depth: int):
    cfg = get_default_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.OUT_FEATURES = list(STAGES)
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    if depth in (18, 34):
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    return cfg


def _tiny_heads(cfg, dec_layers: int = 4):
    ph = cfg.MODEL.SEM_SEG_HEAD
    ph.CONVS_DIM = 32
    ph.MASK_DIM = 24
    ph.TRANSFORMER_ENC_LAYERS = 2
    ph.DIM_FEEDFORWARD = 64
    ph.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 4
    ph.NUM_CLASSES = 3
    mf = cfg.MODEL.MASK_FORMER
    mf.HIDDEN_DIM = 32
    mf.NUM_OBJECT_QUERIES = 5
    mf.DEC_LAYERS = dec_layers
    mf.DIM_FEEDFORWARD = 64
    mf.NHEADS = 4
    return cfg


def _fake_features(b=2, h=64, w=96, channels=(16, 32, 64, 128)):
    shapes = {n: ShapeSpec(channels=c, stride=s) for n, c, s in zip(STAGES, channels, (4, 8, 16, 32))}
    feats = {n: torch.randn(b, sp.channels, h // sp.stride, w // sp.stride) for n, sp in shapes.items()}
    return shapes, feats


def _n_params(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


# ----------------------------------------------------------------------------- backbones
@pytest.mark.parametrize("depth,channels", [(18, [64, 128, 256, 512]), (50, [256, 512, 1024, 2048])])
def test_resnet_outputs_strides_and_frozen_bn(depth, channels):
    bb = build_backbone(_resnet_cfg(depth)).eval()
    spec = bb.output_shape()
    assert [spec[n].stride for n in STAGES] == [4, 8, 16, 32]
    assert [spec[n].channels for n in STAGES] == channels
    assert any(isinstance(m, FrozenBatchNorm2d) for m in bb.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 64, 96))
    for n, c, s in zip(STAGES, channels, (4, 8, 16, 32)):
        assert out[n].shape == (1, c, 64 // s, 96 // s)


def test_timm_swin_shapes_on_odd_sizes_and_windows():
    cfg = get_default_cfg()
    cfg.MODEL.BACKBONE.NAME = "TimmSwinBackbone"
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.0
    bb = build_backbone(cfg).eval()
    assert isinstance(bb, TimmSwinBackbone)
    assert bb.size_divisibility == 32
    spec = bb.output_shape()
    assert [(spec[n].channels, spec[n].stride) for n in STAGES] == [(96, 4), (192, 8), (384, 16), (768, 32)]
    # the last stage keeps its 7x7 window and shifts every other block (always_partition)
    last = bb.model.layers_3.blocks
    assert tuple(last[0].window_size) == (7, 7) and tuple(last[1].shift_size) == (3, 3)
    assert bb.model.layers_0.blocks[0].attn.relative_position_bias_table.shape == (13 * 13, 3)
    with torch.no_grad():
        for h, w in [(64, 96), (96, 160)]:
            out = bb(torch.randn(1, 3, h, w))
            for n, s in zip(STAGES, (4, 8, 16, 32)):
                assert out[n].shape == (1, spec[n].channels, h // s, w // s)
                assert out[n].is_contiguous() and torch.isfinite(out[n]).all()
    with pytest.raises(ValueError, match="patch size"):
        bb(torch.randn(1, 3, 66, 96))


def test_timm_swin_config_mismatch_is_reported():
    cfg = get_default_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_timm_swin_backbone"
    cfg.MODEL.SWIN.EMBED_DIM = 128
    with pytest.raises(ValueError, match="EMBED_DIM=128"):
        build_backbone(cfg)
    with pytest.raises(ValueError, match="not a timm Swin"):
        TimmSwinBackbone("resnet18")


# ----------------------------------------------------------------------------- position embedding
def test_sine_position_embedding_hand_values():
    x = torch.zeros(1, 5, 2, 1)
    pos = PositionEmbeddingSine(num_pos_feats=2, normalize=False)(x)
    assert pos.shape == (1, 4, 2, 1)
    # 2 features per axis -> both use temperature^0 = 1: [sin(y), cos(y), sin(x), cos(x)], y,x from 1
    exp = torch.tensor([[math.sin(1), math.cos(1), math.sin(1), math.cos(1)],
                        [math.sin(2), math.cos(2), math.sin(1), math.cos(1)]])
    torch.testing.assert_close(pos[0, :, :, 0].T, exp)
    pos = PositionEmbeddingSine(num_pos_feats=4, temperature=100.0, normalize=True)(x)
    # normalised y in {pi, 2pi}, x = 2pi; channel 2,3 use frequency 100^(2/4) = 10
    y = torch.tensor([1.0, 2.0]) / 2 * 2 * math.pi
    torch.testing.assert_close(pos[0, 2, :, 0], torch.sin(y / 10), atol=1e-5, rtol=0)
    torch.testing.assert_close(pos[0, 1, :, 0], torch.cos(y), atol=1e-5, rtol=0)
    torch.testing.assert_close(pos[0, 7, :, 0], torch.cos(torch.full((2,), 2 * math.pi) / 10), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- deformable attention
def test_msdeformattn_initial_offsets_ring():
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=8, n_points=3)
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    torch.testing.assert_close(bias[0, 1, 2], torch.tensor([3.0, 0.0]))  # head 0: +x, point 3
    torch.testing.assert_close(bias[1, 0, 0], torch.tensor([1.0, 1.0]))  # head 1: 45 deg, on the square
    torch.testing.assert_close(bias[2, 0, 1], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)  # head 2: +y
    torch.testing.assert_close(bias[4, 1, 0], torch.tensor([-1.0, 0.0]), atol=1e-6, rtol=0)
    assert attn.sampling_offsets.weight.abs().sum() == 0 and attn.attention_weights.weight.abs().sum() == 0


def test_encoder_reference_points_are_pixel_centres():
    ref = encoder_reference_points([(2, 4), (1, 2)], torch.ones(1, 2, 2))
    assert ref.shape == (1, 10, 2, 2)
    torch.testing.assert_close(ref[0, :4, 0], torch.tensor([[0.125, 0.25], [0.375, 0.25], [0.625, 0.25], [0.875, 0.25]]))
    torch.testing.assert_close(ref[0, 8:, 1], torch.tensor([[0.25, 0.5], [0.75, 0.5]]))


def test_msdeformattn_samples_the_offset_pixel():
    """One head, one point: offset (+1, 0) pixel reads the right neighbour (0 past the border)."""
    torch.manual_seed(0)
    h, w, c = 3, 4, 8
    attn = MSDeformAttn(d_model=c, n_levels=1, n_heads=1, n_points=1, impl="torch")
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0]))
        for lin in (attn.value_proj, attn.output_proj):
            lin.weight.copy_(torch.eye(c))
            lin.bias.zero_()
    src = torch.randn(1, h * w, c)
    shapes = torch.tensor([[h, w]])
    ref = encoder_reference_points([(h, w)], torch.ones(1, 1, 2))
    out = attn(torch.randn(1, h * w, c), ref, src, shapes, torch.tensor([0])).view(h, w, c)
    grid = src.view(h, w, c)
    torch.testing.assert_close(out[:, :-1], grid[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, -1], torch.zeros(h, c), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- pixel decoder
def test_pixel_decoder_shapes_and_order():
    cfg = _tiny_heads(get_default_cfg())
    cfg.MODEL.SEM_SEG_HEAD.MSDA_IMPL = "torch"
    shapes, feats = _fake_features()
    pd = build_pixel_decoder(cfg, shapes)
    mask_features, ms = pd.forward_features(feats)
    assert mask_features.shape == (2, 24, 16, 24)
    assert [tuple(m.shape) for m in ms] == [(2, 32, 2, 3), (2, 32, 4, 6), (2, 32, 8, 12)]
    assert all(torch.isfinite(t).all() for t in [mask_features, *ms])
    assert pd.transformer.level_embed.shape == (3, 32)


def test_pixel_decoder_bad_inputs():
    cfg = _tiny_heads(get_default_cfg())
    shapes, feats = _fake_features()
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 2
    with pytest.raises(ValueError, match="COMMON_STRIDE"):
        build_pixel_decoder(cfg, shapes)
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4
    pd = build_pixel_decoder(cfg, shapes)
    with pytest.raises(KeyError, match="res2"):
        pd.forward_features({k: v for k, v in feats.items() if k != "res2"})
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "Nope"
    with pytest.raises(KeyError, match="Nope"):
        build_pixel_decoder(cfg, shapes)


# ----------------------------------------------------------------------------- transformer decoder
def _decoder_inputs(b=2, c=32, mask_dim=24):
    ms = [torch.randn(b, c, 2, 3), torch.randn(b, c, 4, 6), torch.randn(b, c, 8, 12)]
    return ms, torch.randn(b, mask_dim, 16, 24)


def test_transformer_decoder_shapes_aux_and_round_robin():
    torch.manual_seed(0)
    cfg = _tiny_heads(get_default_cfg(), dec_layers=5)
    td = build_transformer_decoder(cfg, 32).eval()
    assert len(td.transformer_cross_attention_layers) == 4
    assert all(isinstance(p, torch.nn.Identity) for p in td.input_proj)
    seen = []
    for layer in td.transformer_cross_attention_layers:
        layer.register_forward_hook(
            lambda mod, args, kwargs, out: seen.append((args[1].shape[1], tuple(kwargs["memory_mask"].shape))),
            with_kwargs=True,
        )
    ms, mf = _decoder_inputs()
    with torch.no_grad():
        out = td(ms, mf)
    assert out["pred_logits"].shape == (2, 5, 4)
    assert out["pred_masks"].shape == (2, 5, 16, 24)
    assert len(out["aux_outputs"]) == 4
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 5, 4) and aux["pred_masks"].shape == (2, 5, 16, 24)
    # levels 0, 1, 2, 0 (lowest resolution first); masks (B * heads, Q, hw)
    assert seen == [(6, (8, 5, 6)), (24, (8, 5, 24)), (96, (8, 5, 96)), (6, (8, 5, 6))]

    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = False
    cfg.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = True
    td = build_transformer_decoder(cfg, 32)
    assert all(isinstance(p, torch.nn.Conv2d) for p in td.input_proj)
    out = td(ms, mf)
    assert out["aux_outputs"] == [] and out["pred_masks"].shape == (2, 5, 16, 24)
    with pytest.raises(ValueError, match="3 feature maps"):
        td(ms[:2], mf)


def test_cross_attention_ignores_masked_keys():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(d_model=16, nhead=2).eval()
    tgt, memory = torch.randn(1, 3, 16), torch.randn(1, 8, 16)
    mask = torch.zeros(2, 3, 8, dtype=torch.bool)
    mask[:, :, 4:] = True  # hide the second half of the keys from every query
    ref = layer(tgt, memory, memory_mask=mask)
    hidden_changed = memory.clone()
    hidden_changed[:, 4:] += 10 * torch.randn(1, 4, 16)
    torch.testing.assert_close(layer(tgt, hidden_changed, memory_mask=mask), ref)
    visible_changed = memory.clone()
    visible_changed[:, :4] += torch.randn(1, 4, 16)
    assert not torch.allclose(layer(tgt, visible_changed, memory_mask=mask), ref, atol=1e-3)
    with pytest.raises(TypeError, match="bool"):
        layer(tgt, memory, memory_mask=mask.float())


def test_attention_mask_threshold_fallback_and_head_layout():
    logits = torch.full((2, 2, 4, 4), -1.0)
    logits[0, 1, :, :2] = 2.0  # image 0, query 1: foreground in the left half
    logits[1, 0, 0, 0] = 0.5  # image 1, query 0: one foreground pixel
    m = compute_attention_mask(logits, (4, 4), num_heads=3)
    assert m.dtype == torch.bool and m.shape == (6, 2, 16)
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    for head in range(3):
        assert not m[head, 0].any()  # all-masked query -> un-masked entirely
        assert torch.equal(m[head, 1], ~left.flatten())
        assert m[3 + head, 0].sum() == 15 and not m[3 + head, 0, 0]
        assert not m[3 + head, 1].any()
    # resized to a coarser level: left half stays visible
    m2 = compute_attention_mask(logits, (2, 2), num_heads=1)
    assert m2[0, 1].tolist() == [False, True, False, True]


def test_decoder_all_masked_queries_attend_everywhere(monkeypatch):
    """All mask logits negative -> every key would be masked; the fallback un-masks the
    queries, so the decoder equals one that never masks (and stays finite)."""
    torch.manual_seed(0)
    td = build_transformer_decoder(_tiny_heads(get_default_cfg()), 32).eval()
    last = td.mask_embed.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-1.0)
    ms, _ = _decoder_inputs()
    mf = torch.ones(2, 24, 16, 24)
    with torch.no_grad():
        out = td(ms, mf)
    assert (out["pred_masks"] == -24.0).all()
    assert torch.isfinite(out["pred_logits"]).all()
    real = mad.compute_attention_mask
    monkeypatch.setattr(mad, "compute_attention_mask", lambda *a, **k: torch.zeros_like(real(*a, **k)))
    with torch.no_grad():
        unmasked = td(ms, mf)
    torch.testing.assert_close(out["pred_logits"], unmasked["pred_logits"])
    for a, b in zip(out["aux_outputs"], unmasked["aux_outputs"]):
        torch.testing.assert_close(a["pred_logits"], b["pred_logits"])


def test_decoder_mask_logits_finite_under_fp16_autocast():
    torch.manual_seed(0)
    td = build_transformer_decoder(_tiny_heads(get_default_cfg()), 32)
    last = td.mask_embed.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(300.0)  # 24 * 300 * 300 = 2.16e6 > fp16 max
    ms, _ = _decoder_inputs()
    with torch.autocast("cpu", dtype=torch.float16):
        out = td(ms, torch.full((2, 24, 16, 24), 300.0))
    assert out["pred_masks"].dtype == torch.float32
    torch.testing.assert_close(out["pred_masks"], torch.full_like(out["pred_masks"], 2.16e6))
    assert torch.isfinite(out["pred_logits"]).all()


# ----------------------------------------------------------------------------- whole network
def test_r50_and_swin_t_parameter_counts_match_mask2former():
    counts = {}
    for name, cfg in [("R50", _resnet_cfg(50)), ("SwinT", get_default_cfg())]:
        if name == "SwinT":
            cfg.MODEL.BACKBONE.NAME = "TimmSwinBackbone"
        bb = build_backbone(cfg)
        pd = build_pixel_decoder(cfg, bb.output_shape())
        td = build_transformer_decoder(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM)
        counts[name] = _n_params(bb, pd, td)
    assert abs(counts["R50"] - 43_970_257) <= 0.02 * 43_970_257
    assert counts["R50"] == 43_970_257  # the architecture matches exactly
    assert counts["SwinT"] == 47_421_643


def test_forward_backward_finite_grads_everywhere():
    torch.manual_seed(0)
    cfg = _tiny_heads(_resnet_cfg(18))
    cfg.MODEL.SEM_SEG_HEAD.MSDA_IMPL = "torch"
    bb = build_backbone(cfg)
    pd = build_pixel_decoder(cfg, bb.output_shape())
    td = build_transformer_decoder(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM)
    # the zero-initialised offset / attention-weight projections make d(out)/d(query) = 0
    # at init (so the encoder's level_embed gets no gradient); move them off zero first
    for m in pd.modules():
        if isinstance(m, MSDeformAttn):
            torch.nn.init.normal_(m.sampling_offsets.weight, std=0.01)
            torch.nn.init.normal_(m.attention_weights.weight, std=0.01)
    mask_features, ms = pd.forward_features(bb(torch.randn(2, 3, 64, 96)))
    out = td(ms, mask_features)
    loss = 0.0
    for o in [out, *out["aux_outputs"]]:
        loss = loss + (o["pred_logits"] * torch.randn_like(o["pred_logits"])).sum()
        loss = loss + (o["pred_masks"] * torch.randn_like(o["pred_masks"])).sum()
    loss.backward()
    bad = []
    for prefix, mod in [("backbone", bb), ("pixel_decoder", pd), ("decoder", td)]:
        for n, p in mod.named_parameters():
            assert p.requires_grad, f"{prefix}.{n} is frozen with FREEZE_AT=0"
            if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().max() == 0:
                bad.append(f"{prefix}.{n}")
    assert not bad, bad
