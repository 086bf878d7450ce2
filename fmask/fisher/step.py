"""``fmask fisher``: the exact diagonal Fisher of a checkpoint on its unlabeled pool, the top-k mask, and the
masked gradient embeddings that the ``fishermask`` query strategy selects with.

The mask file (safetensors) holds, for every parameter N of the model, ``fisher.N`` (float32, N's shape)
and ``mask.N`` (bool, N's shape); its metadata records sparsity, k, head, sample count, the checkpoint's
hash, the fmask version, the parameter order, the FisherMask variant (``embedding_rows``: scaled | unscaled,
``m0``: identity | fisher, which ``fmask query`` follows unless told otherwise) and the step key (inputs' hashes
and parameters) that lets a rerun with the same inputs skip. The embeddings (unlabeled and labeled samples,
(N, classes, k)) are cached beside it (``fmask.core.paths.embeddings_cache``), keyed by the mask file's hash, the sample
ids and the row scaling.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

import fmask
from fmask.core import distributed, paths
from fmask.core.device import format_bytes, resolve_device
from fmask.core.errors import FmaskError
from fmask.fisher.grads import (DEFAULT_BATCH_SIZE, check_embedding_rows, fisher_diagonal, masked_embeddings,
                                plan_fisher_pass)
from fmask.core.progress import ProgressFn
from fmask.fisher.mask import MaskColumns, check_sparsity_works, is_head_parameter, mask_size, top_k_mask
from fmask.core.numerics import deterministic_enabled, exact_float32
from fmask.core.atomic import atomic_save_safetensors, check_writable
from fmask.core.hashing import FORMAT_VERSION, sha256_file, sha256_json
from fmask.core.locking import output_lock
from fmask.core.readers import read_safetensors, read_safetensors_rows, safetensors_shapes
from fmask.core.steps import STEP_KEY, step_is_current, step_output

FISHER = "fmask fisher"
MASK_KIND = "fisher-mask"
EMBEDDINGS_KIND = "fisher-embeddings"
EMBED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
M0_CHOICES = ("identity", "fisher")  # the Fisher-greedy start: lamb I (authors' code) or lamb F (paper's eq. 2)


def check_m0(m0: str) -> None:
    if m0 not in M0_CHOICES:
        raise FmaskError(f"unknown --m0 {m0!r}; use one of: {', '.join(M0_CHOICES)}")


def embeddings_step(mask_hash: str, unlabeled_ids: Sequence[int], labeled_ids: Sequence[int], rows: str) -> dict:
    """The step key of an embeddings cache: which mask, which samples, which row scaling."""
    return {"mask": mask_hash, "unlabeled": sha256_json([int(i) for i in unlabeled_ids]),
            "labeled": sha256_json([int(i) for i in labeled_ids]), "rows": rows}


def head_only_trainable(model: torch.nn.Module) -> bool:
    """True for a frozen backbone: every parameter outside the classifier layer has requires_grad off."""
    return all(not p.requires_grad for name, p in model.named_parameters() if not is_head_parameter(name))


def _fmask_version() -> str:
    return str(getattr(fmask, "__version__", "unknown"))


@dataclass
class FisherResult:
    out: Path
    skipped: bool  # the mask (and its embeddings) were already current
    k: int
    num_parameters: int
    samples: int  # unlabeled samples the Fisher diagonal averages over
    head: bool
    head_fills_mask: bool  # --head and the classifier layer alone holds k or more entries (frozen backbone only)
    embeddings: Optional[Path]  # the embeddings cache, or None when not asked for
    seconds: float
    metadata: dict = field(repr=False)


@dataclass
class MaskFile:
    """A loaded ``fmask fisher`` output; ``embeddings()`` gives the cached gradient embeddings."""

    path: Path
    hash: str  # sha256 of the file
    metadata: dict
    masks: dict[str, torch.Tensor]  # parameter name -> bool tensor
    fisher: dict[str, torch.Tensor]  # parameter name -> float32 tensor
    parameter_names: list[str]  # model.named_parameters() order: the column order of the embeddings

    @property
    def k(self) -> int:
        return int(self.metadata["k"])

    @property
    def sparsity(self) -> float:
        return float(self.metadata["sparsity"])

    @property
    def head(self) -> bool:
        return self.metadata["head"] == "true"

    @property
    def embedding_rows(self) -> str:
        """The row scaling ``fmask fisher`` was asked for (masks without the key predate the choice: scaled)."""
        return self.metadata.get("embedding_rows", "scaled")

    @property
    def m0(self) -> str:
        """The Fisher-greedy start ``fmask fisher`` recorded for ``fmask query`` (default identity)."""
        return self.metadata.get("m0", "identity")

    @property
    def checkpoint_hash(self) -> str:
        return self.metadata["checkpoint"]

    @property
    def columns(self) -> MaskColumns:
        return MaskColumns.from_masks(self.masks, self.parameter_names)

    def embeddings(
        self,
        model: torch.nn.Module,
        pool,
        unlabeled_ids: Sequence[int],
        labeled_ids: Sequence[int],
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[str] = None,
        rows: Optional[str] = None,
        batch_size: Optional[int] = None,
        progress: Optional[ProgressFn] = None,
        block: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(V_unlabeled (N, r, k), V_labeled (L, r, k)) for these ids, columns in mask order.

        Read from the cache beside the mask when it was made from this mask file for these ids and row scaling
        ``rows`` (default: the mask's ``embedding_rows``) (and, if ``dtype`` is given, in that dtype); otherwise
        computed with ``model`` (the mask's checkpoint) in ``dtype`` (default: the one ``fmask fisher`` was asked
        for) and written to the cache.

        Under a torch.distributed process group the call is collective: each rank computes its block of whole
        batches (fmask.core.distributed.shard, ``align=batch_size``, 64 unless given) and the blocks are gathered
        into the cache, which rank 0 writes. ``block``: return only this rank's block of each set (everything in one
        process), read row by row from the cache, or computed and not written (writing would gather every row on
        every rank).
        """
        return self._embeddings(model, pool, unlabeled_ids, labeled_ids, device=device, dtype=dtype, rows=rows,
                                batch_size=batch_size, progress=progress, block=block)[:2]

    def _embeddings(self, model, pool, unlabeled_ids, labeled_ids, *, device, dtype, batch_size, progress,
                    rows: Optional[str] = None, force: bool = False, block: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """:meth:`embeddings`, and whether they were computed (False: read from the cache)."""
        if dtype is not None:
            _check_dtype(dtype)
        rows = rows or self.embedding_rows
        check_embedding_rows(rows)
        # Names and shapes: a mask of the same network with another head has the same names.
        shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
        if shapes != [(name, tuple(self.masks[name].shape)) for name in self.parameter_names]:
            raise FmaskError(f"mask {self.path} was made for another architecture; rerun `{FISHER}` on this checkpoint")
        unlabeled_ids, labeled_ids = [int(i) for i in unlabeled_ids], [int(i) for i in labeled_ids]
        cache = paths.embeddings_cache(self.path)
        step = embeddings_step(self.hash, unlabeled_ids, labeled_ids, rows)
        if batch_size is None and distributed.is_distributed():
            batch_size = DEFAULT_BATCH_SIZE  # every rank must batch alike: shards are whole batches
        # This rank's share of the work (everything in one process), and the rows it returns.
        shares = [distributed.shard_bounds(len(ids), align=batch_size or 1) for ids in (unlabeled_ids, labeled_ids)]
        wanted = shares if block else [(0, len(unlabeled_ids)), (0, len(labeled_ids))]
        gathered = not (block and distributed.is_distributed())  # every row on every rank: the cache is written

        def read_everywhere() -> Optional[tuple[torch.Tensor, torch.Tensor]]:
            """The cache's rows when every rank could read its own (computing is collective: all or none do)."""
            found = None if force else self._read_cache(cache, step, dtype, len(unlabeled_ids), len(labeled_ids),
                                                         wanted)
            return found if all(distributed.all_gather_objects(found is not None)) else None

        found = read_everywhere()  # reading needs no lock (nor a writable directory)
        if found is not None:
            return (*found, False)
        dtype = dtype or self.metadata.get("embed_dtype", "float32")
        _check_dtype(dtype)
        num_classes = int(pool.num_classes)
        with ExitStack() as held:
            def lock() -> None:
                held.enter_context(output_lock(cache.parent, "fisher", outputs=(cache.name,)))

            if gathered:
                distributed.main_decides(lock)  # rank 0 writes
                found = read_everywhere()
                if found is not None:  # written meanwhile by another command
                    return (*found, False)

            def check() -> None:
                check_embedding_memory(sum(stop - start for start, stop in wanted), num_classes, self.k, dtype)
                if gathered:
                    check_writable(cache)

            distributed.main_decides(check)
            unlabeled, labeled = self._compute_embeddings(model, pool, (unlabeled_ids, labeled_ids), shares,
                                                          device=device, dtype=dtype, rows=rows,
                                                          batch_size=batch_size, progress=progress,
                                                          gather=gathered)
            if gathered and distributed.is_main():
                tensors = {"unlabeled": unlabeled, "labeled": labeled,
                           "unlabeled_ids": torch.tensor(unlabeled_ids, dtype=torch.int64),
                           "labeled_ids": torch.tensor(labeled_ids, dtype=torch.int64)}
                metadata = {"format": str(FORMAT_VERSION), "kind": EMBEDDINGS_KIND, "fmask_version": _fmask_version(),
                            "mask": self.hash, "k": str(self.k), "dtype": dtype, "rows": rows,
                            STEP_KEY: json.dumps(step)}
                atomic_save_safetensors(cache, tensors, metadata)
            distributed.barrier()  # nobody reads the cache (or releases the lock) before rank 0 has written it
        return unlabeled, labeled, True

    def _read_cache(self, cache: Path, step: dict, dtype: Optional[str], num_unlabeled: int, num_labeled: int,
                    wanted: list[tuple[int, int]]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Rows ``wanted`` (start, stop) of the unlabeled and labeled embeddings when the cache is current (made
        for this step, ``dtype`` if given, these counts and k); None otherwise, or when it is damaged."""
        if not step_is_current(cache, step):
            return None
        try:
            shapes, metadata = safetensors_shapes(cache, what="embeddings cache", made_by=FISHER)
            unlabeled, labeled = shapes["unlabeled"], shapes["labeled"]
            if not ((dtype is None or metadata.get("dtype") == dtype) and len(unlabeled) == len(labeled) == 3
                    and unlabeled[0] == num_unlabeled and labeled[0] == num_labeled and unlabeled[2] == self.k):
                return None
            # Only the rows asked for are read: the whole cache is N x classes x k on every rank otherwise.
            found = read_safetensors_rows(cache, {"unlabeled": wanted[0], "labeled": wanted[1]},
                                          what="embeddings cache", made_by=FISHER)
        except (FmaskError, KeyError):
            return None  # a damaged cache is recomputed
        return found["unlabeled"], found["labeled"]

    def _compute_embeddings(self, model, pool, ids: tuple[list[int], list[int]], shares: list[tuple[int, int]], *,
                            device, dtype: str, rows: str, batch_size: Optional[int], progress, gather: bool
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each rank's ``shares`` of the unlabeled and labeled ids, gathered over the ranks when ``gather``."""
        columns, num_classes = self.columns, int(pool.num_classes)
        device = torch.device(device) if device is not None else next(model.parameters()).device
        model = model.to(device)

        def compute(all_ids: list[int], share: tuple[int, int], task: str) -> torch.Tensor:
            mine = all_ids[share[0]:share[1]]
            report = (lambda _task, done, total: progress(task, done, total)) if progress else None
            part = masked_embeddings(
                model, lambda positions: pool.inputs([mine[i] for i in positions]), columns,
                num_samples=len(mine), batch_size=batch_size, dtype=EMBED_DTYPES[dtype], device=device,
                num_classes=num_classes, rows=rows, progress=report,
            )
            return distributed.all_gather_concat(part) if gather else part

        return (compute(ids[0], shares[0], "gradient embeddings"),
                compute(ids[1], shares[1], "labeled-set embeddings"))


def _check_dtype(name: str) -> None:
    if name not in EMBED_DTYPES:
        raise FmaskError(f"unknown embedding dtype {name!r}; use one of: {', '.join(EMBED_DTYPES)}")


def check_embedding_memory(samples: int, num_classes: int, k: int, dtype: str) -> None:
    """Refuse, before any work, embeddings that would not fit in RAM."""
    from fmask.core.device import usable_memory_bytes

    need = samples * num_classes * k * torch.empty(0, dtype=EMBED_DTYPES[dtype]).element_size()
    limit = usable_memory_bytes("cpu")
    if need > limit:
        raise FmaskError(
            f"the gradient embeddings of {samples} samples x {num_classes} classes x k={k} need "
            f"{format_bytes(need)} of RAM, more than the {format_bytes(limit)} usable; lower --sparsity, "
            f"use --embed-dtype bfloat16, subsample the pool, or raise --memory-limit"
        )


def load_mask(path: str | os.PathLike, *, checkpoint_hash: Optional[str]) -> MaskFile:
    """Read a mask file, refusing one made from a checkpoint other than ``checkpoint_hash`` (None: no check)."""
    path = Path(path)
    tensors, metadata = read_safetensors(path, what="Fisher mask", made_by=FISHER)
    needed = ("kind", "k", "sparsity", "head", "checkpoint", "parameters")
    if metadata.get("kind") != MASK_KIND or any(key not in metadata for key in needed):
        raise FmaskError(f"{path} is not an fmask Fisher mask; pass the file `{FISHER}` wrote")
    if int(metadata.get("format", "0")) > FORMAT_VERSION:
        raise FmaskError(f"mask {path} was written by a newer fmask (format {metadata['format']}); upgrade fmask")
    if checkpoint_hash is not None and metadata["checkpoint"] != checkpoint_hash:
        raise FmaskError(
            f"mask {path} was made from another checkpoint (hash {metadata['checkpoint'][:12]}, this one is "
            f"{checkpoint_hash[:12]}); rerun `{FISHER} --ckpt CKPT --out {path.name}` on this checkpoint"
        )
    try:
        names = json.loads(metadata["parameters"])
        masks = {name: tensors[f"mask.{name}"] for name in names}
        fisher = {name: tensors[f"fisher.{name}"] for name in names}
    except (KeyError, ValueError, TypeError) as exc:
        raise FmaskError(f"mask {path} is incomplete (missing tensors); rerun `{FISHER}`") from exc
    if any(mask.dtype != torch.bool for mask in masks.values()) or \
            sum(int(mask.sum()) for mask in masks.values()) != int(metadata["k"]):
        raise FmaskError(f"mask {path} is inconsistent (its masks do not hold k entries); rerun `{FISHER}`")
    return MaskFile(path=path, hash=sha256_file(path), metadata=metadata, masks=masks, fisher=fisher,
                    parameter_names=names)


def stratified_subsample(ids: Sequence[int], predicted: Sequence[int], n: int, seed: int) -> list[int]:
    """``n`` of ``ids`` drawn per predicted class in proportion to the class sizes (largest remainders round,
    ties to the lower class), uniformly within a class under ``seed``; returned ascending."""
    if n >= len(ids):
        return sorted(int(i) for i in ids)
    groups: dict[int, list[int]] = {}
    for sample, cls in zip(ids, predicted):
        groups.setdefault(int(cls), []).append(int(sample))
    classes = sorted(groups)
    exact = {c: n * len(groups[c]) / len(ids) for c in classes}
    quota = {c: int(math.floor(exact[c])) for c in classes}
    by_remainder = sorted(classes, key=lambda c: (-(exact[c] - quota[c]), c))
    for c in by_remainder[: n - sum(quota.values())]:
        quota[c] += 1
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for c in classes:
        members = sorted(groups[c])
        order = torch.randperm(len(members), generator=generator)[: quota[c]].tolist()
        chosen.extend(members[i] for i in order)
    return sorted(chosen)


@torch.no_grad()
def _predicted_classes(model: torch.nn.Module, pool, ids: list[int], device: torch.device, batch_size: int,
                       progress: Optional[ProgressFn]) -> list[int]:
    """argmax predictions of ``ids`` (for the stratified --samples draw): each rank predicts its block, gathered."""
    mine = distributed.shard(ids)
    predicted = []
    for start in range(0, len(mine), batch_size):
        x = pool.inputs(mine[start : start + batch_size]).to(device)
        predicted.append(model(x).argmax(dim=1).cpu())
        if progress is not None:
            progress("predicting classes", min(start + batch_size, len(mine)), len(mine))
    return distributed.all_gather_concat(torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.long)
                                         ).tolist()


def _fisher_over(model: torch.nn.Module, pool, ids: list[int], *, batch_size: int, device: torch.device,
                 progress: Optional[ProgressFn]) -> dict[str, torch.Tensor]:
    """The Fisher diagonal over ``ids`` (mean over samples, float64 on CPU, per parameter): each rank sums its block
    of whole batches, the sums are all-reduced (float64), every rank returns the result. Collective."""
    mine = distributed.shard(ids, align=batch_size)
    sums = fisher_diagonal(model, lambda positions: pool.inputs([mine[i] for i in positions]), num_samples=len(mine),
                           batch_size=batch_size, device=device, progress=progress, sums=True)
    return {name: (distributed.all_reduce_sum(value) / len(ids)).cpu() for name, value in sums.items()}


@dataclass
class FisherSetup:
    """Everything ``fmask fisher`` checks and derives before any work."""

    checkpoint: object
    pool: object
    pool_dir: Path
    labeled_set: object
    labeled_ids: list[int]
    unlabeled: list[int]
    model: torch.nn.Module
    names: list[str]
    num_parameters: int
    k: int
    head_size: int
    device: torch.device
    subsample: Optional[int]
    step: dict
    batch_size: int  # resolved for the device (plan_fisher_pass) unless given


def prepare_fisher(*, ckpt: str | os.PathLike, pool_dir: Optional[str | os.PathLike], labeled: Optional[str | os.PathLike],
                   sparsity: float, samples: Optional[int], head: bool, seed: int, device: str, embed_dtype: str,
                   embeddings: bool, batch_size: Optional[int], embedding_rows: str = "scaled",
                   m0: str = "identity") -> FisherSetup:
    """Validate the inputs of ``fmask fisher`` (one FmaskError line each) and derive k, the ids and the step key."""
    from fmask.train.checkpoint import open_round

    if samples is not None and samples < 1:
        raise FmaskError(f"--samples {samples} must be at least 1; omit it to use the whole unlabeled pool")
    if batch_size is not None and batch_size < 1:
        raise FmaskError(f"--batch-size {batch_size} must be at least 1")
    _check_dtype(embed_dtype)
    check_embedding_rows(embedding_rows)
    check_m0(m0)
    opened = open_round(ckpt, pool_dir=pool_dir, labeled=labeled)
    checkpoint, pool, labeled_set, unlabeled = opened.checkpoint, opened.pool, opened.labeled_set, opened.unlabeled_ids
    labeled_ids = [int(i) for i in labeled_set.ids]
    if not unlabeled:
        raise FmaskError(f"the unlabeled pool is empty (every sample of {opened.pool_dir} is labeled); nothing to rank")
    torch_device = resolve_device(device)
    # A --finetune head checkpoint: its head alone on the cached backbone features (the trainable parameters).
    model, pool = opened.strategy_view(torch_device)
    names = [name for name, _ in model.named_parameters()]
    num_parameters = sum(p.numel() for p in model.parameters())
    k = mask_size(sparsity, num_parameters)
    head_size = sum(p.numel() for name, p in model.named_parameters() if is_head_parameter(name))
    if head and head_size == 0:
        raise FmaskError("--head needs parameters named 'head.*' and the model has none; use --no-head")
    if head:
        check_sparsity_works(sparsity=sparsity, k=k, head_size=head_size, num_parameters=num_parameters,
                             head_only_trainable=head_only_trainable(model))
    if embeddings:
        check_embedding_memory(len(unlabeled) + len(labeled_ids), pool.num_classes, k, embed_dtype)
    # Batches sized to the device (64 on a CPU; see plan_fisher_pass) unless --batch-size says otherwise.
    sample_shape = tuple(pool.inputs(unlabeled[:1]).shape[1:]) if torch_device.type != "cpu" else None
    batch_size = plan_fisher_pass(model, sample_shape, device=torch_device, batch_size=batch_size).batch_size
    # --samples at least the pool size is the whole pool: same step, and the seed then plays no part.
    subsample = samples if samples is not None and samples < len(unlabeled) else None
    inputs = {"checkpoint": checkpoint.hash, "pool": pool.hash, "labeled": labeled_set.hash}
    step = {"inputs": inputs, "sparsity": float(sparsity), "head": bool(head), "samples": subsample,
            "seed": seed if subsample is not None else None, "embedding_rows": embedding_rows, "m0": m0}
    if deterministic_enabled():
        step["deterministic"] = True  # another computation on GPUs (absent otherwise: older keys stay valid)
    return FisherSetup(checkpoint, pool, opened.pool_dir, labeled_set, labeled_ids, unlabeled, model, names,
                       num_parameters, k, head_size, torch_device, subsample, step, batch_size)


def mask_artifact(setup: FisherSetup, fisher: dict[str, torch.Tensor], *, sparsity: float, head: bool,
                  embed_dtype: str, samples_used: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The mask file's tensors (``fisher.N`` float32, ``mask.N`` bool) and metadata."""
    names = setup.names
    stored = {name: value.float() for name, value in fisher.items()}
    masks = top_k_mask(stored, setup.k, head=head, order=names)
    tensors = {f"fisher.{name}": stored[name] for name in names}
    tensors.update({f"mask.{name}": masks[name] for name in names})
    metadata = {
        "format": str(FORMAT_VERSION), "kind": MASK_KIND, "fmask_version": _fmask_version(),
        "sparsity": repr(float(sparsity)), "k": str(setup.k), "head": "true" if head else "false",
        "samples": str(samples_used), "num_parameters": str(setup.num_parameters),
        "checkpoint": setup.checkpoint.hash, "pool": setup.pool.hash, "labeled": setup.labeled_set.hash,
        "arch": setup.checkpoint.arch, "embed_dtype": embed_dtype, "parameters": json.dumps(names),
        "embedding_rows": setup.step["embedding_rows"], "m0": setup.step["m0"],
        STEP_KEY: json.dumps(setup.step),
    }
    return tensors, metadata


@exact_float32()  # masks rank parameters by small differences: no TF32 (see fmask.core.numerics)
def run_fisher(
    *,
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    pool_dir: Optional[str | os.PathLike] = None,
    labeled: Optional[str | os.PathLike] = None,
    sparsity: float = 0.002,
    samples: Optional[int] = None,
    head: bool = True,
    seed: int = 0,
    device: str = "auto",
    embed_dtype: str = "float32",
    embeddings: bool = True,
    batch_size: Optional[int] = None,
    embedding_rows: str = "scaled",
    m0: str = "identity",
    force: bool = False,
    progress: Optional[ProgressFn] = None,
) -> FisherResult:
    """Fisher diagonal over the unlabeled pool (or ``samples`` of it, stratified by predicted class), top-k
    mask written to ``out``, and (``embeddings``) the masked gradient embeddings cached beside it, rows as
    ``embedding_rows`` says. ``embedding_rows`` and ``m0`` are recorded in the mask for ``fmask query``.

    Under a torch.distributed process group (``torchrun``) every rank calls it with the same arguments: the pool is
    sharded in whole batches over the ranks, each rank computes its shard's Fisher sum and embeddings, the sums are
    all-reduced and the embeddings gathered, and rank 0 alone locks and writes (the same files as one process: the
    embeddings bit for bit, the Fisher diagonal up to the order of the final float64 additions). In one process
    every exchange is the identity."""
    started = time.perf_counter()
    out = Path(out)
    # Every rank reads the same files, so every rank refuses alike.
    setup = prepare_fisher(ckpt=ckpt, pool_dir=pool_dir, labeled=labeled, sparsity=sparsity, samples=samples,
                           head=head, seed=seed, device=device, embed_dtype=embed_dtype, embeddings=embeddings,
                           batch_size=batch_size, embedding_rows=embedding_rows, m0=m0)
    checkpoint, pool, model, torch_device = setup.checkpoint, setup.pool, setup.model, setup.device
    unlabeled, labeled_ids, subsample = setup.unlabeled, setup.labeled_ids, setup.subsample
    # Shards are whole batches, so every rank must batch alike: the smallest batch any rank's memory allows.
    batch_size = int(distributed.all_gather_concat(torch.tensor([setup.batch_size])).min())
    cache = paths.embeddings_cache(out)
    # The cache's own writability is checked when (and if) it is written, under the same lock.
    with step_output(out, command="fisher", step=setup.step, force=force, beside=(cache,), writable=(out,)) as output:
        skipped = output.current
        model = model.to(torch_device)
        if not skipped:
            chosen = unlabeled
            if subsample is not None:
                predicted = _predicted_classes(model, pool, unlabeled, torch_device, batch_size, progress)
                chosen = stratified_subsample(unlabeled, predicted, subsample, seed)
            fisher = _fisher_over(model, pool, chosen, batch_size=batch_size, device=torch_device, progress=progress)
            if output.writes:
                tensors, metadata = mask_artifact(setup, fisher, sparsity=sparsity, head=head,
                                                  embed_dtype=embed_dtype, samples_used=len(chosen))
                atomic_save_safetensors(out, tensors, metadata)
            distributed.barrier()  # the others read the mask rank 0 just wrote
        mask_file = load_mask(out, checkpoint_hash=checkpoint.hash)
        if embeddings:
            computed = mask_file._embeddings(model, pool, unlabeled, labeled_ids, device=torch_device,
                                             dtype=embed_dtype, batch_size=batch_size, progress=progress,
                                             force=force)[2]
            skipped = skipped and not computed
    return FisherResult(
        out=out, skipped=skipped, k=mask_file.k, num_parameters=setup.num_parameters,
        samples=int(mask_file.metadata.get("samples", 0)), head=mask_file.head,
        head_fills_mask=mask_file.head and setup.head_size >= mask_file.k, embeddings=cache if embeddings else None,
        seconds=time.perf_counter() - started, metadata=mask_file.metadata,
    )
