"""Box-crop pretraining of the backbone: windows, caching, strict loading, no masks read,
training afterwards independent of whether the checkpoint was cached."""
import math
import os

import pytest
import torch

from detectron2.data import DatasetCatalog
from detectron2.modeling import build_backbone

import mask2former_sim.modeling  # noqa: F401
from mask2former_sim.data.registry import register_datasets_for
from mask2former_sim.engine import backbone_pretrain as bp
from mask2former_sim.engine.setup import build_cfg
from mask2former_sim.engine.trainer import Trainer

from test_train_e2e import BOXINST, FULLSUP, LossRecorder, register_poisoned_val, tiny_opts


def pretrain_opts(tmp_path, out="out", **extra):
    opts = {
        "MODEL.BACKBONE_PRETRAIN.ENABLED": True,
        "MODEL.BACKBONE_PRETRAIN.ITERS": 3,
        "MODEL.BACKBONE_PRETRAIN.CROP_SIZE": 32,
        "MODEL.BACKBONE_PRETRAIN.CACHE_DIR": str(tmp_path / "cache"),
    }
    opts.update(extra)
    return tiny_opts(tmp_path / "data", tmp_path / out, **opts)


def test_crop_windows_are_square_with_context_and_jitter():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 8.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        w = bp.crop_windows(boxes, (1.2, 1.5), 0.1, g)
        side = w[:, 2:] - w[:, :2]
        assert torch.allclose(side[:, 0], side[:, 1])
        long_side = torch.tensor([40.0, 8.0])
        assert ((side[:, 0] >= 1.2 * long_side - 1e-4) & (side[:, 0] <= 1.5 * long_side + 1e-4)).all()
        shift = (w[:, :2] + w[:, 2:]) / 2 - (boxes[:, :2] + boxes[:, 2:]) / 2
        assert (shift.abs() <= 0.1 * side + 1e-4).all()
    exact = bp.crop_windows(boxes, (1.0, 1.0), 0.0, g)
    assert torch.allclose(exact[0], torch.tensor([0.0, 20.0, 40.0, 60.0]))


def test_config_errors_name_the_key(tmp_path):
    cfg = build_cfg(BOXINST, pretrain_opts(tmp_path, **{"MODEL.WEIGHTS": "some.pth"}))
    with pytest.raises(ValueError, match="MODEL.WEIGHTS"):
        bp.check_pretrain_config(cfg)
    cfg = build_cfg(BOXINST, pretrain_opts(tmp_path, **{"MODEL.BACKBONE_PRETRAIN.CONTEXT": [0.5, 2.0]}))
    with pytest.raises(ValueError, match="CONTEXT"):
        bp.check_pretrain_config(cfg)
    cfg = build_cfg(BOXINST, pretrain_opts(tmp_path, **{"MODEL.BACKBONE_PRETRAIN.ITERS": 0}))
    with pytest.raises(ValueError, match="ITERS"):
        Trainer(cfg)


def test_fingerprint_follows_settings_and_data_not_names(tmp_path):
    def fp(config=BOXINST, **extra):
        cfg = build_cfg(config, pretrain_opts(tmp_path, **extra))
        register_datasets_for(cfg)
        return bp.pretrain_fingerprint(cfg, bp.training_records(cfg))

    base = fp()
    assert fp(**{"MODEL.BACKBONE_PRETRAIN.ITERS": 4}) != base
    assert fp(**{"SEED": 1}) != base
    assert fp(**{"DATASETS.TRAIN": "('synth_val',)"}) != base  # other images
    assert fp(**{"MODEL.BACKBONE_PRETRAIN.CACHE_DIR": str(tmp_path / "x")}) == base  # where is no setting
    # the fully supervised config reads the same images and boxes: it shares the backbone
    assert fp(FULLSUP) == base


