"""``fmask train``: train a model from scratch on the labeled set (by default as the authors' code does: Adam 1e-3,
crop + flip, until 99% training accuracy or an epoch cap, gradients clamped to ±0.1; the stopping rule and the clamp
come from their code, not from the paper's text, see docs/results.md "Faithfulness"), evaluate it on the test
split and write a checkpoint that loads with ``torch.load(weights_only=True)``.

Rounds are fast because nothing runs per image on the host: the labeled uint8 images are read once into device
memory (GPU, or RAM on CPU), every batch is one gather that crops, mirrors and normalises on the device
(fmask.train.augment), and the model runs in autocast precision (bf16 by default on GPUs that have it) with a
channels-last layout, optionally compiled. When the images do not fit in the device's free memory the batches
stream from host memory instead, with the same draws and therefore the same result."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from fmask import __version__
from fmask.core import distributed, paths
from fmask.core.device import free_memory_bytes, resolve_device
from fmask.core.errors import FmaskError
from fmask.core.steps import step_output
from fmask.core.labeled import load_labeled
from fmask.pool.pool import Pool, load_pool
from fmask.core.numerics import deterministic_enabled
from fmask.core.progress import ProgressFn
from fmask.core.threads import fit_threads_to_work
from fmask.core.numerics import autocast, resolve_precision
from fmask.train.augment import RESIDENT_SHARE, Normalizer, TrainBatches, device_images, draw_crop_flip, padded_nbytes
from fmask.train.checkpoint import load_checkpoint, save_checkpoint
from fmask.train.metrics import Evaluation, record_metrics, test_metrics
from fmask.train.models import build_model, set_head_dropout
from fmask.train.recipe import check_recipe, make_optimizer, make_schedule
from fmask.train.validation import TEST, VALIDATION, not_measured, validation_split

# Config fields that choose where batches come from but not what they hold: they stay out of the step hash, so
# switching them never retrains an up-to-date checkpoint (streaming gives the same weights as resident batches).
PLACEMENT_ONLY = ("stream",)
# Config fields added after the first release: they enter the step only when they differ from their default, so a
# checkpoint trained before they existed stays current. The weights enter by their content (sha256), not their path.
LATER_FIELDS = ("finetune", "input_size", "mean", "std", "optimizer", "schedule", "backbone_lr_scale", "mc_dropout",
                "val_fraction")


@dataclass
class TrainConfig:
    model: str = "resnet18"
    lr: float = 1e-3
    batch_size: int = 64
    max_epochs: int = 100
    target_train_accuracy: Optional[float] = 0.99  # stop once an epoch reaches it (the authors' code, not the paper's text); None: off
    grad_clamp: Optional[float] = 0.1  # clamp each gradient entry to ±value (the authors' code); None: off
    weight_decay: float = 0.0
    augment: bool = True
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast); train() records the resolved one
    channels_last: bool = True  # NHWC activations: what GPU convolutions (and oneDNN on CPU) run fastest
    compile: bool = False  # torch.compile the model for the training steps
    stream: bool = False  # force streaming batches from host memory (otherwise chosen when the pool does not fit)
    # Pretrained backbones (fmask.train.pretrained; fmask.train.recipe.make_train_config picks the recipe):
    weights: Optional[str] = None  # a state-dict file, or "default": the library's pretrained weights
    finetune: str = "full"  # full: train everything | head: a linear head on the frozen backbone's cached features
    input_size: Optional[int] = None  # resize inputs on the device to this size (None: the weights' default)
    mean: Optional[list[float]] = None  # the backbone's normalisation (None: the weights' default)
    std: Optional[list[float]] = None
    optimizer: str = "adam"  # adam | adamw
    schedule: str = "constant"  # constant | cosine (per epoch, over max_epochs)
    backbone_lr_scale: float = 1.0  # non-head parameters train at lr x this
    mc_dropout: float = 0.0  # dropout rate before the head (for BALD's MC dropout); 0: none, as in the paper
    val_fraction: float = 0.0  # hold out this stratified share of the labeled set to measure accuracy on


@dataclass
class TrainResult:
    checkpoint: Path
    skipped: bool
    metrics: dict  # as the checkpoint records it
    notes: list[str] = field(default_factory=list)  # one-line notices for the user (e.g. the streaming fallback)

    @property
    def evaluation(self) -> Evaluation:
        """The metrics, typed."""
        return Evaluation.from_metrics(self.metrics)


def validate_config(config: TrainConfig, device: torch.device) -> TrainConfig:
    """Check the numbers and return ``config`` with its precision resolved for ``device``."""
    if config.max_epochs <= 0 or config.batch_size <= 0 or config.lr <= 0:
        raise FmaskError("--epochs, --batch-size and --lr must be positive")
    check_recipe(config)
    return replace(config, precision=resolve_precision(config.precision, device))


def evaluate(model: torch.nn.Module, pool: Pool, device: torch.device, batch_size: int = 512, *,
             precision: str = "fp32", channels_last: bool = False, stream: Optional[bool] = None) -> dict:
    """Accuracy, balanced accuracy and per-class accuracy on the pool's test split.

    The uint8 test images are read into device memory once (streamed per batch when they do not fit) and
    normalised there; ``precision`` is a name from fmask.core.numerics.PRECISIONS.
    """
    return evaluate_images(model, pool.test_images, pool.test_labels, pool, device, batch_size,
                           precision=precision, channels_last=channels_last, stream=stream)


@torch.no_grad()
def evaluate_images(model: torch.nn.Module, images: torch.Tensor, truth: torch.Tensor, pool: Pool,
                    device: torch.device, batch_size: int = 512, *, precision: str = "fp32",
                    channels_last: bool = False, stream: Optional[bool] = None) -> dict:
    """:func:`evaluate` on any uint8 ``images`` (n, C, H, W) of the pool's classes with labels ``truth``."""
    model.eval()
    precision = resolve_precision(precision, device)
    normalize = Normalizer(pool.manifest["normalization"]["mean"], pool.manifest["normalization"]["std"], device,
                           channels_last)
    images, _ = device_images(images, device, stream=stream)
    predictions = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(device, non_blocking=True))
        with autocast(precision, device):
            predictions.append(model(x).argmax(1))
    predicted = torch.cat(predictions).cpu() if predictions else torch.zeros(0, dtype=torch.long)
    return test_metrics(predicted, truth, pool.num_classes)


