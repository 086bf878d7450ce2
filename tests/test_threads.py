"""The CLI's thread policy and global options: --threads, --verbose, --version, user variables left alone."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import torch

import fmask
from fmask.core import threads
from fmask.train.models import SmallCNN, build_model
from tests.conftest import invoke, refused_line


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    threads.reset_threads_policy()
    torch.set_num_threads(before)


def test_version_prints_the_package_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"fmask {version('fmask')}" == f"fmask {fmask.__version__}"


def test_size_rule_one_thread_per_block_of_work_within_the_cores():
    per = threads.MACS_PER_THREAD
    assert threads.threads_for_work(0, cores=8) == 1
    assert threads.threads_for_work(per - 1, cores=8) == 1
    assert threads.threads_for_work(3 * per, cores=8) == 3
    assert threads.threads_for_work(100 * per, cores=8) == 8


def test_forward_macs_counts_convolutions_and_dense_layers():
    model = SmallCNN(1, 10)  # on 8x8: conv 8x8, max-pool to 4x4, conv 4x4, pool to 2x2, fc, head
    conv1 = 32 * 8 * 8 * (1 * 3 * 3)
    conv2 = 64 * 4 * 4 * (32 * 3 * 3)
    fc = 128 * (64 * 2 * 2)
    head = 10 * 128
    model.train()
    assert threads.forward_macs(model, (1, 8, 8)) == conv1 + conv2 + fc + head
    assert model.training  # left as it was
    # ResNet-18 on CIFAR is ResNet-sized: all cores of a usual machine.
    assert threads.threads_for_work(threads.forward_macs(build_model("resnet18", in_channels=3, num_classes=10),
                                                         (3, 32, 32)), cores=16) == 16


def _train(run_dir, *global_options):
    return invoke(*global_options, "train", "--pool", run_dir / "pool", "--model", "cnn", "--epochs", "1",
                  "--device", "cpu", "--force", "--out", run_dir / "policy.pt")


def test_small_model_gets_one_thread_and_verbose_says_why(run_dir, monkeypatch):
    for name in threads.USER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(2)
    result = _train(run_dir, "--verbose")
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1
    assert "threads: 1 (cnn on 1×8×8 inputs: 0.3M multiply-adds per sample" in result.stderr


def test_threads_option_pins_the_count(run_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # --threads wins over the environment
    result = _train(run_dir, "--threads", "2", "--verbose")
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 2 and "threads: 2 (--threads)" in result.stderr


@pytest.mark.parametrize("variable", threads.USER_VARIABLES)
def test_user_thread_variables_are_left_alone(run_dir, monkeypatch, variable):
    for name in threads.USER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "2")
    torch.set_num_threads(2)  # what PyTorch made of the variable; the size rule would say 1 for this model
    result = _train(run_dir, "--verbose")
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 2
    assert f"threads: 2 (set by the environment ({variable}=2); fmask leaves it alone)" in result.stderr


def test_library_use_leaves_threads_alone():
    threads.reset_threads_policy()
    torch.set_num_threads(2)
    assert threads.fit_threads_to_work(SmallCNN(1, 10), (1, 8, 8)) is None
    assert torch.get_num_threads() == 2


def test_bad_thread_count_is_refused():
    assert "--threads 0 must be at least 1" in refused_line(invoke("--threads", "0", "plot", "nowhere"))
