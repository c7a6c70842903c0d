"""How good are SIM's pseudo masks? IoU against the GT mask on a split that has masks.

For every image of the split, with the test-time input (shortest-edge resize, no
augmentation) and the GT boxes, classes and masks resized the same way:

1. the student forward (eval mode), matched to the GT boxes and classes exactly as in
   training: ``criterion.prepare`` + ``criterion.match`` over every decoder output;
2. with SIM, the EMA teacher forward and the pseudo labeler with ``update_prototypes=False,
   force_targets=True``: the semantic map S_g, instance map T_g, combined map R_g, pseudo
   mask Y_g and weights W_g of every GT (METHOD.md §2), all on the loss grid;
3. per GT, the IoU with the GT mask of

       semantic       S_g > 0.5
       appearance     A_g > 0.5    (the per-image colour model, with MODEL.SIM.APPEARANCE only)
       instance       T_g > 0.5
       combined       R_g > 0.5
       final          Y_g          (= R_g > τ_h inside the box: the pseudo target)
       student        sigmoid(z) > 0.5 of the query matched to g at the final output
       student_image  the same mask, not cut to the box

   and the fraction of in-box cells that the pseudo loss ignores (W_g = 0).

Where the comparison is made. Everything is compared **on the loss grid**
(MODEL.BOXSUP.LOSS_STRIDE), where the pseudo targets live: the GT mask is padded like the
image and sampled at the cell centres, the rule of the box indicators B_g (``box_targets``:
cell (i, j) reads input pixel (s·i + s//2, s·j + s//2)). Every column but
``student_image`` is compared **inside the GT box** (B_g on valid cells): the pseudo loss
acts there only, and a semantic map is by design high on every instance of its class,
so outside the box it says nothing about g. ``student_image`` compares the student's mask
over the whole valid grid, as it would be output at test time (other instances of the same
class then count as errors). GTs whose box or GT mask covers no cell centre are left out
(counted as ``skipped``). A GT with no matched query (more GTs than queries) has an empty
student mask.

Figures are means over GTs, ``pseudo_mask/miou_<column>`` and
``pseudo_mask/ignored_fraction``, and per class ``pseudo_mask/miou_<column>/<class>``.
A model without a teacher (box-only, fully supervised, or SIM with ``--student-only``) has
the two student columns only: the box-only baseline gets the same figure.

Nothing changes state: eval mode for the duration (restored after), no gradients, the
prototypes are read but not updated, the torch RNG is restored (the fully supervised
matcher samples points from it).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.engine import HookBase
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances
from detectron2.utils import comm

from ..data.mappers import annotation_mask, build_lsj_augmentation, read_image_checked
from ..modeling.losses.box_targets import downsample_valid

logger = logging.getLogger(__name__)

__all__ = [
    "COLUMNS",
    "PSEUDO_COLUMNS",
    "STUDENT_COLUMNS",
    "mask_iou",
    "PseudoMaskEvalMapper",
    "BatchPseudoMasks",
    "pseudo_mask_outputs",
    "per_gt_figures",
    "PseudoMaskAccumulator",
    "collect_pseudo_mask_ious",
    "evaluate_pseudo_masks",
    "markdown_table",
    "load_model_for_pseudo_masks",
    "PseudoMaskEvalHook",
    "add_pseudo_mask_eval_hook",
]

PSEUDO_COLUMNS = ("semantic", "appearance", "instance", "combined", "final")
STUDENT_COLUMNS = ("student", "student_image")
COLUMNS = PSEUDO_COLUMNS + STUDENT_COLUMNS
PREFIX = "pseudo_mask"


def mask_iou(pred: torch.Tensor, gt: torch.Tensor, region: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-mask IoU of (G, H, W) boolean masks, counting only cells where ``region`` (G, H, W) is True.

    |pred ∩ gt ∩ region| / |(pred ∪ gt) ∩ region| -> (G,) float32; 1.0 where that union is
    empty (both masks empty in the region: they agree).
    """
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"mask_iou expects two (G, H, W) masks of one shape, got {tuple(pred.shape)} and {tuple(gt.shape)}")
    pred, gt = pred.bool(), gt.bool()
    if region is not None:
        if region.shape != pred.shape:
            raise ValueError(f"mask_iou region must be {tuple(pred.shape)}, got {tuple(region.shape)}")
        pred, gt = pred & region.bool(), gt & region.bool()
    inter = (pred & gt).flatten(1).sum(1).float()
    union = (pred | gt).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


