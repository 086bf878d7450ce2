"""The bait strategy: its embedding is the last-layer Fisher's, and it selects through the Fisher-greedy engine."""

import pytest
import torch

from fmask.core.errors import FmaskError
from fmask.pool.tensor import TensorPool
from fmask.query.base import QueryContext
from fmask.query.fisher_greedy import fisher_greedy
from fmask.query.registry import get_strategy, list_strategies
from fmask.query.strategies.bait import bait_embeddings
from fmask.train.models import build_model


def tiny_pool(size: int) -> TensorPool:
    """A fixed random 1 x 8 x 8 image per position."""
    return TensorPool(torch.randn(size, 1, 8, 8, generator=torch.Generator().manual_seed(7)))


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=3)
    with torch.no_grad():  # a head with some spread, so the predicted probabilities are not all ~1/3
        model.head.weight.mul_(8.0)
    return model.eval()


def autograd_embeddings(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """sqrt(p_y(x)) * d log p_y(x) / d head.weight, row by row, by backpropagation."""
    rows = []
    for image in images:
        log_probs = torch.log_softmax(model(image.unsqueeze(0))[0], dim=0)
        per_class = []
        for y in range(log_probs.shape[0]):
            (grad,) = torch.autograd.grad(log_probs[y], model.head.weight, retain_graph=True)
            per_class.append(log_probs[y].exp().sqrt().detach() * grad.flatten())
        rows.append(torch.stack(per_class))
    return torch.stack(rows)


def test_embedding_is_the_scaled_head_weight_gradient():
    model = tiny_model().double()
    images = tiny_pool(5).inputs(range(5)).double()
    with torch.no_grad():
        features = model.forward_features(images)
        probs = torch.softmax(model.head(features), dim=1)
    assert probs.max() - probs.min() > 0.05
    got = bait_embeddings(probs, features)
    assert got.shape == (5, 3, 3 * features.shape[1])
    torch.testing.assert_close(got, autograd_embeddings(model, images), rtol=1e-10, atol=1e-12)
    # So sum_y V^T V is the expected Fisher of the head: E_y~p [g_y g_y^T] with g_y = grad log p_y.
    grads = autograd_embeddings(model, images) / probs.sqrt().unsqueeze(2)
    expected = torch.einsum("ny,nyd,nye->de", probs, grads, grads)
    torch.testing.assert_close(torch.einsum("nyd,nye->de", got, got), expected)


def make_context(options=None, size=24, labeled=(0, 1, 2, 3)) -> QueryContext:
    unlabeled = [i for i in range(size) if i not in labeled]
    return QueryContext(model=tiny_model(), pool=tiny_pool(size), labeled_ids=list(labeled),
                        unlabeled_ids=unlabeled, seed=3, options=dict(options or {}), batch_size=7)


def test_bait_is_registered():
    assert "bait" in list_strategies()
    assert not get_strategy("bait").needs_mask


def test_selects_through_the_engine_on_autograd_embeddings():
    ctx = make_context()
    selection = get_strategy("bait").select(ctx, 5)
    assert len(selection.ids) == 5 == len(set(selection.ids)) == len(selection.scores)
    assert set(selection.ids) <= set(ctx.unlabeled_ids)
    assert all(score > 0 for score in selection.scores)  # each pick lowers tr(F M^-1)
    # The same choice, made by the engine on embeddings built by backpropagation instead of bait_embeddings.
    model, pool = ctx.model, ctx.pool
    expected = fisher_greedy(
        autograd_embeddings(model, pool.inputs(ctx.unlabeled_ids)).detach(), 5,
        autograd_embeddings(model, pool.inputs(ctx.labeled_ids)).detach(),
    )
    assert selection.ids == [ctx.unlabeled_ids[p] for p in expected]
    assert get_strategy("bait").select(make_context(), 5).ids == selection.ids  # reproducible


@pytest.mark.parametrize(
    "options", [{"backward_steps": True}, {"float64": True, "lamb": 0.5}, {"chunk_size": 3}]
)
def test_options_keep_the_contract(options):
    ctx = make_context(options)
    selection = get_strategy("bait").select(ctx, 6)
    assert len(set(selection.ids)) == 6 and set(selection.ids) <= set(ctx.unlabeled_ids)


def test_backward_steps_option_reaches_the_engine():
    ctx = make_context({"backward_steps": True})
    pool, labeled = (bait_embeddings(torch.softmax(ctx.forward(ids)[0], 1), ctx.forward(ids)[1])
                     for ids in (ctx.unlabeled_ids, ctx.labeled_ids))
    expected = fisher_greedy(pool, 6, labeled, backward_steps=True)
    assert get_strategy("bait").select(ctx, 6).ids == [ctx.unlabeled_ids[p] for p in expected]


def test_without_labeled_samples():
    ctx = make_context(labeled=())
    assert len(set(get_strategy("bait").select(ctx, 4).ids)) == 4


def test_memory_guard_fails_before_any_forward_pass():
    ctx = make_context({"memory_limit": 10_000})
    with pytest.raises(FmaskError, match="fishermask"):
        get_strategy("bait").select(ctx, 4)
    assert not ctx._cache, "no forward pass should have run"
    with pytest.raises(FmaskError, match="'lamb' must be float"):
        get_strategy("bait").select(make_context({"lamb": "big"}), 4)
