"""Exact float32 in fisher and query (TF32 off, the caller's settings restored), and --deterministic."""

from __future__ import annotations

import multiprocessing
import traceback

import pytest
import torch
import torch.nn.functional as F

from fmask.core import numerics
from fmask.core.readers import read_json, read_safetensors
from fmask.core.steps import STEP_KEY
from fmask.train.models import SmallCNN, window_avg_pool2d
from tests.conftest import invoke

NEW_API = hasattr(torch.backends.cudnn, "conv")  # PyTorch 2.9+: per-operation fp32_precision settings


def _user_state(name: str) -> None:
    """Float32 settings a user might have made, through either of PyTorch's two APIs."""
    if name == "legacy-tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif name == "matmul-medium":
        torch.set_float32_matmul_precision("medium")  # also lets oneDNN run float32 matmuls in bf16 on CPUs
    elif name == "global-tf32":
        torch.backends.fp32_precision = "tf32"
    elif name == "mixed":
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "tf32"


def _check_case(name: str) -> None:
    _user_state(name)
    before = numerics.float32_settings()
    with numerics.exact_float32():
        assert numerics.is_exact_float32(), numerics.float32_settings()
        # What PyTorch's CUDA matmul asks before choosing TF32; it raises when the two APIs disagree.
        assert torch._C._get_cublas_allow_tf32() is False
        if NEW_API:
            assert torch.backends.cudnn.conv.fp32_precision not in ("tf32", "bf16")
            assert torch.backends.mkldnn.matmul.fp32_precision not in ("tf32", "bf16")
    assert numerics.float32_settings() == before
    try:
        with numerics.exact_float32():
            raise KeyError("inside")
    except KeyError:
        pass
    assert numerics.float32_settings() == before


def _run_case(name: str, queue) -> None:
    try:
        _check_case(name)
        queue.put(None)
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put(traceback.format_exc())


CASES = ["default", "legacy-tf32", "matmul-medium"] + (["global-tf32", "mixed"] if NEW_API else [])


@pytest.mark.parametrize("case", CASES)
def test_exact_float32_turns_reduced_precision_off_and_restores_the_callers_settings(case):
    # Each case starts from PyTorch's defaults in a forked process (the settings are process-wide).
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_run_case, args=(case, queue))
    process.start()
    error = queue.get(timeout=120)
    process.join(timeout=60)
    assert error is None, error


