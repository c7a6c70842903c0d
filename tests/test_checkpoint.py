"""Crash-safe checkpoints (mask2former_sim/engine/checkpoint.py): atomic writes, failed writes that
leave the previous checkpoint intact, and --resume past a damaged last checkpoint."""
import errno
import logging
import os

import pytest
import torch
from torch import nn

from mask2former_sim.engine.checkpoint import AtomicCheckpointer, checkpoint_iteration_of


class _Counter:
    """A checkpointable with a state (the trainer's role in the real checkpoint)."""

    def __init__(self, value=0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def _checkpointer(tmp_path, seed=0, value=0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    counter = _Counter(value)
    return AtomicCheckpointer(model, str(tmp_path), counter=counter), model, counter


def _last(tmp_path):
    return (tmp_path / "last_checkpoint").read_text()


def test_save_writes_the_file_and_tags_it_with_no_temporary_left(tmp_path):
    ck, model, counter = _checkpointer(tmp_path, value=7)
    ck.save("model_0000009", iteration=9)
    assert _last(tmp_path) == "model_0000009.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]
    loaded = torch.load(tmp_path / "model_0000009.pth", weights_only=False)
    assert loaded["iteration"] == 9 and loaded["counter"] == {"value": 7}
    torch.testing.assert_close(loaded["model"]["weight"], model.weight.detach())


@pytest.mark.parametrize("fail_at", ["write", "rename"])
def test_a_failed_write_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    ck, _, counter = _checkpointer(tmp_path, value=1)
    ck.save("model_0000001", iteration=1)
    before = (tmp_path / "model_0000001.pth").read_bytes()
    counter.value = 2
    if fail_at == "write":  # disk full half-way through the file
        real_save = torch.save

        def half_then_enospc(obj, f, *a, **k):
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(torch, "save", half_then_enospc)
    else:  # the directory became unwritable (as root, chmod would not stop us: simulate it)
        def refuse(src, dst):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match=r"model_0000002\.pth.*previous checkpoint"):
        ck.save("model_0000002", iteration=2)
    monkeypatch.undo()
    assert _last(tmp_path) == "model_0000001.pth"
    assert (tmp_path / "model_0000001.pth").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory(tmp_path):
    ck, _, _ = _checkpointer(tmp_path)
    ck.save("model_0000001", iteration=1)
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(OSError, match="model_0000002"):
            ck.save("model_0000002", iteration=2)
    finally:
        os.chmod(tmp_path, 0o700)
    assert _last(tmp_path) == "model_0000001.pth"


def test_resume_skips_a_truncated_last_checkpoint_and_names_it(tmp_path, caplog):
    ck, _, _ = _checkpointer(tmp_path, seed=0, value=1)
    ck.save("model_0000001", iteration=1)
    ck.model.weight.data.add_(1.0)
    ck.checkpointables["counter"].value = 3
    ck.save("model_0000003", iteration=3)
    good = {k: v.clone() for k, v in ck.model.state_dict().items()}
    ck.model.weight.data.add_(1.0)
    ck.save("model_0000005", iteration=5)
    data = (tmp_path / "model_0000005.pth").read_bytes()
    (tmp_path / "model_0000005.pth").write_bytes(data[: len(data) // 2])  # killed mid-write, old-style

    fresh, model, counter = _checkpointer(tmp_path, seed=1)
    with caplog.at_level(logging.WARNING):
        extra = fresh.resume_or_load("", resume=True)
    assert extra["iteration"] == 3 and counter.value == 3
    torch.testing.assert_close(model.state_dict()["weight"], good["weight"])
    text = caplog.text
    assert "model_0000005.pth" in text and "model_0000003.pth" in text


def test_resume_with_no_readable_checkpoint_is_an_error_listing_them(tmp_path):
    ck, _, _ = _checkpointer(tmp_path)
    ck.save("model_0000001", iteration=1)
    (tmp_path / "model_0000001.pth").write_bytes(b"garbage")
    fresh, _, _ = _checkpointer(tmp_path, seed=1)
    with pytest.raises(RuntimeError, match=r"no readable checkpoint.*model_0000001\.pth"):
        fresh.resume_or_load("", resume=True)


def test_resume_when_last_checkpoint_names_a_missing_file(tmp_path):
    ck, _, _ = _checkpointer(tmp_path)
    ck.save("model_0000004", iteration=4)
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    fresh, _, _ = _checkpointer(tmp_path, seed=1)
    assert fresh.resume_or_load("", resume=True)["iteration"] == 4


def test_checkpoint_iteration_of_a_file_name():
    assert checkpoint_iteration_of("out/model_0000123.pth") == 123
    assert checkpoint_iteration_of("out/model_final.pth") is None


def test_nonfinite_loss_message_names_terms_outputs_iteration_and_resume_point():
    from mask2former_sim.engine.trainer import nonfinite_loss_message

    losses = {"loss_ce": torch.tensor(1.0), "loss_proj_3": torch.tensor(float("nan")),
              "loss_pseudo_bce": torch.tensor(float("inf")), "loss_pairwise_0": torch.tensor(0.5)}
    msg = nonfinite_loss_message(losses, 17, "out/model_0000015.pth")
    assert "iteration 17" in msg and "out/model_0000015.pth" in msg
    assert "loss_proj = nan at decoder output aux_3" in msg
    assert "loss_pseudo_bce = inf at the final decoder output" in msg
    assert "loss_ce" not in msg and "loss_pairwise" not in msg
    assert "no checkpoint was written yet" in nonfinite_loss_message(losses, 1)


def test_resume_refuses_a_checkpoint_whose_shapes_do_not_fit_the_model(tmp_path):
    """--resume continues the same run: a tensor of another shape (a changed config) is an error
    naming the key, not detectron2's logged skip that keeps the fresh tensor."""
    ck, model, counter = _checkpointer(tmp_path, value=3)
    ck.save("model_0000004", iteration=4)
    torch.manual_seed(1)
    other = nn.Linear(3, 4)  # weight (4, 3) instead of (2, 3)
    ck2 = AtomicCheckpointer(other, str(tmp_path), counter=_Counter())
    with pytest.raises(ValueError, match=r"weight: \(2, 3\) in the checkpoint, \(4, 3\) in the model"):
        ck2.resume_or_load("", resume=True)
    # the same file as plain weights (no --resume): detectron2's skip-and-log
    ck3 = AtomicCheckpointer(nn.Linear(3, 4), str(tmp_path / "elsewhere"), counter=_Counter())
    ck3.resume_or_load(str(tmp_path / "model_0000004.pth"), resume=False)
