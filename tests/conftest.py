import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mask2former_sim  # noqa: E402,F401  (Pillow shim before detectron2)


@pytest.fixture
def cfg():
    from mask2former_sim.config import get_default_cfg

    return get_default_cfg()