# ---------------------------------------------------------------------- data
class PseudoMaskEvalMapper:
    """Test-time mapper that keeps the GT: image resized as by ``BoxSupTestMapper``
    (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST, no flip, no crop), and ``instances`` with
    gt_boxes (annotated boxes, resized and clipped), gt_classes and, when the annotations carry
    a "segmentation", gt_masks (BitMasks, resized with the same transform, nearest).

    Boxes narrower or lower than INPUT.MIN_BOX_SIZE after the resize are dropped, as the
    training mapper drops them. ``require_masks``: an annotation without a segmentation is an
    error that names the dataset, image and annotation; otherwise masks are kept only when
    every annotation of the image has one.
    """

    def __init__(self, cfg, dataset_name: str = "", require_masks: bool = True):
        self.augmentations = T.AugmentationList(build_lsj_augmentation(cfg, is_train=False))
        self.image_format = cfg.INPUT.FORMAT
        self.min_box_size = float(cfg.INPUT.MIN_BOX_SIZE)
        self.num_classes = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        self.dataset_name = dataset_name
        self.require_masks = bool(require_masks)

    def __call__(self, record: Mapping) -> Dict:
        annos = list(record.get("annotations", []))
        where = f"dataset '{self.dataset_name}', image {record.get('image_id', record['file_name'])!r}"
        missing = [a.get("annotation_id", a.get("id", i)) for i, a in enumerate(annos) if "segmentation" not in a]
        if missing and self.require_masks:
            raise ValueError(
                f"{where}: annotation(s) {missing[:5]} have no 'segmentation'; pseudo-mask quality needs a split "
                "with GT masks (e.g. synth_val, or a COCO json registered with kind 'masks')"
            )
        with_masks = bool(annos) and not missing
        image = read_image_checked(record["file_name"], self.image_format)
        utils.check_image_size(dict(record), image)
        orig_h, orig_w = image.shape[:2]
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        h, w = image.shape[:2]

        boxes = np.zeros((0, 4), dtype=np.float64)
        if annos:
            boxes = np.array(
                [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos], dtype=np.float64
            )
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, orig_w)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, orig_h)
            boxes = transforms.apply_box(boxes)
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        keep = np.nonzero(
            ((boxes[:, 2] - boxes[:, 0]) >= self.min_box_size) & ((boxes[:, 3] - boxes[:, 1]) >= self.min_box_size)
        )[0]
        classes = [int(annos[i]["category_id"]) for i in keep]
        bad = [c for c in classes if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(
                f"{where}: category ids {sorted(set(bad))} outside [0, {self.num_classes}) "
                "(MODEL.SEM_SEG_HEAD.NUM_CLASSES): the split's categories are not the model's"
            )
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.as_tensor(boxes[keep], dtype=torch.float32).reshape(-1, 4))
        instances.gt_classes = torch.as_tensor(classes, dtype=torch.int64)
        if with_masks:
            masks = [
                transforms.apply_segmentation(annotation_mask(annos[i]["segmentation"], orig_h, orig_w)) > 0
                for i in keep
            ]
            stacked = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.bool)
            instances.gt_masks = BitMasks(stacked)
        out = {k: v for k, v in record.items() if k != "annotations"}
        out["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        out["valid_mask"] = torch.ones((h, w), dtype=torch.bool)
        out["instances"] = instances
        out["num_dropped_boxes"] = int(len(annos) - len(keep))
        return out


def dataset_records(dataset_name: str, max_images: Optional[int] = None, require_masks: bool = True) -> List[Dict]:
    """The first ``max_images`` records of a registered split (error names the split)."""
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(f"dataset '{dataset_name}' is not registered (known: {sorted(DatasetCatalog.list())[:20]} ...)")
    if require_masks and MetadataCatalog.get(dataset_name).get("box_only", False):
        raise ValueError(
            f"dataset '{dataset_name}' is registered box-only (no GT masks): pseudo-mask quality needs a split "
            "with masks (e.g. synth_val)"
        )
    records = DatasetCatalog.get(dataset_name)
    if max_images is not None:
        if int(max_images) < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        records = records[: int(max_images)]
    return list(records)


# ---------------------------------------------------------------------- one batch
@dataclass
class BatchPseudoMasks:
    """Everything one batch yields, in the criterion's GT order; maps (G, H, W) on the loss grid."""

    labels: torch.Tensor  # (G,) class of each GT
    batch_idx: torch.Tensor  # (G,) image of each GT
    boxes: torch.Tensor  # (G, 4) XYXY, padded-input pixels
    in_box: torch.Tensor  # (G, H, W) bool: B_g on valid cells
    valid: torch.Tensor  # (G, H, W) bool: valid cells of the GT's image
    student: torch.Tensor  # (G, H, W) sigmoid of the query matched at the final output (0 when unmatched)
    student_query: torch.Tensor  # (G,) that query, -1 when none
    gt_masks: Optional[torch.Tensor]  # (G, H, W) bool, cell-centre samples of the GT masks (None: split has none)
    pseudo: Optional[object]  # PseudoTargets (None without a teacher)
    images: torch.Tensor  # (B, 3, Hp, Wp) padded RGB 0..255
    image_sizes: List[Tuple[int, int]]  # (h, w) of each image before padding
    stride: int  # loss stride: input pixels per grid cell
    num_levels: int  # decoder outputs matched (L+1)


@contextlib.contextmanager
def _frozen(model):
    """Eval mode, no gradients and an untouched torch RNG for the duration; the mode is restored."""
    was_training = model.training
    devices = [model.device] if model.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            yield
    finally:
        model.train(was_training)


def _grid_gt_masks(batched_inputs: Sequence[Mapping], padded_hw, stride: int, device) -> Optional[torch.Tensor]:
    if not all(x["instances"].has("gt_masks") for x in batched_inputs):
        return None
    out = []
    for x in batched_inputs:
        masks = x["instances"].gt_masks.tensor.to(device)
        padded = masks.new_zeros((masks.shape[0], *padded_hw), dtype=torch.bool)
        padded[:, : masks.shape[1], : masks.shape[2]] = masks.bool()
        out.append(downsample_valid(padded, stride))
    return torch.cat(out)


def pseudo_mask_outputs(model, batched_inputs: List[Dict], iteration: int = 0, use_teacher: bool = True) -> BatchPseudoMasks:
    """Student forward, training matching, teacher forward and pseudo labels of one batch.

    ``model`` is an unwrapped ``BoxSupMaskFormer``; ``batched_inputs`` come from
    ``PseudoMaskEvalMapper``. Pseudo labels are built when the criterion has SIM's pseudo
    labeler, a teacher is attached and ``use_teacher``; otherwise ``pseudo`` is None.
    ``iteration`` only feeds the pairwise ramp of ``prepare`` (unused here). No state changes.
    """
    crit = model.criterion
    labeler = getattr(crit, "pseudo_labeler", None)
    with_teacher = bool(use_teacher) and labeler is not None and model.teacher is not None
    with _frozen(model):
        images, raw, valid = model.preprocess(batched_inputs)
        padded_hw = tuple(images.tensor.shape[-2:])
        outputs = model.forward_network(images.tensor)
        targets = model.prepare_targets(batched_inputs, padded_hw)
        prepared = crit.prepare(outputs, targets, {"images": raw, "valid": valid}, int(iteration))
        levels = [out for _, out in crit.decoder_outputs(outputs)]
        match = crit.match(levels, prepared)
        pseudo = None
        if with_teacher:
            teacher_outputs = model.forward_network(images.tensor, model.teacher.module)
            pseudo = labeler(
                [out for _, out in crit.decoder_outputs(teacher_outputs)],
                teacher_outputs["mask_features"],
                prepared,
                match,
                int(iteration),
                stride=crit.loss_stride,
                to_loss_grid=crit._to_loss_grid,
                update_prototypes=False,
                force_targets=True,
            )
        batch_idx = prepared.batch_idx
        grid_hw = tuple(prepared.box_masks.shape[-2:])
        valid_grid = prepared.valid_grid if prepared.valid_grid is not None else downsample_valid(valid, crit.loss_stride)
        valid_g = valid_grid[batch_idx]
        in_box = (prepared.box_masks > 0) & valid_g
        query = match.query_of_gt[-1]  # (G,) final output
        picked = outputs["pred_masks"][batch_idx, query.clamp(min=0)].float()
        student = crit._to_loss_grid(picked).sigmoid() * (query >= 0).float()[:, None, None]
        gt = _grid_gt_masks(batched_inputs, padded_hw, crit.loss_stride, batch_idx.device)
        if gt is not None and tuple(gt.shape) != (len(batch_idx), *grid_hw):
            raise RuntimeError(f"GT masks on the grid {tuple(gt.shape)} disagree with the box masks {tuple(prepared.box_masks.shape)}")
        boxes = prepared.boxes if prepared.boxes is not None else torch.zeros((len(batch_idx), 4), device=batch_idx.device)
    return BatchPseudoMasks(
        labels=prepared.labels,
        batch_idx=batch_idx,
        boxes=boxes,
        in_box=in_box,
        valid=valid_g,
        student=student,
        student_query=query,
        gt_masks=gt,
        pseudo=pseudo,
        images=raw,
        image_sizes=list(images.image_sizes),
        stride=crit.loss_stride,
        num_levels=len(levels),
    )


def per_gt_figures(batch: BatchPseudoMasks) -> Dict[str, torch.Tensor]:
    """(G,) IoU per column present, "ignored" (in-box fraction with W = 0) and "counted" (bool:
    box and GT mask cover a cell centre). Needs the GT masks."""
    if batch.gt_masks is None:
        raise ValueError("per_gt_figures needs the GT masks (a split with 'segmentation')")
    gt, in_box = batch.gt_masks & batch.in_box, batch.in_box
    out: Dict[str, torch.Tensor] = {"counted": gt.flatten(1).any(1)}
    out["student"] = mask_iou(batch.student > 0.5, gt, in_box)
    out["student_image"] = mask_iou(batch.student > 0.5, batch.gt_masks & batch.valid, batch.valid)
    p = batch.pseudo
    if p is not None:
        out["semantic"] = mask_iou(p.semantic > 0.5, gt, in_box)
        if getattr(p, "appearance", None) is not None:  # MODEL.SIM.APPEARANCE
            out["appearance"] = mask_iou(p.appearance > 0.5, gt, in_box)
        out["instance"] = mask_iou(p.instance > 0.5, gt, in_box)
        out["combined"] = mask_iou(p.combined > 0.5, gt, in_box)
        out["final"] = mask_iou(p.targets > 0.5, gt, in_box)
        ignored = ((p.weights <= 0) & in_box).flatten(1).sum(1).float()
        out["ignored"] = ignored / in_box.flatten(1).sum(1).float().clamp_min(1.0)
    return out


# ---------------------------------------------------------------------- aggregation
@dataclass
class PseudoMaskAccumulator:
    """Per-GT figures of the GTs seen so far (NumPy, CPU); ``summarize`` turns them into means."""

    labels: List[np.ndarray] = field(default_factory=list)
    values: Dict[str, List[np.ndarray]] = field(default_factory=dict)
    images: int = 0
    skipped: int = 0  # GTs whose box or mask covers no cell centre
    dropped_boxes: int = 0  # boxes below INPUT.MIN_BOX_SIZE after the resize
    images_without_gt: int = 0

    def add(self, batch: BatchPseudoMasks, dropped_boxes: int = 0) -> None:
        figures = per_gt_figures(batch)
        counted = figures.pop("counted").cpu().numpy()
        self.images += len(batch.image_sizes)
        self.dropped_boxes += int(dropped_boxes)
        self.skipped += int((~counted).sum())
        self.labels.append(batch.labels.cpu().numpy()[counted])
        for key, value in figures.items():
            self.values.setdefault(key, []).append(value.cpu().numpy()[counted])

    def merge(self, other: "PseudoMaskAccumulator") -> None:
        self.labels += other.labels
        for key, value in other.values.items():
            self.values.setdefault(key, []).extend(value)
        self.images += other.images
        self.skipped += other.skipped
        self.dropped_boxes += other.dropped_boxes
        self.images_without_gt += other.images_without_gt

    @property
    def columns(self) -> List[str]:
        return [c for c in COLUMNS if c in self.values]

    def arrays(self) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, dtype=np.int64)
        values = {k: np.concatenate(v) if v else np.zeros(0) for k, v in self.values.items()}
        return labels, values

    @property
    def num_gts(self) -> int:
        return int(sum(len(x) for x in self.labels))

    def counts(self) -> Dict[str, int]:
        return {
            "images": self.images,
            "gts": self.num_gts,
            "skipped_gts": self.skipped,
            "dropped_boxes": self.dropped_boxes,
            "images_without_gt": self.images_without_gt,
        }

    def summarize(self, class_names: Optional[Sequence[str]] = None, per_class: bool = True) -> Dict[str, float]:
        """Means over GTs: ``pseudo_mask/miou_<column>``, ``pseudo_mask/ignored_fraction`` and, with
        ``per_class``, the same per class with the suffix ``/<class name>`` (classes with GTs only).
        Empty when no GT was counted."""
        labels, values = self.arrays()
        if labels.size == 0:
            return {}
        out: Dict[str, float] = {}
        keys = [(c, f"{PREFIX}/miou_{c}") for c in self.columns]
        if "ignored" in values:
            keys.append(("ignored", f"{PREFIX}/ignored_fraction"))
        for col, key in keys:
            out[key] = float(values[col].mean())
        if per_class:
            for c in np.unique(labels):
                sel = labels == c
                name = _class_key(class_names, int(c))
                for col, key in keys:
                    out[f"{key}/{name}"] = float(values[col][sel].mean())
        return out


