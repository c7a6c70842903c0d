"""Pause a training run at a chosen moment, so that a test can kill it exactly there.

Off unless the environment variable ``MASK2FORMER_SIM_PAUSE_AT`` is set; then the run stops
at the first moment it names, writes a marker file and sleeps, and the test (which waited
for the marker) sends SIGKILL. Unset, every call below returns at once (one check of a
module-level tuple).

Grammar of ``MASK2FORMER_SIM_PAUSE_AT`` (comma-separated moments; the first one reached pauses)::

    step:N          in training iteration N (0-based, detectron2's ``trainer.iter``): after the
                    forward and backward passes (losses written to the EventStorage, the SIM
                    prototypes already updated by the forward), before the optimizer step
    write:NAME      inside the write of checkpoint file NAME (e.g. ``model_0000003.pth``,
                    ``model_final.pth``, ``last_checkpoint``): the temporary file holds only the
                    first bytes torch.save wrote
    replace:NAME    the temporary file of NAME is complete and fsync'ed, not yet renamed over NAME
    tag:NAME        NAME is in place, ``last_checkpoint`` does not name it yet

``MASK2FORMER_SIM_PAUSE_FILE``: the marker written when pausing (its text: the moment and the
process id); without it the pause is only logged. ``MASK2FORMER_SIM_PAUSE_SECONDS`` (default
3600): how long the pause lasts before the run goes on (a safety net when nobody kills it).

Where the moments are: ``install(trainer)`` (one call in ``Trainer.build_hooks``) for
``step``; ``pause_at`` calls in ``engine/checkpoint.py`` for the others.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Tuple

logger = logging.getLogger(__name__)

__all__ = ["ENV_AT", "ENV_FILE", "ENV_SECONDS", "KINDS", "parse", "requested", "pause_at", "install",
           "PausingWriter"]

ENV_AT = "MASK2FORMER_SIM_PAUSE_AT"
ENV_FILE = "MASK2FORMER_SIM_PAUSE_FILE"
ENV_SECONDS = "MASK2FORMER_SIM_PAUSE_SECONDS"
KINDS = ("step", "write", "replace", "tag")


def parse(spec: str) -> Tuple[Tuple[str, str], ...]:
    """``"step:5,tag:model_0000003.pth"`` -> ``(("step", "5"), ("tag", "model_0000003.pth"))``."""
    moments = []
    for item in (s.strip() for s in (spec or "").split(",")):
        if not item:
            continue
        kind, sep, where = item.partition(":")
        if not sep or kind not in KINDS or not where:
            raise ValueError(f"{ENV_AT}: bad moment {item!r}; expected one of " +
                             ", ".join(f"{k}:..." for k in KINDS) + " (see mask2former_sim/engine/fault_injection.py)")
        if kind == "step" and not where.isdigit():
            raise ValueError(f"{ENV_AT}: bad moment {item!r}; step:N needs an iteration number")
        moments.append((kind, where))
    return tuple(moments)


_MOMENTS = parse(os.environ.get(ENV_AT, ""))


def requested(kind: str, where: str) -> bool:
    return bool(_MOMENTS) and (kind, str(where)) in _MOMENTS


def _pause(kind: str, where: str) -> None:
    moment = f"{kind}:{where}"
    logger.warning("%s: pausing at %s (pid %d)", ENV_AT, moment, os.getpid())
    sys.stdout.flush()
    sys.stderr.flush()
    marker = os.environ.get(ENV_FILE)
    if marker:
        tmp = f"{marker}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:  # complete when the test sees it: written, then renamed
            f.write(f"{moment} {os.getpid()}\n")
        os.replace(tmp, marker)
    deadline = time.monotonic() + float(os.environ.get(ENV_SECONDS, "3600"))
    while time.monotonic() < deadline:
        time.sleep(0.05)
    logger.warning("%s: the pause at %s ended, continuing", ENV_AT, moment)


def pause_at(kind: str, where) -> None:
    """Pause here when ``kind:where`` is requested; otherwise return at once."""
    if _MOMENTS and (kind, str(where)) in _MOMENTS:
        _pause(kind, str(where))


class PausingWriter:
    """File wrapper for ``write:NAME``: passes every write through; after the first write that
    brings the file to at least ``after_bytes`` bytes, flushes what is there and pauses."""

    def __init__(self, f, name: str, after_bytes: int = 1024):
        self._f, self._name, self._after, self._written, self._done = f, name, after_bytes, 0, False

    def write(self, data) -> int:
        n = self._f.write(data)
        self._written += len(data)
        if not self._done and self._written >= self._after:
            self._done = True
            self._f.flush()
            os.fsync(self._f.fileno())
            _pause("write", self._name)
        return n

    def __getattr__(self, attr):  # flush, fileno, tell, ... of the real file
        return getattr(self._f, attr)


def install(trainer) -> None:
    """``step:N`` moments: wrap the step's metric writing, which detectron2's SimpleTrainer and
    AMPTrainer call between ``losses.backward()`` and the optimizer step. No-op when unset."""
    steps = {int(where) for kind, where in _MOMENTS if kind == "step"}
    if not steps:
        return
    inner = trainer._trainer
    write_metrics = inner._write_metrics

    def write_then_maybe_pause(loss_dict, data_time, prefix=""):
        write_metrics(loss_dict, data_time, prefix)
        if inner.iter in steps:
            _pause("step", str(inner.iter))

    inner._write_metrics = write_then_maybe_pause