@pytest.fixture
def tf32_on():
    """The user lets float32 matmuls and convolutions use TF32 (PyTorch's legacy switches)."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    yield numerics.float32_settings()
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


def _spy(monkeypatch, owner, name: str, seen: list):
    original = getattr(owner, name)

    def spied(*args, **kwargs):
        seen.append({"exact": numerics.is_exact_float32(), "deterministic": torch.are_deterministic_algorithms_enabled(),
                     "cudnn_deterministic": torch.backends.cudnn.deterministic})
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, spied)


def test_fisher_and_query_run_in_exact_float32_and_restore_tf32(run_dir, monkeypatch, tf32_on):
    import fmask.fisher.step as fisher_step
    from fmask.query.base import QueryContext

    assert not numerics.is_exact_float32()
    seen: list = []
    _spy(monkeypatch, fisher_step, "fisher_diagonal", seen)
    _spy(monkeypatch, QueryContext, "forward", seen)
    mask = run_dir / "mask.safetensors"
    result = invoke("fisher", "--ckpt", run_dir / "round0.pt", "--out", mask, "--sparsity", "0.05",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert numerics.float32_settings() == tf32_on
    result = invoke("query", "--ckpt", run_dir / "round0.pt", "--strategy", "entropy", "--batch", "5",
                    "--out", run_dir / "q.json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert numerics.float32_settings() == tf32_on
    assert len(seen) >= 2 and all(s["exact"] for s in seen)


def test_deterministic_flag_is_on_during_each_command_recorded_and_switched_off(run_dir, monkeypatch):
    import fmask.fisher.step as fisher_step
    import fmask.train.trainer as trainer
    from fmask.query.base import QueryContext

    seen: list = []
    _spy(monkeypatch, trainer, "fit", seen)
    _spy(monkeypatch, fisher_step, "fisher_diagonal", seen)
    _spy(monkeypatch, QueryContext, "forward", seen)
    ckpt, mask, query = run_dir / "det.pt", run_dir / "det.safetensors", run_dir / "det.json"
    commands = [
        ["train", "--pool", run_dir / "pool", "--model", "cnn", "--epochs", "1", "--device", "cpu", "--out", ckpt],
        ["fisher", "--ckpt", ckpt, "--out", mask, "--sparsity", "0.05", "--device", "cpu"],
        ["query", "--ckpt", ckpt, "--strategy", "entropy", "--batch", "5", "--out", query, "--device", "cpu"],
    ]
    for args in commands:
        result = invoke(*args, "--deterministic")
        assert result.exit_code == 0, result.output
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert len(seen) == 3 and all(s["deterministic"] and s["cudnn_deterministic"] for s in seen)
    assert torch.load(ckpt, weights_only=True)[STEP_KEY]["deterministic"] is True
    assert '"deterministic": true' in read_safetensors(mask, what="mask", made_by="fmask fisher")[1][STEP_KEY]
    assert read_json(query, what="query", made_by="fmask query")[STEP_KEY]["deterministic"] is True
    # Without the flag the steps are other steps: they rerun instead of skipping, and record nothing.
    result = invoke("query", "--ckpt", ckpt, "--strategy", "entropy", "--batch", "5", "--out", query, "--device", "cpu")
    assert result.exit_code == 0 and "skipped" not in result.output
    assert "deterministic" not in read_json(query, what="query", made_by="fmask query")[STEP_KEY]
    assert seen[-1]["deterministic"] is False


def test_run_takes_deterministic(tmp_path, monkeypatch):
    import fmask.run.experiment as experiment

    seen: list = []
    _spy(monkeypatch, experiment, "train", seen)
    result = invoke("run", "--out", tmp_path / "run", "--dataset", "digits", "--class-counts", "8,8,8,8,8,8,8,8,8,40",
                    "--initial", "20", "--batch", "5", "--rounds", "1", "--strategies", "random", "--epochs", "1",
                    "--test-per-class", "5", "--device", "cpu", "--deterministic")
    assert result.exit_code == 0, result.output
    assert seen and all(s["deterministic"] for s in seen) and not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (2, 3, 16, 16), (2, 3, 14, 14), (2, 3, 3, 3), (1, 2, 5, 7)])
def test_window_pooling_equals_adaptive_pooling(shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    reference = F.adaptive_avg_pool2d(x, 2)
    windowed = window_avg_pool2d(x, 2)
    torch.testing.assert_close(windowed, reference, rtol=1e-14, atol=1e-14)
    upstream = torch.randn_like(reference)
    (grad_reference,) = torch.autograd.grad(reference, x, upstream)
    (grad_windowed,) = torch.autograd.grad(windowed, x, upstream)
    torch.testing.assert_close(grad_windowed, grad_reference, rtol=1e-14, atol=1e-14)


def test_small_cnn_pools_deterministically_with_the_same_outputs(monkeypatch):
    torch.manual_seed(0)
    model = SmallCNN(3, 10).eval()
    x = torch.randn(4, 3, 32, 32)
    before = model(x)
    with numerics.deterministic_algorithms():
        def refuse(*args, **kwargs):
            raise AssertionError("adaptive_avg_pool2d has no deterministic CUDA backward")

        monkeypatch.setattr(F, "adaptive_avg_pool2d", refuse)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_an_operation_without_a_deterministic_kernel_is_one_line():
    from fmask.core.errors import FmaskError

    with pytest.raises(FmaskError, match="--deterministic: foo_backward_cuda does not have a deterministic implementation; drop"):
        with numerics.deterministic_algorithms():
            raise RuntimeError("foo_backward_cuda does not have a deterministic implementation, but you set "
                               "'torch.use_deterministic_algorithms(True)'. You can turn off determinism ...")
    assert not torch.are_deterministic_algorithms_enabled()
