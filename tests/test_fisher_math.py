"""The exact Fisher diagonal and masked gradient embeddings against a per-(sample, class) autograd loop, and
the top-k mask's rules (exactly k, deterministic ties, head forcing, column order)."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fmask.core.errors import FmaskError
from fmask.fisher import grads
from fmask.fisher.grads import (fallback_parameters, fisher_diagonal, masked_embeddings, softmax_hessian_factor,
                                softmax_hessian_sqrt)
from fmask.fisher.mask import MaskColumns, mask_size, top_k_mask
from fmask.fisher.profile import mask_profile, plot_mask_profile
from fmask.fisher.step import stratified_subsample
from fmask.train.models import build_model


class ResidualNet(nn.Module):
    """BatchNorm, an in-place ReLU on a BatchNorm output, a residual block whose shortcut is a strided conv,
    asymmetric kernel/stride/dilation, grouped 'same' convs (zero and reflect padding, even kernel), plus
    parameters only the generic fallback can serve (LayerNorm, a bare scale)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(4)
        self.stem_relu = nn.ReLU(inplace=True)
        self.conv_a = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
        self.bn_a = nn.BatchNorm2d(6)
        self.conv_b = nn.Conv2d(6, 6, (2, 3), padding="same", groups=2, padding_mode="reflect")
        self.conv_c = nn.Conv2d(6, 6, 2, padding="same", bias=False)
        self.bn_c = nn.BatchNorm2d(6)
        self.shortcut = nn.Conv2d(4, 6, (1, 3), stride=(2, 1))
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem_relu(self.stem_bn(self.stem(x)))
        out = torch.relu_(self.bn_a(self.conv_a(h)))
        out = self.bn_c(self.conv_c(self.conv_b(out)))
        out = F.relu(out + self.shortcut(h)) * self.scale
        return self.head(self.norm(out.mean((2, 3))))


