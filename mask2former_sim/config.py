"""Config keys of mask2former-sim.

``add_maskformer2_config`` holds the Mask2Former keys the recipe needs (METHOD.md §5);
``add_sim_config`` holds one key per box-supervision / SIM knob (METHOD.md §1–§4).
Every key has the documented default; detectron2's CfgNode rejects unknown keys in a yaml.
"""
from detectron2.config import CfgNode as CN


def add_maskformer2_config(cfg):
    """Mask2Former model, solver and input keys (defaults: COCO instance recipe)."""
    # ---------------------------------------------------------------- input / data
    cfg.INPUT.DATASET_MAPPER_NAME = "box_only_lsj"  # "box_only_lsj" | "full_mask_lsj"
    cfg.INPUT.IMAGE_SIZE = 1024  # LSJ fixed crop (square)
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    # boxes narrower or shorter than this (pixels, after transform + clip) are dropped
    cfg.INPUT.MIN_BOX_SIZE = 1.0
    # an image whose crop keeps no box is skipped (a fresh image is drawn) and counted
    cfg.INPUT.SKIP_EMPTY_CROPS = True
    cfg.INPUT.CROP_PAD_VALUE = 128.0

    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True

    # timeout of the process group's collectives (minutes): when one process dies, the others
    # stop with an error after this long instead of waiting for ever (train_net.py's launch)
    cfg.DIST_TIMEOUT_MINUTES = 30.0

    # ---------------------------------------------------------------- solver
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # detectron2's CLIP_GRADIENTS keys, plus CLIP_TYPE "full_model" (one L2 norm over all params)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    cfg.SOLVER.AMP.ENABLED = True  # used on CUDA only

    # ---------------------------------------------------------------- mask former
    cfg.MODEL.MASK_FORMER = CN()
    mf = cfg.MODEL.MASK_FORMER
    mf.DEEP_SUPERVISION = True
    mf.NO_OBJECT_WEIGHT = 0.1
    mf.CLASS_WEIGHT = 2.0
    mf.MASK_WEIGHT = 5.0  # full-mask CE (fully supervised configs only)
    mf.DICE_WEIGHT = 5.0  # full-mask dice (fully supervised configs only)
    mf.NHEADS = 8
    mf.DROPOUT = 0.0
    mf.DIM_FEEDFORWARD = 2048
    mf.ENC_LAYERS = 0
    mf.DEC_LAYERS = 10  # decoder outputs = 1 (learnable queries) + 9 layers
    mf.PRE_NORM = False
    mf.ENFORCE_INPUT_PROJ = False
    mf.HIDDEN_DIM = 256
    mf.NUM_OBJECT_QUERIES = 100
    mf.TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"
    mf.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    mf.SIZE_DIVISIBILITY = 32
    # point sampling for the full-mask and copy-paste losses
    mf.TRAIN_NUM_POINTS = 112 * 112
    mf.OVERSAMPLE_RATIO = 3.0
    mf.IMPORTANCE_SAMPLE_RATIO = 0.75
    mf.TEST = CN()
    mf.TEST.INSTANCE_ON = True
    mf.TEST.MASK_THRESHOLD = 0.5
    mf.TEST.DETECTIONS_PER_IMAGE = 100
    mf.TEST.EVAL_TEACHER = False  # evaluate the EMA teacher instead of the student

    # ---------------------------------------------------------------- pixel decoder
    cfg.MODEL.SEM_SEG_HEAD = CN()
    ph = cfg.MODEL.SEM_SEG_HEAD
    ph.NAME = "MaskFormerHead"
    ph.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # -1: the number of categories of DATASETS.TRAIN[0] (resolved by engine.setup.build_cfg
    # before the config is frozen). Any other value must equal the training sets' category
    # count (checked at set-up; the error names both numbers and the dataset).
    ph.NUM_CLASSES = 80
    ph.CONVS_DIM = 256
    ph.MASK_DIM = 256
    ph.NORM = "GN"
    ph.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    ph.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    ph.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    ph.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    ph.TRANSFORMER_ENC_LAYERS = 6
    ph.DIM_FEEDFORWARD = 1024
    ph.DROPOUT = 0.0
    ph.COMMON_STRIDE = 4
    # "auto": CUDA op for CUDA tensors when built, torch otherwise; "torch": force reference
    ph.MSDA_IMPL = "auto"

    # ---------------------------------------------------------------- backbones
    # ResNets use detectron2's MODEL.RESNETS keys (DEPTH 18/34/50/101, STRIDE_IN_1X1 False).
    # Swin through timm (features_only); names as in timm's model registry.
    cfg.MODEL.SWIN = CN()
    sw = cfg.MODEL.SWIN
    sw.TIMM_NAME = "swin_tiny_patch4_window7_224"
    sw.EMBED_DIM = 96
    sw.DEPTHS = [2, 2, 6, 2]
    sw.NUM_HEADS = [3, 6, 12, 24]
    sw.WINDOW_SIZE = 7
    sw.MLP_RATIO = 4.0
    sw.DROP_PATH_RATE = 0.3
    sw.PRETRAIN_IMG_SIZE = 224
    sw.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    sw.USE_CHECKPOINT = False


