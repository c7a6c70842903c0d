#!/usr/bin/env python
"""Convert a torchvision ResNet checkpoint into a detectron2 ``.pkl`` for MODEL.WEIGHTS.

torchvision names (conv1, bn1, layer1..layer4 with conv/bn pairs and downsample.0/.1)
become detectron2's ``build_resnet_backbone`` names (stem.conv1[.norm], res2..res5 with
convN[.norm] and shortcut[.norm]). The classifier (fc) and BatchNorm's
num_batches_tracked counters are dropped. The output is a pickle
``{"model": {name: numpy array}, "__author__": "torchvision", "matching_heuristics": True}``
which ``DetectionCheckpointer`` reads directly; its name-suffix matching puts the
weights under whatever prefix the model holds the backbone (``backbone.res2...``).

torchvision puts the stride of a bottleneck in its 3x3 conv, so train with
MODEL.RESNETS.STRIDE_IN_1X1 False (and RES2_OUT_CHANNELS 64 for R18/R34).

Example:
    python tools/convert_torchvision_resnet.py resnet50-11ad3fa6.pth R-50.pkl
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

# keys under which training scripts commonly nest the weights, tried in this order
_WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")

# (block kind, blocks per stage) -> depth of the standard torchvision / detectron2 ResNets
_KNOWN_DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


@dataclass
class ConversionResult:
    """Converted weights plus what the summary reports."""

    model: Dict[str, np.ndarray]
    dropped: List[str] = field(default_factory=list)  # input keys not carried over
    missing: List[str] = field(default_factory=list)  # target keys the input has no value for
    notes: List[str] = field(default_factory=list)  # free-form facts (layout, resizes, cfg hints)


# ---------------------------------------------------------------------------------------
# shared helpers (convert_swin.py imports these)
# ---------------------------------------------------------------------------------------


def load_checkpoint(path: str, key: Optional[str] = None, trust_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Read a state dict from ``.pth``/``.pt``/``.bin`` (torch.load) or ``.safetensors``.

    ``key`` picks a top-level entry (e.g. "state_dict_ema"); without it the dict is
    unwrapped through "model"/"state_dict"/"model_state"/"module" when present. A leading
    "module." (DataParallel) is stripped. ``trust_pickle`` allows full unpickling for
    checkpoints that hold more than tensors (only for files you trust).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj = load_file(path, device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{path!r} holds objects other than tensors and cannot be read with weights_only=True "
                f"({str(e).splitlines()[0]}); if you trust the file, rerun with --trust-pickle"
            ) from e
    return unwrap_state_dict(obj, key=key, source=path)


def unwrap_state_dict(obj: object, key: Optional[str] = None, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Return the flat {name: tensor} dict inside ``obj`` (see ``load_checkpoint``)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise ValueError(f"{source}: no top-level key {key!r}; keys are {sorted(map(str, obj))[:20]}")
        obj = obj[key]
    else:
        for _ in range(3):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None or any(torch.is_tensor(v) for v in obj.values()):
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: selected entry is a {type(obj).__name__}, not a dict of tensors")
    out: Dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise ValueError(f"{source}: non-string key {k!r} in state dict")
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
        if not torch.is_tensor(v):
            raise ValueError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor; not a state dict")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    if not out:
        raise ValueError(f"{source}: state dict is empty")
    return out


def save_d2_pickle(path: str, model: Mapping[str, np.ndarray], author: str) -> None:
    """Write ``{"model": model, "__author__": author, "matching_heuristics": True}``.

    The file must end in ``.pkl``: that suffix is what makes DetectionCheckpointer read it
    as a pickle of numpy arrays.
    """
    if not path.endswith(".pkl"):
        raise ValueError(f"output {path!r} must end with .pkl (DetectionCheckpointer reads .pkl files as pickles)")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    data = {"model": dict(model), "__author__": author, "matching_heuristics": True}
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Detached CPU numpy copy; bf16/fp16 tensors become float32."""
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy().copy()


def print_summary(result: ConversionResult, out_path: str, stream=None) -> None:
    """Human-readable report (stdout by default): tensors written, dropped and missing keys, notes."""
    stream = stream if stream is not None else sys.stdout
    print(f"wrote {len(result.model)} tensors to {out_path}", file=stream)
    for n in result.notes:
        print(f"note: {n}", file=stream)
    print(f"dropped {len(result.dropped)} input keys" + (":" if result.dropped else ""), file=stream)
    for k in _compress(result.dropped):
        print(f"  {k}", file=stream)
    if result.missing:
        print(f"missing {len(result.missing)} target keys (keep their initialisation):", file=stream)
        for k in _compress(result.missing):
            print(f"  {k}", file=stream)


def rename_state_dict(sd: Mapping[str, torch.Tensor], rename, what: str):
    """Apply ``rename`` (new name, None to drop, ValueError if unknown) to every key.

    Returns ({new name: array}, [dropped keys]); raises naming the unknown keys.
    """
    out: Dict[str, np.ndarray] = {}
    dropped: List[str] = []
    unknown: List[str] = []
    for k, v in sd.items():
        try:
            new = rename(k)
        except ValueError:
            unknown.append(k)
            continue
        if new is None:
            dropped.append(k)
        else:
            out[new] = to_numpy(v)
    if unknown:
        raise ValueError(f"not a {what} state dict: {len(unknown)} keys of unknown layout, e.g. {unknown[:8]}")
    return out, dropped