def _class_key(class_names: Optional[Sequence[str]], c: int) -> str:
    if class_names is not None and 0 <= c < len(class_names):
        return str(class_names[c]).strip().replace(" ", "_").replace("/", "_")
    return f"class{c}"


def _shard(records: List[Dict]) -> Tuple[List[Dict], List[bool]]:
    """This rank's records, padded so that every rank runs the same number of batches (the
    criterion all-reduces the GT count in ``prepare``); padding entries are flagged False."""
    world, rank = comm.get_world_size(), comm.get_rank()
    if world == 1:
        return records, [True] * len(records)
    mine = records[rank::world]
    length = -(-len(records) // world)
    keep = [True] * len(mine) + [False] * (length - len(mine))
    mine = mine + [records[0]] * (length - len(mine))
    return mine, keep


def collect_pseudo_mask_ious(
    model,
    cfg,
    dataset_name: str,
    max_images: Optional[int] = None,
    iteration: int = 0,
    use_teacher: bool = True,
) -> PseudoMaskAccumulator:
    """Run ``pseudo_mask_outputs`` over a split, one image per batch (the test-time input);
    under torch.distributed the images are sharded over ranks and the result gathered on
    every rank (call it on every rank)."""
    from ..engine.sim_hooks import unwrap

    model = unwrap(model)
    records = dataset_records(dataset_name, max_images, require_masks=True)
    mapper = PseudoMaskEvalMapper(cfg, dataset_name, require_masks=True)
    mine, keep = _shard(records)
    acc = PseudoMaskAccumulator()
    for record, real in zip(mine, keep):
        inputs = mapper(record)
        if len(inputs["instances"]) == 0:
            acc.images_without_gt += int(real)
            continue
        batch = pseudo_mask_outputs(model, [inputs], iteration, use_teacher)
        if real:
            acc.add(batch, inputs["num_dropped_boxes"])
    if comm.get_world_size() > 1:
        merged = PseudoMaskAccumulator()
        for part in comm.all_gather(acc):
            merged.merge(part)
        acc = merged
    return acc


def evaluate_pseudo_masks(
    model,
    cfg,
    dataset_name: Optional[str] = None,
    max_images: Optional[int] = None,
    per_class: bool = True,
    iteration: int = 0,
    use_teacher: bool = True,
) -> Dict[str, float]:
    """Pseudo-mask quality of ``model`` on ``dataset_name`` (default DATASETS.TEST[0]) as a dict
    of floats in [0, 1] (see the module docstring for the keys)."""
    if dataset_name is None:
        if not cfg.DATASETS.TEST:
            raise ValueError("evaluate_pseudo_masks: no dataset_name given and DATASETS.TEST is empty")
        dataset_name = cfg.DATASETS.TEST[0]
    acc = collect_pseudo_mask_ious(model, cfg, dataset_name, max_images, iteration, use_teacher)
    figures = acc.summarize(MetadataCatalog.get(dataset_name).get("thing_classes"), per_class)
    logger.info(
        "Pseudo-mask quality on %s (%s): %s", dataset_name, acc.counts(),
        {k: round(v, 4) for k, v in figures.items() if k.count("/") == 1},
    )
    if not figures:
        logger.warning("Pseudo-mask quality on %s: no GT covers a cell of the loss grid; nothing to report", dataset_name)
    return figures


def markdown_table(acc: PseudoMaskAccumulator, class_names: Optional[Sequence[str]] = None, per_class: bool = True) -> str:
    """A markdown table: one row per class (with ``per_class``) and a row "all", mean IoU per column."""
    labels, values = acc.arrays()
    cols = acc.columns + (["ignored"] if "ignored" in values else [])
    header = "| class | GTs | " + " | ".join("ignored (W=0)" if c == "ignored" else c for c in cols) + " |"
    lines = [header, "|" + "---|" * (len(cols) + 2)]

    def row(name, sel):
        cells = [f"{values[c][sel].mean():.3f}" if sel.any() else "-" for c in cols]
        lines.append(f"| {name} | {int(sel.sum())} | " + " | ".join(cells) + " |")

    if per_class:
        for c in np.unique(labels):
            row(_class_key(class_names, int(c)), labels == c)
    row("**all**", np.ones(labels.shape, dtype=bool))
    return "\n".join(lines)


# ---------------------------------------------------------------------- loading
def load_model_for_pseudo_masks(cfg, weights: str, use_teacher: bool = True):
    """Build the model of ``cfg`` and load ``weights`` (student, prototypes, and with SIM the teacher
    from ``checkpoint["trainer"]["sim_teacher"]``). Returns (model in eval mode, checkpoint iteration)."""
    import os

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from ..engine.sim_hooks import TEACHER_KEY, attach_teacher

    if not weights or not os.path.isfile(weights):
        raise FileNotFoundError(f"--weights: no such checkpoint file {weights!r}")
    model = build_model(cfg)
    extra = DetectionCheckpointer(model).load(weights)
    iteration = int(extra.get("iteration", 0) or 0)
    wants_teacher = use_teacher and getattr(model.criterion, "pseudo_labeler", None) is not None
    if wants_teacher:
        state = (extra.get("trainer") or {}).get(TEACHER_KEY)
        if state is None:
            raise KeyError(
                f"{weights} holds no SIM teacher (checkpoint['trainer']['{TEACHER_KEY}']): give a checkpoint "
                "of a SIM training (model_final.pth or model_XXXXXXX.pth of its OUTPUT_DIR), or pass "
                "--student-only for the student's own masks alone"
            )
        attach_teacher(model, state)
    model.eval()
    return model, iteration


# ---------------------------------------------------------------------- training hook
class PseudoMaskEvalHook(HookBase):
    """Pseudo-mask quality every ``period`` iterations (0: only at the end) and after the last
    iteration, written through the EventStorage (so into metrics.json and TensorBoard).

    Runs on every rank (the images are sharded; the result is gathered). Register it before
    detectron2's PeriodicWriter so that the figures of the last iteration are written.
    """

    def __init__(self, period: int, cfg, dataset_name: Optional[str] = None, max_images: Optional[int] = None,
                 per_class: bool = True):
        if int(period) < 0:
            raise ValueError(f"PseudoMaskEvalHook period (TEST.EVAL_PERIOD) must be >= 0, got {period}")
        self._period = int(period)
        self._cfg = cfg
        self._dataset = dataset_name if dataset_name is not None else (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
        if self._dataset is None:
            raise ValueError("PseudoMaskEvalHook needs a dataset_name or a DATASETS.TEST split with masks")
        self._max_images = max_images
        self._per_class = bool(per_class)
        self.last_figures: Dict[str, float] = {}

    def _do_eval(self) -> None:
        figures = evaluate_pseudo_masks(
            self.trainer.model, self._cfg, self._dataset, self._max_images, self._per_class, self.trainer.iter
        )
        self.last_figures = figures
        if figures:
            self.trainer.storage.put_scalars(**figures, smoothing_hint=False)
        comm.synchronize()

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if self._period > 0 and next_iter % self._period == 0 and next_iter != self.trainer.max_iter:
            self._do_eval()

    def after_train(self):
        if self.trainer.iter + 1 >= self.trainer.max_iter:  # not after a failed training
            self._do_eval()


def add_pseudo_mask_eval_hook(hooks: List, cfg, dataset_name: Optional[str] = None, period: Optional[int] = None) -> List:
    """Insert a ``PseudoMaskEvalHook`` before detectron2's PeriodicWriter (or at the end) and
    return ``hooks``. Defaults: DATASETS.TEST[0] and TEST.EVAL_PERIOD; nothing is inserted when
    no split is named or the split is registered box-only. Per-class figures when the model
    has at most 20 classes (COCO's 80 x 7 would swamp metrics.json)."""
    name = dataset_name if dataset_name is not None else (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    if name is None:
        return hooks
    if MetadataCatalog.get(name).get("box_only", False):
        logger.info("No pseudo-mask quality evaluation: %s has no masks", name)
        return hooks
    hook = PseudoMaskEvalHook(
        cfg.TEST.EVAL_PERIOD if period is None else period, cfg, name,
        per_class=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES <= 20,
    )
    # before the writer: the figures of after_train are put before its last write
    at = next((i for i, h in enumerate(hooks) if type(h).__name__ == "PeriodicWriter"), len(hooks))
    hooks.insert(at, hook)
    return hooks


# ---------------------------------------------------------------------- command-line tools
def checkpoint_tool_parser(description: str, what: str = "checkpoint (.pth) written by train_net.py"):
    """The arguments every pseudo-mask tool shares: --config-file, --weights, --dataset (the tool
    adds its own, then ``add_opts_argument``)."""
    import argparse

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="the training config of the checkpoint")
    p.add_argument("--weights", required=True, help=what)
    p.add_argument("--dataset", default="", help="split to use (default: DATASETS.TEST[0])")
    return p


def add_opts_argument(parser) -> None:
    import argparse

    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")


def load_for_tool(args, use_teacher: bool = True):
    """(cfg, dataset name, model in eval mode, checkpoint iteration) of a tool's arguments; exits with
    a message when no split is named."""
    import sys

    from ..data.registry import register_datasets_for
    from ..engine.setup import build_cfg

    cfg = build_cfg(args.config_file, args.opts)
    register_datasets_for(cfg)
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "")
    if not dataset:
        sys.exit("no --dataset given and the config names no DATASETS.TEST split")
    model, iteration = load_model_for_pseudo_masks(cfg, args.weights, use_teacher=use_teacher)
    return cfg, dataset, model, iteration
