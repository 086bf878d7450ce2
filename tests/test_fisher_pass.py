"""The device-aware Fisher pass: CPU results bit-identical to the fixed CPU chunking, batches sized from the usable
memory on accelerators, the mask's index tensors built once per mask, and the page-locked gather's fallback."""

from __future__ import annotations

import pytest
import torch

from fmask.core.device import memory_budget
from fmask.fisher import MaskColumns, fisher_diagonal, masked_embeddings, top_k_mask
from fmask.fisher import grads
from fmask.train.models import SmallCNN


def _model_and_inputs():
    torch.manual_seed(0)
    model = SmallCNN(3, 10).eval()
    with torch.no_grad():  # non-trivial running statistics, so BatchNorm's x̂ is not the input
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(150, 3, 16, 16)


def test_the_cpu_plan_is_the_fixed_cpu_chunking():
    model, _ = _model_and_inputs()
    assert grads.plan_fisher_pass(model, (3, 16, 16), device=torch.device("cpu")) == (64, 1 << 22)
    assert grads.plan_fisher_pass(model, device=torch.device("cpu"), batch_size=10) == (10, 1 << 22)


def test_cpu_results_are_bit_identical_to_the_fixed_chunking():
    model, x = _model_and_inputs()
    planned = fisher_diagonal(model, x)
    fixed = fisher_diagonal(model, x, batch_size=64, max_elements=1 << 22)
    assert all(torch.equal(planned[name], fixed[name]) for name in fixed)
    columns = MaskColumns.from_masks(top_k_mask({n: v.float() for n, v in fixed.items()}, 2000, head=True,
                                                order=list(fixed)), list(fixed))
    assert torch.equal(masked_embeddings(model, x, columns),
                       masked_embeddings(model, x, columns, batch_size=64, max_elements=1 << 22))


def test_accelerator_batches_follow_the_usable_memory():
    model, _ = _model_and_inputs()
    # What the passes keep per sample of SmallCNN on 3x32x32 (conv/BN outputs 32x32x32 and 64x16x16, fc 128,
    # head 10; three copies each), plus the unfolded inputs (3*9 x 32*32 and 32*9 x 16*16), float32.
    outputs = 2 * 32 * 32 * 32 + 2 * 64 * 16 * 16 + 128 + 10
    per_sample = 4 * (3 * outputs + 27 * 1024 + 288 * 256)
    meta = torch.device("meta")  # any non-CPU device: the plan reads only its memory budget
    with memory_budget(10**9):
        plan = grads.plan_fisher_pass(model, (3, 32, 32), device=meta)
    expected = (10**9 // 2) // per_sample
    assert plan.batch_size == expected - expected % 64 and plan.max_elements == 10**9 // 64
    with memory_budget(10**12):  # plenty: the largest batch and intermediates
        assert grads.plan_fisher_pass(model, (3, 32, 32), device=meta) == (grads.MAX_DEVICE_BATCH,
                                                                           grads.MAX_DEVICE_ELEMENTS)
    with memory_budget(10 * per_sample):  # tight: fewer samples, never fewer than one
        assert grads.plan_fisher_pass(model, (3, 32, 32), device=meta).batch_size == 5
    with memory_budget(per_sample):
        assert grads.plan_fisher_pass(model, (3, 32, 32), device=meta).batch_size == 1


def test_the_masks_index_tensors_are_built_once_per_mask(monkeypatch):
    model, x = _model_and_inputs()
    fisher = fisher_diagonal(model, x[:20])
    columns = MaskColumns.from_masks(top_k_mask({n: v.float() for n, v in fisher.items()}, 3000, head=True,
                                                order=list(fisher)), list(fisher))
    calls = [0]
    unique = torch.unique

    def counted(*args, **kwargs):
        calls[0] += 1
        return unique(*args, **kwargs)

    monkeypatch.setattr(torch, "unique", counted)
    one_batch = masked_embeddings(model, x, columns, batch_size=len(x))
    per_mask = calls[0]
    assert per_mask > 0
    calls[0] = 0
    many_batches = masked_embeddings(model, x, columns, batch_size=16)  # 10 batches
    assert calls[0] == per_mask
    torch.testing.assert_close(many_batches, one_batch)


def test_page_locked_gather_falls_back_to_ordinary_memory():
    result, pinned = grads._host_result((3, 2, 4), torch.float32, zeros=True, pinned=True)
    if not torch.cuda.is_available():
        assert not pinned
    assert result.shape == (3, 2, 4) and result.device.type == "cpu" and not result.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_embeddings_match_the_cpu_in_float64():
    model, x = _model_and_inputs()
    model = model.double()
    fisher = fisher_diagonal(model, x.double())
    columns = MaskColumns.from_masks(top_k_mask({n: v.float() for n, v in fisher.items()}, 2000, head=True,
                                                order=list(fisher)), list(fisher))
    cpu = masked_embeddings(model, x.double(), columns, dtype=torch.float64)
    gpu = masked_embeddings(model.cuda(), x.double(), columns, dtype=torch.float64, device=torch.device("cuda"))
    assert gpu.is_pinned()
    torch.testing.assert_close(gpu, cpu, rtol=1e-10, atol=1e-12)
