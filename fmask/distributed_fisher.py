"""``fmask fisher`` across processes: the pool is sharded over the ranks of a torch.distributed group; each rank
computes its shard's Fisher sum and masked gradient embeddings, the sums are all-reduced and the embeddings
gathered, and rank 0 alone writes the mask and the embeddings cache (atomically, under the output lock).

Shards are whole multiples of ``--batch-size`` samples, so every rank forms exactly the batches a single process
would: the embeddings match the single-process ones bit for bit, and the Fisher diagonal (a float64 sum) up to the
order of the final additions. The files written are the ones :func:`fmask.fisher.run_fisher` writes, so a later
single-process ``fmask query`` reads them as current. Without a process group every function here is the
single-process computation.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Optional, Sequence

import torch

from fmask.core import distributed, paths
from fmask.core.errors import FmaskError
from fmask.fisher.grads import DEFAULT_BATCH_SIZE, fisher_diagonal, masked_embeddings
from fmask.fisher.mask import MaskColumns
from fmask.fisher.step import (EMBED_DTYPES, EMBEDDINGS_KIND, FISHER, FisherResult, embeddings_step, load_mask,
                               mask_artifact, prepare_fisher, run_fisher, stratified_subsample)
from fmask.core.numerics import exact_float32
from fmask.core.atomic import atomic_save_safetensors, check_writable
from fmask.core.hashing import FORMAT_VERSION
from fmask.core.locking import output_lock
from fmask.core.readers import read_safetensors_rows, safetensors_shapes
from fmask.core.steps import STEP_KEY, step_is_current
from fmask.core.progress import ProgressFn


def _version() -> str:
    import fmask

    return str(getattr(fmask, "__version__", "unknown"))


def sharded_fisher_diagonal(model: torch.nn.Module, pool, ids: Sequence[int], *,
                            batch_size: int = DEFAULT_BATCH_SIZE, device: Optional[torch.device] = None,
                            progress: Optional[ProgressFn] = None) -> dict[str, torch.Tensor]:
    """The Fisher diagonal over ``ids`` (mean over samples, float64 on CPU, per parameter), each rank computing
    its shard; every rank returns the all-reduced result. Collective: every rank calls it with the same ids."""
    ids = [int(i) for i in ids]
    if not distributed.is_distributed():
        return fisher_diagonal(model, lambda positions: pool.inputs([ids[i] for i in positions]),
                               num_samples=len(ids), batch_size=batch_size, device=device, progress=progress)
    if not ids:
        raise FmaskError("no samples to estimate the Fisher diagonal from; the unlabeled pool is empty")
    local = distributed.shard(ids, align=batch_size)
    names_shapes = [(name, p.shape) for name, p in model.named_parameters()]
    flat = torch.zeros(sum(shape.numel() for _, shape in names_shapes), dtype=torch.float64)
    if local:
        means = fisher_diagonal(model, lambda positions: pool.inputs([local[i] for i in positions]),
                                num_samples=len(local), batch_size=batch_size, device=device, progress=progress)
        # fisher_diagonal averages over its own samples: undo that to get this shard's sum.
        torch.cat([means[name].reshape(-1) for name, _ in names_shapes], out=flat)
        flat.mul_(len(local))
    distributed.all_reduce_sum(flat)
    flat.div_(len(ids))
    out, offset = {}, 0
    for name, shape in names_shapes:
        out[name] = flat[offset:offset + shape.numel()].view(shape).clone()
        offset += shape.numel()
    return out


def sharded_masked_embeddings(model: torch.nn.Module, pool, ids: Sequence[int], columns: MaskColumns, *,
                              num_classes: int, batch_size: int = DEFAULT_BATCH_SIZE,
                              dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                              progress: Optional[ProgressFn] = None, gather: bool = True, rows: str = "scaled"
                              ) -> torch.Tensor:
    """Masked gradient embeddings (N, r, k) of ``ids``; each rank computes its shard (whole batches).

    ``gather``: every rank returns all N rows in ``ids`` order; otherwise only its own shard's rows (the rows
    :func:`fmask.core.distributed.shard_bounds` with ``align=batch_size`` gives it). Collective.
    """
    ids = [int(i) for i in ids]
    local = distributed.shard(ids, align=batch_size)
    part = masked_embeddings(model, lambda positions: pool.inputs([local[i] for i in positions]), columns,
                             num_samples=len(local), batch_size=batch_size, dtype=dtype, device=device,
                             num_classes=num_classes, rows=rows, progress=progress)
    if not gather:
        return part
    if part.shape[1] != num_classes:  # an empty shard: give it the shape the others have
        part = torch.empty(0, num_classes, columns.k, dtype=dtype)
    return distributed.all_gather_concat(part)


@torch.no_grad()
def sharded_predicted_classes(model: torch.nn.Module, pool, ids: Sequence[int], device: torch.device,
                              batch_size: int) -> list[int]:
    """argmax predictions of ``ids`` (for the stratified --samples draw), sharded and gathered."""
    local = distributed.shard([int(i) for i in ids])
    predicted = []
    for start in range(0, len(local), batch_size):
        predicted.append(model(pool.inputs(local[start:start + batch_size]).to(device)).argmax(dim=1).cpu())
    mine = torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.long)
    return distributed.all_gather_concat(mine).tolist()


def _cached_embeddings_current(cache: Path, step: dict, dtype: Optional[str], num_unlabeled: int, num_labeled: int,
                               k: int) -> bool:
    """The same test MaskFile.embeddings applies before reusing the cache."""
    if not step_is_current(cache, step):
        return False
    try:
        shapes, metadata = safetensors_shapes(cache, what="embeddings cache", made_by=FISHER)
        unlabeled, labeled = shapes["unlabeled"], shapes["labeled"]
    except (FmaskError, KeyError):
        return False
    return ((dtype is None or metadata.get("dtype") == dtype) and len(unlabeled) == len(labeled) == 3
            and unlabeled[0] == num_unlabeled and labeled[0] == num_labeled and unlabeled[2] == k)


@exact_float32()
def run_fisher_distributed(
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
    """:func:`fmask.fisher.run_fisher` with the pool sharded over the process group (the same files result);
    without a process group it is run_fisher itself. Every rank calls it with the same arguments."""
    if not distributed.is_distributed():
        return run_fisher(ckpt=ckpt, out=out, pool_dir=pool_dir, labeled=labeled, sparsity=sparsity, samples=samples,
                          head=head, seed=seed, device=device, embed_dtype=embed_dtype, embeddings=embeddings,
                          batch_size=batch_size, embedding_rows=embedding_rows, m0=m0, force=force,
                          progress=progress)
    started = time.perf_counter()
    out = Path(out)
    # The same checks as run_fisher: every rank reads the same files, so every rank refuses alike.
    setup = prepare_fisher(ckpt=ckpt, pool_dir=pool_dir, labeled=labeled, sparsity=sparsity, samples=samples,
                           head=head, seed=seed, device=device, embed_dtype=embed_dtype, embeddings=embeddings,
                           batch_size=batch_size, embedding_rows=embedding_rows, m0=m0)
    checkpoint, pool, model, torch_device = setup.checkpoint, setup.pool, setup.model, setup.device
    unlabeled, labeled_ids, subsample, step = setup.unlabeled, setup.labeled_ids, setup.subsample, setup.step
    # Shards are whole batches, so every rank must batch alike: the smallest batch any rank's memory allows.
    batch_size = int(distributed.all_gather_concat(torch.tensor([setup.batch_size])).min())
    cache = paths.embeddings_cache(out)
    with ExitStack() as held:
        def lock_and_check() -> bool:
            check_writable(out)
            held.enter_context(output_lock(out.parent, "fisher", outputs=(out.name, cache.name)))
            return not force and step_is_current(out, step)

        skipped = distributed.main_decides(lock_and_check)
        model = model.to(torch_device)
        if not skipped:
            chosen = unlabeled
            if subsample is not None:
                predicted = sharded_predicted_classes(model, pool, unlabeled, torch_device, batch_size)
                chosen = stratified_subsample(unlabeled, predicted, subsample, seed)
            fisher = sharded_fisher_diagonal(model, pool, chosen, batch_size=batch_size, device=torch_device,
                                             progress=progress)
            if distributed.is_main():
                tensors, metadata = mask_artifact(setup, fisher, sparsity=sparsity, head=head,
                                                  embed_dtype=embed_dtype, samples_used=len(chosen))
                atomic_save_safetensors(out, tensors, metadata)
            distributed.barrier()  # the others read the mask rank 0 just wrote
        mask_file = load_mask(out, checkpoint_hash=checkpoint.hash)
        computed = False
        if embeddings:
            cache_step = embeddings_step(mask_file.hash, unlabeled, labeled_ids, embedding_rows)
            current = distributed.main_decides(lambda: not force and _cached_embeddings_current(
                cache, cache_step, embed_dtype, len(unlabeled), len(labeled_ids), mask_file.k))
            if not current:
                computed = True
                _write_embeddings_cache(mask_file, cache, cache_step, model, pool, unlabeled, labeled_ids,
                                        dtype=embed_dtype, rows=embedding_rows, device=torch_device,
                                        batch_size=batch_size, progress=progress)
        skipped = skipped and not computed
        distributed.barrier()  # nobody returns (and releases nothing) before rank 0 has written
    return FisherResult(
        out=out, skipped=skipped, k=mask_file.k, num_parameters=setup.num_parameters,
        samples=int(mask_file.metadata.get("samples", 0)), head=mask_file.head,
        head_fills_mask=mask_file.head and setup.head_size >= mask_file.k, embeddings=cache if embeddings else None,
        seconds=time.perf_counter() - started, metadata=mask_file.metadata,
    )


def _write_embeddings_cache(mask_file, cache: Path, step: dict, model, pool, unlabeled: list[int],
                            labeled: list[int], *, dtype: str, rows: str, device: torch.device, batch_size: int,
                            progress: Optional[ProgressFn]) -> None:
    """Sharded embeddings of both sets, written by rank 0 in the layout MaskFile.embeddings reads."""
    columns, num_classes = mask_file.columns, int(pool.num_classes)

    def compute(ids: list[int], task: str) -> torch.Tensor:
        report = (lambda _task, done, total: progress(task, done, total)) if progress else None
        return sharded_masked_embeddings(model, pool, ids, columns, num_classes=num_classes, batch_size=batch_size,
                                         dtype=EMBED_DTYPES[dtype], device=device, progress=report, rows=rows)

    unlabeled_rows = compute(unlabeled, "gradient embeddings")
    labeled_rows = compute(labeled, "labeled-set embeddings")
    if distributed.is_main():
        tensors = {"unlabeled": unlabeled_rows, "labeled": labeled_rows,
                   "unlabeled_ids": torch.tensor(unlabeled, dtype=torch.int64),
                   "labeled_ids": torch.tensor(labeled, dtype=torch.int64)}
        metadata = {"format": str(FORMAT_VERSION), "kind": EMBEDDINGS_KIND, "fmask_version": _version(),
                    "mask": mask_file.hash, "k": str(mask_file.k), "dtype": dtype, "rows": rows,
                    STEP_KEY: json.dumps(step)}
        atomic_save_safetensors(cache, tensors, metadata)


def local_mask_embeddings(mask_file, model: torch.nn.Module, pool, unlabeled: Sequence[int], labeled: Sequence[int],
                          *, device: Optional[torch.device] = None, batch_size: int = DEFAULT_BATCH_SIZE,
                          rows: Optional[str] = None, progress: Optional[ProgressFn] = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the masked embeddings (its block of ``unlabeled``, its block of ``labeled``, both by
    :func:`fmask.core.distributed.shard` with ``align=batch_size``): sliced from the cache ``fmask fisher`` wrote when
    it is current, computed for the block alone otherwise (nothing is written: the cache is rank 0's to write).
    Collective when computing."""
    unlabeled, labeled = [int(i) for i in unlabeled], [int(i) for i in labeled]
    ustart, ustop = distributed.shard_bounds(len(unlabeled), align=batch_size)
    lstart, lstop = distributed.shard_bounds(len(labeled), align=batch_size)
    cache = paths.embeddings_cache(mask_file.path)
    rows = rows or mask_file.embedding_rows
    step = embeddings_step(mask_file.hash, unlabeled, labeled, rows)
    if _cached_embeddings_current(cache, step, None, len(unlabeled), len(labeled), mask_file.k):
        # Only this rank's rows are read: the whole cache is N × classes × k per rank otherwise.
        mine = read_safetensors_rows(cache, {"unlabeled": (ustart, ustop), "labeled": (lstart, lstop)},
                                     what="embeddings cache", made_by=FISHER)
        return mine["unlabeled"], mine["labeled"]
    dtype = mask_file.metadata.get("embed_dtype", "float32")
    columns, num_classes = mask_file.columns, int(pool.num_classes)
    device = torch.device(device) if device is not None else next(model.parameters()).device

    def compute(ids: list[int], task: str) -> torch.Tensor:
        report = (lambda _task, done, total: progress(task, done, total)) if progress else None
        return sharded_masked_embeddings(model.to(device), pool, ids, columns, num_classes=num_classes,
                                         batch_size=batch_size, dtype=EMBED_DTYPES[dtype], device=device,
                                         progress=report, gather=False, rows=rows)

    return compute(unlabeled, "gradient embeddings"), compute(labeled, "labeled-set embeddings")
