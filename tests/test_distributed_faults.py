"""Faults of a multi-process run, with two gloo processes on the CPU.

* A rank whose batches hold no GT at all completes its SIM training steps: the project's Trainer
  (DDP as detectron2 builds it, without ``find_unused_parameters``; TeacherEMAHook; the
  prototypes' all-reduce) for 3 iterations, the pseudo-mask loss on from the 2nd; both ranks end
  with the same student (BN running statistics aside: per rank with detectron2's DDP), teacher
  and prototypes. (tests/test_sim_training.py's two-process test
  covers one image without GT and one without a class, with a plain DDP loop.)
* When one rank dies (or hangs outside the collective), the other's collective raises within
  DIST_TIMEOUT_MINUTES instead of waiting for ever: the process group is made with the timeout
  that train_net.py gives detectron2's ``launch`` (``process_group_timeout``); and train_net.py
  does pass DIST_TIMEOUT_MINUTES to ``launch``.
"""
import datetime
import os
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

import mask2former_sim  # noqa: F401  (compat shim before detectron2, also in spawned workers)
from mask2former_sim.utils.distributed import process_group_timeout

from test_cli import ROOT, load_script, tiny

SIM_CP_CFG = "configs/synthetic/sim_cp_R18_synth.yaml"

PROTO_KEY = "criterion.pseudo_labeler.memory.prototypes"
JOIN = 240  # seconds: every spawned test ends by then, or is killed (CI never hangs)


def _join_all(procs, timeout=JOIN):
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return hung


# ------------------------------------------------------------ a rank without any GT (SIM on)
def _no_gt_worker(rank, world, init_file, data_root, out_dir, result_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    outcome = "finished"
    try:
        import torch.distributed as dist
        from detectron2.engine import defaults
        from detectron2.utils import comm

        from mask2former_sim.engine.setup import build_cfg
        from mask2former_sim.engine.sim_hooks import TEACHER_KEY, unwrap
        from mask2former_sim.engine.trainer import Trainer

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=process_group_timeout(2.0))
        comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(world)))  # what detectron2's launch sets
        # detectron2 builds DDP with device_ids=[local rank], which is for one GPU per process;
        # a CPU module takes device_ids=None. Everything else is detectron2's DDP as it is.
        create_ddp_model = defaults.create_ddp_model
        defaults.create_ddp_model = lambda model, **kw: create_ddp_model(model, device_ids=None, **kw)

        os.chdir(ROOT)
        # SIM + copy-paste: rank 0 fills its bank and pastes from the 3rd step on, rank 1 never
        cfg = build_cfg(SIM_CP_CFG, tiny(data_root, out_dir, **{
            "SOLVER.MAX_ITER": 3, "SOLVER.CHECKPOINT_PERIOD": 100, "DATASETS.TEST": "()", "SEED": 3,
            "MODEL.SIM.WARMUP_ITERS": 1, "MODEL.SIM.MODULATION": 1.0, "MODEL.SIM.LOW_THRESH": 0.5,
            "MODEL.SIM.HIGH_THRESH": 0.5, "MODEL.SIM.TEACHER.MOMENTUM": 0.5, "MODEL.SIM.PROTO_MOMENTUM": 0.5,
            "MODEL.SIM.COPY_PASTE.PROB": 1.0, "MODEL.SIM.COPY_PASTE.MASK_THRESH": 0.3}))
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        seen = []

        def stream(it):
            for batch in it:
                if rank == 1:  # every image of rank 1's batches loses its GT
                    for d in batch:
                        d["instances"] = d["instances"][:0]
                seen.append(sum(len(d["instances"]) for d in batch))
                yield batch

        inner = trainer._trainer
        inner._data_loader_iter = stream(inner._data_loader_iter)
        trainer.train()
        model = unwrap(trainer.model)
        state = {"seen": seen, "model": {k: v.clone() for k, v in model.state_dict().items()},
                 TEACHER_KEY: {k: v.clone() for k, v in model.teacher.state_dict().items()},
                 "losses": {k: max(x for x, _ in v.values()) for k, v in trainer.storage.histories().items()
                            if k.startswith(("loss_pseudo", "loss_paste"))},
                 "bank": len(model.copy_paste.bank)}
        torch.save(state, os.path.join(result_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001  (the outcome is what the test checks)
        outcome = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)


@pytest.mark.slow  # two spawned interpreters training 3 tiny SIM steps, about a minute on 2 cores
def test_a_rank_without_any_gt_completes_its_sim_and_copy_paste_steps(tmp_path):
    from mask2former_sim.engine.setup import build_cfg

    build_cfg(os.path.join(ROOT, SIM_CP_CFG), tiny(tmp_path / "data"))  # generate the data once, here
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_no_gt_worker, args=(r, 2, str(tmp_path / "pg_init"), str(tmp_path / "data"),
                                                      str(tmp_path / "out"), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    hung = _join_all(procs)
    assert not hung, f"rank(s) {hung} hung"
    out = {r: (tmp_path / f"rank{r}.txt").read_text() for r in range(2)}
    assert out == {0: "finished", 1: "finished"}, out
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert len(r1["seen"]) == 3 and not any(r1["seen"]), r1["seen"]  # 3 steps, no GT on rank 1
    assert all(r0["seen"]), r0["seen"]
    assert any(v > 0 for k, v in r0["losses"].items() if "pseudo" in k), r0["losses"]  # the pseudo loss acted
    assert any(v > 0 for k, v in r0["losses"].items() if "paste" in k), r0["losses"]  # and rank 0 pasted
    assert r0["bank"] > 0 and r1["bank"] == 0, (r0["bank"], r1["bank"])
    # the same student (but for BN running statistics: detectron2 builds DDP with
    # broadcast_buffers=False and the synthetic configs use plain BN, so they are per rank),
    # prototypes and teacher (all of it)
    per_rank = ("running_mean", "running_var", "num_batches_tracked")
    for key, value in r0["model"].items():
        if not key.endswith(per_rank):
            assert torch.equal(value, r1["model"][key]), key
    assert torch.equal(r0["model"][PROTO_KEY], r1["model"][PROTO_KEY])
    assert r0["model"][PROTO_KEY].abs().sum() > 0
    assert set(r0["sim_teacher"]) == set(r1["sim_teacher"])
    for key, value in r0["sim_teacher"].items():
        assert torch.equal(value, r1["sim_teacher"][key]), key


# -------------------------------------------------------------- a rank dies or hangs: timeout
def _timeout_worker(rank, world, init_file, minutes, case, result_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=process_group_timeout(minutes))
    dist.barrier()  # both ranks are up
    if rank == 1:
        if case == "dies":
            os._exit(3)  # as a killed process: no clean-up, no goodbye to the group
        time.sleep(JOIN)  # "hangs": alive, never joins the collective
        os._exit(0)
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4))  # stands for DDP's gradient all-reduce
        outcome = "returned"
    except Exception as e:  # noqa: BLE001
        outcome = f"{type(e).__name__}: {e}"
    with open(os.path.join(result_dir, "rank0.txt"), "w") as f:
        f.write(f"{time.monotonic() - start:.1f}\n{outcome}")
    os._exit(1 if outcome != "returned" else 0)


