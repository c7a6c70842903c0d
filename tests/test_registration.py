"""`import mask2former_sim` registers the model components and every built-in dataset name;
synthetic data is generated lazily, on the first DatasetCatalog.get, into the cache."""
import os
import subprocess
import sys
import textwrap

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from mask2former_sim.data import synthetic
from mask2former_sim.data.datasets import register_builtin_datasets
from mask2former_sim.data.registry import register_datasets_for
from mask2former_sim.engine.setup import build_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOXINST = os.path.join(ROOT, "configs/synthetic/boxinst_R18_synth.yaml")

FRESH_IMPORT = textwrap.dedent("""
    import os, sys
    cache = os.environ["MASK2FORMER_SIM_CACHE"]

    def files_under(path):
        return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)

    import mask2former_sim  # the only import of this project
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model
    from mask2former_sim.config import add_maskformer2_config, add_sim_config

    names = ["coco_2017_train_box", "coco_2017_train_full", "coco_2017_val_full",
             "voc_2012_train_aug_box", "voc_2012_val_full", "synth_train", "synth_train_full", "synth_val"]
    missing = [n for n in names if n not in DatasetCatalog.list()]
    assert not missing, missing
    cfg = get_cfg()
    add_maskformer2_config(cfg)
    add_sim_config(cfg)
    cfg.merge_from_file(sys.argv[1])
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 1
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 2
    model = build_model(cfg)
    assert type(model).__name__ == "BoxSupMaskFormer"
    assert files_under(cache) == [], files_under(cache)  # registration wrote nothing
    records = DatasetCatalog.get("synth_val")
    assert len(records) == 100 and all(os.path.isfile(r["file_name"]) for r in records)
    val_dir = os.path.join(cache, "synthetic", "val")
    assert os.path.isfile(os.path.join(val_dir, "annotations.json"))
    # only the split that was asked for is generated
    assert not os.path.exists(os.path.join(cache, "synthetic", "train"))
    print("OK", len(records))
""")


def test_import_registers_model_and_datasets_lazily(tmp_path):
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_IMPORT)
    cache = tmp_path / "cache"
    cache.mkdir()
    env = dict(os.environ, MASK2FORMER_SIM_CACHE=str(cache), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script), BOXINST], cwd=str(tmp_path), env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK 100" in proc.stdout


@pytest.fixture
def restore_synthetic_defaults():
    yield
    synthetic.register_synthetic_datasets()


def test_cfg_with_other_synthetic_settings_reregisters_lazily(tmp_path, restore_synthetic_defaults):
    root = tmp_path / "synth"
    opts = ["DATASETS.SYNTHETIC.ROOT", str(root), "DATASETS.SYNTHETIC.NUM_TRAIN", "3",
            "DATASETS.SYNTHETIC.NUM_VAL", "2"]
    cfg = build_cfg(BOXINST, opts)
    register_datasets_for(cfg)
    assert MetadataCatalog.get("synth_train").json_file == str(root / "train" / "annotations.json")
    assert not root.exists()  # nothing generated before .get
    assert len(DatasetCatalog.get("synth_train")) == 3
    assert len(DatasetCatalog.get("synth_val")) == 2
    assert (root / "train" / "annotations.json").is_file()
    cfg = build_cfg(BOXINST, opts[:-1] + ["4"])
    register_datasets_for(cfg)
    assert len(DatasetCatalog.get("synth_val")) == 4


def test_builtin_names_follow_the_datasets_root(tmp_path):
    register_builtin_datasets(str(tmp_path / "a"))
    assert MetadataCatalog.get("coco_2017_val_full").json_file.startswith(str(tmp_path / "a"))
    register_builtin_datasets(str(tmp_path / "b"))
    assert MetadataCatalog.get("coco_2017_val_full").json_file.startswith(str(tmp_path / "b"))
    register_builtin_datasets()  # back to $DETECTRON2_DATASETS / ./datasets
    assert not MetadataCatalog.get("coco_2017_val_full").json_file.startswith(str(tmp_path))