def test_pretrain_caches_a_complete_backbone_checkpoint(tmp_path, monkeypatch):
    cfg = build_cfg(BOXINST, pretrain_opts(tmp_path))
    register_datasets_for(cfg)
    path = bp.ensure_pretrained_backbone(cfg)
    assert os.path.isfile(path) and path.startswith(str(tmp_path / "cache"))
    ckpt = torch.load(path, weights_only=True)
    backbone_keys = set(build_backbone(cfg).state_dict())
    assert set(ckpt["model"]) == {"backbone." + k for k in backbone_keys}
    assert ckpt["pretrain"]["iters"] == 3 and math.isfinite(ckpt["pretrain"]["final_loss"])
    # a second call reuses the file without training
    monkeypatch.setattr(bp, "pretrain_backbone", lambda *a: pytest.fail("retrained a cached backbone"))
    assert bp.ensure_pretrained_backbone(cfg) == path


def test_pretraining_changes_the_backbone_and_is_deterministic(tmp_path):
    cfg = build_cfg(BOXINST, pretrain_opts(tmp_path))
    register_datasets_for(cfg)
    first = bp.pretrain_backbone(cfg)["model"]
    second = bp.pretrain_backbone(cfg)["model"]
    torch.manual_seed(cfg.SEED)
    init = build_backbone(cfg).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    changed = [k for k, v in init.items() if v.is_floating_point() and not torch.equal(v, first["backbone." + k])]
    assert len(changed) > len(init) // 2


def test_pretraining_never_reads_masks(tmp_path):
    """A full-supervision config's dataset with garbage masks: pretraining uses boxes only."""
    cfg = build_cfg(FULLSUP, pretrain_opts(tmp_path))
    register_datasets_for(cfg)
    name = "poisoned_pretrain_train"
    # masks kept in the records (box_only=False), as a fully supervised config would have them
    register_poisoned_val(tmp_path / "data", tmp_path / "poisoned.json", name, box_only=False)
    try:
        cfg2 = build_cfg(FULLSUP, pretrain_opts(tmp_path, **{"DATASETS.TRAIN": f"('{name}',)"}))
        result = bp.pretrain_backbone(cfg2)
        assert math.isfinite(result["pretrain"]["final_loss"])
    finally:
        DatasetCatalog.remove(name)


def test_load_is_strict(tmp_path):
    cfg = build_cfg(BOXINST, pretrain_opts(tmp_path))
    model = Trainer.build_model(cfg)
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"backbone.stem.conv1.weight": torch.zeros(1)}}, bad)
    with pytest.raises(ValueError, match="does not fit"):
        bp.load_pretrained_backbone(model, str(bad))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        bp.load_pretrained_backbone(model, str(tmp_path / "missing.pth"))


def _first_losses(cfg, resume=False):
    register_datasets_for(cfg)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    rec = LossRecorder()
    trainer.register_hooks([rec])
    trainer.train()
    return trainer, rec.losses


def test_trainer_starts_from_the_pretrained_backbone_cached_or_not(tmp_path):
    opts = {"SOLVER.MAX_ITER": 2, "DATASETS.TEST": "()"}
    cfg = build_cfg(BOXINST, pretrain_opts(tmp_path, out="a", **opts))
    register_datasets_for(cfg)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)  # makes the cache
    ckpt = torch.load(bp.ensure_pretrained_backbone(cfg), weights_only=True)["model"]
    state = trainer.model.backbone.state_dict()
    assert all(torch.equal(state[k[len("backbone."):]], v) for k, v in ckpt.items())
    rec = LossRecorder()
    trainer.register_hooks([rec])
    trainer.train()
    # the same config again, now from the cache: identical training (random states preserved)
    _, cached = _first_losses(build_cfg(BOXINST, pretrain_opts(tmp_path, out="b", **opts)))
    assert rec.losses == cached and len(cached) == 2


def test_command_line_logs_progress_and_prints_the_checkpoint_last(tmp_path):
    import json
    import subprocess
    import sys

    opts = pretrain_opts(tmp_path, **{"MODEL.BACKBONE_PRETRAIN.ITERS": 2})
    cmd = [sys.executable, "-m", "mask2former_sim.engine.backbone_pretrain", "--config-file", BOXINST, *opts]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert os.path.isfile(result["path"]) and result["iters"] == 2
    assert result["path"].startswith(str(tmp_path / "cache"))
    # progress goes to the project's logger also when the module runs as __main__
    assert "backbone pretraining: iter 2/2" in done.stdout + done.stderr