class SequenceNet(nn.Module):
    """A Linear over a sequence dimension, BatchNorm1d, and one Linear applied twice (shared weights)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.embed(x).transpose(1, 2)).transpose(1, 2)
        h = self.shared(torch.tanh(self.shared(h)))
        return self.head(h.mean(1))


def _randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            c = module.num_features
            module.running_mean.copy_(torch.rand(c, generator=generator, dtype=torch.float64) - 0.5)
            module.running_var.copy_(torch.rand(c, generator=generator, dtype=torch.float64) + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=generator, dtype=torch.float64) + 0.5)
            module.bias.data.copy_(torch.rand(c, generator=generator, dtype=torch.float64) - 0.5)


def _case(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    if name == "cnn":
        model, x = build_model("cnn", in_channels=3, num_classes=3), torch.randn(4, 3, 7, 8, generator=generator)
    elif name == "residual":
        model, x = ResidualNet(), torch.randn(5, 3, 9, 10, generator=generator)
    else:
        model, x = SequenceNet(), torch.randn(5, 6, 3, generator=generator)
    model = model.double().eval()
    _randomize_batchnorm(model, generator)
    return model, x.double()


def autograd_loop(model: nn.Module, x: torch.Tensor, scaled: bool = True, rows: bool = True
                  ) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """Reference: one torch.autograd.grad per (sample, class). Returns the Fisher diagonal and (``rows``) the full
    per-class gradient rows sqrt(p_y) grad log p_y (``scaled=False``: grad log p_y), (n, r, P) in
    named_parameters() order."""
    names, params = zip(*model.named_parameters())
    fisher = {name: torch.zeros_like(p) for name, p in zip(names, params)}
    all_rows = []
    for i in range(x.shape[0]):
        log_p = torch.log_softmax(model(x[i : i + 1]), dim=-1)[0]
        per_class = []
        for y in range(log_p.shape[0]):
            g = torch.autograd.grad(log_p[y], params, retain_graph=True, allow_unused=True)
            g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]
            weight = log_p[y].detach().exp()
            for name, gi in zip(names, g):
                fisher[name] += weight * gi.square() / x.shape[0]
            if rows:
                per_class.append((weight.sqrt() if scaled else 1.0) * torch.cat([gi.reshape(-1) for gi in g]))
        if rows:
            all_rows.append(torch.stack(per_class))
    return fisher, torch.stack(all_rows) if rows else None


# float64 against the autograd loop: the largest difference within 1e-14 of the largest reference entry (measured:
# below 6e-16 for every case and engine, the README's "about 1e-15"). Entries far below the largest are only held
# to that absolute bound: their own relative error is larger (cancellation), and no caller sees it.
FLOAT64_AGREEMENT = 1e-14


def assert_float64_agreement(actual: torch.Tensor, expected: torch.Tensor, scale: float, msg: str = "") -> None:
    assert actual.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=0, atol=FLOAT64_AGREEMENT * scale, msg=msg)


ENGINES = {
    "default": {},
    # Every conv through the grouped weight-gradient kernel, embeddings by gathered pairs, tiny memory chunks.
    "grouped+pairs": {"GROUPED_MIN_POSITIONS": 1, "FEW_INPUTS": 0, "MATMUL_PER_GATHER": 1e-9,
                      "SMALL_MAPS_BATCHED": None, "max_elements": 64},
    # Every ungrouped conv through the stems' unfold and batched matmuls (grouped ones: grouped kernel); the
    # unfolded input is kept for the r passes.
    "stem-unfold": {"GROUPED_MIN_POSITIONS": 1, "FEW_INPUTS": 10**9, "max_elements": 64},
    # The same, the unfolded input formed anew per chunk and pass.
    "stem-unfold-unkept": {"GROUPED_MIN_POSITIONS": 1, "FEW_INPUTS": 10**9, "KEEP_UNFOLDED": 0, "max_elements": 64},
    # Every conv through unfold (formed anew per chunk and pass) and per-sample matmuls, embeddings by submatrix
    # products, tiny chunks.
    "unfold+submatrix": {"GROUPED_MIN_POSITIONS": 10**9, "MATMUL_PER_GATHER": 1e9, "SMALL_MAPS_BATCHED": False,
                         "KEEP_UNFOLDED": 0, "max_elements": 64},
    # Every conv through unfold and batched matmuls (the accelerator path).
    "unfold+batched": {"GROUPED_MIN_POSITIONS": 10**9, "MATMUL_PER_GATHER": 1.0, "SMALL_MAPS_BATCHED": True,
                       "max_elements": 1 << 20},
}
CONV_SETTINGS = ("GROUPED_MIN_POSITIONS", "FEW_INPUTS", "KEEP_UNFOLDED", "SMALL_MAPS_BATCHED")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("case", ["cnn", "residual", "sequence"])
def test_fisher_and_embeddings_equal_the_autograd_loop(case, engine, monkeypatch):
    settings = dict(ENGINES[engine])
    for name in CONV_SETTINGS:
        if name in settings:
            monkeypatch.setattr(grads._Conv2dTap, name, settings.pop(name))
    if "MATMUL_PER_GATHER" in settings:
        monkeypatch.setattr(grads, "_MATMUL_PER_GATHER", settings.pop("MATMUL_PER_GATHER"))
    model, x = _case(case)
    reference_fisher, reference_rows = autograd_loop(model, x)

    fisher = fisher_diagonal(model, x, batch_size=2, **settings)
    assert list(fisher) == [name for name, _ in model.named_parameters()]
    largest = max(float(value.abs().max()) for value in reference_fisher.values())
    for name, value in fisher.items():
        assert_float64_agreement(value, reference_fisher[name], largest, msg=name)

    # A random mask touching every parameter, so every layer's gather path is checked.
    generator = torch.Generator().manual_seed(2)
    masks = {name: torch.rand(p.shape, generator=generator) < 0.4 for name, p in model.named_parameters()}
    columns = MaskColumns.from_masks(masks, list(fisher))
    loader = lambda positions: x[positions]  # noqa: E731  (the loader form of inputs)
    embeddings = masked_embeddings(model, loader, columns, num_samples=x.shape[0], batch_size=3,
                                   dtype=torch.float64, **settings)
    flat_mask = torch.cat([masks[name].reshape(-1) for name in fisher])
    expected = reference_rows[:, :, flat_mask]
    assert embeddings.shape == expected.shape == (x.shape[0], reference_rows.shape[1], columns.k)
    assert_float64_agreement(embeddings, expected, float(expected.abs().max()))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_unsupported_parameters_take_the_fallback_and_the_model_is_left_as_found():
    model, x = _case("residual")
    assert fallback_parameters(model, x) == ["scale", "norm.weight", "norm.bias"]
    sequence, xs = _case("sequence")
    assert fallback_parameters(sequence, xs) == ["shared.weight", "shared.bias"]  # called twice per forward
    model.train()
    model.stem.weight.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    fisher_diagonal(model, x)
    assert model.training and not model.stem.weight.requires_grad and model.head.weight.requires_grad
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())  # no running-stat update


def test_masked_embeddings_refuse_a_mask_of_another_model():
    """The guard in masked_embeddings itself (the sharded query path reaches it without MaskFile's check)."""
    model, x = _case("cnn")  # 3 classes
    wider = build_model("cnn", in_channels=3, num_classes=5)  # the same parameter names, a 5-row head
    every_entry = {name: torch.ones(p.shape, dtype=torch.bool) for name, p in wider.named_parameters()}
    with pytest.raises(FmaskError, match="entries of head.weight lie outside this model's parameter"):
        masked_embeddings(model, x, MaskColumns.from_masks(every_entry))
    own = {name: torch.ones(p.shape, dtype=torch.bool) for name, p in model.named_parameters()}
    every_parameter = sum(p.numel() for p in model.parameters())
    assert masked_embeddings(model, x, MaskColumns.from_masks(own)).shape == (4, 3, every_parameter)
    other_names = {f"other.{name}": mask for name, mask in own.items()}
    with pytest.raises(FmaskError, match="parameter names do not match this model"):
        masked_embeddings(model, x, MaskColumns.from_masks(other_names))
    residual = {name: torch.ones(p.shape, dtype=torch.bool) for name, p in ResidualNet().named_parameters()}
    with pytest.raises(FmaskError, match="parameter names do not match this model"):
        masked_embeddings(model, x, MaskColumns.from_masks(residual))


def test_float32_matches_float64_and_embeddings_can_be_bfloat16():
    model, x = _case("cnn")
    exact = fisher_diagonal(model, x)
    single = fisher_diagonal(model.float(), x.float())
    for name in exact:
        torch.testing.assert_close(single[name], exact[name], rtol=1e-3, atol=1e-7)
    columns = MaskColumns.from_masks(top_k_mask(single, 600, head=True))
    low = masked_embeddings(model, x.float(), columns, dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16 and low.shape == (4, 3, 600)


def test_softmax_hessian_sqrt_squares_to_the_softmax_hessian():
    logits = torch.randn(4, 6, dtype=torch.float64)
    p = torch.softmax(logits, dim=1)
    s = softmax_hessian_sqrt(logits)
    torch.testing.assert_close(s.transpose(1, 2) @ s, torch.diag_embed(p) - p[:, :, None] * p[:, None, :])


@pytest.mark.parametrize("classes", [1, 2, 7])
def test_the_fisher_passes_factor_has_one_row_fewer_and_the_same_square(classes):
    # Includes near-one-hot predictions of either sign pattern, where a naive reflection would divide by ~0.
    logits = torch.cat([torch.randn(5, classes, dtype=torch.float64),
                        30 * torch.eye(classes, dtype=torch.float64)[[0, -1]]])
    p = torch.softmax(logits, dim=1)
    t = softmax_hessian_factor(logits)
    assert t.shape == (7, classes - 1, classes)
    hessian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    torch.testing.assert_close(t.transpose(1, 2) @ t, hessian, rtol=1e-12, atol=1e-14)


def _fisher(values: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(v) for name, v in values.items()}


def test_top_k_mask_holds_exactly_k_and_breaks_ties_by_model_order():
    fisher = _fisher({"a.weight": [1.0, 5.0, 5.0], "b.weight": [5.0, 2.0], "head.weight": [0.5, 0.1]})
    masks = top_k_mask(fisher, 2, head=False)
    assert masks["a.weight"].tolist() == [False, True, True] and not masks["b.weight"].any()
    masks = top_k_mask(fisher, 4, head=False)
    assert sum(int(m.sum()) for m in masks.values()) == 4
    assert masks["b.weight"].tolist() == [True, True] and masks["a.weight"].tolist() == [False, True, True]
    assert masks["head.weight"].tolist() == [False, False]
    # The order argument, not the mapping's, defines "earlier".
    masks = top_k_mask(fisher, 1, head=False, order=["b.weight", "a.weight", "head.weight"])
    assert masks["b.weight"].tolist() == [True, False] and not masks["a.weight"].any()


def test_head_is_always_in_the_mask_and_counts_toward_k():
    fisher = _fisher({"a.weight": [1.0, 5.0, 3.0], "head.weight": [0.5, 0.1], "head.bias": [0.0]})
    masks = top_k_mask(fisher, 4, head=True)
    assert masks["head.weight"].all() and masks["head.bias"].all()
    assert masks["a.weight"].tolist() == [False, True, False]
    # When the head alone fills k, its own top-k entries are the mask.
    masks = top_k_mask(fisher, 2, head=True)
    assert masks["head.weight"].tolist() == [True, True] and masks["head.bias"].tolist() == [False]
    assert not masks["a.weight"].any()
    with pytest.raises(FmaskError, match="--no-head"):
        top_k_mask({"a.weight": torch.ones(3)}, 1, head=True)
    with pytest.raises(FmaskError, match="NaN"):
        top_k_mask({"a.weight": torch.tensor([1.0, float("nan")])}, 1, head=False)


def test_mask_size_rounds_half_up_and_refuses_bad_sparsity():
    assert mask_size(0.002, 11_173_962) == 22_348
    assert mask_size(0.25, 10) == 3  # 2.5 rounds up
    assert mask_size(1.0, 7) == 7
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(FmaskError, match="--sparsity"):
            mask_size(bad, 100)
    with pytest.raises(FmaskError, match="keeps no parameter"):
        mask_size(1e-4, 100)


def test_columns_follow_parameter_order_then_row_major_indices():
    masks = {"b": torch.tensor([[False, True], [True, False]]), "a": torch.tensor([True, False, True])}
    columns = MaskColumns.from_masks(masks, ["a", "b"])
    assert columns.k == 4 and columns.names == ("a", "b")
    assert columns.indices[0].tolist() == [0, 2] and columns.indices[1].tolist() == [1, 2]
    assert columns.of("b")[1:] == (2, 4)


def test_mask_profile_rows_and_plot(tmp_path):
    masks = {"conv.weight": torch.tensor([True, False, False, False]), "conv.bias": torch.tensor([True]),
             "head.weight": torch.tensor([True, True])}
    rows = mask_profile(masks)
    assert [tuple(row) for row in rows] == [("conv", 5, 2, 0.4), ("head", 2, 2, 1.0)]
    out = plot_mask_profile(rows, tmp_path / "profile.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stratified_subsample_keeps_class_proportions_and_is_seeded():
    ids = list(range(100, 200))
    predicted = [0] * 70 + [1] * 20 + [2] * 10
    chosen = stratified_subsample(ids, predicted, 10, seed=3)
    assert len(chosen) == 10 and chosen == sorted(chosen) and set(chosen) <= set(ids)
    per_class = [sum(1 for i in chosen if predicted[i - 100] == c) for c in range(3)]
    assert per_class == [7, 2, 1]
    assert stratified_subsample(ids, predicted, 10, seed=3) == chosen
    assert stratified_subsample(ids, predicted, 10, seed=4) != chosen
    assert stratified_subsample(ids, predicted, 500, seed=3) == ids


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", ["cnn", "residual", "sequence"])
def test_unscaled_embedding_rows_equal_the_plain_log_likelihood_gradients(case):
    """The authors' code's rows, ∇θ log p_y(x) with no √p_y, against one autograd.grad per (sample, class)."""
    model, x = _case(case)
    names = [name for name, _ in model.named_parameters()]
    expected = autograd_loop(model, x, scaled=False)[1]
    generator = torch.Generator().manual_seed(3)
    masks = {name: torch.rand(p.shape, generator=generator) < 0.4 for name, p in model.named_parameters()}
    columns = MaskColumns.from_masks(masks, list(names))
    flat_mask = torch.cat([masks[name].reshape(-1) for name in names])
    unscaled = masked_embeddings(model, x, columns, batch_size=2, dtype=torch.float64, rows="unscaled")
    expected = expected[:, :, flat_mask]
    assert_float64_agreement(unscaled, expected, float(expected.abs().max()))
    with pytest.raises(FmaskError, match="--embedding-rows"):
        masked_embeddings(model, x, columns, rows="sqrt")
