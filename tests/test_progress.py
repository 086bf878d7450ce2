"""Progress when output is not a terminal: plain lines per epoch and finished step; tables that fit their content."""

from __future__ import annotations

import math
import re

import pandas as pd

from fmask.cli import ui
from fmask.train.checkpoint import load_checkpoint
from tests.conftest import invoke


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_on_change_on_finish_and_every_interval():
    lines: list[str] = []
    clock = FakeClock()
    progress = ui.ProgressLines(lines.append, interval=30.0, clock=clock)
    progress("Fisher diagonal", 64, 256)  # a task's first update
    clock.now = 10.0
    progress("Fisher diagonal", 128, 256)  # unchanged, within the interval: quiet
    clock.now = 31.0
    progress("Fisher diagonal", 192, 256)  # the interval passed
    clock.now = 32.0
    progress("Fisher diagonal", 256, 256)  # finished
    progress("training (epoch 1, loss 2.3000, train acc 0.100)", 1, 3)  # every epoch changes the description
    clock.now = 33.0
    progress("training (epoch 2, loss 2.1000, train acc 0.200)", 2, 3)
    assert lines == [
        "Fisher diagonal: 64/256 (0 s)",
        "Fisher diagonal: 192/256 (31 s)",
        "Fisher diagonal: 256/256 (32 s)",
        "training (epoch 1, loss 2.3000, train acc 0.100): 1/3 (0 s)",
        "training (epoch 2, loss 2.1000, train acc 0.200): 2/3 (1 s)",
    ]
    # What the bad-input tests set apart from the one error line a refused command writes.
    assert all(ui.PROGRESS_LINE.fullmatch(line) for line in lines)
    assert not ui.PROGRESS_LINE.fullmatch("error: no space left on device (28/30 blocks); free some (1 s)x")


def test_train_writes_one_line_per_epoch_with_loss_and_accuracy(run_dir):
    result = invoke("train", "--pool", run_dir / "pool", "--model", "cnn", "--epochs", "3", "--device", "cpu",
                    "--target-accuracy", "1.01", "--out", run_dir / "lines.pt")  # CliRunner: not a terminal
    assert result.exit_code == 0, result.output
    epochs = [re.fullmatch(r"training \(epoch (\d), loss ([0-9.]+), train acc ([0-9.]+)\): (\d)/3 \(\d+ s\)", line)
              for line in result.stderr.splitlines() if line.startswith("training")]
    assert [int(m.group(1)) for m in epochs] == [1, 2, 3] and all(m.group(1) == m.group(4) for m in epochs)
    # Cross-entropy of a 10-class model trained for 3 epochs: finite, positive, below a few nats.
    assert all(0 < float(m.group(2)) < 5 and math.isfinite(float(m.group(2))) for m in epochs)
    assert float(epochs[-1].group(3)) == round(load_checkpoint(run_dir / "lines.pt").metrics["train_accuracy"], 3)


def test_tables_fit_their_content_in_a_log(capsys):
    frame = pd.DataFrame({"strategy": ["fishermask", "least-confidence"],
                          "balanced_accuracy_at_the_final_round": [0.912345, 0.5],
                          "area_under_the_learning_curve": [0.854, 0.812],
                          "labels_needed_to_reach_the_target": ["120", "—"]})
    ui.print_table(frame, "A summary whose title is longer than any eighty-column terminal would show on one line")
    out = capsys.readouterr().out
    for text in list(frame.columns) + ["least-confidence", "0.9123",
                                       "A summary whose title is longer than any eighty-column terminal would show "
                                       "on one line"]:
        assert text in out
    assert "…" not in out
