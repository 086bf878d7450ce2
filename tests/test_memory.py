"""--memory-limit: parsing, refusals (one line, nothing written), the override of every plan, and a Fisher-greedy
plan that covers the engine's measured peak including every D x D temporary."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fmask.core.device import memory_budget, parse_memory_size, usable_memory_bytes
from fmask.core.errors import FmaskError
from fmask.query.fisher_greedy import fisher_greedy_detailed, plan_fisher_greedy
from tests.conftest import invoke, refused_line, snapshot


@pytest.mark.parametrize("text, size", [("123456", 123456), ("20GB", 20 * 10**9), ("20gb", 20 * 10**9),
                                        ("16GiB", 16 * 2**30), ("1.5 MB", 1_500_000), ("512KiB", 512 * 1024),
                                        ("2TB", 2 * 10**12), ("7B", 7)])
def test_memory_sizes_parse(text, size):
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["20XB", "GB", "-5GB", "0", "1e9", "twenty", "20 G B", ""])
def test_bad_memory_sizes_are_refused(text):
    with pytest.raises(FmaskError, match="--memory-limit"):
        parse_memory_size(text)


def test_the_limit_overrides_every_plan_inside_its_block():
    assert usable_memory_bytes("cpu") != 12345
    with memory_budget(12345):
        assert usable_memory_bytes("cpu") == 12345
        with pytest.raises(FmaskError, match="12.1 KiB memory limit"):
            plan_fisher_greedy(100, 10, 1000, steps=10)
        with memory_budget(None):  # None keeps the one in force
            assert usable_memory_bytes("cpu") == 12345
    assert usable_memory_bytes("cpu") != 12345
    plan = plan_fisher_greedy(100, 10, 1000, steps=10, memory_limit=10**9)  # an explicit limit still wins
    assert plan.memory_limit == 10**9


def test_fisher_and_query_refuse_a_limit_too_small_with_one_line(run_dir):
    before = snapshot(run_dir)
    line = refused_line(invoke("fisher", "--ckpt", run_dir / "round0.pt", "--out", run_dir / "m.safetensors",
                               "--sparsity", "0.05", "--memory-limit", "1KB", "--device", "cpu"))
    assert "more than the 1000 B usable" in line and "--memory-limit" in line
    assert "is not a size" in refused_line(invoke("fisher", "--ckpt", run_dir / "round0.pt", "--out",
                                                  run_dir / "m.safetensors", "--memory-limit", "lots"))
    assert snapshot(run_dir) == before
    # A mask made without a limit; the selection then refuses a limit below its D x D matrices.
    assert invoke("fisher", "--ckpt", run_dir / "round0.pt", "--out", run_dir / "m.safetensors", "--sparsity",
                  "0.05", "--device", "cpu").exit_code == 0
    before = snapshot(run_dir)
    line = refused_line(invoke("query", "--ckpt", run_dir / "round0.pt", "--strategy", "fishermask", "--mask",
                               run_dir / "m.safetensors", "--batch", "5", "--out", run_dir / "q.json",
                               "--memory-limit", "100KB", "--device", "cpu"))
    assert "over the 97.7 KiB memory limit" in line
    assert snapshot(run_dir) == before
    result = invoke("query", "--ckpt", run_dir / "round0.pt", "--strategy", "fishermask", "--mask",
                    run_dir / "m.safetensors", "--batch", "5", "--out", run_dir / "q.json", "--memory-limit", "2GiB",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output


class PeakMemory(TorchDispatchMode):
    """The peak bytes of CPU storages created by tensor operations inside the block (inputs ``ignore``d): each
    storage counts from the first tensor that holds it until the last such tensor is gone."""

    def __init__(self, ignore: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self.ignore = {t.untyped_storage().data_ptr() for t in ignore}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors holding it]
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self.ignore:
                continue
            if key not in self.live:
                self.live[key] = [storage.nbytes(), 0]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            self.live[key][1] += 1
            weakref.finalize(tensor, self._release, key)
        return out


@pytest.mark.parametrize("n, r, d, num_labeled, mode", [(40, 3, 600, 5, "dense"), (40, 3, 600, 0, "dense"),
                                                        (40, 3, 600, 5, "factored"), (200, 10, 300, 20, "auto")])
def test_the_plan_covers_the_measured_peak_and_the_gpu_solvers_copy(n, r, d, num_labeled, mode):
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(n, r, d, generator=generator)
    labeled = torch.randn(num_labeled, r, d, generator=generator) if num_labeled else None
    tracker = PeakMemory(ignore=(pool,) + ((labeled,) if labeled is not None else ()))
    with tracker:
        result = fisher_greedy_detailed(pool, 5, labeled, chunk_size=8, fisher_mode=mode)
    # On CUDA, cholesky_inverse also clones the Cholesky factor (cuSOLVER's working copy): one D x D more than
    # the CPU path measured here makes, at the moment of the CPU's peak (F, the factor and the inverse).
    assert result.plan.bytes_needed >= tracker.peak + d * d * 4
