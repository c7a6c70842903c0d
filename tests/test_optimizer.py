"""AdamW parameter groups and full-model gradient clipping."""
import os

import torch
from torch import nn

from mask2former_sim.engine.optimizer import build_optimizer, param_groups, with_full_model_clipping


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 2)
        self.norm = nn.LayerNorm(2)
        self.query_embed = nn.Embedding(5, 2)
        self.level_embed = nn.Parameter(torch.zeros(3, 2))


def group_of(groups, param):
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_groups(cfg):
    cfg.SOLVER.BASE_LR = 1e-4
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    m = Toy()
    groups = param_groups(cfg, m)
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    conv = group_of(groups, m.backbone[0].weight)
    assert conv["lr"] == 1e-4 * 0.1 and conv["weight_decay"] == 0.05
    bn = group_of(groups, m.backbone[1].weight)
    assert bn["lr"] == 1e-4 * 0.1 and bn["weight_decay"] == 0.0
    assert group_of(groups, m.head.weight)["weight_decay"] == 0.05
    assert group_of(groups, m.head.weight)["lr"] == 1e-4
    assert group_of(groups, m.norm.weight)["weight_decay"] == 0.0
    assert group_of(groups, m.query_embed.weight)["weight_decay"] == 0.0
    # a plain nn.Parameter called level_embed (the pixel decoder's) is not an embedding
    assert group_of(groups, m.level_embed)["weight_decay"] == 0.05
    # parameters with equal settings share one group
    assert len(groups) == 4


class SwinLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4, 2))
        self.proj = nn.Linear(2, 2)


def test_swin_position_tables_get_no_decay(cfg):
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.25
    m = SwinLike()
    groups = param_groups(cfg, m)
    assert group_of(groups, m.relative_position_bias_table)["weight_decay"] == 0.0
    assert group_of(groups, m.absolute_pos_embed)["weight_decay"] == 0.0
    assert group_of(groups, m.proj.weight)["weight_decay"] == 0.05


def test_model_groups_follow_upstream_mask2former(cfg):
    """Upstream: decoder embeddings (nn.Embedding) get WEIGHT_DECAY_EMBED, the pixel
    decoder's level_embed (a Parameter) the normal WEIGHT_DECAY."""
    import mask2former_sim.modeling  # noqa: F401
    from detectron2.modeling import build_model

    from mask2former_sim.engine.setup import build_cfg

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs", "synthetic", "boxinst_R18_synth.yaml")
    cfg = build_cfg(config, [
        "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1", "MODEL.MASK_FORMER.DEC_LAYERS", "2",
        "SOLVER.WEIGHT_DECAY", "0.05", "SOLVER.WEIGHT_DECAY_EMBED", "0.25",
    ])
    model = build_model(cfg)
    groups = param_groups(cfg, model)
    params = dict(model.named_parameters())
    decay = {name: group_of(groups, p)["weight_decay"] for name, p in params.items()}
    assert decay["pixel_decoder.transformer.level_embed"] == 0.05
    for name in ("predictor.query_feat.weight", "predictor.query_embed.weight", "predictor.level_embed.weight"):
        assert decay[name] == 0.25, name
    embeds = {n for n, v in decay.items() if v == 0.25}
    assert embeds == {"predictor.query_feat.weight", "predictor.query_embed.weight", "predictor.level_embed.weight"}
    assert decay["predictor.class_embed.weight"] == 0.05


def test_full_model_clipping_clips_the_global_norm():
    p1 = nn.Parameter(torch.zeros(3))
    p2 = nn.Parameter(torch.zeros(4))
    opt = with_full_model_clipping(torch.optim.SGD, 0.5, 2.0)([{"params": [p1]}, {"params": [p2]}], lr=1.0)
    p1.grad = torch.full((3,), 3.0)
    p2.grad = torch.full((4,), 4.0)
    opt.step()
    total = (3 * 9 + 4 * 16) ** 0.5
    torch.testing.assert_close(p1.data, torch.full((3,), -3.0 * 0.5 / total))
    torch.testing.assert_close(p2.data, torch.full((4,), -4.0 * 0.5 / total))


def test_build_optimizer(cfg):
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    opt = build_optimizer(cfg, Toy())
    assert isinstance(opt, torch.optim.AdamW) and "FullModelClipped" in type(opt).__name__
    cfg.SOLVER.OPTIMIZER = "LION"
    try:
        build_optimizer(cfg, Toy())
    except ValueError as e:
        assert "LION" in str(e)
    else:
        raise AssertionError("unknown optimizer accepted")
