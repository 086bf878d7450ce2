"""BALD and BatchBALD against the mutual-information formula and brute-force joint entropies; MC dropout: the
`fmask train --mc-dropout` layer, passes with dropout active in them alone, refusals, and `fmask run` chains."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from fmask.core.errors import FmaskError
from fmask.core.labeled import load_labeled
from fmask.pool.pool import load_pool
from fmask.query import bald_scores, batchbald_select
from fmask.query.base import QueryContext
from fmask.query.mc_dropout import candidate_log_probs, mc_dropout_log_probs
from fmask.query.registry import get_strategy
from fmask.query.strategies.batchbald import JointLabels, batchbald_greedy
from fmask.train.checkpoint import load_checkpoint
from fmask.train.models import HeadOnly, build_model, head_dropout_rate, set_head_dropout
from tests.conftest import invoke, refused_line

# ---------------------------------------------------------------- independent references


def random_log_probs(n: int, passes: int, classes: int, seed: int, sharpness: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = sharpness * torch.randn(n, passes, classes, generator=generator, dtype=torch.float64)
    return torch.log_softmax(logits, dim=-1)


def entropy(probabilities: list[float]) -> float:
    return -sum(p * math.log(p) for p in probabilities if p > 0)


def mutual_information_reference(log_probs: torch.Tensor) -> list[float]:
    """I[y; w | x] = H[mean_s p_s] − mean_s H[p_s], one candidate and one class at a time."""
    n, passes, classes = log_probs.shape
    probs = log_probs.exp().tolist()
    out = []
    for i in range(n):
        mean = [sum(probs[i][s][c] for s in range(passes)) / passes for c in range(classes)]
        out.append(entropy(mean) - sum(entropy(probs[i][s]) for s in range(passes)) / passes)
    return out


def brute_joint_entropy(log_probs: torch.Tensor, points: list[int]) -> float:
    """H[y_points] over every label configuration: P(ŷ) = mean_s Π_i p_s(ŷ_i | x_i)."""
    probs = log_probs.exp()
    configurations = torch.tensor(list(itertools.product(range(probs.shape[2]), repeat=len(points))))  # (K, n)
    per_pass = torch.ones(probs.shape[1], len(configurations), dtype=torch.float64)  # P(ŷ | w_s), (S, K)
    for column, point in enumerate(points):
        per_pass = per_pass * probs[point][:, configurations[:, column]]
    marginal = per_pass.mean(dim=0)
    return float(-(marginal[marginal > 0] * marginal[marginal > 0].log()).sum())


def brute_batch_information(log_probs: torch.Tensor, points: list[int]) -> float:
    """BatchBALD's a(points) = H[y_1..y_n] − Σ_i E_w H[y_i | w], from brute-force joint entropies."""
    probs = log_probs.exp().tolist()
    conditional = sum(sum(entropy(row) for row in probs[i]) / len(probs[i]) for i in points)
    return brute_joint_entropy(log_probs, points) - conditional


def brute_batchbald(log_probs: torch.Tensor, batch: int) -> list[int]:
    """Greedy BatchBALD with every joint entropy enumerated; ties go to the lowest index."""
    chosen: list[int] = []
    for _ in range(batch):
        best, best_value = None, -math.inf
        for x in range(log_probs.shape[0]):
            if x not in chosen:
                value = brute_batch_information(log_probs, chosen + [x])
                if value > best_value + 1e-12:
                    best, best_value = x, value
        chosen.append(best)
    return chosen


# ---------------------------------------------------------------- BALD


@pytest.mark.parametrize("seed", [0, 1])
def test_bald_is_the_mutual_information_computed_directly(seed: int) -> None:
    log_probs = random_log_probs(25, 7, 4, seed)
    assert bald_scores(log_probs).tolist() == pytest.approx(mutual_information_reference(log_probs), abs=1e-12)
    # float32 inputs, scored in float64
    assert bald_scores(log_probs.float()).tolist() == pytest.approx(mutual_information_reference(log_probs), abs=1e-5)