class TrainLoop:
    """One training run, an epoch at a time: the optimiser, the batch source and the random stream.

    ``images`` are the labeled uint8 images (n, C, H, W) on any device; ``config.precision`` must be resolved
    (see :func:`validate_config`). The model is trained in place (converted to channels-last when asked).

    Under torchrun (a process group of W ranks) the model is wrapped in DistributedDataParallel: every rank draws
    the same epoch (order, crops, flips) from the same seed, each ``batch_size`` batch is split into W contiguous
    parts, and each rank's loss is its part's sum scaled so that DDP's gradient average is the mean over the whole
    batch. What differs from one process: BatchNorm normalises each part with its own statistics (and the running
    statistics kept are rank 0's), and the gradient sum is added in another order.
    """

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                 normalization: dict, augment: dict, config: TrainConfig, device: torch.device,
                 stream: bool = False) -> None:
        if config.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"resolve the precision first (validate_config); got {config.precision!r}")
        self.model, self.config, self.device = model, config, device
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        self.world = distributed.world_size()
        step_model = model
        if self.world > 1:
            if config.batch_size < 2 * self.world:
                raise FmaskError(f"--batch-size {config.batch_size} gives some of the {self.world} processes fewer "
                                 f"than 2 samples per step; use --batch-size {2 * self.world} or more")
            from torch.nn.parallel import DistributedDataParallel

            step_model = DistributedDataParallel(
                model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
        self.step_model = torch.compile(step_model, dynamic=False) if config.compile else step_model
        self.optimizer = make_optimizer(model, config)
        self.schedule = make_schedule(self.optimizer, config)
        # fp16 needs loss scaling against gradient underflow; bf16 has fp32's exponent range and does not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        self.pad = int(augment["crop_pad"]) if config.augment else 0
        self.flip = bool(augment["flip"]) and config.augment
        self.batches = TrainBatches(images, pad=self.pad, device=device, stream=stream)
        self.labels = labels.to(device)
        self.normalize = Normalizer(normalization["mean"], normalization["std"], device, config.channels_last)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.epochs_done = 0
        self.last_loss = float("nan")

    def run_epoch(self) -> float:
        """Train one epoch over every labeled image in a fresh random order; returns its training accuracy."""
        config, device, n = self.config, self.device, len(self.batches)
        self.model.train()
        # All of the epoch's draws at once (CPU generator: same on every device), moved to the device in one go.
        order = torch.randperm(n, generator=self.generator)
        dy, dx, flips = draw_crop_flip(n, pad=self.pad, flip=self.flip, generator=self.generator)
        dy, dx, flips, order_on_device = (t.to(device) for t in (dy, dx, flips, order))
        batch_order = order if self.batches.stream else order_on_device
        correct = torch.zeros((), dtype=torch.long, device=device)  # summed on the device: no sync per step
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # this rank's per-sample losses, summed
        trained = 0
        for batch_start in range(0, n, config.batch_size):
            batch_stop = min(batch_start + config.batch_size, n)
            # BatchNorm needs two samples (on every rank); the lone ones are seen next epoch.
            if batch_stop - batch_start < 2 * self.world and n >= 2:
                continue
            start, stop = batch_start, batch_stop
            if self.world > 1:  # this rank's part of the batch
                part_start, part_stop = distributed.shard_bounds(batch_stop - batch_start)
                start, stop = batch_start + part_start, batch_start + part_stop
            images = self.batches.batch(batch_order[start:stop], dy[start:stop], dx[start:stop], flips[start:stop])
            labels = self.labels[order_on_device[start:stop]]
            with autocast(config.precision, device):
                logits = self.step_model(self.normalize(images))
                if self.world > 1:  # DDP averages over ranks: W x (part sum / batch size) averages to the mean
                    loss = F.cross_entropy(logits, labels, reduction="sum") * (self.world / (batch_stop - batch_start))
                else:
                    loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if config.grad_clamp is not None:
                self.scaler.unscale_(self.optimizer)  # clamp the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_value_(self.model.parameters(), config.grad_clamp)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            correct += (logits.argmax(1) == labels).sum()
            # The loss is a mean over the batch; under DDP this rank's part sum times W / batch size.
            loss_sum += loss.detach().double() * ((batch_stop - batch_start) / self.world if self.world > 1
                                                  else stop - start)
            trained += batch_stop - batch_start
        if self.schedule is not None:
            self.schedule.step()
        self.epochs_done += 1
        self.model.eval()
        # Every rank must see the same accuracy, or they would stop at different epochs.
        totals = distributed.all_reduce_sum(torch.stack([correct.double(), loss_sum]))
        self.last_loss = float(totals[1]) / max(trained, 1)  # mean training loss of the epoch (for progress)
        return int(totals[0]) / max(n, 1)


def fit(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, pool: Pool, config: TrainConfig,
        device: torch.device, progress: Optional[ProgressFn] = None, *, stream: bool = False) -> dict:
    """Train ``model`` on uint8 ``images`` until the target train accuracy or the epoch cap.

    ``stream=False`` keeps the images on ``device``; True streams each batch from host memory."""
    config = validate_config(config, device)
    loop = TrainLoop(model, images, labels, normalization=pool.manifest["normalization"],
                     augment=pool.manifest["augment"], config=config, device=device, stream=stream)
    train_accuracy = 0.0
    for epoch in range(1, config.max_epochs + 1):
        train_accuracy = loop.run_epoch()
        if progress:
            progress(f"training (epoch {epoch}, loss {loop.last_loss:.4f}, train acc {train_accuracy:.3f})", epoch,
                     config.max_epochs)
        if config.target_train_accuracy is not None and train_accuracy >= config.target_train_accuracy:
            break
    return {"epochs": loop.epochs_done, "train_accuracy": train_accuracy}


def plan_loader(pool: Pool, n_labeled: int, device: torch.device, *, pad: int,
                force_stream: bool) -> tuple[bool, Optional[str]]:
    """Resident or streaming batches: (stream, the one-line note to show the user, or None)."""
    if force_stream:
        return True, "streaming batches from host memory (--stream)"
    channels, height, width = pool.image_shape
    needed = padded_nbytes((n_labeled, channels, height, width), pad) + pool.test_images.numel()
    free = free_memory_bytes(device)
    if needed <= RESIDENT_SHARE * free:
        return False, None
    where = "GPU" if device.type == "cuda" else "RAM"
    return True, (f"the labeled and test images ({needed / 2**20:.1f} MiB) do not fit in half the free {where} "
                  f"({free / 2**20:.1f} MiB free); streaming batches from host memory instead (slower)")


def train(*, pool_dir: str | os.PathLike, labeled: Optional[str | os.PathLike], out: str | os.PathLike,
          config: TrainConfig, device: str = "auto", force: bool = False,
          progress: Optional[ProgressFn] = None) -> TrainResult:
    """Train from scratch on the labeled set and write the checkpoint ``out`` (skipped when unchanged)."""
    out = Path(out)
    torch_device = resolve_device(device)
    config = validate_config(config, torch_device)
    pool = load_pool(pool_dir)
    labeled_path = Path(labeled) if labeled is not None else paths.pool_labeled(pool_dir)
    labeled_set = load_labeled(labeled_path, pool)
    if len(labeled_set.ids) == 0:
        if not pool.ground_truth:
            raise FmaskError(f"labeled set {labeled_path} is empty; label a first batch: `fmask query --pool "
                             f"{pool_dir} --strategy random --batch B --out Q`, `fmask export`, then `fmask label "
                             "--answers`")
        raise FmaskError(f"labeled set {labeled_path} is empty; build the pool with --initial > 0")
    validation_split(labeled_set.ids, labeled_set.labels, config.val_fraction, config.seed)  # refuse bad values now
    set_head_dropout(build_model(config.model, in_channels=pool.image_shape[0], num_classes=pool.num_classes),
                     config.mc_dropout)  # validate the name and the rate
    backbone = pretrained_backbone(config, pool)
    defaults = asdict(TrainConfig())
    step_config = {k: v for k, v in asdict(config).items() if k not in PLACEMENT_ONLY and k != "weights"
                   and not (k in LATER_FIELDS and v == defaults[k])}
    step = {"pool": pool.hash, "labeled": labeled_set.hash, "config": step_config}
    if backbone is not None:
        step["weights"] = backbone.weights.sha256
        if config.finetune == "head" and distributed.world_size() > 1:
            raise FmaskError("--finetune head trains a linear head in seconds on one process; run it without torchrun")
    if distributed.world_size() > 1:  # DDP training gives other weights than one process: not the same step
        step["processes"] = distributed.world_size()
    if deterministic_enabled():  # other algorithms on GPUs: not the same step (absent otherwise)
        step["deterministic"] = True
    def reuse() -> dict:
        metrics = load_checkpoint(out).metrics
        # A run killed between the checkpoint and its metrics row gets the row now.
        record_metrics(out, labeled_set=labeled_set, metrics=metrics, train_seed=config.seed)
        return metrics

    # Under torchrun every rank trains (DDP); rank 0 alone locks, decides whether the checkpoint is current and
    # writes.
    with step_output(out, command="train", step=step, force=force, beside=(paths.metrics_csv(out),),
                     on_current=reuse) as output:
        if output.current:
            return TrainResult(out, True, output.recorded)
        if config.finetune == "head":
            from fmask.train.head import train_head_locked

            metrics = train_head_locked(out, step=step, pool=pool, labeled_set=labeled_set, config=config,
                                        backbone=backbone, device=torch_device, progress=progress)
            return TrainResult(out, False, metrics)
        return _train_locked(out, step, pool, labeled_set, config, torch_device, progress, backbone)


def pretrained_backbone(config: TrainConfig, pool: Pool):
    """The located weights and resolved preprocessing of ``config`` (fmask.train.pretrained.Backbone), or None
    when it trains from scratch."""
    if config.weights is None:
        return None
    from fmask.train.pretrained import Backbone

    return Backbone.resolve(config.model, config.weights, channels=pool.image_shape[0], input_size=config.input_size,
                            mean=config.mean, std=config.std)


def _train_locked(out: Path, step: dict, pool: Pool, labeled_set, config: TrainConfig, torch_device: torch.device,
                  progress: Optional[ProgressFn], backbone=None) -> TrainResult:
    """train's work, done while rank 0 holds the lock of the checkpoint's directory."""
    pad = int(pool.manifest["augment"]["crop_pad"]) if config.augment else 0
    stream, note = plan_loader(pool, len(labeled_set.ids), torch_device, pad=pad, force_stream=config.stream)
    torch.manual_seed(config.seed)
    if backbone is None:
        model = build_model(config.model, in_channels=pool.image_shape[0], num_classes=pool.num_classes)
    else:
        model = backbone.build(pool)
    model = set_head_dropout(model, config.mc_dropout).to(torch_device)
    fit_threads_to_work(model, pool.image_shape, what=config.model)  # the CLI's thread policy (no-op otherwise)
    train_ids, validation_ids = validation_split(labeled_set.ids, labeled_set.labels, config.val_fraction, config.seed)
    label_of = dict(zip(labeled_set.ids, labeled_set.labels))
    images = pool.images(train_ids)  # host uint8; TrainLoop moves it to the device once unless streaming
    labels = torch.tensor([label_of[i] for i in train_ids], dtype=torch.long)
    started = time.perf_counter()
    fit_stats = fit(model, images, labels, pool, config, torch_device, progress, stream=stream)
    if torch_device.type == "cuda":
        torch.cuda.synchronize(torch_device)  # the clock must include the queued GPU work
    train_seconds = time.perf_counter() - started
    model.to(memory_format=torch.contiguous_format)  # checkpoints hold plain layouts whatever the training used
    metrics = None
    if distributed.is_main():  # the others wait: one evaluation, one writer
        evaluation = dict(precision=config.precision, channels_last=config.channels_last, stream=stream)
        if validation_ids:  # asked for: measured on the held-out part of the labeled set
            metrics = evaluate_images(model, pool.images(validation_ids),
                                      torch.tensor([label_of[i] for i in validation_ids]), pool, torch_device,
                                      **evaluation)
            metrics.update(evaluated_on=VALIDATION, validation_samples=len(validation_ids), test_samples=0)
        elif pool.has_test_set:
            metrics = evaluate(model, pool, torch_device, **evaluation)
            metrics["evaluated_on"] = TEST
        else:
            metrics = not_measured(pool.num_classes)
        metrics.update(fit_stats, train_seconds=train_seconds, labeled=len(labeled_set.ids), trained_on=len(train_ids),
                       loader="streaming" if stream else "resident", precision=config.precision)
        save_checkpoint(out, model=model, config=replace(config, stream=stream), pool=pool,
                        labeled_set=labeled_set, metrics=metrics, step=step, fmask_version=__version__,
                        extra=backbone.record() if backbone is not None else None)
        record_metrics(out, labeled_set=labeled_set, metrics=metrics, train_seed=config.seed)
    metrics = distributed.broadcast_object(metrics)
    return TrainResult(out, False, metrics, [note] if note else [])
