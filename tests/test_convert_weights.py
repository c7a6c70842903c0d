"""Weight converters: torchvision ResNet and timm/official Swin -> detectron2 .pkl.

Random-weight models only (no downloads). Converted files are loaded with
DetectionCheckpointer and the loaded backbones must reproduce the source models' features.
"""
import os
import pickle
import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

import mask2former_sim  # noqa: F401  (Pillow shim before detectron2)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import convert_swin as cs  # noqa: E402
import convert_torchvision_resnet as cr  # noqa: E402
import timm  # noqa: E402
import torchvision  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling.backbone import build_resnet_backbone  # noqa: E402

SWIN_T = "swin_tiny_patch4_window7_224"


class Holder(nn.Module):
    """Stand-in for the meta-architecture: holds the backbone as ``backbone``."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone


def _load(model: nn.Module, path: str):
    """Load ``path`` with DetectionCheckpointer.load, then return the (missing, unexpected)
    key lists of the same conversion (its private steps, which report them)."""
    ckpt = DetectionCheckpointer(model)
    ckpt.load(path)
    incompatible = ckpt._load_model(ckpt._load_file(path))
    missing = [k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked")]
    return sorted(missing), sorted(incompatible.unexpected_keys)


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.randn(c, generator=g) * 0.1
            m.running_mean.data = torch.randn(c, generator=g) * 0.1
            m.running_var.data = torch.rand(c, generator=g) + 0.5


def _torchvision_stages(m: torchvision.models.ResNet, x: torch.Tensor):
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    outs = []
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
        x = layer(x)
        outs.append(x)
    return outs


def _d2_resnet(cfg, depth: int, norm: str):
    cfg = cfg.clone()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


# ----------------------------------------------------------------------------- ResNet


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_resnet18_converted_features_match_torchvision(cfg, tmp_path, capsys, norm):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None)
    _randomize_bn(tv)
    tv.eval()
    src, dst = str(tmp_path / "r18.pth"), str(tmp_path / "out" / "R-18.pkl")
    torch.save({"state_dict": tv.state_dict()}, src)  # wrapped, as many trainers save

    assert cr.main([src, dst]) == 0
    log = capsys.readouterr().out
    # stem conv + 4 bn (5), 8 blocks x 2 x (conv + 4 bn) (80), 3 shortcuts x (conv + 4 bn) (15)
    assert "wrote 100 tensors" in log
    assert "fc.weight" in log and "20 x *.num_batches_tracked" in log
    assert "ResNet-18" in log and "RES2_OUT_CHANNELS 64" in log

    with open(dst, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == "torchvision" and data["matching_heuristics"] is True
    assert all(isinstance(v, np.ndarray) for v in data["model"].values())
    np.testing.assert_array_equal(data["model"]["res3.0.shortcut.norm.running_var"], tv.layer2[0].downsample[1].running_var.numpy())
    np.testing.assert_array_equal(data["model"]["res5.1.conv2.weight"], tv.layer4[1].conv2.weight.detach().numpy())

    holder = Holder(_d2_resnet(cfg, 18, norm)).eval()
    missing, unexpected = _load(holder, dst)
    assert missing == [] and unexpected == []

    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours = holder.backbone(x)
        ref = _torchvision_stages(tv, x)
    for name, r in zip(["res2", "res3", "res4", "res5"], ref):
        assert ours[name].shape == r.shape
        torch.testing.assert_close(ours[name], r, atol=1e-5, rtol=1e-5)


def test_resnet50_names_and_shapes_match_detectron2(cfg):
    tv_sd = torchvision.models.resnet50(weights=None).state_dict()
    res = cr.convert_resnet_state_dict(tv_sd)
    d2 = {k: tuple(v.shape) for k, v in _d2_resnet(cfg, 50, "FrozenBN").state_dict().items()}
    assert {k: v.shape for k, v in res.model.items()} == d2
    assert [k for k in res.dropped if not k.endswith("num_batches_tracked")] == ["fc.bias", "fc.weight"]
    assert len(res.dropped) == 2 + 53  # 53 BatchNorms
    assert res.model["res2.0.conv3.norm.running_mean"].shape == (256,)


def test_resnext_layout_reports_groups():
    sd = torchvision.models.resnext50_32x4d(weights=None).state_dict()
    notes = " ".join(cr.convert_resnet_state_dict(sd).notes)
    assert "NUM_GROUPS 32" in notes and "WIDTH_PER_GROUP 4" in notes and "DEPTH 50" in notes


def test_resnet_bad_inputs(tmp_path, capsys):
    with pytest.raises(ValueError, match="not a torchvision ResNet.*conv1.weight"):
        cr.convert_resnet_state_dict({"foo.weight": torch.zeros(3)})
    sd = torchvision.models.resnet18(weights=None).state_dict()
    sd["layer2.0.se.fc.weight"] = torch.zeros(4, 4)
    with pytest.raises(ValueError, match=re.escape("layer2.0.se.fc.weight")):
        cr.convert_resnet_state_dict(sd)
    sd.pop("layer2.0.se.fc.weight")
    sd.pop("layer3.1.bn2.running_var")
    with pytest.raises(ValueError, match=re.escape("res4.1.conv2.norm.running_var")):
        cr.convert_resnet_state_dict(sd)

    garbage = tmp_path / "garbage.pth"
    torch.save({"weights": [1, 2, 3]}, str(garbage))
    assert cr.main([str(garbage), str(tmp_path / "g.pkl")]) == 1
    assert "not a tensor" in capsys.readouterr().err
    assert not (tmp_path / "g.pkl").exists()

    assert cr.main([str(tmp_path / "nope.pth"), str(tmp_path / "n.pkl")]) == 1
    err = capsys.readouterr().err
    assert "not found" in err and "nope.pth" in err

    good = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), str(good))
    assert cr.main([str(good), str(tmp_path / "r18.pth2")]) == 1
    assert ".pkl" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no top-level key 'ema'"):
        cr.load_checkpoint(str(good), key="ema")


def test_help_exits_cleanly(capsys):
    for mod in (cr, cs):
        with pytest.raises(SystemExit) as e:
            mod.main(["--help"])
        assert e.value.code == 0
        assert "usage:" in capsys.readouterr().out


# ----------------------------------------------------------------------------- Swin


@pytest.fixture(scope="module")
def swin_src(module_tmp):
    """Random timm Swin-T (classifier), its state dict saved to disk, and an official-layout copy."""
    torch.manual_seed(0)
    ref = timm.create_model(SWIN_T, pretrained=False, dynamic_img_size=True, always_partition=True).eval()
    with torch.no_grad():  # LayerNorms and bias tables are constant at init: make them distinct
        for n, p in ref.named_parameters():
            if "norm" in n or "relative_position_bias_table" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    d = module_tmp
    sd = ref.state_dict()
    timm_path = str(d / "swin_t_timm.pth")
    torch.save(sd, timm_path)

    # official microsoft/Swin-Transformer layout: merging at the end of the previous stage,
    # head without ".fc", persistent index / mask buffers
    off = {}
    for k, v in sd.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.+)", k)
        if m:
            k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        off[k.replace("head.fc.", "head.")] = v
    for i, stage in enumerate(ref.layers):
        for j, _ in enumerate(stage.blocks):
            off[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
            if j % 2:
                off[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, 49, 49)
    off_path = str(d / "swin_t_official.pth")
    torch.save({"model": off}, off_path)
    return ref, timm_path, off_path, d


def test_swin_converted_features_match_timm(swin_src, capsys):
    from mask2former_sim.modeling.backbone.swin import TimmSwinBackbone

    ref, timm_path, _, d = swin_src
    dst = str(d / "swin_t.pkl")
    assert cs.main([timm_path, dst, "--timm-name", SWIN_T]) == 0
    log = capsys.readouterr().out
    # 173 timm tensors - head.fc (2) - final norm (2)
    assert "wrote 169 tensors" in log and "head.fc.weight" in log and "norm.bias" in log
    assert "missing 8 target keys" in log and "backbone.out_norms.res5.weight" in log

    bb = TimmSwinBackbone(SWIN_T, img_size=224, window_size=7)
    holder = Holder(bb).eval()
    missing, unexpected = _load(holder, dst)
    assert unexpected == []
    assert missing == sorted(f"backbone.out_norms.res{i}.{p}" for i in range(2, 6) for p in ("weight", "bias"))

    x = torch.randn(1, 3, 32, 64)  # 8x16 patches: stages 3-4 are smaller than a window (padded)
    with torch.no_grad():
        want = ref.forward_intermediates(x, indices=4, intermediates_only=True)  # NCHW
        got_raw = bb.model(x)  # NHWC, before out_norms
        got = bb(x)
    for i, name in enumerate(["res2", "res3", "res4", "res5"]):
        w = want[i]
        assert got_raw[i].permute(0, 3, 1, 2).shape == w.shape
        torch.testing.assert_close(got_raw[i].permute(0, 3, 1, 2), w, atol=1e-5, rtol=1e-5)
        # out_norms are untouched (unit weight, zero bias): a plain channel LayerNorm
        normed = nn.functional.layer_norm(w.permute(0, 2, 3, 1), (w.shape[1],)).permute(0, 3, 1, 2)
        torch.testing.assert_close(got[name], normed, atol=1e-4, rtol=1e-4)


def test_swin_official_layout_gives_same_weights(swin_src):
    ref, timm_path, off_path, _ = swin_src
    a = cs.convert_swin_state_dict(cr.load_checkpoint(timm_path), SWIN_T)
    b = cs.convert_swin_state_dict(cr.load_checkpoint(off_path), SWIN_T)
    assert sorted(a.model) == sorted(b.model)
    for k in a.model:
        np.testing.assert_array_equal(a.model[k], b.model[k], err_msg=k)
    # stage-1 merging sits at the end of stage 0 officially, at the start of stage 1 in timm
    np.testing.assert_array_equal(
        b.model["backbone.model.layers_1.downsample.reduction.weight"],
        ref.layers[1].downsample.reduction.weight.detach().numpy(),
    )
    assert "official" in b.notes[0] and "timm" in a.notes[0]
    assert "layers.0.blocks.0.attn.relative_position_index" in b.dropped
    assert "layers.2.blocks.5.attn_mask" in b.dropped and "head.fc.weight" in b.dropped


def test_swin_window_resize(swin_src):
    from mask2former_sim.modeling.backbone.swin import TimmSwinBackbone

    ref, timm_path, _, d = swin_src
    res = cs.convert_swin_state_dict(cr.load_checkpoint(timm_path), SWIN_T, window_size=12)
    key = "backbone.model.layers_2.blocks.3.attn.relative_position_bias_table"
    new = res.model[key]
    old = ref.layers[2].blocks[3].attn.relative_position_bias_table.detach().numpy()
    assert old.shape == (13 * 13, 12) and new.shape == (23 * 23, 12)
    # offset (0, 0) and the extreme offsets keep their values under the resize
    np.testing.assert_allclose(new[11 * 23 + 11], old[6 * 13 + 6], atol=1e-4)
    np.testing.assert_allclose(new[0], old[0], atol=1e-4)
    np.testing.assert_allclose(new[-1], old[-1], atol=1e-4)
    assert any("resized 12 relative_position_bias_table" in n and "[7] to 12" in n for n in res.notes)

    path = str(d / "swin_t_w12.pkl")
    cr.save_d2_pickle(path, res.model, author="timm")
    holder = Holder(TimmSwinBackbone(SWIN_T, img_size=224, window_size=12))
    missing, unexpected = _load(holder, path)
    assert unexpected == [] and all(".out_norms." in k for k in missing)
    torch.testing.assert_close(
        holder.backbone.model.layers_2.blocks[3].attn.relative_position_bias_table.detach(), torch.from_numpy(new)
    )


def test_swin_loads_into_full_model(swin_src, cfg):
    from detectron2.modeling import build_model

    import mask2former_sim.modeling  # noqa: F401  (registers the meta-architecture)

    ref, timm_path, _, d = swin_src
    dst = str(d / "swin_t_full.pkl")
    assert cs.main([timm_path, dst, "--timm-name", SWIN_T]) == 0
    cfg.merge_from_file(os.path.join(os.path.dirname(__file__), "..", "configs", "coco", "instance-segmentation", "swin", "boxinst_swin_tiny_bs16_50ep.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    missing, unexpected = _load(model, dst)
    assert unexpected == []
    assert not [k for k in missing if k.startswith("backbone.") and ".out_norms." not in k]
    torch.testing.assert_close(model.backbone.model.layers_3.blocks[1].mlp.fc2.weight.detach(), ref.layers[3].blocks[1].mlp.fc2.weight.detach())
    torch.testing.assert_close(model.backbone.model.patch_embed.proj.bias.detach(), ref.patch_embed.proj.bias.detach())


def test_swin_bad_inputs(swin_src, tmp_path, capsys):
    _, timm_path, _, _ = swin_src
    with pytest.raises(ValueError, match="not a Swin state dict"):
        cs.convert_swin_state_dict({"conv1.weight": torch.zeros(2, 3, 7, 7)}, SWIN_T)
    with pytest.raises(ValueError, match="not a timm Swin"):
        cs.convert_swin_state_dict({"patch_embed.proj.weight": torch.zeros(1)}, "resnet50")
    sd = cr.load_checkpoint(timm_path)
    with pytest.raises(ValueError, match="swin_small.*without a value.*layers_2.blocks"):
        cs.convert_swin_state_dict(sd, "swin_small_patch4_window7_224")
    with pytest.raises(ValueError, match=r"swin_base.*shape mismatches.*patch_embed.proj.weight: \(96, 3, 4, 4\) vs \(128, 3, 4, 4\)"):
        cs.convert_swin_state_dict(sd, "swin_base_patch4_window7_224")
    deeper = dict(sd)  # a block Swin-T does not have (e.g. from a Swin-S checkpoint)
    deeper["layers.2.blocks.10.attn.relative_position_bias_table"] = torch.zeros(169, 12)
    with pytest.raises(ValueError, match="does not fit timm model 'swin_tiny"):
        cs.convert_swin_state_dict(deeper, SWIN_T)
    sd2 = dict(sd)
    sd2["layers.1.blocks.0.mlp.fc1.weight"] = torch.zeros(10, 192)
    with pytest.raises(ValueError, match=r"1 shape mismatches.*layers_1.blocks.0.mlp.fc1.weight: \(10, 192\) vs \(768, 192\)"):
        cs.convert_swin_state_dict(sd2, SWIN_T)
    sd2 = dict(sd)
    sd2["layers.1.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="lacks.*layers_1.extra.weight"):
        cs.convert_swin_state_dict(sd2, SWIN_T)
    assert cs.main([str(tmp_path / "missing.pth"), str(tmp_path / "o.pkl"), "--timm-name", SWIN_T]) == 1
    assert "not found" in capsys.readouterr().err
