"""torch.distributed paths on CPU: two gloo processes on 127.0.0.1 against the single-process results.

Each test spawns its two ranks once and checks several things inside them (process start-up is most of the
cost on a 2-core machine); rank 0 saves what it saw and the test compares it with a single-process run.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fmask.core import distributed

WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _entry(rank: int, port: int, target, args: tuple, out_dir: str) -> None:
    """One rank: the torchrun environment, the process group, then ``target(*args)``; its result saved."""
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        assert distributed.init_from_env("cpu")
        result = target(*args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        distributed.shutdown()


def spawn(target, *args, tmp_path: Path) -> list:
    """Run ``target(*args)`` on WORLD gloo ranks; every rank's return value, in rank order."""
    out_dir = tmp_path / f"ranks-{target.__name__}"
    out_dir.mkdir()
    try:
        mp.spawn(_entry, args=(_free_port(), target, args, str(out_dir)), nprocs=WORLD, join=True)
    except Exception:
        errors = "\n".join(p.read_text() for p in sorted(out_dir.glob("*.error")))
        pytest.fail(f"a rank failed:\n{errors}")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---- primitives ----------------------------------------------------------------------------------------------


def _step_output(directory: str) -> dict:
    """Two writes of one step: rank 0 alone locks, decides and writes; every rank sees its decision."""
    from fmask.core.atomic import atomic_write_json
    from fmask.core.locking import lock_holder
    from fmask.core.readers import read_json
    from fmask.core.steps import step_output

    out = Path(directory) / "a.json"
    with step_output(out, command="test", step={"x": 1}) as first:
        holder = lock_holder(out.parent)  # rank 1: rank 0's lock; rank 0: its own, not "another command"
        if first.writes:
            atomic_write_json(out, first.sealed({"rank": distributed.rank()}))
    with step_output(out, command="test", step={"x": 1},
                     on_current=lambda: read_json(out, what="test", made_by="test")["rank"]) as second:
        pass
    return {"first": (first.current, first.writes), "holder": None if holder is None else holder.command,
            "second": (second.current, second.recorded)}


def _primitives(directory: str) -> dict:
    rank = distributed.rank()
    ids = list(range(10, 21))  # 11 ids: uneven shards
    summed = distributed.all_reduce_sum(torch.tensor([1.0, float(rank)], dtype=torch.float64))
    gathered = distributed.all_gather_concat(torch.arange(rank + 1, dtype=torch.float32).reshape(-1, 1) + 10 * rank)
    halves = distributed.all_gather_concat(torch.full((rank + 2, 3), rank + 0.5, dtype=torch.bfloat16))
    return {
        "rank": rank, "world": distributed.world_size(), "main": distributed.is_main(),
        "shard": distributed.shard(ids), "aligned": distributed.shard(ids, align=4), "summed": summed,
        "gathered": gathered, "halves": halves, "object": distributed.broadcast_object({"from": rank}),
        "step_output": _step_output(directory),
    }


def test_primitives_on_two_gloo_ranks(tmp_path):
    first, second = spawn(_primitives, str(tmp_path / "step"), tmp_path=tmp_path)
    assert (first["rank"], second["rank"], first["world"]) == (0, 1, 2)
    assert first["main"] and not second["main"]
    assert first["shard"] + second["shard"] == list(range(10, 21))  # contiguous, rank order
    assert first["aligned"] == list(range(10, 18)) and second["aligned"] == list(range(18, 21))  # whole blocks of 4
    for result in (first, second):
        assert result["summed"].tolist() == [2.0, 1.0]
        assert result["gathered"].flatten().tolist() == [0.0, 10.0, 11.0]
        assert result["halves"].dtype == torch.bfloat16 and result["halves"].shape == (5, 3)
        assert result["halves"][:2].eq(0.5).all() and result["halves"][2:].eq(1.5).all()
        assert result["object"] == {"from": 0}
        assert result["step_output"]["second"] == (True, 0)  # current on every rank, rank 0's record shared
    assert first["step_output"]["first"] == (False, True) and second["step_output"]["first"] == (False, False)
    assert first["step_output"]["holder"] is None and second["step_output"]["holder"] == "test"  # rank 0 locked
    assert sorted(p.name for p in (tmp_path / "step").iterdir()) == ["a.json"]  # one writer, lock released


