#!/usr/bin/env python
"""Train / evaluate box-supervised Mask2Former (detectron2 conventions).

    python train_net.py --config-file configs/synthetic/boxinst_R18_synth.yaml MODEL.DEVICE cpu
    python train_net.py --config-file configs/coco/instance-segmentation/boxinst_R50_bs16_50ep.yaml --num-gpus 8
    python train_net.py --config-file X.yaml --resume                 # continue from OUTPUT_DIR/last_checkpoint
    python train_net.py --config-file X.yaml --eval-only MODEL.WEIGHTS model_final.pth
"""
import mask2former_sim  # noqa: F401  (compat shim before detectron2)

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, launch

import mask2former_sim.modeling  # noqa: F401  (registers the meta-architecture)
from mask2former_sim.engine.setup import setup
from mask2former_sim.engine.trainer import Trainer


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