def add_sim_config(cfg):
    """Box supervision (MODEL.BOXSUP) and SIM (MODEL.SIM) keys, METHOD.md defaults."""
    cfg.MODEL.BOXSUP = CN()
    bs = cfg.MODEL.BOXSUP
    # False: train from boxes only (masks are never loaded). True: the fully supervised
    # upper bound (GT masks loaded, point-sampled mask loss, mask-cost matcher).
    bs.FULL_MASK_SUPERVISION = False
    bs.MASK_STRIDE = 4  # grid of pred_masks relative to the input
    # Grid of the box-only matcher cost and the projection / pairwise losses. A divisor of
    # MASK_STRIDE; below it, pred_masks are upsampled bilinearly first (small-image configs).
    bs.LOSS_STRIDE = 4
    bs.MATCHER_CLASS_WEIGHT = 2.0
    bs.MATCHER_PROJ_WEIGHT = 5.0
    bs.PROJECTION_WEIGHT = 5.0
    bs.PAIRWISE_WEIGHT = 1.0
    bs.PAIRWISE_SIZE = 3  # kernel size of the neighbourhood (3 -> 8 neighbours)
    bs.PAIRWISE_DILATION = 2
    bs.PAIRWISE_THETA = 2.0  # S = exp(-||Lab(u) - Lab(v)|| / theta)
    bs.PAIRWISE_COLOR_THRESH = 0.1  # tau_c (official SIM; BoxInst uses 0.3)
    bs.PAIRWISE_WARMUP_ITERS = 10000
    bs.DICE_EPS = 1e-5

    cfg.MODEL.SIM = CN()
    sim = cfg.MODEL.SIM
    sim.ENABLED = False  # pseudo-mask loss, prototypes, teacher
    # the pseudo-mask loss (Eq.8) is active from this trainer iteration on (10k of the paper's
    # 368,750; scale it with the schedule). Teacher and prototypes run from iteration 0.
    sim.WARMUP_ITERS = 10000
    sim.PSEUDO_LOSS = True  # ablation: False trains without the pseudo-mask loss
    # prototypes (Eq.1-5)
    sim.NUM_PROTOTYPES = 10
    sim.PROTO_TEMPERATURE = 1.0
    # not in the paper: subtract each image's mean teacher feature (valid cells) before the
    # cosine of Eq.1 and the prototype update, then renormalise (sim/prototypes.center_features)
    sim.CENTER_FEATURES = False
    # not in the paper: one more prototype row for the background, updated (Eq.2-5) with each
    # image's cells outside every GT box; S_g = sigmoid((max_k cos(f, P_c) - max_k cos(f, P_bg)) / tau_s)
    sim.BACKGROUND_PROTOTYPES = False
    # not in the paper: a per-image colour model (sim/appearance.py), the GrabCut idea: colour
    # histogram of the teacher's confident cells of a GT against that of its image's cells outside
    # every GT box; mixed into Eq.7's semantic term, S' = (1 - WEIGHT) S + WEIGHT A (0 = the paper)
    # not in the paper: the pseudo loss also pushes g's mask down on every valid cell outside its
    # box (boxes say those cells are not g; Eq.8 leaves them to the projection loss)
    sim.OUTSIDE_BOX_NEGATIVES = False
    # with OUTSIDE_BOX_NEGATIVES: the outside cells of g together weigh as much as g's in-box
    # weights (each sum(W in B_g) / #outside cells) instead of 1 each, so that the many easy
    # outside cells do not dilute the weighted BCE of the box's pseudo targets (normalised by sum W)
    sim.OUTSIDE_BOX_BALANCED = False
    sim.APPEARANCE = CN()
    sim.APPEARANCE.WEIGHT = 0.0
    sim.APPEARANCE.LEVELS = 32  # colour levels per RGB channel (LEVELS^3 histogram bins)
    sim.APPEARANCE.SMOOTH = True  # 3x3x3 box filter over the bins
    sim.PROTO_MOMENTUM = 0.999
    sim.PROTO_PIXEL_THRESH = 0.7
    sim.SINKHORN_EPS = 0.05
    sim.SINKHORN_ITERS = 3
    sim.PROTO_SEED = 0  # seed of the random unit-vector initialisation (identical on every rank)
    # positives and instance map (Eq.6)
    sim.IOU_GAMMA = 5.0
    sim.NUM_EXTRA_POSITIVES = 0
    # self-correction (Eq.7) and pseudo mask (Eq.8)
    sim.MODULATION = 0.5
    sim.LOW_THRESH = 0.3
    sim.HIGH_THRESH = 0.7
    sim.ADAPTIVE_HIGH_THRESH = False
    sim.ADAPTIVE_HIGH_RANGE = [0.7, 0.8]
    sim.PSEUDO_WEIGHT = 1.0  # lambda_1
    sim.PSEUDO_BCE_WEIGHT = 5.0
    sim.PSEUDO_DICE_WEIGHT = 5.0
    # pseudo-mask quality (mean IoU with the GT masks, evaluation/pseudo_masks.py) on
    # DATASETS.TEST[0] every TEST.EVAL_PERIOD and after training, into metrics.json; only for a
    # split registered with masks
    sim.EVAL_PSEUDO_MASKS = True
    # teacher (EMA of the whole model)
    sim.TEACHER = CN()
    sim.TEACHER.MOMENTUM = 0.9999
    # copy-paste (Eq.9, Eq.11)
    sim.COPY_PASTE = CN()
    cp = sim.COPY_PASTE
    cp.ENABLED = False  # needs MODEL.SIM.ENABLED; bank filled and pasting from WARMUP_ITERS on
    cp.BANK_SIZE = 100  # FIFO entries per process, one per training image
    cp.PROB = 0.5  # chance that an image receives pasted instances (once the bank holds one)
    cp.FRACTION = 0.25  # n = clamp(floor(FRACTION * instances of the drawn entry), 1, MAX_INSTANCES)
    cp.MAX_INSTANCES = 3
    cp.MASK_THRESH = 0.7  # paste mask M_g = 1[T_g upsampled > MASK_THRESH] inside the box (Eq.11)
    # an original GT is dropped when the pasted pixels cover more than this fraction of its box
    # (1.0: only when nothing of it is left)
    cp.OCCLUDED_DROP = 1.0
    cp.WEIGHT = 1.0  # lambda_2 (Eq.9)
    cp.CE_WEIGHT = 5.0
    cp.DICE_WEIGHT = 5.0
    # bound of the bank's memory per process (MiB; 0: BANK_SIZE alone bounds it): the oldest
    # entries leave first. 100 LSJ-1024 entries of typical images take ~46 MiB, crowded images
    # with large objects ~127 MiB (docs/BENCHMARKS.md)
    cp.MAX_BANK_MIB = 64.0
    # save the bank in checkpoints: the main process's bank (only it writes checkpoints), so a
    # one-process run resumes exactly; with several processes every one resumes with a copy of
    # the main process's bank
    cp.BANK_IN_CHECKPOINT = False

    # box-crop classification pretraining of the backbone before training, for data without
    # an ImageNet-initialised backbone (see mask2former_sim/engine/backbone_pretrain.py)
    cfg.MODEL.BACKBONE_PRETRAIN = CN()
    bp = cfg.MODEL.BACKBONE_PRETRAIN
    bp.ENABLED = False
    bp.ITERS = 1000
    bp.BASE_LR = 2e-3  # peak of a one-cycle schedule (AdamW)
    bp.WEIGHT_DECAY = 0.05
    bp.CROP_SIZE = 64  # crops are resized to CROP_SIZE x CROP_SIZE
    bp.CONTEXT = [1.1, 2.0]  # window side = long box side x U(CONTEXT)
    bp.JITTER = 0.1  # window centre shift, fraction of the side
    bp.CACHE_DIR = ""  # "" -> $MASK2FORMER_SIM_CACHE/pretrained or ~/.cache/mask2former_sim/pretrained

    # synthetic data (the embedded default); see mask2former_sim/data/synthetic.py
    cfg.DATASETS.SYNTHETIC = CN()
    sy = cfg.DATASETS.SYNTHETIC
    sy.ROOT = ""  # "" -> $MASK2FORMER_SIM_CACHE/synthetic or ~/.cache/mask2former_sim/synthetic
    sy.SEED = 0
    sy.NUM_TRAIN = 600
    sy.NUM_VAL = 100

    # Your own COCO-format jsons, registered by name from the config alone:
    #   COCO_JSONS: [["my_train", "ann/train.json", "images/train", "boxes"],
    #                ["my_val", "ann/val.json", "images/val", "masks"]]
    # [name, json file, image root, kind]; kind "boxes" registers box-only (segmentation is
    # never read: training), "masks" with masks (evaluation; the fully supervised upper bound).
    # Relative paths are taken from the working directory. Names may not shadow built-in ones.
    cfg.DATASETS.COCO_JSONS = []


def get_default_cfg():
    """detectron2's defaults plus every key of this project."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_maskformer2_config(cfg)
    add_sim_config(cfg)
    return cfg
