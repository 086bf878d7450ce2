"""Fast rounds: on-device augmentation matches torchvision's transforms, training is seeded and reproducible,
streaming batches give the same result as device-resident ones, and precision options are checked and recorded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from scipy.stats import chi2_contingency, chisquare

from fmask import load_pool
from fmask.core.errors import FmaskError
from fmask.query.base import QueryContext
from fmask.core.numerics import resolve_precision
from fmask.train.augment import Normalizer, TrainBatches, draw_crop_flip, random_crop_flip
from fmask.train.checkpoint import load_checkpoint
from fmask.train.models import build_model
from fmask.train.trainer import TrainConfig, TrainLoop, evaluate, plan_loader, validate_config
from tests.conftest import invoke

PAD, SIZE, N_DRAWS = 4, 32, 3000
MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def marker_images(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, 32, 32): channel 0 holds row+1, channel 1 col+1 (padding reads 0), channel 2 random content,
    so the crop offset and the mirroring can be read back from any output."""
    rows = torch.arange(1, SIZE + 1, dtype=torch.uint8)
    images = torch.empty(n, 3, SIZE, SIZE, dtype=torch.uint8)
    images[:, 0] = rows[:, None]
    images[:, 1] = rows[None, :]
    images[:, 2] = torch.randint(0, 256, (n, SIZE, SIZE), generator=torch.Generator().manual_seed(seed),
                                 dtype=torch.uint8)
    return images


def read_back(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dy, dx, flipped) of augmented marker images (n, 3, 32, 32). The centre pixel always comes from the image:
    its original row is dy + 16 - PAD; its original column dx + 16 - PAD, or dx + 15 - PAD when mirrored."""
    centre_row, centre_col = batch[:, 0, 16, 16].astype(int) - 1, batch[:, 1, 16, 16].astype(int) - 1
    flipped = batch[:, 1, 16, 17] < batch[:, 1, 16, 16]
    dy = centre_row - 16 + PAD
    dx = centre_col - np.where(flipped, 15, 16) + PAD
    return dy, dx, flipped


def torchvision_batch(images: torch.Tensor, seed: int) -> np.ndarray:
    """The authors' loop: PIL image -> RandomCrop(32, padding=4) -> RandomHorizontalFlip, (n, 3, 32, 32) uint8."""
    transform = T.Compose([T.RandomCrop(SIZE, padding=PAD), T.RandomHorizontalFlip()])
    torch.manual_seed(seed)
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    return np.stack([np.asarray(transform(im)) for im in pil]).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def both_augmentations():
    images = marker_images(N_DRAWS)
    ours = random_crop_flip(images, pad=PAD, flip=True, generator=torch.Generator().manual_seed(0))
    return images, ours, torchvision_batch(images, seed=0)


def test_on_device_augmentation_has_torchvisions_shapes_values_and_statistics(both_augmentations):
    images, ours, theirs = both_augmentations
    assert ours.shape == theirs.shape == (N_DRAWS, 3, SIZE, SIZE) and ours.dtype == torch.uint8
    ours = ours.numpy()
    ours_dy, ours_dx, ours_flip = read_back(ours)
    theirs_dy, theirs_dx, theirs_flip = read_back(theirs)
    for offsets in (ours_dy, ours_dx, theirs_dy, theirs_dx):
        assert offsets.min() == 0 and offsets.max() == 2 * PAD  # every offset 0..2*pad, nothing outside
    # Each side: offsets uniform over the 81 (dy, dx) cells, flips at rate 1/2.
    for dy, dx, flipped in ((ours_dy, ours_dx, ours_flip), (theirs_dy, theirs_dx, theirs_flip)):
        cells = np.bincount(dy * (2 * PAD + 1) + dx, minlength=(2 * PAD + 1) ** 2)
        assert chisquare(cells).pvalue > 1e-3
        assert abs(flipped.mean() - 0.5) < 0.03
    # The two sides against each other: same offset and flip distributions.
    for a, b, bins in ((ours_dy, theirs_dy, 2 * PAD + 1), (ours_dx, theirs_dx, 2 * PAD + 1),
                       (ours_flip.astype(int), theirs_flip.astype(int), 2)):
        table = np.stack([np.bincount(a, minlength=bins), np.bincount(b, minlength=bins)])
        assert chi2_contingency(table).pvalue > 1e-3
    # Same share of zero padding pixels (the crop's value range includes the padding's zeros).
    assert abs((ours[:, 0] == 0).mean() - (theirs[:, 0] == 0).mean()) < 0.01
    assert (ours[:, 0] == 0).mean() > 0.05
    # Pixel for pixel, each of our outputs is torchvision's crop + flip with the offsets read back from it.
    for i in range(40):
        pil = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        expected = TF.crop(TF.pad(pil, PAD), int(ours_dy[i]), int(ours_dx[i]), SIZE, SIZE)
        expected = TF.hflip(expected) if ours_flip[i] else expected
        assert np.array_equal(np.asarray(expected).transpose(2, 0, 1), ours[i]), i


