"""The notebook API: `dir(fmask)`, a light `import fmask`, and `fmask.select` checked against `fmask query` run
through the CLI on the same checkpoint (an independent path: files in, files out)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fmask
from conftest import invoke, snapshot
from fmask.core.errors import FmaskError

BATCH = 6
REPO = Path(__file__).resolve().parents[1]


def test_dir_lists_the_public_api_and_every_name_resolves():
    listed = dir(fmask)
    for name in ("select", "Selection", "load_pool", "load_model", "load_labeled", "load_mask", "list_strategies",
                 "get_strategy", "register_strategy", "run_fisher", "fisher_greedy", "FmaskError"):
        assert name in listed and name in fmask.__all__
    for name in fmask.__all__:
        assert getattr(fmask, name) is not None
    with pytest.raises(AttributeError):
        fmask.no_such_name  # noqa: B018


def test_import_fmask_loads_no_torch():
    # A fresh interpreter: this one has torch loaded already.
    code = "import sys, fmask; dir(fmask); print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---------------------------------------------------------------- the same ids as `fmask query`


def cli_query(tmp_path: Path, ckpt: Path, strategy: str, *extra) -> dict:
    out = tmp_path / f"{strategy}.json"
    result = invoke("query", "--ckpt", ckpt, "--strategy", strategy, "--batch", BATCH, "--seed", 3,
                    "--device", "cpu", "--out", out, *extra)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def plain_strategies() -> list[str]:
    return [name for name in fmask.list_strategies()
            if not fmask.get_strategy(name).needs_mask and not fmask.get_strategy(name).needs_mc_dropout]


@pytest.fixture(scope="module")
def tiny_fisher_mask(tiny_run: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("api_mask") / "mask.safetensors"
    result = invoke("fisher", "--ckpt", tiny_run / "round0.pt", "--out", out, "--sparsity", "0.05", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def checkpoint_for(name: str, tiny_run: Path, request) -> Path:
    needs_dropout = fmask.get_strategy(name).needs_mc_dropout
    return request.getfixturevalue("tiny_dropout_ckpt") if needs_dropout else tiny_run / "round0.pt"


@pytest.mark.parametrize("name", plain_strategies() + ["bald", "batchbald", "fishermask"])
def test_select_on_a_loaded_pool_matches_the_cli(name, tiny_run, tmp_path, request):
    ckpt = checkpoint_for(name, tiny_run, request)
    mask = request.getfixturevalue("tiny_fisher_mask") if fmask.get_strategy(name).needs_mask else None
    expected = cli_query(tmp_path, ckpt, name, *(("--mask", mask) if mask else ()))
    pool = fmask.load_pool(tiny_run / "pool")
    labeled = fmask.load_labeled(tiny_run / "pool" / "labeled.json", pool)
    before = snapshot(tiny_run) | (snapshot(mask.parent) if mask else {})
    selection = fmask.select(name, model=fmask.load_model(ckpt), pool=pool, labeled=labeled.ids, batch=BATCH, seed=3,
                             mask=mask)
    assert isinstance(selection, fmask.Selection)
    assert selection.ids == expected["selected"]
    assert selection.scores == pytest.approx(expected["scores"], rel=1e-5, abs=1e-7)
    # Nothing written: not beside the pool, the checkpoint, nor the mask (its embeddings cache stays as it was).
    assert (snapshot(tiny_run) | (snapshot(mask.parent) if mask else {})) == before


def margin_of(model: torch.nn.Module, x: torch.Tensor) -> float:
    """-(p_top1 - p_top2) of one input, by the literal formula."""
    with torch.no_grad():
        top = torch.softmax(model(x.unsqueeze(0))[0].double(), 0).sort(descending=True).values
    return -float(top[0] - top[1])


@pytest.mark.parametrize("name", ["margin", "kcenter", "typiclust", "bald"])
def test_select_on_a_tensor_names_samples_by_position(name, tiny_run, tmp_path, request):
    ckpt = checkpoint_for(name, tiny_run, request)
    expected = cli_query(tmp_path, ckpt, name)
    pool = fmask.load_pool(tiny_run / "pool")
    labeled_ids = fmask.load_labeled(tiny_run / "pool" / "labeled.json", pool).ids
    images = pool.inputs(pool.ids)  # row r is sample pool.ids[r]
    positions = [pool.ids.index(i) for i in labeled_ids]
    model = fmask.load_model(ckpt)
    selection = fmask.select(name, model=model, pool=images, labeled=positions, batch=BATCH, seed=3)
    assert all(0 <= p < len(images) for p in selection.ids)
    assert [pool.ids[p] for p in selection.ids] == expected["selected"]
    if name == "margin":  # scores aligned with the ids they belong to
        assert selection.scores == pytest.approx([margin_of(model, images[p]) for p in selection.ids], abs=1e-6)


def test_positions_follow_the_rows_of_the_tensor(tiny_run):
    pool = fmask.load_pool(tiny_run / "pool")
    labeled_ids = fmask.load_labeled(tiny_run / "pool" / "labeled.json", pool).ids
    model = fmask.load_model(tiny_run / "round0.pt")
    by_id = fmask.select("margin", model=model, pool=pool, labeled=labeled_ids, batch=BATCH)
    order = torch.randperm(len(pool.ids), generator=torch.Generator().manual_seed(5)).tolist()
    shuffled_ids = [pool.ids[r] for r in order]  # row r of the shuffled tensor is sample shuffled_ids[r]
    images = pool.inputs(shuffled_ids)
    positions = [shuffled_ids.index(i) for i in labeled_ids]
    by_position = fmask.select("margin", model=model, pool=images, labeled=positions, batch=BATCH)
    assert [shuffled_ids[p] for p in by_position.ids] == by_id.ids
    assert by_position.scores == pytest.approx(by_id.scores, abs=1e-6)


def test_random_needs_no_model_and_a_pool_directory_works(tiny_run, tmp_path):
    result = invoke("query", "--pool", tiny_run / "pool", "--strategy", "random", "--batch", BATCH, "--seed", 3,
                    "--out", tmp_path / "q.json")
    assert result.exit_code == 0, result.output
    pool = fmask.load_pool(tiny_run / "pool")
    labeled = fmask.load_labeled(tiny_run / "pool" / "labeled.json", pool)
    selection = fmask.select("random", model=None, pool=tiny_run / "pool", labeled=labeled, batch=BATCH, seed=3)
    assert selection.ids == json.loads((tmp_path / "q.json").read_text())["selected"]


def test_the_model_is_put_back_in_its_mode(tiny_run):
    pool = fmask.load_pool(tiny_run / "pool")
    labeled_ids = fmask.load_labeled(tiny_run / "pool" / "labeled.json", pool).ids
    model = fmask.load_model(tiny_run / "round0.pt")
    in_eval = fmask.select("entropy", model=model, pool=pool, labeled=labeled_ids, batch=BATCH)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert fmask.select("entropy", model=model, pool=pool, labeled=labeled_ids, batch=BATCH).ids == in_eval.ids
    assert model.training  # restored
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # no batch-norm statistics moved


def test_query_result_is_typed(tiny_run, tmp_path):
    result = fmask.run_query(ckpt=tiny_run / "round0.pt", out=tmp_path / "q.json", strategy="margin", batch=BATCH,
                       device="cpu")
    written = json.loads((tmp_path / "q.json").read_text())
    assert result.selection.ids == written["selected"] and result.selection.scores == written["scores"]


# ---------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def loaded(tiny_run):
    pool = fmask.load_pool(tiny_run / "pool")
    return pool, fmask.load_labeled(tiny_run / "pool" / "labeled.json", pool).ids, fmask.load_model(tiny_run / "round0.pt")


@pytest.mark.parametrize("change, message", [
    (dict(labeled=[10 ** 9]), "not in the pool"),
    (dict(labeled=[1.5]), "not an integer"),
    (dict(batch=0), "batch 0 must be positive"),
    (dict(batch=10 ** 6), "larger than the unlabeled pool"),
    (dict(model=None), "needs a model"),
    (dict(model=torch.nn.Linear(3, 2)), "forward_features"),
    (dict(pool=[1, 2, 3]), "pool must be"),
    (dict(pool=torch.zeros(4, 1, 8, 8, dtype=torch.uint8), labeled=[]), "float"),
    (dict(pool=torch.zeros(4, 8, 8), labeled=[]), "float"),
    (dict(pool=torch.zeros(4, 1, 8, 8), labeled=[4]), "position"),
    (dict(strategy="nope"), "unknown strategy"),
    (dict(pool=torch.zeros(200, 1, 8, 8), labeled=None), "list of integers"),
    (dict(strategy="fishermask"), "needs mask="),
    (dict(mask="whatever.safetensors"), "uses no mask"),
    (dict(strategy="bald"), "mc-dropout"),
])
def test_select_refuses_in_one_line(change, message, loaded):
    pool, labeled_ids, model = loaded
    arguments = dict(strategy="margin", model=model, pool=pool, labeled=labeled_ids, batch=BATCH) | change
    with pytest.raises(FmaskError, match=message):
        fmask.select(arguments.pop("strategy"), **arguments)


def test_a_labeled_id_twice_and_a_labeled_set_on_a_tensor_are_refused(loaded, tiny_run):
    pool, labeled_ids, model = loaded
    with pytest.raises(FmaskError, match="twice"):
        fmask.select("margin", model=model, pool=pool, labeled=[labeled_ids[0]] * 2, batch=BATCH)
    labeled_set = fmask.load_labeled(tiny_run / "pool" / "labeled.json", pool)
    with pytest.raises(FmaskError, match="positions"):
        fmask.select("margin", model=model, pool=pool.inputs(pool.ids), labeled=labeled_set, batch=BATCH)


def test_a_mask_that_does_not_fit_the_model_is_refused(loaded, tiny_fisher_mask):
    from fmask.train.models import build_model

    pool, labeled_ids, _ = loaded
    # Another architecture: the mask names parameters this model does not have.
    model = build_model("resnet18", in_channels=pool.image_shape[0], num_classes=pool.num_classes).eval()
    with pytest.raises(FmaskError, match="parameter names"):
        fmask.select("fishermask", model=model, pool=pool, labeled=labeled_ids, batch=BATCH, mask=tiny_fisher_mask)


def test_train_result_evaluation_is_typed(run_dir):
    from fmask.train.trainer import TrainConfig, train

    result = train(pool_dir=run_dir / "pool", labeled=None, out=run_dir / "round0.pt",
                   config=TrainConfig(model="cnn", max_epochs=3, batch_size=16), device="cpu")
    evaluation = result.evaluation
    pool = fmask.load_pool(run_dir / "pool")
    model = fmask.load_model(run_dir / "round0.pt")
    with torch.no_grad():
        predicted = model(pool.normalize(pool.test_images)).argmax(dim=1)
    assert evaluation.evaluated_on == "test" and evaluation.test_samples == len(pool.test_labels)
    assert evaluation.accuracy == pytest.approx(float((predicted == pool.test_labels).double().mean()))
    assert evaluation.labeled == 20 and 1 <= evaluation.epochs <= 3
    assert len(evaluation.per_class_accuracy) == pool.num_classes
