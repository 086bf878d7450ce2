"""The step record: every artifact stores the inputs' hashes and parameters that made it under :data:`STEP_KEY`,
so a step whose inputs did not change is skipped; and :func:`step_output`, the one frame every writing command runs
in (lock, is-current, compute, atomic write, seal), under torchrun as in one process."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Iterator, Optional, Sequence, TypeVar

import torch

from fmask.core import distributed, paths
from fmask.core.atomic import check_writable
from fmask.core.hashing import seal_json, seal_matches, sha256_json
from fmask.core.locking import output_lock
from fmask.core.readers import zip_is_intact

T = TypeVar("T")

STEP_KEY = "step"  # where every artifact records the inputs' hashes and parameters that made it


def recorded_step(path: str | os.PathLike) -> dict | None:
    """The step key an existing artifact records, or None when absent, unreadable or corrupt (so the step that
    makes it runs again instead of skipping over a damaged file)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        if path.suffix == ".json":
            obj = json.loads(path.read_text())
            return obj.get(STEP_KEY) if seal_matches(obj) else None
        if path.suffix == paths.SAFETENSORS_SUFFIX:
            from safetensors.torch import safe_open

            with safe_open(str(path), framework="pt") as handle:
                text = (handle.metadata() or {}).get(STEP_KEY)
            return json.loads(text) if text else None
        if path.suffix == ".pt":
            if not zip_is_intact(path):
                return None
            return torch.load(path, map_location="cpu", weights_only=True).get(STEP_KEY)
    except Exception:  # an unreadable output is simply not current; the step rewrites it
        return None
    return None


def step_is_current(path: str | os.PathLike, step: dict) -> bool:
    """True when ``path`` exists and was made by the same inputs and parameters (``step``)."""
    recorded = recorded_step(path)
    return recorded is not None and sha256_json(recorded) == sha256_json(step)


# ---- One writing step: lock, is-current, compute, atomic write, seal ------------------------------------------------


@dataclass
class StepOutput(Generic[T]):
    """What :func:`step_output` decided, the same on every rank."""

    path: Path  # the artifact that records the step (written last)
    step: Optional[dict]  # the inputs' hashes and parameters it records (None: a command that records none)
    current: bool  # the recorded step equals ``step`` (and no --force): nothing is computed
    recorded: Optional[T]  # on_current()'s value, computed on the main rank when current (else None)
    writes: bool  # this process writes the outputs: the main rank (the only process without torchrun)

    def sealed(self, data: dict) -> dict:
        """``data`` with the step recorded under :data:`STEP_KEY` and sealed: the JSON the step writes."""
        return seal_json({**data, STEP_KEY: self.step})


@contextmanager
def step_output(out: str | os.PathLike, *, command: str, step: Optional[dict], force: bool = False,
                beside: Sequence[str | os.PathLike] = (), writable: Optional[Sequence[str | os.PathLike]] = None,
                is_current: Optional[Callable[[], bool]] = None,
                on_current: Optional[Callable[[], T]] = None) -> Iterator[StepOutput[T]]:
    """The frame of every writing step: lock the output directory, decide whether ``out`` is current, then let the
    block compute and write it (atomically, :mod:`fmask.core.atomic`; JSON through :meth:`StepOutput.sealed`).

    ``out`` is the artifact that records ``step`` (write it last, so a current ``out`` means a complete step);
    ``beside`` the other files the step writes in the same directory (a CSV beside it, a pool's caches). On the
    main rank alone, holding the lock of ``out``'s directory (which also clears temp files a killed command left
    under these names): ``out`` is current when ``is_current()`` (default: its recorded step equals ``step``) and
    not ``force``; then ``on_current()`` gives what the skipped step returns (it may repair a missing companion
    file). Otherwise every path of ``writable`` (default ``out`` and ``beside``) must be writable, before any work.
    The decision (or the refusal, one FmaskError line) reaches every rank (:func:`fmask.core.distributed.main_decides`)
    so that all compute together and only the main rank (``writes``) writes; a block that succeeds ends at a
    barrier, so no rank returns before the outputs exist. ``step=None``: a command that records no step and always
    writes (predict, export). Without torchrun the decision is simply taken in this process.
    """
    out = Path(out)
    extra = [Path(path) for path in beside]
    if any(path.parent != out.parent for path in extra):
        raise ValueError(f"{out}: the files a step writes beside its output must be in its directory")
    names = (out.name, *(path.name for path in extra))
    with ExitStack() as held:
        def decide() -> tuple[bool, Optional[T]]:
            held.enter_context(output_lock(out.parent, command, outputs=names))
            if not force and step is not None and (is_current() if is_current is not None
                                                   else step_is_current(out, step)):
                return True, on_current() if on_current is not None else None
            for path in (writable if writable is not None else (out, *extra)):
                check_writable(path)
            return False, None

        current, recorded = distributed.main_decides(decide)
        yield StepOutput(out, step, current, recorded, distributed.is_main())
        distributed.barrier()  # the outputs exist before any rank returns (and before the lock is released)