@pytest.mark.slow  # two spawned interpreters, about 15 s on 2 cores
@pytest.mark.parametrize("case", ["dies", "hangs"])
def test_when_a_rank_dies_the_other_stops_within_the_timeout(tmp_path, case):
    minutes = 0.1  # DIST_TIMEOUT_MINUTES 0.1: 6 s
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_timeout_worker, args=(r, 2, str(tmp_path / "pg_init"), minutes, case, str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    hung = _join_all(procs[:1], timeout=120)
    for p in procs[1:]:  # the sleeping rank of "hangs"
        if p.is_alive():
            p.kill()
        p.join()
    assert not hung, "rank 0 hung in the all-reduce"
    seconds, outcome = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert outcome != "returned", outcome
    assert procs[0].exitcode == 1
    # the timeout bounds the wait (slack for a slow shared machine); a dead peer may fail it sooner
    assert float(seconds) < minutes * 60 + 50, (seconds, outcome)
    if case == "hangs":
        assert float(seconds) >= minutes * 60 * 0.9, (seconds, outcome)  # it waited for the timeout


# --------------------------------------------------------------------- train_net.py's launch
def test_train_net_gives_launch_the_configured_timeout(monkeypatch, capsys):
    from detectron2.engine import default_argument_parser

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "")  # restored (or removed) after the test
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    train_net = load_script("train_net.py")
    calls = []
    monkeypatch.setattr(train_net, "launch", lambda *a, **kw: calls.append(kw))
    synth = "configs/synthetic/boxinst_R18_synth.yaml"
    train_net.cli(default_argument_parser().parse_args(["--config-file", synth, "DIST_TIMEOUT_MINUTES", "0.1"]))
    assert calls[0]["timeout"] == datetime.timedelta(seconds=6)
    # NCCL acts on the timeout only with its async error handling (inherited by the spawned ranks)
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    train_net.cli(default_argument_parser().parse_args(["--config-file", synth]))
    assert calls[1]["timeout"] == datetime.timedelta(minutes=30)  # the default
    with pytest.raises(SystemExit) as e:
        train_net.cli(default_argument_parser().parse_args(["--config-file", synth, "DIST_TIMEOUT_MINUTES", "0.0"]))
    assert e.value.code == 2 and "DIST_TIMEOUT_MINUTES must be > 0" in capsys.readouterr().err
    assert len(calls) == 2
