"""Crash-safe checkpoints: atomic writes and a resume that survives a damaged last checkpoint.

detectron2's ``Checkpointer.save`` writes ``model_XXXXXXX.pth`` in place and then
``last_checkpoint``; a job killed during the write leaves a truncated file that
``last_checkpoint`` may already name (or, for ``model_final.pth``, a truncated copy of
the file that was complete). Here:

* a checkpoint is written to a temporary file in the same directory, flushed and fsync'ed,
  then renamed over the final name (``os.replace`` is atomic on POSIX); ``last_checkpoint``
  is replaced the same way, and only after the checkpoint is in place. A kill at any moment
  leaves the previous checkpoint and ``last_checkpoint`` intact (at worst a stray
  ``.tmp`` file, removed on the next save of that name).
* a failed write (disk full, read-only directory) raises an error naming the path; the
  previous checkpoint and ``last_checkpoint`` are untouched.
* ``--resume`` loads the checkpoint named by ``last_checkpoint``; when that file is missing,
  truncated or unreadable it is reported by name and the newest readable checkpoint of the
  directory is used instead (logged), or the run stops with an error listing what was tried.
* ``--resume`` continues the same run, so a tensor whose shape differs between the checkpoint
  and the model (e.g. MODEL.SIM.NUM_PROTOTYPES or BACKGROUND_PROTOTYPES changed) is an error
  naming the keys; detectron2 would log it and keep the model's fresh tensor. Loading weights
  without ``--resume`` (MODEL.WEIGHTS, fine-tuning) keeps detectron2's skip-and-log.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, List, Optional

import torch

from detectron2.checkpoint import DetectionCheckpointer

from . import fault_injection

logger = logging.getLogger(__name__)

__all__ = ["AtomicCheckpointer", "atomic_write_bytes", "checkpoint_iteration_of"]

_ITER_RE = re.compile(r"model_(\d+)\.pth$")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write) -> None:
    """Write ``path`` through ``write(fileobj)`` into ``path.tmp`` first, then rename into place."""
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    tmp = os.path.join(directory, f".{name}.tmp")
    try:
        with open(tmp, "wb") as f:
            # MASK2FORMER_SIM_PAUSE_AT write:NAME / replace:NAME (tests kill the run there)
            write(fault_injection.PausingWriter(f, name) if fault_injection.requested("write", name) else f)
            f.flush()
            os.fsync(f.fileno())
        fault_injection.pause_at("replace", name)
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException as e:
        try:
            if os.path.exists(tmp):
                os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OSError(
                e.errno, f"could not write checkpoint file {path} ({e.strerror or e}); the previous "
                "checkpoint and last_checkpoint are unchanged"
            ) from e
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file in the same directory + rename)."""
    _atomic_write(path, lambda f: f.write(data))


def checkpoint_iteration_of(filename: str) -> Optional[int]:
    """The iteration in a ``model_XXXXXXX.pth`` name, else None (``model_final.pth``, others)."""
    m = _ITER_RE.search(os.path.basename(filename))
    return int(m.group(1)) if m else None


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves and a resume that falls back to the newest readable
    checkpoint when the tagged one is damaged (see the module docstring)."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data: Dict[str, Any] = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        _atomic_write(save_file, lambda f: torch.save(data, f))
        fault_injection.pause_at("tag", basename)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_bytes(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename.encode())

    # ------------------------------------------------------------------ resume
    def _readable(self, path: str) -> Optional[str]:
        """None when ``path`` loads as a checkpoint, else the reason it does not."""
        if not os.path.isfile(path):
            return "no such file"
        try:
            ckpt = super()._load_file(path)
        except Exception as e:  # truncated zip, unpickling error, ...
            return f"{type(e).__name__}: {e}"
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            return "not a checkpoint (no 'model' entry)"
        self._checked = (path, ckpt)  # load() below reuses it instead of reading the file again
        return None

    def _load_file(self, f: str) -> Dict[str, Any]:
        checked, self._checked = getattr(self, "_checked", None), None
        if checked is not None and checked[0] == f:
            return checked[1]
        return super()._load_file(f)

    def candidates(self) -> List[str]:
        """Checkpoint files of save_dir, newest first: by iteration in the name (model_final.pth,
        written last, first), then by modification time."""
        files = [f for f in self.get_all_checkpoint_files() if not os.path.basename(f).startswith(".")]

        def key(f):
            it = checkpoint_iteration_of(f)
            final = os.path.basename(f) == "model_final.pth"
            return (final, -1 if it is None else it, os.path.getmtime(f))

        return sorted(files, key=key, reverse=True)

    def _load_model(self, checkpoint: Any):
        incompatible = super()._load_model(checkpoint)
        if getattr(self, "_resuming", False) and incompatible is not None and incompatible.incorrect_shapes:
            shapes = "; ".join(f"{k}: {tuple(a)} in the checkpoint, {tuple(b)} in the model"
                               for k, a, b in incompatible.incorrect_shapes)
            raise ValueError(
                f"--resume: the checkpoint does not fit this config's model ({shapes}). Resume with the "
                "config it was trained with, or load it as MODEL.WEIGHTS without --resume"
            )
        return incompatible

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        tagged = self.get_checkpoint_file()
        tried: List[str] = []
        for candidate in [tagged] + [c for c in self.candidates() if os.path.abspath(c) != os.path.abspath(tagged)]:
            reason = self._readable(candidate)
            if reason is None:
                if tried:
                    logger.warning("Resuming from %s, the newest readable checkpoint (skipped: %s)",
                                   candidate, "; ".join(tried))
                self._resuming = True
                try:
                    return self.load(candidate)
                finally:
                    self._resuming = False
            tried.append(f"{candidate}: {reason}")
            logger.error("Cannot resume from %s: %s", candidate, reason)
        raise RuntimeError(
            f"--resume: no readable checkpoint in {self.save_dir} (last_checkpoint names {tagged}). "
            "Tried: " + "; ".join(tried)
        )
