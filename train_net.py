#!/usr/bin/env python
"""Train / evaluate box-supervised Mask2Former (detectron2 conventions).

    python train_net.py --config-file configs/synthetic/boxinst_R18_synth.yaml MODEL.DEVICE cpu
    python train_net.py --config-file configs/coco/instance-segmentation/boxinst_R50_bs16_50ep.yaml --num-gpus 8
    python train_net.py --config-file X.yaml --resume                 # continue from OUTPUT_DIR/last_checkpoint
    python train_net.py --config-file X.yaml --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file X.yaml --num-gpus 2 SOLVER.REFERENCE_WORLD_SIZE 8   # 8-GPU recipe on 2

Any KEY VALUE pair after the arguments overrides the config. Mistakes a user can fix (a
missing config or weights file, an unknown key, a bad value) are reported before anything
is built or launched, naming the file or key, with exit status 2.
"""
import os
import sys

import mask2former_sim  # noqa: F401  (compat shim before detectron2)

import yaml
from detectron2.engine import default_argument_parser, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import mask2former_sim.modeling  # noqa: F401  (registers the meta-architecture)
from mask2former_sim.engine.setup import build_cfg, setup
from mask2former_sim.engine.trainer import Trainer
from mask2former_sim.utils.distributed import process_group_timeout


def _is_local(path: str) -> bool:
    return "://" not in path


def check_args(args):
    """Exit with a message naming the culprit for the errors found without building anything;
    returns the config (read again by ``setup`` in every process)."""
    prog = os.path.basename(sys.argv[0]) or "train_net.py"

    def fail(msg: str):
        print(f"{prog}: error: {msg}", file=sys.stderr)
        raise SystemExit(2)

    if not args.config_file:
        fail("--config-file is required (e.g. --config-file configs/synthetic/boxinst_R18_synth.yaml)")
    try:
        cfg = build_cfg(args.config_file, args.opts)
    except FileNotFoundError as e:  # the config file or one of its _BASE_ files
        fail(str(e))
    except (KeyError, AssertionError, ValueError, TypeError, yaml.YAMLError) as e:
        # yacs names the key: "Non-existent config key: X", "Type mismatch ... for config key: X"
        detail = e.args[0] if isinstance(e, KeyError) and e.args else e
        fail(f"invalid config (--config-file {args.config_file} and the KEY VALUE overrides {args.opts}): {detail}")
    resuming = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    weights = cfg.MODEL.WEIGHTS
    if weights and not resuming and _is_local(weights) and not os.path.isfile(weights):
        fail(f"MODEL.WEIGHTS file not found: {weights}")
    if args.eval_only and not weights and not resuming:
        fail("--eval-only needs MODEL.WEIGHTS <checkpoint> (or --resume with a checkpoint in OUTPUT_DIR "
             f"{cfg.OUTPUT_DIR}); an untrained model is not evaluated")
    if not cfg.DIST_TIMEOUT_MINUTES > 0:
        fail(f"DIST_TIMEOUT_MINUTES must be > 0 (minutes), got {cfg.DIST_TIMEOUT_MINUTES}")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        Trainer.load_for_evaluation(cfg, model, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process() and not verify_results(cfg, results):  # TEST.EXPECTED_RESULTS, when set
            raise RuntimeError(f"TEST.EXPECTED_RESULTS {cfg.TEST.EXPECTED_RESULTS} not met (results in the log above)")
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(args):
    """Check the arguments, then run ``main`` in ``--num-gpus`` processes per machine whose
    collectives time out after DIST_TIMEOUT_MINUTES (a dead or hung process stops the others)."""
    cfg = check_args(args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,), timeout=process_group_timeout(cfg.DIST_TIMEOUT_MINUTES))


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    cli(args)
