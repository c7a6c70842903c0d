import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mask2former_sim  # noqa: E402,F401  (Pillow shim before detectron2)


@pytest.fixture
def cfg():
    from mask2former_sim.config import get_default_cfg

    return get_default_cfg()


KEEP_OUTPUTS_ENV = "MASK2FORMER_SIM_KEEP_TEST_OUTPUTS"


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """A folder shared by one test module's tests (trainings, checkpoints), removed when the
    module ends: the suite's checkpoints add up to more than a CI disk may hold (passed tests'
    own tmp_path go at once, pyproject.toml). Set MASK2FORMER_SIM_KEEP_TEST_OUTPUTS=1 to keep it."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    if not os.environ.get(KEEP_OUTPUTS_ENV):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def drop_run():
    """``drop_run(path)`` removes a finished run's folder (its checkpoints are 100-200 MB each)
    unless MASK2FORMER_SIM_KEEP_TEST_OUTPUTS is set: for module_tmp runs no later test reads."""

    def drop(path):
        if not os.environ.get(KEEP_OUTPUTS_ENV):
            shutil.rmtree(path, ignore_errors=True)

    return drop
