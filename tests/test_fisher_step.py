"""`fmask fisher` as a step: the safetensors layout, skip-if-unchanged, --head/--no-head, --samples, the
embeddings cache, and the refusals (another checkpoint's mask, another pool, bad options)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

import fmask
from fmask.core import paths
from fmask.core.errors import FmaskError
from fmask.fisher import MaskColumns, load_mask, masked_embeddings, run_fisher
from fmask.core.labeled import load_labeled
from fmask.pool.pool import load_pool
from fmask.train.checkpoint import load_checkpoint
from tests.conftest import invoke, snapshot
from tests.test_fisher_math import autograd_loop

SPARSITY = 0.05  # the tiny CNN has ~53k parameters: k ~ 2.7k, more than its 1,290 head parameters


def _unlabeled_and_labeled(run):
    pool = load_pool(run / "pool")
    labeled = load_labeled(run / "pool" / "labeled.json", pool)
    taken = set(labeled.ids)
    return pool, [i for i in pool.ids if i not in taken], list(labeled.ids)


def test_mask_file_layout_and_exact_fisher(run_dir):
    out = run_dir / "fisher0.safetensors"
    result = run_fisher(ckpt=run_dir / "round0.pt", out=out, sparsity=SPARSITY, device="cpu")
    checkpoint = load_checkpoint(run_dir / "round0.pt")
    model = checkpoint.model
    names = [name for name, _ in model.named_parameters()]
    num_parameters = sum(p.numel() for p in model.parameters())
    k = round(SPARSITY * num_parameters)
    assert not result.skipped and result.k == k and result.num_parameters == num_parameters

    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
    assert keys == {f"fisher.{n}" for n in names} | {f"mask.{n}" for n in names}
    assert metadata["sparsity"] == repr(SPARSITY) and metadata["k"] == str(k) and metadata["head"] == "true"
    assert metadata["checkpoint"] == checkpoint.hash and metadata["fmask_version"] == fmask.__version__
    assert json.loads(metadata["parameters"]) == names and "inputs" in json.loads(metadata["step"])

    mask = load_mask(out, checkpoint_hash=checkpoint.hash)
    pool, unlabeled, labeled = _unlabeled_and_labeled(run_dir)
    assert int(metadata["samples"]) == len(unlabeled) == result.samples
    for name, p in model.named_parameters():
        assert mask.masks[name].dtype == torch.bool and mask.masks[name].shape == p.shape
        assert mask.fisher[name].dtype == torch.float32 and mask.fisher[name].shape == p.shape
    assert sum(int(m.sum()) for m in mask.masks.values()) == k
    assert all(mask.masks[n].all() for n in names if n.startswith("head."))

    # The stored Fisher is the mean over the unlabeled samples only (labeled ones excluded): against one
    # autograd.grad per (sample, class) in float64, to float32 accuracy (the model and the pass are float32;
    # measured: largest difference 8e-8 of the largest entry).
    expected, _ = autograd_loop(copy.deepcopy(model).double(), pool.inputs(unlabeled).double(), rows=False)
    largest = max(float(value.abs().max()) for value in expected.values())
    for name in names:
        torch.testing.assert_close(mask.fisher[name].double(), expected[name], rtol=0, atol=1e-6 * largest, msg=name)

    # The cached embeddings are V for the unlabeled pool and the labeled set, columns in mask order.
    v_unlabeled, v_labeled = mask.embeddings(model, pool, unlabeled, labeled)
    assert result.embeddings == paths.embeddings_cache(out) and result.embeddings.exists()
    assert v_unlabeled.shape == (len(unlabeled), pool.num_classes, k) and v_unlabeled.dtype == torch.float32
    columns = MaskColumns.from_masks(mask.masks, names)
    direct = masked_embeddings(model, pool.inputs(labeled), columns)
    torch.testing.assert_close(v_labeled, direct, rtol=1e-4, atol=1e-6)


def test_rerun_skips_and_force_recomputes(run_dir):
    out = run_dir / "fisher0.safetensors"
    run_fisher(ckpt=run_dir / "round0.pt", out=out, sparsity=SPARSITY, device="cpu")
    before = snapshot(run_dir)
    again = run_fisher(ckpt=run_dir / "round0.pt", out=out, sparsity=SPARSITY, device="cpu")
    assert again.skipped and snapshot(run_dir) == before
    # A lost embeddings cache is rebuilt, equal, without redoing the mask.
    cache = paths.embeddings_cache(out)
    with safe_open(str(cache), framework="pt") as handle:
        cached = {key: handle.get_tensor(key) for key in handle.keys()}
    cache.unlink()
    rebuilt = run_fisher(ckpt=run_dir / "round0.pt", out=out, sparsity=SPARSITY, device="cpu")
    assert not rebuilt.skipped and snapshot(run_dir)[out.name] == before[out.name]
    with safe_open(str(cache), framework="pt") as handle:
        assert all(torch.equal(handle.get_tensor(key), value) for key, value in cached.items())
    assert not run_fisher(ckpt=run_dir / "round0.pt", out=out, sparsity=SPARSITY, device="cpu", force=True).skipped
    # Byte-identical: a query records the mask file's hash, so a forced rewrite must not make it rerun.
    assert snapshot(run_dir) == before
    changed = run_fisher(ckpt=run_dir / "round0.pt", out=out, sparsity=SPARSITY * 1.2, device="cpu")
    assert not changed.skipped and changed.k == round(SPARSITY * 1.2 * changed.num_parameters)


def test_no_head_is_plain_top_k_and_samples_subsample_by_prediction(run_dir):
    ckpt = run_dir / "round0.pt"
    plain = run_fisher(ckpt=ckpt, out=run_dir / "plain.safetensors", sparsity=0.01, head=False,
                       embeddings=False, device="cpu")
    mask = load_mask(plain.out, checkpoint_hash=None)
    values = torch.cat([mask.fisher[n].reshape(-1) for n in mask.parameter_names])
    chosen = torch.cat([mask.masks[n].reshape(-1) for n in mask.parameter_names])
    assert int(chosen.sum()) == plain.k and values[chosen].min() >= values[~chosen].max()
    assert plain.embeddings is None and not paths.embeddings_cache(plain.out).exists()

    first = run_fisher(ckpt=ckpt, out=run_dir / "s1.safetensors", sparsity=SPARSITY, samples=30, seed=5,
                       embeddings=False, device="cpu")
    second = run_fisher(ckpt=ckpt, out=run_dir / "s2.safetensors", sparsity=SPARSITY, samples=30, seed=5,
                        embeddings=False, device="cpu")
    assert first.samples == 30
    a, b = load_mask(first.out, checkpoint_hash=None), load_mask(second.out, checkpoint_hash=None)
    assert all(torch.equal(a.fisher[n], b.fisher[n]) for n in a.parameter_names)


def test_mask_from_another_checkpoint_is_refused_by_query(run_dir):
    out = run_dir / "fisher0.safetensors"
    run_fisher(ckpt=run_dir / "round0.pt", out=out, sparsity=SPARSITY, device="cpu")
    with pytest.raises(FmaskError, match="another checkpoint") as caught:
        load_mask(out, checkpoint_hash="0" * 64)
    assert "\n" not in str(caught.value)
    result = invoke("train", "--pool", run_dir / "pool", "--model", "cnn", "--epochs", "1", "--seed", "1",
                    "--device", "cpu", "--out", run_dir / "other.pt")
    assert result.exit_code == 0, result.output
    result = invoke("query", "--ckpt", run_dir / "other.pt", "--strategy", "fishermask", "--batch", "5",
                    "--mask", out, "--device", "cpu", "--out", run_dir / "q.json")
    assert result.exit_code == 2 and "another checkpoint" in result.output
    assert not (run_dir / "q.json").exists()
    # With its own checkpoint the query runs, from the cached embeddings.
    result = invoke("query", "--ckpt", run_dir / "round0.pt", "--strategy", "fishermask", "--batch", "5",
                    "--mask", out, "--device", "cpu", "--out", run_dir / "q.json")
    assert result.exit_code == 0, result.output
    assert len(json.loads((run_dir / "q.json").read_text())["selected"]) == 5


def test_bad_inputs_are_refused_before_anything_is_written(run_dir, tmp_path):
    out = run_dir / "bad.safetensors"
    result = invoke("fisher", "--ckpt", run_dir / "round0.pt", "--out", out, "--sparsity", "0", "--device", "cpu")
    assert result.exit_code == 2 and "--sparsity" in result.output and not out.exists()
    result = invoke("fisher", "--ckpt", run_dir / "round0.pt", "--out", out, "--samples", "0", "--device", "cpu")
    assert result.exit_code == 2 and "--samples" in result.output and not out.exists()
    result = invoke("fisher", "--ckpt", run_dir / "round0.pt", "--out", out, "--embed-dtype", "float16")
    assert result.exit_code == 2 and "dtype" in result.output and not out.exists()
    # A pool other than the checkpoint's is refused.
    other = tmp_path / "other_pool"
    result = invoke("build-pool", "--dataset", "digits", "--class-counts", "5,5,5,5,5,5,5,5,5,5", "--initial", "10",
                    "--seed", "1", "--test-per-class", "5", "--out", other)
    assert result.exit_code == 0, result.output
    with pytest.raises(FmaskError, match="another pool"):
        run_fisher(ckpt=run_dir / "round0.pt", out=out, pool_dir=other, device="cpu")
    assert not out.exists()
    with pytest.raises(FmaskError, match="does not exist"):
        load_mask(run_dir / "missing.safetensors", checkpoint_hash=None)


def test_cli_prints_the_profile(run_dir):
    out = run_dir / "fisher0.safetensors"
    result = invoke("fisher", "--ckpt", run_dir / "round0.pt", "--out", out, "--sparsity", str(SPARSITY),
                    "--profile", "--no-embeddings", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "conv2" in result.output and "head" in result.output and "100.000%" in result.output
    assert out.exists() and not paths.embeddings_cache(out).exists()


def test_a_shard_of_the_embeddings_cache_is_read_without_the_rest(run_dir):
    from fmask.core.readers import read_safetensors, read_safetensors_rows, safetensors_shapes

    out = run_dir / "fisher0.safetensors"
    run_fisher(ckpt=run_dir / "round0.pt", out=out, sparsity=SPARSITY, device="cpu")
    cache = paths.embeddings_cache(out)
    whole, metadata = read_safetensors(cache, what="embeddings cache", made_by="fmask fisher")
    shapes, shape_metadata = safetensors_shapes(cache, what="embeddings cache", made_by="fmask fisher")
    assert shapes == {key: list(value.shape) for key, value in whole.items()} and shape_metadata == metadata
    rows = read_safetensors_rows(cache, {"unlabeled": (3, 9), "labeled": (0, 2)}, what="embeddings cache",
                                 made_by="fmask fisher")
    assert torch.equal(rows["unlabeled"], whole["unlabeled"][3:9]) and torch.equal(rows["labeled"], whole["labeled"][:2])
    cache.write_bytes(cache.read_bytes()[:-100])  # truncated: refused at open, not read past its end
    with pytest.raises(FmaskError, match="corrupt"):
        read_safetensors_rows(cache, {"unlabeled": (0, 1)}, what="embeddings cache", made_by="fmask fisher")


# ---- the head-fills-k guard -------------------------------------------------------------------------------------

def _brute_force_smallest(head_size: int, num_parameters: int) -> float:
    """The smallest two-significant-digit sparsity whose k = round-half-up(s × P) is at least 2 × head, by scanning."""
    from decimal import Decimal

    need = 2 * head_size
    for exponent in range(-6, 1):
        for mantissa in range(10, 100):
            s = float(Decimal(mantissa) * Decimal(10) ** (exponent - 1))
            if s <= 1 and int(Decimal(str(s)) * num_parameters + Decimal("0.5")) >= need:
                return s
    raise AssertionError("no sparsity works")


@pytest.mark.parametrize("head_size,num_parameters", [(516, 52_996), (1290, 53_770), (1290, 53_194), (5130, 11_173_962),
                                                      (3, 100), (6, 13)])
def test_smallest_working_sparsity_matches_a_scan(head_size, num_parameters):
    from fmask.fisher.mask import mask_size, smallest_working_sparsity

    smallest = smallest_working_sparsity(head_size, num_parameters)
    assert smallest == pytest.approx(_brute_force_smallest(head_size, num_parameters), rel=1e-12)
    assert mask_size(smallest, num_parameters) >= 2 * head_size
    assert smallest_working_sparsity(60, 100) is None  # the head is more than half the model


def test_a_sparsity_the_head_would_fill_is_refused_with_the_smallest_that_works(run_dir):
    from fmask.fisher.mask import mask_size, smallest_working_sparsity
    from tests.conftest import refused_line

    out = run_dir / "fisher0.safetensors"
    model = load_checkpoint(run_dir / "round0.pt").model
    num_parameters = sum(p.numel() for p in model.parameters())
    head_size = model.head.weight.numel() + model.head.bias.numel()
    # 0.002 keeps k ~ 106 < 1,290 head entries; 0.04 keeps ~2,128: more than the head, less than twice it.
    for sparsity in ("0.002", "0.04"):
        line = refused_line(invoke("fisher", "--ckpt", run_dir / "round0.pt", "--out", out, "--sparsity", sparsity,
                                   "--no-embeddings", "--device", "cpu"))
        smallest = _brute_force_smallest(head_size, num_parameters)
        assert f"--sparsity {smallest:g} or more" in line and "--no-head" in line and f"k={mask_size(float(sparsity), num_parameters)}" in line
        assert not out.exists()
    named = smallest_working_sparsity(head_size, num_parameters)
    result = invoke("fisher", "--ckpt", run_dir / "round0.pt", "--out", out, "--sparsity", f"{named:g}",
                    "--no-embeddings", "--device", "cpu")
    assert result.exit_code == 0, result.output
    mask = load_mask(out, checkpoint_hash=None)
    outside = sum(int(mask.masks[n].sum()) for n in mask.parameter_names if not n.startswith("head."))
    assert outside >= head_size  # as many entries outside the head as in it
    # --no-head takes any sparsity.
    assert invoke("fisher", "--ckpt", run_dir / "round0.pt", "--out", run_dir / "plain.safetensors", "--sparsity",
                  "0.002", "--no-head", "--no-embeddings", "--device", "cpu").exit_code == 0


def test_a_frozen_backbone_is_exempt_and_its_mask_is_the_heads_top_k(run_dir):
    from fmask.fisher.mask import check_sparsity_works, top_k_mask
    from fmask.fisher.step import head_only_trainable

    model = load_checkpoint(run_dir / "round0.pt").model
    assert not head_only_trainable(model)
    with pytest.raises(FmaskError, match="--no-head"):
        check_sparsity_works(sparsity=0.002, k=106, head_size=1290, num_parameters=53_194,
                             head_only_trainable=head_only_trainable(model))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("head."))
    assert head_only_trainable(model)
    check_sparsity_works(sparsity=0.002, k=106, head_size=1290, num_parameters=53_194, head_only_trainable=True)
    fisher = {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(i))
              for i, (name, p) in enumerate(model.named_parameters())}
    masks = top_k_mask(fisher, 106, head=True, order=list(fisher))
    head_values = torch.cat([fisher[n].reshape(-1) for n in fisher if n.startswith("head.")])
    chosen = torch.cat([masks[n].reshape(-1) for n in fisher if n.startswith("head.")])
    assert all(not masks[n].any() for n in fisher if not n.startswith("head."))
    assert int(chosen.sum()) == 106 and head_values[chosen].min() >= head_values[~chosen].max()


@pytest.mark.parametrize("preset", ["setting1-low", "setting1-high", "setting2"])
def test_every_small_preset_sparsity_works_on_its_model(preset):
    from fmask.fisher.mask import mask_size
    from fmask.pool.pool import SETTINGS
    from fmask.run.experiment import preset_config
    from fmask.train.models import build_model

    config = preset_config(preset, small=True)
    model = build_model(config.model, in_channels=3, num_classes=len(SETTINGS[config.setting]))
    num_parameters = sum(p.numel() for p in model.parameters())
    head_size = sum(p.numel() for n, p in model.named_parameters() if n.startswith("head."))
    assert mask_size(config.sparsity, num_parameters) >= 2 * head_size


@pytest.mark.slow
def test_variants_are_recorded_in_the_mask_the_cache_and_the_query(run_dir):
    from fmask.query.step import run_query

    ckpt, out = run_dir / "round0.pt", run_dir / "fisher0.safetensors"
    result = invoke("fisher", "--ckpt", ckpt, "--out", out, "--sparsity", str(SPARSITY), "--embedding-rows",
                    "unscaled", "--m0", "fisher", "--device", "cpu")
    assert result.exit_code == 0, result.output
    mask = load_mask(out, checkpoint_hash=None)
    assert (mask.embedding_rows, mask.m0) == ("unscaled", "fisher")
    assert json.loads(mask.metadata["step"])["embedding_rows"] == "unscaled"
    with safe_open(paths.embeddings_cache(out), "pt") as cache:
        assert cache.metadata()["rows"] == "unscaled"
        cached = cache.get_tensor("unlabeled")
    pool, unlabeled, _ = _unlabeled_and_labeled(run_dir)
    model = load_checkpoint(ckpt).model
    direct = masked_embeddings(model, pool.inputs(unlabeled), mask.columns, rows="unscaled")
    torch.testing.assert_close(cached, direct)
    scaled = masked_embeddings(model, pool.inputs(unlabeled), mask.columns, rows="scaled")
    probs = torch.softmax(model.eval()(pool.inputs(unlabeled)), dim=1).detach()
    torch.testing.assert_close(scaled, direct * probs.sqrt().unsqueeze(2), rtol=1e-4, atol=1e-6)

    # fmask query follows the mask's record unless told otherwise, and writes down what it used.
    query = run_query(ckpt=ckpt, out=run_dir / "q.json", strategy="fishermask", batch=4, mask=out, device="cpu")
    assert query.data["details"] == {"embedding_rows": "unscaled", "m0": "fisher"}
    other = run_query(ckpt=ckpt, out=run_dir / "q2.json", strategy="fishermask", batch=4, mask=out, device="cpu",
                      options={"embedding_rows": "scaled", "m0": "identity"})
    assert other.data["details"] == {"embedding_rows": "scaled", "m0": "identity"}
    pinned = run_query(ckpt=ckpt, out=run_dir / "q3.json", strategy="fishermask-m0fisher", batch=4, mask=out,
                       device="cpu", options={"embedding_rows": "scaled"})
    assert pinned.data["details"] == {"embedding_rows": "scaled", "m0": "fisher"}
    with pytest.raises(FmaskError, match="fishermask-unscaled"):
        run_query(ckpt=ckpt, out=run_dir / "q4.json", strategy="fishermask-unscaled", batch=4, mask=out,
                  device="cpu", options={"embedding_rows": "scaled"})
    bad = invoke("fisher", "--ckpt", ckpt, "--out", run_dir / "bad.safetensors", "--sparsity", str(SPARSITY),
                 "--m0", "eye", "--device", "cpu")
    assert bad.exit_code == 2 and "--m0" in bad.stderr and not (run_dir / "bad.safetensors").exists()
