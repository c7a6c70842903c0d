#!/usr/bin/env python
"""Convert a Swin Transformer checkpoint into a detectron2 ``.pkl`` for MODEL.WEIGHTS.

Accepts timm checkpoints and the official microsoft/Swin-Transformer release (weights
under "model", patch merging at the end of each stage); timm's own
``timm.models.swin_transformer.checkpoint_filter_fn`` maps the official names to timm's
and resizes relative-position bias tables when the window size differs. Names are then
placed under the project's backbone (``TimmSwinBackbone``): ``backbone.model.patch_embed.*``
and ``backbone.model.layers_N.*``. The classifier (``head.*``) and final ``norm.*`` are
dropped; the per-level ``backbone.out_norms.*`` are absent from ImageNet checkpoints and
keep their initialisation. Every tensor is checked against the backbone's names and
shapes (built on the meta device, so no memory or init time).

--window-size and --img-size must equal MODEL.SWIN.WINDOW_SIZE and PRETRAIN_IMG_SIZE of
the config you train with; they default to the values in the timm model name.

Example:
    python tools/convert_swin.py swin_tiny_patch4_window7_224.pth swin_tiny_patch4_window7_224.pkl \\
        --timm-name swin_tiny_patch4_window7_224
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, Mapping, Optional, Sequence

_TOOLS = os.path.dirname(os.path.abspath(__file__))
for _p in (_TOOLS, os.path.dirname(_TOOLS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import mask2former_sim  # noqa: E402,F401  (Pillow shim before detectron2)
import timm  # noqa: E402
import torch  # noqa: E402
from timm.models.swin_transformer import checkpoint_filter_fn  # noqa: E402

from convert_torchvision_resnet import (  # noqa: E402
    ConversionResult,
    load_checkpoint,
    print_summary,
    save_d2_pickle,
    rename_state_dict,
)

PREFIX = "backbone."
_SKIPPED_BUFFERS = ("relative_position_index", "attn_mask")  # non-persistent in timm


def swin_defaults(timm_name: str) -> Dict[str, Optional[int]]:
    """Window and image size encoded in a timm Swin name (window None when the name has none)."""
    m = re.search(r"window(\d+)", timm_name)
    cfg = timm.models.get_pretrained_cfg(timm_name)
    img = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
    return {"window_size": int(m.group(1)) if m else None, "img_size": img}


def _check_name(timm_name: str) -> None:
    names = timm.list_models(module="swin_transformer")
    if timm_name not in names:
        raise ValueError(
            f"--timm-name {timm_name!r} is not a timm Swin (v1) model; choose one of {names}"
        )


def _rename(key: str) -> Optional[str]:
    """timm classifier name -> full-model name; None for keys that are dropped."""
    if key.startswith("head.") or key in ("norm.weight", "norm.bias"):
        return None
    if key.startswith("patch_embed."):
        return PREFIX + "model." + key
    m = re.match(r"^layers\.(\d+)\.(.+)$", key)
    if m:
        return f"{PREFIX}model.layers_{m.group(1)}.{m.group(2)}"
    raise ValueError(f"key {key!r} has no place in a timm Swin backbone")


def convert_swin_state_dict(
    sd: Mapping[str, torch.Tensor],
    timm_name: str,
    window_size: Optional[int] = None,
    img_size: Optional[int] = None,
) -> ConversionResult:
    """Map a timm or official Swin state dict to ``backbone.*`` names of TimmSwinBackbone.

    Raises ValueError when the dict is not a Swin checkpoint or does not fit ``timm_name``
    (unknown keys, shape mismatches, backbone tensors without a value).
    """
    from mask2former_sim.modeling.backbone.swin import TimmSwinBackbone

    _check_name(timm_name)
    defaults = swin_defaults(timm_name)
    window_size = window_size if window_size is not None else defaults["window_size"]
    img_size = img_size if img_size is not None else defaults["img_size"]
    if window_size is None:
        raise ValueError(f"{timm_name!r} does not name its window size; pass --window-size")
    if window_size < 1 or img_size < 1:
        raise ValueError(f"window size {window_size} and image size {img_size} must be positive")

    if "patch_embed.proj.weight" not in sd or not any(k.startswith("layers.") for k in sd):
        raise ValueError(
            "not a Swin state dict in timm or official layout (needs patch_embed.proj.weight and "
            f"layers.*); first keys are {sorted(sd)[:8]}"
        )
    official = "layers.0.downsample.reduction.weight" in sd

    # classifier twin of the backbone (same constructor arguments) for timm's filter
    kwargs = dict(img_size=img_size, window_size=window_size, dynamic_img_size=True, always_partition=True)
    with torch.device("meta"):  # only names and shapes are needed: skip allocation and init
        ref = timm.create_model(timm_name, pretrained=False, **kwargs)
    try:
        filtered = checkpoint_filter_fn(dict(sd), ref)
    except Exception as e:  # shapes/names from another architecture make timm's helper fail
        raise ValueError(f"checkpoint does not fit timm model {timm_name!r}: {type(e).__name__}: {e}") from e
    del ref

    out, renamed_away = rename_state_dict(filtered, _rename, "Swin")
    dropped = sorted(k for k in sd if any(b in k for b in _SKIPPED_BUFFERS)) + renamed_away

    with torch.device("meta"):
        backbone = TimmSwinBackbone(timm_name, img_size=img_size, window_size=window_size)
    target = {PREFIX + k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    del backbone
    unexpected = sorted(k for k in out if k not in target)
    wrong = [f"{k}: {out[k].shape} vs {target[k]}" for k in out if k in target and out[k].shape != target[k]]
    missing = sorted(k for k in target if k not in out)
    missing_blocks = [k for k in missing if not k.startswith(PREFIX + "out_norms.")]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the backbone lacks, e.g. {unexpected[:4]}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (checkpoint vs backbone), e.g. {wrong[:4]}")
    if missing_blocks:
        problems.append(f"{len(missing_blocks)} backbone tensors without a value, e.g. {missing_blocks[:4]}")
    if problems:
        raise ValueError(f"checkpoint does not match {timm_name!r} (window {window_size}): " + "; ".join(problems))

    notes = [
        f"input layout: {'official microsoft/Swin-Transformer' if official else 'timm'}",
        f"config: MODEL.SWIN.TIMM_NAME {timm_name}, WINDOW_SIZE {window_size}, PRETRAIN_IMG_SIZE {img_size}",
    ]
    resized = sorted(
        (tuple(sd[k].shape), tuple(filtered[k].shape))
        for k in sd
        if k.endswith("relative_position_bias_table") and k in filtered and sd[k].shape != filtered[k].shape
    )
    if resized:
        n_tab = len(resized)
        src = sorted({int(round(s[0] ** 0.5)) // 2 + 1 for s, _ in resized})
        notes.append(
            f"resized {n_tab} relative_position_bias_table(s) from window {src} to {window_size} "
            "(timm resize_rel_pos_bias_table); fine-tune before trusting them"
        )
    return ConversionResult(model=out, dropped=sorted(dropped), missing=missing, notes=notes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_swin.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", help="Swin checkpoint, timm or official (.pth/.pt/.bin/.safetensors)")
    parser.add_argument("output", help="detectron2 pickle to write (.pkl)")
    parser.add_argument("--timm-name", required=True, help="timm model name = MODEL.SWIN.TIMM_NAME")
    parser.add_argument("--window-size", type=int, default=None, help="MODEL.SWIN.WINDOW_SIZE (default: from the name)")
    parser.add_argument("--img-size", type=int, default=None, help="MODEL.SWIN.PRETRAIN_IMG_SIZE (default: from timm)")
    parser.add_argument("--key", default=None, help="top-level key holding the state dict (default: auto)")
    parser.add_argument(
        "--trust-pickle", action="store_true",
        help="unpickle arbitrary objects in the input (only for files you trust)",
    )
    args = parser.parse_args(argv)
    try:
        sd = load_checkpoint(args.input, key=args.key, trust_pickle=args.trust_pickle)
        result = convert_swin_state_dict(sd, args.timm_name, window_size=args.window_size, img_size=args.img_size)
        save_d2_pickle(args.output, result.model, author="timm")
    except (FileNotFoundError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    print_summary(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