def test_single_process_helpers_are_identities(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.init_from_env("cpu") and not distributed.is_distributed()
    assert distributed.shard([3, 4, 5]) == [3, 4, 5] and distributed.is_main()
    x = torch.ones(2)
    assert distributed.all_reduce_sum(x) is x and distributed.all_gather_concat(x) is x
    assert distributed.main_decides(lambda: 7) == 7
    assert distributed.backend_for(True) == "nccl" and distributed.backend_for(False) == "gloo"


# ---- the sharded Fisher-greedy engine -------------------------------------------------------------------------


def _instance(n: int, r: int, d: int, num_labeled: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Spread row scales so scores are well separated: the engines agree exactly, not merely within rounding.
    scales = torch.rand(n + num_labeled, 1, 1, generator=generator) * 2 + 0.2
    rows = torch.randn(n + num_labeled, r, d, generator=generator) * scales / d**0.5
    return rows[:n], rows[n:]


def _sharded_greedy(cases: list[dict]) -> list:
    from fmask.query.fisher_greedy_dist import fisher_greedy_distributed

    results = []
    for case in cases:
        pool, labeled = _instance(case["n"], case["r"], case["d"], case["labeled"], case["seed"])
        start, stop = distributed.shard_bounds(len(pool), align=case.get("align", 1))
        lstart, lstop = distributed.shard_bounds(len(labeled))
        result = fisher_greedy_distributed(
            pool[start:stop], case["batch"], labeled[lstart:lstop] if case["labeled"] else None,
            lamb=case["lamb"], backward_steps=case["backward"], dtype=case["dtype"], guard_tol=case.get("guard"),
            chunk_size=case.get("chunk"))
        results.append((result.positions, result.gains, result.refreshes, result.rebuilds))
    return results


GREEDY_CASES = [
    dict(n=41, r=3, d=12, labeled=0, batch=7, lamb=1.0, backward=False, dtype=torch.float64, seed=1),
    dict(n=40, r=4, d=10, labeled=9, batch=6, lamb=0.5, backward=True, dtype=torch.float64, seed=2),
    dict(n=37, r=3, d=15, labeled=5, batch=8, lamb=1.0, backward=False, dtype=torch.float32, seed=3, chunk=4),
    dict(n=30, r=2, d=9, labeled=4, batch=5, lamb=1.0, backward=True, dtype=torch.float32, seed=4, guard=0.0),
    dict(n=20, r=3, d=8, labeled=3, batch=4, lamb=1.0, backward=True, dtype=torch.float64, seed=5, align=32),
]  # the last leaves rank 1 without candidates


def test_sharded_fisher_greedy_matches_the_single_process_engine(tmp_path):
    from fmask.query.fisher_greedy import fisher_greedy_detailed

    ranks = spawn(_sharded_greedy, GREEDY_CASES, tmp_path=tmp_path)
    assert ranks[0] == ranks[1]  # every rank ends with the same selection
    for case, (positions, gains, refreshes, _rebuilds) in zip(GREEDY_CASES, ranks[0]):
        pool, labeled = _instance(case["n"], case["r"], case["d"], case["labeled"], case["seed"])
        single = fisher_greedy_detailed(
            pool, case["batch"], labeled if case["labeled"] else None, lamb=case["lamb"],
            backward_steps=case["backward"], dtype=case["dtype"], guard_tol=case.get("guard"),
            chunk_size=case.get("chunk"), fisher_mode="dense")
        assert positions == single.positions, case  # same ids, same order
        tolerance = 1e-10 if case["dtype"] == torch.float64 else 1e-4
        assert torch.allclose(torch.tensor(gains), torch.tensor(single.gains), rtol=tolerance), case
        if case.get("guard") == 0.0:
            assert refreshes > 0  # the guard's recompute path ran on both ranks


# ---- fmask fisher and fmask query across two ranks ------------------------------------------------------------

SPARSITY = 0.05  # at least twice the tiny CNN's 1,290 head entries
FISHER_BATCH = 16  # 92 unlabeled samples: uneven shards of whole batches (3 and 3 batches, the last partial)


def _fisher_and_queries(run_dir: str) -> dict:
    from fmask.distributed_fisher import run_fisher_distributed
    from fmask.query.step import run_query

    root = Path(run_dir)
    ckpt = root / "round0.pt"
    fisher = run_fisher_distributed(ckpt=ckpt, out=root / "dist" / "mask.safetensors", sparsity=SPARSITY,
                                    samples=None, device="cpu", batch_size=FISHER_BATCH)
    again = run_fisher_distributed(ckpt=ckpt, out=root / "dist" / "mask.safetensors", sparsity=SPARSITY,
                                   device="cpu", batch_size=FISHER_BATCH)
    # No cached embeddings: the query computes each rank's block itself.
    bare = run_fisher_distributed(ckpt=ckpt, out=root / "dist" / "bare.safetensors", sparsity=SPARSITY,
                                  device="cpu", batch_size=FISHER_BATCH, embeddings=False)
    selected = {}
    for name, strategy, mask, options in (
        ("fishermask", "fishermask", root / "dist" / "mask.safetensors", {}),
        ("fishermask-computed", "fishermask", root / "dist" / "bare.safetensors", {}),
        ("fishermask-backward", "fishermask", root / "dist" / "mask.safetensors", {"backward_steps": True}),
        ("bait", "bait", None, {"float64": True}),
    ):
        result = run_query(ckpt=ckpt, out=root / "dist" / f"{name}.json", strategy=strategy, batch=6, mask=mask,
                           device="cpu", options=options, batch_size=32)
        selected[name] = result.data["selected"]
    return {"fisher_skipped": (fisher.skipped, again.skipped, bare.skipped), "selected": selected}


def test_fisher_embeddings_and_queries_match_single_process(run_dir, tmp_path):
    from fmask.fisher import load_mask, run_fisher
    from fmask.core.readers import read_safetensors
    from fmask.query.step import run_query

    ranks = spawn(_fisher_and_queries, str(run_dir), tmp_path=tmp_path)
    assert ranks[0] == ranks[1]
    assert ranks[0]["fisher_skipped"] == (False, True, False)  # the rerun found rank 0's files current

    ckpt = run_dir / "round0.pt"
    single_mask = run_dir / "single" / "mask.safetensors"
    run_fisher(ckpt=ckpt, out=single_mask, sparsity=SPARSITY, device="cpu", batch_size=FISHER_BATCH)
    single, dist = load_mask(single_mask, checkpoint_hash=None), load_mask(run_dir / "dist" / "mask.safetensors",
                                                                          checkpoint_hash=None)
    assert dist.metadata["step"] == single.metadata["step"] and dist.k == single.k
    for name in single.parameter_names:
        assert torch.allclose(dist.fisher[name], single.fisher[name], rtol=1e-6, atol=0), name
        assert torch.equal(dist.masks[name], single.masks[name]), name
    single_cache, _ = read_safetensors(run_dir / "single" / "mask.embeddings.safetensors", what="", made_by="")
    dist_cache, _ = read_safetensors(run_dir / "dist" / "mask.embeddings.safetensors", what="", made_by="")
    for key in ("unlabeled", "labeled", "unlabeled_ids", "labeled_ids"):
        assert torch.equal(dist_cache[key], single_cache[key]), key  # whole batches per rank: bit for bit
    # The single-process query reads the distributed run's cache as current: no pool to recompute from is needed.
    from fmask.train.checkpoint import load_checkpoint

    cached = dist.embeddings(load_checkpoint(ckpt).model, None, dist_cache["unlabeled_ids"].tolist(),
                             dist_cache["labeled_ids"].tolist())
    assert torch.equal(cached[0], single_cache["unlabeled"])

    for name, strategy, mask, options in (
        ("fishermask", "fishermask", single_mask, {}),
        ("fishermask-computed", "fishermask", single_mask, {}),
        ("fishermask-backward", "fishermask", single_mask, {"backward_steps": True}),
        ("bait", "bait", None, {"float64": True}),
    ):
        result = run_query(ckpt=ckpt, out=run_dir / "single" / f"{name}.json", strategy=strategy, batch=6,
                           mask=mask, device="cpu", options=options, batch_size=32)
        assert ranks[0]["selected"][name] == result.data["selected"], name  # same ids, same order
    leftovers = [p.name for p in (run_dir / "dist").iterdir() if p.name.startswith(".") or ".tmp" in p.name]
    assert leftovers == []  # rank 0 wrote every file atomically and released its lock


# ---- DDP training --------------------------------------------------------------------------------------------


def _ddp_train(run_dir: str) -> dict:
    from fmask.train.checkpoint import load_checkpoint
    from fmask.train.trainer import TrainConfig, train

    root = Path(run_dir)
    config = TrainConfig(model="cnn", max_epochs=3, batch_size=16, seed=3)
    first = train(pool_dir=root / "pool", labeled=None, out=root / "ddp" / "a.pt", config=config, device="cpu")
    second = train(pool_dir=root / "pool", labeled=None, out=root / "ddp" / "b.pt", config=config, device="cpu")
    skipped = train(pool_dir=root / "pool", labeled=None, out=root / "ddp" / "a.pt", config=config, device="cpu")
    weights = load_checkpoint(root / "ddp" / "a.pt").model.state_dict() if distributed.is_main() else None
    return {"metrics": first.metrics, "again": second.metrics["accuracy"], "skipped": skipped.skipped,
            "weights": weights}


def test_ddp_training_is_reproducible_and_written_once(run_dir, tmp_path):
    from fmask.core.steps import recorded_step
    from fmask.train.checkpoint import load_checkpoint

    first, second = spawn(_ddp_train, str(run_dir), tmp_path=tmp_path)
    assert first["metrics"] == second["metrics"]  # every rank returns rank 0's evaluation
    assert first["skipped"] and second["skipped"]
    a, b = load_checkpoint(run_dir / "ddp" / "a.pt"), load_checkpoint(run_dir / "ddp" / "b.pt")
    for name, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[name]), name  # same seed, same weights
    assert first["metrics"]["epochs"] == 3 and 0.0 <= first["metrics"]["accuracy"] <= 1.0
    assert recorded_step(run_dir / "ddp" / "a.pt")["processes"] == 2
    rows = (run_dir / "ddp" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # a header and one row per checkpoint: rank 1 wrote nothing
    assert sorted(p.name for p in (run_dir / "ddp").iterdir()) == ["a.pt", "b.pt", "metrics.csv"]


def _ddp_gradient() -> list:
    """One DDP step on a model without BatchNorm: the update must be the single-process one on the whole batch."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(7, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    start, stop = distributed.shard_bounds(7)
    wrapped = DistributedDataParallel(model)
    loss = torch.nn.functional.cross_entropy(wrapped(x[start:stop]), y[start:stop], reduction="sum")
    (loss * distributed.world_size() / 7).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_ddp_loss_scaling_gives_the_whole_batch_gradient(tmp_path):
    ranks = spawn(_ddp_gradient, tmp_path=tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(7, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for grads in ranks:
        for got, want in zip(grads, [p.grad for p in model.parameters()]):
            assert torch.allclose(got, want, atol=1e-6)
