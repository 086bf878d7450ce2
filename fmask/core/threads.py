"""The CPU thread policy of the command line: how many intra-op threads PyTorch uses.

PyTorch starts one intra-op thread per core. For small models that is a poor default: each operation is too
short to share, and on a busy machine (CI, a shared box, a GPU box whose cores feed data loaders) every
operation waits for its slowest thread, which the OS has descheduled; a digits round measured 40 s instead of
0.3 s that way. The CLI therefore sizes the thread count to the work: one thread per ``MACS_PER_THREAD``
multiply-adds of one sample's forward pass, at least one, at most all cores (the small CNN gets one thread,
ResNet-18 on 32×32 images all cores of any usual machine).

Precedence: ``fmask --threads N`` pins N; otherwise a user who set ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``
keeps what PyTorch made of it; otherwise the size rule applies when a command knows its model and inputs
(:func:`fit_threads_to_work`). Library use is unaffected: nothing here runs unless the CLI calls
:func:`configure_threads`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from fmask.core.errors import FmaskError

USER_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# A sample's forward pass per thread: the small CNN (0.35M on digits, 5.6M on CIFAR) stays on one thread,
# ResNet-18 on CIFAR (556M) gets 22.
MACS_PER_THREAD = 25_000_000
DEFAULT_THREADS = torch.get_num_threads()  # what PyTorch chose at start-up: one per core


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str


@dataclass
class _Policy:
    mode: str  # "pinned" (--threads), "user" (environment variables), "auto" (the size rule)
    notify: Optional[Callable[[str], None]]
    last: Optional[ThreadChoice] = None


_policy: Optional[_Policy] = None  # None: not configured (library use): torch's settings are left alone


def user_thread_variables(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The thread variables the user set (non-empty), by name."""
    return {name: environ[name] for name in USER_VARIABLES if environ.get(name, "").strip()}


def threads_for_work(macs_per_sample: float, cores: int = DEFAULT_THREADS) -> int:
    """The size rule: one thread per MACS_PER_THREAD multiply-adds of a sample's forward pass, within 1..cores."""
    return max(1, min(int(cores), int(macs_per_sample // MACS_PER_THREAD)))


def configure_threads(*, requested: Optional[int] = None, notify: Optional[Callable[[str], None]] = None,
                      environ: Mapping[str, str] = os.environ) -> ThreadChoice:
    """Set the policy for this process (the CLI calls it once, before any command): ``requested`` (``--threads``)
    pins that many threads now; variables the user set are left to PyTorch; otherwise the count waits for the
    work (:func:`fit_threads_to_work`). ``notify`` receives one line per decision (``--verbose``)."""
    global _policy
    if requested is not None:
        if requested < 1:
            raise FmaskError(f"--threads {requested} must be at least 1; omit it to size threads to the work")
        torch.set_num_threads(requested)
        choice = ThreadChoice(requested, "--threads")
        _policy = _Policy("pinned", notify, choice)
    elif user_thread_variables(environ):
        given = ", ".join(f"{k}={v}" for k, v in user_thread_variables(environ).items())
        choice = ThreadChoice(torch.get_num_threads(), f"set by the environment ({given}); fmask leaves it alone")
        _policy = _Policy("user", notify, choice)
    else:
        choice = ThreadChoice(torch.get_num_threads(), "PyTorch's default until a command knows its model")
        _policy = _Policy("auto", notify)
    if notify is not None and _policy.mode != "auto":
        notify(f"threads: {choice.threads} ({choice.reason})")
    return choice


def reset_threads_policy() -> None:
    """Forget the policy (tests); torch's current thread count is kept."""
    global _policy
    _policy = None


def forward_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds of one sample's forward pass through the model's convolutions and dense layers (the bulk
    of any image classifier), counted on a zero input in eval mode. Counted with hooks rather than
    torch.utils.flop_counter, whose first use costs about a second per process."""
    counts = [0]

    def count(module: nn.Module, inputs, output) -> None:
        if isinstance(module, nn.Conv2d):
            counts[0] += output.numel() * (module.in_channels // module.groups) * module.kernel_size[0] \
                * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            counts[0] += output.numel() * module.in_features

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return counts[0]


def fit_threads_to_work(model: nn.Module, input_shape: Sequence[int], what: str = "model") -> Optional[ThreadChoice]:
    """Under the CLI's size rule, set the thread count for ``model`` on inputs of ``input_shape`` (C, H, W).
    Does nothing (returns None) when the user pinned the count, set a thread variable, or nothing configured
    the policy (library use)."""
    if _policy is None or _policy.mode != "auto":
        return None
    try:
        macs = forward_macs(model, input_shape)
    except RuntimeError:
        return None  # the model cannot take a zero sample of this shape: its own step will say why
    threads = threads_for_work(macs)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    shape = "×".join(str(int(s)) for s in input_shape)
    choice = ThreadChoice(threads, f"{what} on {shape} inputs: {macs / 1e6:.1f}M multiply-adds per sample, one "
                                   f"thread per {MACS_PER_THREAD / 1e6:.0f}M, {DEFAULT_THREADS} cores; "
                                   "--threads N or OMP_NUM_THREADS override")
    if _policy.notify is not None and choice != _policy.last:
        _policy.notify(f"threads: {choice.threads} ({choice.reason})")
    _policy.last = choice
    return choice
