"""SIM end to end on tiny synthetic data: the teacher is made after the weights are loaded and
lags the student by the EMA formula, resume restores teacher, prototypes and iteration exactly
(across the warm-up boundary), SIM training never reads a GT mask, the teacher can be evaluated,
and two processes end a SIM step with identical prototypes and teachers."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mask2former_sim  # noqa: F401  (compat shim before detectron2, also in spawned workers)
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from mask2former_sim.engine.setup import build_cfg
from mask2former_sim.engine.sim_hooks import TEACHER_KEY
from mask2former_sim.engine.trainer import Trainer

from test_train_e2e import BOXINST, ROOT, LossRecorder, PoisonMasks, StopAfter, tiny_opts, train

SIM = os.path.join(ROOT, "configs/synthetic/sim_R18_synth.yaml")
PROTO_KEY = "criterion.pseudo_labeler.memory.prototypes"


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_teacher_is_made_after_the_weights_are_loaded_and_lags_by_the_ema(tmp_path):
    box_cfg = build_cfg(BOXINST, tiny_opts(tmp_path / "data", tmp_path / "box", **{
        "SOLVER.MAX_ITER": 2, "DATASETS.TEST": "()"}))
    train(box_cfg)
    weights = str(tmp_path / "box" / "model_final.pth")
    loaded = _load(weights)["model"]

    cfg = build_cfg(SIM, tiny_opts(tmp_path / "data", tmp_path / "sim", **{
        "SOLVER.MAX_ITER": 1, "DATASETS.TEST": "()", "MODEL.WEIGHTS": weights,
        "MODEL.SIM.TEACHER.MOMENTUM": 0.5, "MODEL.SIM.WARMUP_ITERS": 0}))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    teacher0 = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    # step 0: the teacher equals the student as loaded from MODEL.WEIGHTS, not the random init
    for key, value in teacher0.items():
        assert torch.equal(value, loaded[key]), key
    assert not any(p.requires_grad for p in model.teacher.module.parameters())
    assert not any(name.startswith("_teacher") for name, _ in model.named_parameters())
    trainer.train()
    student1 = model.student_parts().state_dict()
    params = {n for n, _ in model.teacher.module.named_parameters()}
    moved = 0
    for key, value in model.teacher.state_dict().items():
        if key in params:
            assert torch.allclose(value, 0.5 * teacher0[key] + 0.5 * student1[key], atol=1e-6), key
            moved += int(not torch.equal(value, teacher0[key]))
        else:  # buffers are copied
            assert torch.equal(value, student1[key]), key
    assert moved > 0
    assert model.teacher.module.training is False


@pytest.mark.slow
def test_resume_restores_teacher_prototypes_and_iteration_across_the_warmup(tmp_path):
    common = {"SOLVER.MAX_ITER": 5, "TEST.EVAL_PERIOD": 0, "DATASETS.TEST": "()",
              "MODEL.SIM.WARMUP_ITERS": 3, "MODEL.SIM.TEACHER.MOMENTUM": 0.9, "MODEL.SIM.PROTO_MOMENTUM": 0.9}
    full = LossRecorder()
    train(build_cfg(SIM, tiny_opts(tmp_path / "data", tmp_path / "a", **common)), [full])

    cfg_b = build_cfg(SIM, tiny_opts(tmp_path / "data", tmp_path / "b", **common, **{"SOLVER.CHECKPOINT_PERIOD": 2}))
    with pytest.raises(KeyboardInterrupt):
        train(cfg_b, [StopAfter(1)])  # checkpoint after iteration 1 (model_0000001.pth), before the warm-up
    ckpt = _load(tmp_path / "b" / "model_0000001.pth")
    assert TEACHER_KEY in ckpt["trainer"] and PROTO_KEY in ckpt["model"]
    resumed = LossRecorder()
    train(cfg_b, [resumed], resume=True)
    assert sorted(resumed.losses) == [2, 3, 4]  # crosses the warm-up boundary at 3
    for it in (2, 3, 4):
        assert resumed.losses[it] == pytest.approx(full.losses[it], rel=1e-6, abs=1e-7), it
    a, b = _load(tmp_path / "a" / "model_final.pth"), _load(tmp_path / "b" / "model_final.pth")
    assert torch.equal(a["model"][PROTO_KEY], b["model"][PROTO_KEY])
    for key, value in a["trainer"][TEACHER_KEY].items():
        assert torch.equal(value, b["trainer"][TEACHER_KEY][key]), key
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def _poisoned_batch(g, poison=True):
    batch = []
    for _ in range(2):
        inst = Instances((64, 64))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 20.0, 60.0, 50.0]]))
        inst.gt_classes = torch.tensor([1, 3])
        if poison:
            inst._fields["gt_masks"] = PoisonMasks(2)
        batch.append({"image": torch.randint(0, 255, (3, 64, 64), generator=g, dtype=torch.uint8),
                      "valid_mask": torch.ones(64, 64, dtype=torch.bool), "instances": inst,
                      "height": 64, "width": 64})
    return batch


def test_sim_training_never_reads_gt_masks(tmp_path):
    cfg = build_cfg(SIM, tiny_opts(tmp_path / "data", tmp_path / "out", **{"MODEL.SIM.WARMUP_ITERS": 0}))
    model = build_model(cfg)
    model.train()
    with pytest.raises(RuntimeError, match="teacher"):
        model(_poisoned_batch(torch.Generator().manual_seed(0)))
    model.attach_teacher()
    losses = model(_poisoned_batch(torch.Generator().manual_seed(0)))
    total = sum(losses.values())
    assert torch.isfinite(total) and "loss_pseudo_bce" in losses
    assert model.criterion.last_pseudo.targets is not None  # past the warm-up: pseudo targets were built
    total.backward()
    assert all(p.grad is None for p in model.teacher.module.parameters())


@pytest.mark.slow
def test_eval_teacher_evaluates_the_teacher(tmp_path):
    common = {"SOLVER.MAX_ITER": 2, "DATASETS.TEST": "()", "MODEL.SIM.TEACHER.MOMENTUM": 0.5}
    train(build_cfg(SIM, tiny_opts(tmp_path / "data", tmp_path / "a", **common)))
    weights = str(tmp_path / "a" / "model_final.pth")
    image = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    preds = {}
    for flag in (False, True):
        cfg = build_cfg(SIM, tiny_opts(tmp_path / "data", tmp_path / "e", **{
            "MODEL.WEIGHTS": weights, "MODEL.MASK_FORMER.TEST.EVAL_TEACHER": flag}))
        model = build_model(cfg).eval()
        Trainer.load_for_evaluation(cfg, model)
        assert (model.teacher is not None) == flag
        with torch.no_grad():
            preds[flag] = model([{"image": image, "height": 64, "width": 64}])[0]["instances"].scores
    assert not torch.equal(preds[False], preds[True])  # the teacher lags the student
    box_cfg = build_cfg(BOXINST, tiny_opts(tmp_path / "data", tmp_path / "box", **common))
    train(box_cfg)
    cfg = build_cfg(SIM, tiny_opts(tmp_path / "data", tmp_path / "e2", **{
        "MODEL.WEIGHTS": str(tmp_path / "box" / "model_final.pth"), "MODEL.MASK_FORMER.TEST.EVAL_TEACHER": True}))
    with pytest.raises(KeyError, match="holds no SIM teacher"):
        Trainer.load_for_evaluation(cfg, build_model(cfg).eval())


# ---------------------------------------------------------------------- two processes
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, data_root, out_dir, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = build_cfg(SIM, tiny_opts(data_root, out_dir, **{"MODEL.SIM.WARMUP_ITERS": 0,
                                                              "MODEL.SIM.TEACHER.MOMENTUM": 0.5}))
        model = build_model(cfg)
        model.train()
        model.attach_teacher()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(rank)
        batch = _poisoned_batch(g, poison=False)
        if rank == 1:  # rank 1: no GT of class 3 in one image, no GT at all in the other
            inst = batch[0]["instances"]
            batch[0]["instances"] = inst[inst.gt_classes != 3]
            batch[1]["instances"] = inst[torch.zeros(len(inst), dtype=torch.bool)]
        for _ in range(2):
            losses = ddp(batch)
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            model.update_teacher()
        state = {"prototypes": model.criterion.pseudo_labeler.memory.prototypes.clone(),
                 "teacher": {k: v.clone() for k, v in model.teacher.state_dict().items()}}
        torch.save(state, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_end_a_sim_step_with_identical_prototypes_and_teachers(tmp_path):
    # generate the synthetic data once, outside the workers
    build_cfg(SIM, tiny_opts(tmp_path / "data", tmp_path / "out"))
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, port, str(tmp_path / "data"), str(tmp_path / f"out{r}"),
                                                     str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung"
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert torch.equal(r0["prototypes"], r1["prototypes"])
    init = build_model(build_cfg(SIM, tiny_opts(tmp_path / "data", tmp_path / "out"))).criterion.pseudo_labeler.memory.prototypes
    assert not torch.equal(r0["prototypes"], init)  # they moved
    for key, value in r0["teacher"].items():
        assert torch.equal(value, r1["teacher"][key]), key
