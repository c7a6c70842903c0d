"""kill -9 at any moment, then ``--resume`` until the end: the result is bit-identical on the CPU.

For each config (box-only, fully supervised, SIM; SIM + copy-paste where its config exists),
``train_net.py`` runs 8 tiny iterations with
a checkpoint every 2 (model_0000001, 3, 5, 7, model_final) twice: once uninterrupted, once
killed with SIGKILL at chosen moments and restarted with ``--resume`` after each kill. The
moments (``MASK2FORMER_SIM_PAUSE_AT``, mask2former_sim/engine/fault_injection.py: the run
pauses there and writes a marker, the test then kills it) are inside a training step (after
the backward pass, before the optimizer step) and inside checkpoint writes (a temporary file
half written; complete but not renamed; renamed but not yet named by ``last_checkpoint``;
``last_checkpoint``'s own replacement; the write of model_final.pth). After every kill,
``last_checkpoint`` must name a complete, loadable checkpoint, and the next run must start
from the iteration after it. At the end, every entry of the two model_final.pth files (model
tensors, among them the SIM prototypes; the SIM teacher; optimizer, scheduler, iteration, RNG
states) must be equal bit for bit.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_cli import ROOT, SIM_CFG, SYNTH_CFG, read_metrics, tiny

FULLSUP_CFG = "configs/synthetic/fullsup_R18_synth.yaml"
PROTO_KEY = "criterion.pseudo_labeler.memory.prototypes"
TEACHER_KEY = "sim_teacher"  # mask2former_sim.engine.sim_hooks.TEACHER_KEY, under checkpoint["trainer"]
MAX_ITER = 8
WAIT = 240  # seconds for one run to reach its pause or its end (a shared 2-core machine is slow)

COMMON = {
    "SOLVER.MAX_ITER": MAX_ITER,
    "SOLVER.CHECKPOINT_PERIOD": 2,
    "SEED": 7,
    "DATASETS.TEST": "()",  # no evaluation: it runs after training and is not what is tested here
}
# tau_l = tau_h = 0.5 and the pseudo-mask loss from iteration 1 on (as test_cli's sim_trained):
# teacher, prototypes and pseudo loss all act in every step that a kill interrupts or replays
SIM = {"MODEL.SIM.WARMUP_ITERS": 1, "MODEL.SIM.MODULATION": 1.0, "MODEL.SIM.LOW_THRESH": 0.5,
       "MODEL.SIM.HIGH_THRESH": 0.5, "MODEL.SIM.TEACHER.MOMENTUM": 0.9, "MODEL.SIM.PROTO_MOMENTUM": 0.9}

# name: (config, overrides, the pause of each interrupted run (the last run has none), the
# iteration each run starts from)
CASES = {
    # a kill inside step 2 loses it (resume at 2, after model_0000001); a kill while
    # model_0000005.pth is half written leaves last_checkpoint on model_0000003
    "boxinst": (SYNTH_CFG, {}, ["step:2", "write:model_0000005.pth"], [0, 2, 4]),
    # model_0000003.pth complete but not renamed into place: resume from model_0000001; then
    # model_0000005.pth in place but not yet named by last_checkpoint: resume from model_0000003
    "fullsup": (FULLSUP_CFG, {}, ["replace:model_0000003.pth", "tag:model_0000005.pth"], [0, 2, 4]),
    # inside step 3 (SIM: after the forward pass that updated the prototypes); the new
    # last_checkpoint (naming model_0000003) written but not renamed: resume from model_0000001
    # again; model_final.pth half written: resume after model_0000007, with nothing left to train
    "sim": (SIM_CFG, SIM, ["step:3", "replace:last_checkpoint", "write:model_final.pth"], [0, 2, 2, 8]),
}
CP_CFG = "configs/synthetic/sim_cp_R18_synth.yaml"
BANK_KEY = "sim_copy_paste_bank"  # mask2former_sim.engine.sim_hooks.BANK_KEY, under checkpoint["trainer"]
if os.path.isfile(os.path.join(ROOT, CP_CFG)):
    # SIM + copy-paste (MODEL.SIM.COPY_PASTE, its bank in the checkpoint): inside step 3 (the
    # bank filled from the teacher since iteration 1), then model_0000005.pth half written
    CASES["sim_copypaste"] = (CP_CFG, SIM, ["step:3", "write:model_0000005.pth"], [0, 2, 4])
# compare() walks the whole checkpoint: a new entry of the model state or of
# checkpoint["trainer"] (the copy-paste bank, ...) is compared without change below.


def _env(cache, pause=None, marker=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MASK2FORMER_SIM_CACHE=str(cache))
    for key in ("MASK2FORMER_SIM_PAUSE_AT", "MASK2FORMER_SIM_PAUSE_FILE", "MASK2FORMER_SIM_PAUSE_SECONDS"):
        env.pop(key, None)
    if pause:
        env.update(MASK2FORMER_SIM_PAUSE_AT=pause, MASK2FORMER_SIM_PAUSE_FILE=str(marker),
                   MASK2FORMER_SIM_PAUSE_SECONDS=str(WAIT))
    return env


def _start(argv, log_path, env):
    log = open(log_path, "w")  # a file, not a pipe: a full pipe would block the child
    try:
        return subprocess.Popen([sys.executable, "train_net.py"] + argv, cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    finally:
        log.close()


def _finish(proc, log_path, timeout=WAIT):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"train_net.py did not finish in {timeout} s:\n" + log_path.read_text()[-4000:])
    assert proc.returncode == 0, log_path.read_text()[-5000:]


def _kill_at_pause(proc, marker, log_path, pause):
    deadline = time.monotonic() + WAIT
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"train_net.py ended (status {proc.returncode}) before pausing at {pause}:\n"
                        + log_path.read_text()[-5000:])
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"train_net.py did not reach {pause} in {WAIT} s:\n" + log_path.read_text()[-4000:])
        time.sleep(0.05)
    assert marker.read_text().split()[0] == pause
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    marker.unlink()


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def compare(a, b, path="checkpoint"):
    """Paths at which two checkpoint trees differ (tensors: dtype, shape and every bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path} keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a for d in compare(a[k], b[k], f"{path}[{k!r}]")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in compare(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.fixture(scope="module")
def shared(module_tmp):
    base = module_tmp
    return {"data": base / "data", "cache": base / "cache"}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_then_resume_ends_bit_identical(case, shared, tmp_path):
    config, extra, pauses, starts = CASES[case]
    kv = dict(COMMON, **extra)

    def argv(out, resume):
        return ["--config-file", config] + (["--resume"] if resume else []) + tiny(shared["data"], out, **kv)

    ref_out, out, marker = tmp_path / "uninterrupted", tmp_path / "interrupted", tmp_path / "paused"
    # the uninterrupted run, alongside the interrupted ones
    ref = _start(argv(ref_out, False), tmp_path / "uninterrupted.log", _env(shared["cache"]))
    try:
        logs = []
        for i, pause in enumerate(pauses + [None]):
            log_path = tmp_path / f"run{i}.log"
            proc = _start(argv(out, i > 0), log_path, _env(shared["cache"], pause, marker))
            if pause is None:
                _finish(proc, log_path)
            else:
                _kill_at_pause(proc, marker, log_path, pause)
                # last_checkpoint names a complete, loadable checkpoint of this run
                named = (out / "last_checkpoint").read_text().strip()
                ckpt = _load(out / named)
                assert ckpt["iteration"] == starts[i + 1] - 1, (pause, named, ckpt["iteration"])
                assert "model" in ckpt and "optimizer" in ckpt["trainer"]["_trainer"], (pause, named)
            logs.append(log_path.read_text())
        _finish(ref, tmp_path / "uninterrupted.log")
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.wait()

    started = [int(log.split("Starting training from iteration ", 1)[1].split()[0]) for log in logs]
    assert started == starts, started
    a, b = _load(ref_out / "model_final.pth"), _load(out / "model_final.pth")
    assert a["iteration"] == MAX_ITER - 1
    assert "optimizer" in a["trainer"]["_trainer"] and "rng" in a["trainer"]
    if case.startswith("sim"):
        # not vacuous: the teacher and prototypes are saved, and the pseudo-mask loss acted
        assert TEACHER_KEY in a["trainer"] and PROTO_KEY in a["model"]
        assert any(r.get("loss_pseudo_bce", 0) > 0 for r in read_metrics(ref_out / "metrics.json"))
        early = _load(ref_out / "model_0000001.pth")["model"][PROTO_KEY]
        assert not torch.equal(a["model"][PROTO_KEY], early)  # the prototypes moved in the replayed steps
        teacher = a["trainer"][TEACHER_KEY]
        assert any(not torch.equal(v, a["model"][k]) for k, v in teacher.items() if k in a["model"])
    if case == "sim_copypaste":  # the bank is saved, and pastes were trained on
        assert BANK_KEY in a["trainer"], sorted(a["trainer"])
        rows = read_metrics(ref_out / "metrics.json")
        assert any(v > 0 for r in rows for k, v in r.items() if k.startswith("loss_paste")), rows[-1]
    differ = compare(a, b)
    assert not differ, f"{len(differ)} entries differ after kill + resume: {differ[:20]}"


def test_pause_grammar():
    from mask2former_sim.engine.fault_injection import parse

    assert parse("") == ()
    assert parse("step:5, write:model_0000003.pth,replace:last_checkpoint,tag:model_final.pth") == (
        ("step", "5"), ("write", "model_0000003.pth"), ("replace", "last_checkpoint"), ("tag", "model_final.pth"))
    for bad in ("step", "step:x", "save:model_final.pth", "write:"):
        with pytest.raises(ValueError, match="MASK2FORMER_SIM_PAUSE_AT"):
            parse(bad)
