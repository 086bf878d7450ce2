"""The shared strategy template: every registered strategy honours the one selection contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fmask.core.errors import FmaskError
from fmask.core.labeled import load_labeled
from fmask.pool.pool import load_pool
from fmask.query.base import QueryContext
from fmask.query.registry import get_strategy, list_strategies, register_strategy
from fmask.train.checkpoint import load_checkpoint

BATCH = 12


@pytest.fixture(scope="module")
def template_mask(tiny_run, tmp_path_factory) -> Path:
    """A mask (and its embeddings cache) of tiny_run's checkpoint, made once, beside the read-only tiny_run. Plain
    top-k of 0.5% (k = 266): the contract needs no head, and the greedy's cost grows with k squared."""
    from fmask.fisher import run_fisher

    out = tmp_path_factory.mktemp("template_mask") / "mask.safetensors"
    run_fisher(ckpt=tiny_run / "round0.pt", out=out, sparsity=0.005, head=False, device="cpu")
    return out


def make_context(tiny_run, strategy, seed: int, ckpt=None, request=None) -> QueryContext:
    checkpoint = load_checkpoint(ckpt or tiny_run / "round0.pt")
    pool = load_pool(tiny_run / "pool")
    labeled = load_labeled(tiny_run / "pool" / "labeled.json", pool)
    mask = None
    if strategy.needs_mask:
        from fmask.fisher import load_mask

        mask = load_mask(request.getfixturevalue("template_mask"), checkpoint_hash=checkpoint.hash)
    unlabeled = [i for i in pool.ids if i not in set(labeled.ids)]
    return QueryContext(model=checkpoint.model, pool=pool, labeled_ids=list(labeled.ids), unlabeled_ids=unlabeled,
                        seed=seed, mask=mask, options={"lamb": 1.0})


def test_registry_lists_the_baselines():
    assert {"random", "entropy", "margin", "least-confidence"} <= set(list_strategies())


@pytest.mark.parametrize("name", list_strategies())
def test_strategy_contract(name, tiny_run, request):
    strategy = get_strategy(name)
    # bald and batchbald need a checkpoint trained with --mc-dropout; the others get the plain one.
    ckpt = request.getfixturevalue("tiny_dropout_ckpt") if strategy.needs_mc_dropout else None
    ctx = make_context(tiny_run, strategy, seed=7, ckpt=ckpt, request=request)
    first = strategy.select(ctx, BATCH)
    assert len(first.ids) == BATCH and len(set(first.ids)) == BATCH
    assert set(first.ids) <= set(ctx.unlabeled_ids)
    assert not set(first.ids) & set(ctx.labeled_ids)
    assert len(first.scores) == BATCH and all(s == s for s in first.scores)  # no NaN
    again = get_strategy(name).select(make_context(tiny_run, strategy, seed=7, ckpt=ckpt, request=request), BATCH)
    assert again.ids == first.ids  # reproducible under a seed
    # The whole unlabeled pool can be asked for.
    everything = strategy.select(make_context(tiny_run, strategy, seed=7, ckpt=ckpt, request=request),
                                 len(ctx.unlabeled_ids))
    assert sorted(everything.ids) == sorted(ctx.unlabeled_ids)


@pytest.mark.parametrize("name", [n for n in list_strategies() if get_strategy(n).needs_labels])
def test_strategies_that_need_a_trained_head_refuse_an_empty_labeled_set(name, tiny_run, request):
    strategy = get_strategy(name)
    ckpt = request.getfixturevalue("tiny_dropout_ckpt") if strategy.needs_mc_dropout else None
    ctx = make_context(tiny_run, strategy, seed=7, ckpt=ckpt, request=request)
    ctx.unlabeled_ids, ctx.labeled_ids = sorted(ctx.unlabeled_ids + ctx.labeled_ids), []
    with pytest.raises(FmaskError, match="labeled set is empty") as refused:
        strategy.select(ctx, BATCH)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("name", ["typiclust", "probcover", "kcenter", "random"])
def test_cold_start_strategies_select_without_labels(name, tiny_run):
    strategy = get_strategy(name)
    ctx = make_context(tiny_run, strategy, seed=3)
    ctx.unlabeled_ids, ctx.labeled_ids = sorted(ctx.unlabeled_ids + ctx.labeled_ids), []
    selection = strategy.select(ctx, BATCH)
    assert len(set(selection.ids)) == BATCH and set(selection.ids) <= set(ctx.unlabeled_ids)


def test_the_new_strategies_are_registered():
    assert {"bald", "batchbald", "typiclust", "probcover", "cluster-margin"} <= set(list_strategies())


def test_uncertainty_scores_order():
    from fmask.query.strategies.entropy import entropy_scores
    from fmask.query.strategies.least_confidence import least_confidence_scores
    from fmask.query.strategies.margin import margin_scores

    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.3, 0.1]])
    assert entropy_scores(probs).argsort().tolist() == [0, 1, 3, 2]  # ln 2 < 0.898 < ln 3
    assert margin_scores(probs).argmax() == 1 and margin_scores(probs).argmin() == 0
    assert least_confidence_scores(probs).argmax() == 2


def test_register_strategy_rejects_a_second_class_under_one_name():
    with pytest.raises(ValueError):
        @register_strategy("random")
        class Impostor:  # noqa: F841
            pass


def test_no_strategy_imports_another():
    """Shared helpers live in fmask.query's own modules (base, clustering, coverage, uncertainty, mc_dropout,
    fisher_greedy)."""
    import ast
    from pathlib import Path

    import fmask.query.strategies as package

    offenders = []
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.name}: {name}" for name in names if name.startswith("fmask.query.strategies")]
    assert offenders == []