def test_fused_normalisation_equals_totensor_normalize(both_augmentations):
    images, ours, _ = both_augmentations
    reference = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    expected = torch.stack([reference(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in ours[:64]])
    for channels_last in (False, True):
        x = Normalizer(MEAN, STD, torch.device("cpu"), channels_last)(ours[:64])
        assert x.dtype == torch.float32 and x.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.allclose(x, expected, atol=1e-6)
    low, high = (0 - max(MEAN)) / min(STD), (1 - min(MEAN)) / min(STD)
    assert low <= float(expected.min()) and float(expected.max()) <= high


def test_resident_and_streamed_batches_are_identical_and_seeded():
    images = marker_images(20, seed=1)
    index = torch.tensor([3, 0, 19, 7, 7])
    draws = draw_crop_flip(5, pad=PAD, flip=True, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in
               zip(draws, draw_crop_flip(5, pad=PAD, flip=True, generator=torch.Generator().manual_seed(5))))
    resident = TrainBatches(images, pad=PAD, device=torch.device("cpu"), stream=False).batch(index, *draws)
    streamed = TrainBatches(images, pad=PAD, device=torch.device("cpu"), stream=True).batch(index, *draws)
    assert torch.equal(resident, streamed) and resident.shape == (5, 3, SIZE, SIZE)
    # No augmentation draws (offset pad, no flip) give the images themselves.
    centre = torch.full((5,), PAD)
    plain = TrainBatches(images, pad=PAD, device=torch.device("cpu"), stream=False)
    assert torch.equal(plain.batch(index, centre, centre, torch.zeros(5, dtype=torch.bool)), images[index])


def synthetic_run(seed: int, *, stream: bool = False, precision: str = "fp32", channels_last: bool = True,
                  epochs: int = 2) -> tuple[dict, list[float]]:
    generator = torch.Generator().manual_seed(99)
    images = torch.randint(0, 256, (40, 3, SIZE, SIZE), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 4, (40,), generator=generator)
    config = validate_config(TrainConfig(model="cnn", batch_size=16, seed=seed, precision=precision,
                                         channels_last=channels_last), torch.device("cpu"))
    torch.manual_seed(seed)
    model = build_model("cnn", in_channels=3, num_classes=4)
    loop = TrainLoop(model, images, labels, normalization={"mean": MEAN, "std": STD},
                     augment={"crop_pad": PAD, "flip": True}, config=config, device=torch.device("cpu"), stream=stream)
    accuracies = [loop.run_epoch() for _ in range(epochs)]
    assert not model.training
    return {k: v.clone() for k, v in model.state_dict().items()}, accuracies


def test_training_is_reproducible_under_a_seed_and_streaming_changes_nothing():
    first, acc_first = synthetic_run(seed=4)
    again, acc_again = synthetic_run(seed=4)
    streamed, acc_streamed = synthetic_run(seed=4, stream=True)
    other, _ = synthetic_run(seed=5)
    assert acc_first == acc_again == acc_streamed
    for name, value in first.items():
        assert torch.equal(value, again[name]), name
        assert torch.equal(value, streamed[name]), name
    assert any(not torch.equal(value, other[name]) for name, value in first.items() if value.is_floating_point())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_on_cpu(precision):
    reference, _ = synthetic_run(seed=4, epochs=1)
    weights, accuracies = synthetic_run(seed=4, precision=precision, epochs=1)
    assert 0.0 <= accuracies[0] <= 1.0
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    # Autocast really ran: the weights moved differently from full precision, but stayed close to it.
    moved = [float((weights[k] - reference[k]).abs().max()) for k in reference if reference[k].is_floating_point()]
    assert max(moved) > 0 and max(moved) < 0.05


def test_precision_names_are_checked_and_auto_is_fp32_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(FmaskError, match="precision"):
        resolve_precision("fp64", cpu)


def test_bad_precision_exits_2_and_writes_nothing(tiny_run, tmp_path):
    result = invoke("train", "--pool", tiny_run / "pool", "--model", "cnn", "--epochs", "1", "--device", "cpu",
                    "--precision", "half", "--out", tmp_path / "x.pt")
    assert result.exit_code == 2
    assert "precision" in result.output and "fp32" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()


def test_streaming_fallback_gives_the_same_metrics_and_checkpoints_record_the_setup(tiny_run, tmp_path):
    common = ["train", "--pool", tiny_run / "pool", "--model", "cnn", "--epochs", "2", "--batch-size", "16",
              "--seed", "2", "--device", "cpu"]
    resident = invoke(*common, "--out", tmp_path / "resident.pt")
    streamed = invoke(*common, "--stream", "--out", tmp_path / "streamed.pt")
    assert resident.exit_code == 0 and streamed.exit_code == 0, resident.output + streamed.output
    assert "note: streaming" in streamed.output and "note:" not in resident.output
    a, b = (torch.load(tmp_path / name, weights_only=True) for name in ("resident.pt", "streamed.pt"))
    assert set(a["metrics"]) == set(b["metrics"]) and len(b["metrics"]["per_class_accuracy"]) == 10
    assert (a["metrics"]["loader"], b["metrics"]["loader"]) == ("resident", "streaming")
    for key in ("accuracy", "balanced_accuracy", "per_class_accuracy", "epochs", "train_accuracy"):
        assert a["metrics"][key] == b["metrics"][key], key
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
        assert value.is_contiguous(), name  # plain layouts in checkpoints, whatever training used
    assert a["config"]["precision"] == "fp32" and a["metrics"]["precision"] == "fp32"  # auto on CPU
    assert a["config"]["channels_last"] is True and a["config"]["compile"] is False
    assert (a["config"]["stream"], b["config"]["stream"]) == (False, True)
    # Streaming is a placement choice, not an input: the up-to-date checkpoint is not retrained.
    assert "unchanged, skipped" in invoke(*common, "--stream", "--out", tmp_path / "resident.pt").output

    bf16 = invoke(*common, "--precision", "bf16", "--no-channels-last", "--out", tmp_path / "bf16.pt")
    assert bf16.exit_code == 0, bf16.output
    config = load_checkpoint(tmp_path / "bf16.pt").state["config"]
    assert config["precision"] == "bf16" and config["channels_last"] is False


def test_loader_streams_when_the_images_do_not_fit(tiny_run, monkeypatch):
    pool = load_pool(tiny_run / "pool")
    cpu = torch.device("cpu")
    assert plan_loader(pool, 20, cpu, pad=1, force_stream=False) == (False, None)
    monkeypatch.setattr("fmask.train.trainer.free_memory_bytes", lambda device: 2048)
    stream, note = plan_loader(pool, 20, cpu, pad=1, force_stream=False)
    assert stream and "do not fit" in note and "streaming" in note and "\n" not in note


def test_evaluation_and_query_forward_read_the_uint8_cache(tiny_run):
    pool = load_pool(tiny_run / "pool")
    model = load_checkpoint(tiny_run / "round0.pt").model
    cpu = torch.device("cpu")
    resident = evaluate(model, pool, cpu, batch_size=7, stream=False)
    assert resident == evaluate(model, pool, cpu, batch_size=64, stream=True)
    assert resident == evaluate(model, pool, cpu, channels_last=True)
    ids = pool.ids[:30]
    with torch.no_grad():  # chunk by chunk as the query does: other batch sizes round differently
        expected = torch.cat([model(pool.inputs(ids[start:start + 8])) for start in range(0, 30, 8)])
    context = QueryContext(model=model, pool=pool, labeled_ids=[], unlabeled_ids=ids, batch_size=8)
    logits, features = context.forward(ids)
    assert torch.equal(logits, expected) and features.shape[0] == 30  # fp32 on CPU: exactly the pool's inputs
    low, _ = QueryContext(model=model, pool=pool, labeled_ids=[], unlabeled_ids=ids, batch_size=8,
                          options={"precision": "bf16"}).forward(ids)
    assert not torch.equal(low, expected) and torch.allclose(low, expected, atol=0.1 * float(expected.abs().max()))
    with pytest.raises(FmaskError, match="precision"):
        QueryContext(model=model, pool=pool, labeled_ids=[], unlabeled_ids=ids, options={"precision": "x"}).forward(ids)