def test_bald_handles_zero_probabilities_and_agreeing_passes() -> None:
    log_probs = torch.log(torch.tensor([[[1.0, 0.0], [0.0, 1.0]],  # confident passes that disagree: ln 2
                                        [[0.5, 0.5], [0.5, 0.5]],  # agreeing, uncertain passes: 0
                                        [[1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64))
    assert bald_scores(log_probs).tolist() == pytest.approx([math.log(2), 0.0, 0.0], abs=1e-12)


# ---------------------------------------------------------------- BatchBALD


@pytest.mark.parametrize("n, passes, classes, batch, seed",
                         [(10, 6, 3, 4, 0), (9, 5, 2, 5, 1), (8, 4, 4, 3, 2), (120, 6, 2, 7, 3)])
def test_batchbald_exact_mode_equals_brute_force_greedy(n, passes, classes, batch, seed) -> None:
    log_probs = random_log_probs(n, passes, classes, seed)
    expected = brute_batchbald(log_probs, batch)
    positions, scores = batchbald_greedy(log_probs, batch, num_samples=classes ** batch)
    assert positions == expected
    assert batchbald_select(log_probs, batch, num_samples=classes ** batch) == expected
    assert positions[0] == int(torch.argmax(bald_scores(log_probs)))  # one pick is BALD
    for step in range(batch):  # each score is the batch's information so far
        assert scores[step] == pytest.approx(brute_batch_information(log_probs, expected[:step + 1]), abs=1e-9)


def test_sampled_joint_entropies_are_within_tolerance_of_brute_force() -> None:
    log_probs = random_log_probs(10, 8, 4, seed=3)
    picked = [0, 1, 2, 3, 4, 5]  # 4^6 = 4,096 configurations, more than the 2,000 kept
    exact = [brute_joint_entropy(log_probs, picked + [x]) for x in range(10)]
    for seed in (0, 1):
        joint = JointLabels(8, 4, num_samples=2000, generator=torch.Generator().manual_seed(seed),
                            device=torch.device("cpu"))
        for point in picked:
            joint.add(log_probs[point])
        assert not joint.exact and joint.log_joint.shape == (8, 2000)
        assert joint.joint_entropies(log_probs).tolist() == pytest.approx(exact, abs=0.1)


def test_sampled_batchbald_is_close_to_exact_and_reproducible() -> None:
    log_probs = random_log_probs(12, 10, 3, seed=4)
    exact = batchbald_select(log_probs, 6, num_samples=3 ** 6)
    sampled = batchbald_select(log_probs, 6, num_samples=40, seed=5)  # exact up to 3 picks, then 40 draws
    assert len(set(sampled)) == 6 and sampled[:4] == exact[:4]
    assert brute_batch_information(log_probs, sampled) == pytest.approx(
        brute_batch_information(log_probs, exact), abs=0.05)
    assert batchbald_select(log_probs, 6, num_samples=40, seed=5) == sampled


def test_batchbald_keeps_at_most_num_samples_configurations() -> None:
    log_probs = random_log_probs(60, 20, 10, seed=6)
    joint = JointLabels(20, 10, num_samples=1000, generator=torch.Generator().manual_seed(0),
                        device=torch.device("cpu"))
    for point in range(40):  # 10^40 configurations
        joint.add(log_probs[point])
        assert joint.log_joint.shape[1] <= 1000
    positions = batchbald_select(log_probs.float(), 40, num_samples=1000)
    assert len(set(positions)) == 40


def test_batchbald_rejects_an_oversized_batch() -> None:
    with pytest.raises(ValueError, match="batch"):
        batchbald_select(random_log_probs(3, 2, 2, 0), 4)


# ---------------------------------------------------------------- MC dropout


def test_set_head_dropout_puts_a_parameter_free_dropout_before_the_head() -> None:
    plain, dropped = (set_head_dropout(build_model("cnn", in_channels=1, num_classes=3), p) for p in (0.0, 0.3))
    assert head_dropout_rate(plain) == 0.0 and head_dropout_rate(dropped) == 0.3
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(4, 1, 8, 8)
    dropped.eval()
    assert torch.equal(dropped(x), dropped.head(dropped.forward_features(x)))  # eval: no dropout
    dropped.train()
    torch.manual_seed(0)
    assert not torch.equal(dropped(x), dropped(x))  # training: active
    with pytest.raises(FmaskError, match="--mc-dropout"):
        set_head_dropout(build_model("cnn", in_channels=1, num_classes=3), 1.0)
    head_only = set_head_dropout(HeadOnly(nn.Linear(4, 3)), 0.3)  # a head on cached features (--finetune head)
    features = torch.ones(2, 4)
    torch.manual_seed(1)
    assert torch.equal(head_only.eval()(features), head_only.head(features))
    assert not torch.equal(head_only.train()(features), head_only.train()(features))


def test_mc_passes_have_the_mean_and_variance_of_bernoulli_dropout() -> None:
    torch.manual_seed(0)
    head = nn.Linear(6, 3).double()
    features = torch.rand(2, 6, dtype=torch.float64) + 0.5
    rate, passes = 0.3, 20_000
    log_probs = mc_dropout_log_probs(features, head, rate, passes, generator=torch.Generator().manual_seed(1),
                                     chunk_rows=1)
    assert log_probs.shape == (2, passes, 3)
    assert torch.allclose(torch.logsumexp(log_probs, dim=-1), torch.zeros(2, passes, dtype=log_probs.dtype), atol=1e-5)
    # Logits up to a per-pass constant: recover them from the log-probabilities relative to class 0.
    relative = (log_probs - log_probs[..., :1]).double()
    weights = (head.weight - head.weight[:1]).detach()
    expected_mean = (features @ weights.T) + (head.bias - head.bias[0]).detach()
    # Each feature is kept with probability 1 − p and scaled by 1/(1 − p): variance h² p/(1 − p) per feature.
    expected_var = (features ** 2 * rate / (1 - rate)) @ (weights ** 2).T
    assert torch.allclose(relative.mean(dim=1), expected_mean, atol=0.02)
    assert torch.allclose(relative.var(dim=1), expected_var, rtol=0.05, atol=1e-6)


def context(ckpt, seed: int = 0, **options) -> QueryContext:
    checkpoint = load_checkpoint(ckpt)
    pool = load_pool(checkpoint.pool_dir)
    labeled = load_labeled(checkpoint.labeled_path, pool)
    unlabeled = [i for i in pool.ids if i not in set(labeled.ids)]
    return QueryContext(model=checkpoint.model, pool=pool, labeled_ids=list(labeled.ids), unlabeled_ids=unlabeled,
                        seed=seed, options=options)


def test_dropout_is_active_in_the_mc_passes_only(tiny_dropout_ckpt) -> None:
    ctx = context(tiny_dropout_ckpt, seed=4, mc_samples=8)
    assert head_dropout_rate(ctx.model) == pytest.approx(0.3)
    assert load_checkpoint(tiny_dropout_ckpt).state["config"]["mc_dropout"] == pytest.approx(0.3)
    log_probs = candidate_log_probs(ctx, "bald")
    assert log_probs.shape == (len(ctx.unlabeled_ids), 8, ctx.model.head.out_features)
    assert not torch.allclose(log_probs[:, 0], log_probs[:, 1])  # the passes differ
    assert not ctx.model.training and not ctx.model.head_dropout.training
    x = ctx.pool.inputs(ctx.unlabeled_ids[:5])
    assert torch.allclose(ctx.forward(ctx.unlabeled_ids[:5])[0], ctx.model(x), atol=1e-5)  # plain passes: no dropout
    again = candidate_log_probs(context(tiny_dropout_ckpt, seed=4, mc_samples=8), "bald")
    assert torch.equal(log_probs, again)  # seeded
    assert not torch.equal(log_probs, candidate_log_probs(context(tiny_dropout_ckpt, seed=5, mc_samples=8), "bald"))


def test_bald_strategy_ranks_by_the_passes_bald_scores(tiny_dropout_ckpt) -> None:
    ctx = context(tiny_dropout_ckpt, seed=2)
    selection = get_strategy("bald").select(ctx, 10)
    scores = mutual_information_reference(candidate_log_probs(ctx, "bald").double())
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:10]
    assert selection.ids == [ctx.unlabeled_ids[i] for i in order]


@pytest.mark.parametrize("strategy", ["bald", "batchbald"])
def test_a_checkpoint_without_dropout_is_refused_naming_the_flag(strategy, run_dir) -> None:
    line = refused_line(invoke("query", "--ckpt", run_dir / "round0.pt", "--strategy", strategy, "--batch", "5",
                               "--device", "cpu", "--out", run_dir / "q.json"))
    assert "--mc-dropout" in line
    assert not (run_dir / "q.json").exists()


def test_query_cli_runs_batchbald_with_its_options(tiny_dropout_ckpt, tmp_path) -> None:
    out = tmp_path / "q.json"
    result = invoke("query", "--ckpt", tiny_dropout_ckpt, "--strategy", "batchbald", "--batch", "6", "--device", "cpu",
                    "--mc-samples", "10", "--joint-samples", "200", "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["options"]["mc_samples"] == 10 and data["options"]["joint_samples"] == 200
    assert len(set(data["selected"])) == 6
    line = refused_line(invoke("query", "--ckpt", tiny_dropout_ckpt, "--strategy", "bald", "--batch", "6",
                               "--device", "cpu", "--mc-samples", "1", "--out", tmp_path / "q1.json"))
    assert "--mc-samples" in line


def test_mc_dropout_flag_is_recorded_and_part_of_the_step(tiny_run, tmp_path) -> None:
    out = tmp_path / "r.pt"
    args = ["train", "--pool", tiny_run / "pool", "--model", "cnn", "--epochs", "1", "--batch-size", "16",
            "--device", "cpu", "--out", out]
    assert invoke(*args).exit_code == 0
    assert load_checkpoint(out).state["config"]["mc_dropout"] == 0.0
    assert "unchanged, skipped" in invoke(*args, "--mc-dropout", "0").output
    result = invoke(*args, "--mc-dropout", "0.2")
    assert result.exit_code == 0 and "written" in result.output
    assert head_dropout_rate(load_checkpoint(out).model) == pytest.approx(0.2)
    assert "--mc-dropout" in refused_line(invoke(*args, "--mc-dropout", "1.5"))


@pytest.mark.slow
def test_run_trains_the_bald_chains_with_dropout_round_0_included(tmp_path) -> None:
    out = tmp_path / "res"
    result = invoke("run", "--out", out, "--dataset", "digits", "--class-counts", "8,8,8,8,8,8,8,8,8,40",
                    "--initial", "10", "--batch", "5", "--rounds", "1", "--strategies", "bald,margin", "--seeds", "0",
                    "--model", "cnn", "--epochs", "2", "--test-per-class", "5", "--device", "cpu")
    assert result.exit_code == 0, result.output
    for round_ in (0, 1):
        assert head_dropout_rate(load_checkpoint(out / "seed0" / "bald" / f"round{round_}.pt").model) == 0.3
        assert head_dropout_rate(load_checkpoint(out / "seed0" / "margin" / f"round{round_}.pt").model) == 0.0
    assert invoke("plot", out).exit_code == 0
    summary = (out / "summary.csv").read_text()
    assert "bald" in summary and "margin" in summary