def _compress(keys: Sequence[str], limit: int = 12) -> List[str]:
    """Collapse counters (num_batches_tracked) into one line and cap the list length."""
    nbt = [k for k in keys if k.endswith("num_batches_tracked")]
    rest = [k for k in keys if not k.endswith("num_batches_tracked")]
    lines = rest[:limit] + ([f"... and {len(rest) - limit} more"] if len(rest) > limit else [])
    if nbt:
        lines.append(f"{len(nbt)} x *.num_batches_tracked")
    return lines


# ---------------------------------------------------------------------------------------
# ResNet renaming
# ---------------------------------------------------------------------------------------

_BLOCK_RE = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")


def _rename_block_param(rest: str) -> Optional[str]:
    """Name inside one residual block: torchvision -> detectron2 (None if unknown)."""
    m = re.fullmatch(r"conv([1-3])\.weight", rest)
    if m:
        return rest
    m = re.fullmatch(r"bn([1-3])\.(\w+)", rest)
    if m and m.group(2) in _BN_FIELDS:
        return f"conv{m.group(1)}.norm.{m.group(2)}"
    if rest == "downsample.0.weight":
        return "shortcut.weight"
    m = re.fullmatch(r"downsample\.1\.(\w+)", rest)
    if m and m.group(1) in _BN_FIELDS:
        return f"shortcut.norm.{m.group(1)}"
    return None


def rename_resnet_key(key: str) -> Optional[str]:
    """detectron2 name for one torchvision ResNet key; None for keys that are dropped
    (fc.*, *.num_batches_tracked). Raises ValueError for keys of an unknown layout."""
    if key.endswith("num_batches_tracked") or key.startswith("fc."):
        return None
    if key == "conv1.weight":
        return "stem.conv1.weight"
    m = re.fullmatch(r"bn1\.(\w+)", key)
    if m and m.group(1) in _BN_FIELDS:
        return f"stem.conv1.norm.{m.group(1)}"
    m = _BLOCK_RE.match(key)
    if m:
        inner = _rename_block_param(m.group(3))
        if inner is not None:
            return f"res{int(m.group(1)) + 1}.{m.group(2)}.{inner}"
    raise ValueError(f"key {key!r} does not belong to a torchvision ResNet")


def _describe_layout(sd: Mapping[str, torch.Tensor]) -> List[str]:
    """Notes: detected depth and the MODEL.RESNETS settings it needs."""
    blocks = []
    for stage in range(1, 5):
        idx = {int(m.group(2)) for k in sd if (m := _BLOCK_RE.match(k)) and m.group(1) == str(stage)}
        blocks.append(len(idx))
    kind = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    depth = _KNOWN_DEPTHS.get((kind, tuple(blocks)))
    notes = [
        f"layout: {kind} blocks {blocks}"
        + (f" = ResNet-{depth} (MODEL.RESNETS.DEPTH {depth})" if depth else " (not a standard depth)")
    ]
    hints = ["STRIDE_IN_1X1 False"]
    if kind == "basic":
        hints.append(f"RES2_OUT_CHANNELS {sd['layer1.0.conv1.weight'].shape[0]}")
    else:
        w2 = sd["layer1.0.conv2.weight"]
        groups = w2.shape[0] // w2.shape[1]
        hints += [f"NUM_GROUPS {groups}", f"WIDTH_PER_GROUP {w2.shape[0] // groups}"]
        hints.append(f"RES2_OUT_CHANNELS {sd['layer1.0.conv3.weight'].shape[0]}")
    hints.append(f"STEM_OUT_CHANNELS {sd['conv1.weight'].shape[0]}")
    notes.append("detectron2 cfg: MODEL.RESNETS." + ", ".join(hints))
    return notes


def convert_resnet_state_dict(sd: Mapping[str, torch.Tensor]) -> ConversionResult:
    """Rename a torchvision ResNet state dict to detectron2 names (numpy values).

    Raises ValueError naming the offending keys when the dict is not a torchvision ResNet.
    """
    required = ["conv1.weight", "bn1.weight"] + [f"layer{i}.0.conv1.weight" for i in range(1, 5)]
    absent = [k for k in required if k not in sd]
    if absent:
        sample = sorted(sd)[:8]
        raise ValueError(
            f"not a torchvision ResNet state dict: missing {absent}; first keys are {sample}"
        )
    out, dropped = rename_state_dict(sd, rename_resnet_key, "torchvision ResNet")
    # every conv of every block needs its norm and vice versa
    convs = {k[: -len(".weight")] for k in out if re.search(r"(conv\d|shortcut)\.weight$", k)}
    incomplete = sorted(
        f"{c}.norm.{f}" for c in convs for f in _BN_FIELDS if f"{c}.norm.{f}" not in out
    ) + sorted(
        k for k in out if ".norm." in k and k.split(".norm.")[0] not in convs
    )
    if incomplete:
        raise ValueError(f"incomplete torchvision ResNet state dict: conv/norm pairs lack {incomplete[:8]}")
    return ConversionResult(model=out, dropped=sorted(dropped), notes=_describe_layout(sd))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_torchvision_resnet.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", help="torchvision ResNet checkpoint (.pth/.pt/.bin/.safetensors)")
    parser.add_argument("output", help="detectron2 pickle to write (.pkl)")
    parser.add_argument("--key", default=None, help="top-level key holding the state dict (default: auto)")
    parser.add_argument(
        "--trust-pickle", action="store_true",
        help="unpickle arbitrary objects in the input (only for files you trust)",
    )
    args = parser.parse_args(argv)
    try:
        sd = load_checkpoint(args.input, key=args.key, trust_pickle=args.trust_pickle)
        result = convert_resnet_state_dict(sd)
        save_d2_pickle(args.output, result.model, author="torchvision")
    except (FileNotFoundError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    print_summary(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
