"""Pretrained backbones: weights really loaded from the file (torchvision and timm models whose weights these
tests save), the classifier replaced, mismatches refused; --weights default offline; --finetune head against an
independent linear fit on the cached features, the feature pass run once per (pool, weights), every strategy on
the cache, the head-only Fisher mask, small head checkpoints bound to their backbone's hash; the fine-tuning
recipe; a cold start on a pool without labels."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from fmask import load_pool
from fmask.query.registry import get_strategy, list_strategies
from fmask.train import models
from fmask.train.pretrained import Backbone
from fmask.train.recipe import FULL_FINETUNE, make_optimizer, make_schedule, make_train_config
from fmask.train.trainer import TrainConfig
from tests.conftest import SHARED_CIFAR10, invoke, refused_line, snapshot

TV = "torchvision:shufflenet_v2_x0_5"
TIMM = "timm:test_resnet"
CLASSES = ("airplane", "automobile", "bird")
SIZE = 40  # --input-size of most tests: the 32x32 images are resized on the device
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

pytestmark = pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="needs the shared CIFAR-10 images")
# timm is an optional extra (the test extra has it; the lowest-versions job of .ci/run leaves it out)
HAVE_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAVE_TIMM, reason="needs timm: pip install 'fmask[timm]'")


def make_folder(root: Path, train_per_class: int = 12, test_per_class: int = 4) -> Path:
    """A folder dataset of real CIFAR-10 JPEGs: three classes."""
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            for source in sorted((SHARED_CIFAR10 / split / cls).iterdir())[:count]:
                shutil.copy(source, root / split / cls / source.name)
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A 36-image pool with 9 labels, a 36-image pool with none, and the weights files of a torchvision and a
    timm model saved from seeded random initialisations."""
    root = tmp_path_factory.mktemp("pretrained")
    folder = make_folder(root / "images")
    for name, initial in (("pool", 9), ("cold", 0)):
        result = invoke("build-pool", "--dataset", f"folder:{folder}", "--initial", initial, "--seed", "0",
                        "--out", root / name)
        assert result.exit_code == 0, result.output
    torch.manual_seed(1)
    torch.save(torchvision.models.get_model("shufflenet_v2_x0_5").state_dict(), root / "shufflenet.pt")
    torch.manual_seed(2)
    other = torchvision.models.get_model("shufflenet_v2_x0_5").state_dict()
    save_file(other, str(root / "shufflenet_other.safetensors"))
    if HAVE_TIMM:
        import timm

        torch.manual_seed(3)
        save_file(timm.create_model("test_resnet").state_dict(), str(root / "test_resnet.safetensors"))
    else:  # stands in for the weights file that the refusal without timm names
        shutil.copyfile(root / "shufflenet_other.safetensors", root / "test_resnet.safetensors")
    return {"root": root, "pool": root / "pool", "cold": root / "cold", "tv": root / "shufflenet.pt",
            "tv_other": root / "shufflenet_other.safetensors", "timm": root / "test_resnet.safetensors"}


def train_head(setup: dict, out: Path, *extra, weights=None, labeled=None, model=TV):
    args = ["train", "--pool", setup["pool"], "--model", model, "--weights", weights or setup["tv"],
            "--finetune", "head", "--device", "cpu", "--out", out, *extra]
    if model == TV and "--input-size" not in extra:
        args += ["--input-size", SIZE]
    if labeled is not None:
        args += ["--labeled", labeled]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return torch.load(out, weights_only=True)


def feature_cache_files(pool_dir: Path) -> list[Path]:
    return sorted(pool_dir.glob("features-*.safetensors"))


# ---- weights ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, key", [(TV, "tv"), pytest.param(TIMM, "timm", marks=needs_timm)])
def test_weights_are_loaded_and_the_classifier_replaced(setup, model, key):
    pool = load_pool(setup["pool"])
    file_state = (torch.load(setup[key], weights_only=True) if setup[key].suffix == ".pt"
                  else load_file(str(setup[key])))
    backbone = Backbone.resolve(model, setup[key], channels=3)
    net = backbone.build(pool)
    body = net.body.state_dict()
    classifier = "fc"  # both models name their classifier fc
    assert set(body) == {k for k in file_state if not k.startswith(classifier + ".")}
    for name, value in body.items():
        assert torch.equal(value, file_state[name]), name
    # The library's 1000-way classifier is gone; the head has the pool's 3 classes on the same features.
    assert net.head.weight.shape == (3, file_state[f"{classifier}.weight"].shape[1])
    assert backbone.weights.sha256 == hashlib.sha256(setup[key].read_bytes()).hexdigest()


def test_a_grayscale_pool_gets_the_rgb_stem_summed(setup):
    from fmask.train.pretrained import load_backbone_weights, resolve_preprocessing

    state = torch.load(setup["tv"], weights_only=True)
    net = models.build_model(TV, in_channels=1, num_classes=3)
    load_backbone_weights(net, state, source="file", model_name=TV)
    # A gray pixel g stands for (g, g, g): the 1-channel filter is the sum of the RGB ones.
    assert torch.equal(net.body.conv1[0].weight, state["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(net.body.conv5[0].weight, state["conv5.0.weight"])
    chosen = resolve_preprocessing(TV, channels=1)
    assert chosen["mean"] == [pytest.approx(sum(IMAGENET_MEAN) / 3)]
    assert chosen["std"] == [pytest.approx(sum(IMAGENET_STD) / 3)]


@needs_timm
def test_input_size_and_normalisation_come_from_the_library_config(setup, tmp_path):
    timm_ckpt = train_head(setup, tmp_path / "timm.pt", model=TIMM, weights=setup["timm"])
    import timm

    config = timm.models.get_pretrained_cfg("test_resnet")
    assert timm_ckpt["preprocessing"] == {"input_size": list(config.input_size[1:]), "mean": list(config.mean),
                                          "std": list(config.std)}
    transforms = torchvision.models.get_model_weights("shufflenet_v2_x0_5").DEFAULT.transforms()
    backbone = Backbone.resolve(TV, setup["tv"], channels=3)
    assert backbone.preprocessing == {"input_size": list(transforms.crop_size) * 2, "mean": list(transforms.mean),
                                      "std": list(transforms.std)}
    # A plain state-dict file for fmask's own models: ImageNet statistics, the pool's own size.
    assert Backbone.resolve("cnn", setup["tv"], channels=3).preprocessing == {
        "input_size": None, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    overridden = Backbone.resolve(TV, setup["tv"], channels=3, input_size=48, mean=[0.5] * 3, std=[0.25] * 3)
    assert overridden.preprocessing == {"input_size": [48, 48], "mean": [0.5] * 3, "std": [0.25] * 3}


def test_weights_that_do_not_fit_are_refused_naming_keys(setup, tmp_path):
    state = torch.load(setup["tv"], weights_only=True)
    missing = dict(state)
    del missing["conv1.0.weight"]
    extra = {**state, "extra.weight": torch.zeros(2)}
    wrong = {**state, "conv1.0.weight": torch.zeros(24, 3, 5, 5)}
    cases = {"missing.pt": (missing, "conv1.0.weight"), "extra.pt": (extra, "extra.weight"),
             "wrong.pt": (wrong, "conv1.0.weight (24, 3, 5, 5)")}
    for name, (weights, named) in cases.items():
        torch.save(weights, tmp_path / name)
    (tmp_path / "pickled.pt").write_bytes(b"not a zip")
    before = snapshot(setup["pool"])
    for name, named in [(n, c[1]) for n, c in cases.items()] + [("pickled.pt", "weights_only=True")]:
        result = invoke("train", "--pool", setup["pool"], "--model", TV, "--weights", tmp_path / name,
                        "--input-size", SIZE, "--device", "cpu", "--out", tmp_path / "never.pt")
        assert named in refused_line(result), (name, result.stderr)
        assert not (tmp_path / "never.pt").exists()
    assert snapshot(setup["pool"]) == before  # no feature cache either


@needs_timm  # and huggingface_hub, which timm brings
def test_weights_default_offline_says_where_to_put_the_file(setup, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):  # nothing answers there: offline
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    url = torchvision.models.get_model_weights("shufflenet_v2_x0_5").DEFAULT.url
    line = refused_line(invoke("train", "--pool", setup["pool"], "--model", TV, "--weights", "default",
                               "--device", "cpu", "--out", tmp_path / "never.pt"))
    assert url in line and str(tmp_path / "torch" / "hub" / "checkpoints" / Path(url).name) in line
    line = refused_line(invoke("train", "--pool", setup["pool"], "--model", TIMM, "--weights", "default",
                               "--device", "cpu", "--out", tmp_path / "never.pt"))
    assert "timm/test_resnet" in line and "model.safetensors" in line and "--weights FILE" in line
    line = refused_line(invoke("train", "--pool", setup["pool"], "--model", "cnn", "--weights", "default",
                               "--device", "cpu", "--out", tmp_path / "never.pt"))
    assert "only for torchvision:NAME and timm:NAME" in line
    assert not (tmp_path / "never.pt").exists()


def test_timm_models_without_timm_are_refused_with_the_install_line(setup, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what Python does when the package is not installed
    line = refused_line(invoke("train", "--pool", setup["pool"], "--model", TIMM, "--weights", setup["timm"],
                               "--device", "cpu", "--out", tmp_path / "never.pt"))
    assert "pip install 'fmask[timm]'" in line


# ---- --finetune head ------------------------------------------------------------------------------------------


def test_head_training_equals_a_linear_fit_on_the_cached_features(setup, tmp_path):
    epochs, batch, seed = 4, 4, 7
    ckpt = train_head(setup, tmp_path / "head.pt", "--epochs", epochs, "--batch-size", batch, "--seed", seed)
    pool = load_pool(setup["pool"])
    cached = load_file(str(setup["pool"] / ckpt["features"]))
    # The cache holds what the backbone computes: torchvision's network on the resized, normalised images.
    net = torchvision.models.get_model("shufflenet_v2_x0_5")
    net.load_state_dict(torch.load(setup["tv"], weights_only=True))
    net.fc = nn.Identity()
    net.eval()

    def reference(images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float() / 255, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            return net((x - mean) / std)

    torch.testing.assert_close(cached["train"], reference(pool.images(pool.ids)), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(cached["test"], reference(pool.test_images), atol=2e-4, rtol=1e-4)

    # The same linear layer fitted independently: AdamW, cosine over the epochs, a seeded order per epoch.
    labeled = ckpt["labeled_ids"]
    x = cached["train"][[pool.ids.index(i) for i in labeled]]
    y = pool.labels(labeled)
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], 3)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    order_generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=order_generator)
        for start in range(0, len(x), batch):
            rows = order[start:start + batch]
            optimizer.zero_grad()
            F.cross_entropy(head(x[rows]), y[rows]).backward()
            optimizer.step()
        schedule.step()
    assert set(ckpt["state_dict"]) == {"head.weight", "head.bias"}
    torch.testing.assert_close(ckpt["state_dict"]["head.weight"], head.weight.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ckpt["state_dict"]["head.bias"], head.bias.detach(), atol=1e-6, rtol=1e-5)
    predicted = head(cached["test"]).argmax(1)
    assert ckpt["metrics"]["accuracy"] == pytest.approx(float((predicted == pool.test_labels).float().mean()))
    assert ckpt["config"]["augment"] is False and ckpt["finetune"] == "head"


def test_the_feature_pass_runs_once_per_pool_and_weights(setup, tmp_path, monkeypatch):
    pool_dir = tmp_path / "pool"
    shutil.copytree(setup["pool"], pool_dir)
    for cache in feature_cache_files(pool_dir):
        cache.unlink()
    local = {**setup, "pool": pool_dir}
    rows = []
    original = models.TorchvisionClassifier.forward_features

    def counting(self, x):
        rows.append(len(x))
        return original(self, x)

    monkeypatch.setattr(models.TorchvisionClassifier, "forward_features", counting)
    train_head(local, tmp_path / "round0.pt")
    one_pass = len(load_pool(pool_dir).ids) + len(load_pool(pool_dir).test_labels)
    assert sum(rows) == one_pass
    for strategy in ("entropy", "kcenter"):
        result = invoke("query", "--ckpt", tmp_path / "round0.pt", "--strategy", strategy, "--batch", 5,
                        "--device", "cpu", "--out", tmp_path / f"{strategy}.json")
        assert result.exit_code == 0, result.output
    result = invoke("label", "--query", tmp_path / "entropy.json", "--out", tmp_path / "labeled1.json")
    assert result.exit_code == 0, result.output
    train_head(local, tmp_path / "round1.pt", labeled=tmp_path / "labeled1.json")
    result = invoke("query", "--ckpt", tmp_path / "round1.pt", "--strategy", "margin", "--batch", 5,
                    "--device", "cpu", "--out", tmp_path / "query1.json")
    assert result.exit_code == 0, result.output
    assert sum(rows) == one_pass  # train, queries and a second round all read the cache
    # Other weights or another preprocessing: another backbone, another pass.
    train_head(local, tmp_path / "other.pt", weights=setup["tv_other"])
    assert sum(rows) == 2 * one_pass
    train_head(local, tmp_path / "bigger.pt", "--input-size", SIZE + 8)
    assert sum(rows) == 3 * one_pass and len(feature_cache_files(pool_dir)) == 3


@pytest.mark.slow
def test_every_strategy_runs_on_the_cached_features(setup, tmp_path):
    ckpt = tmp_path / "head.pt"
    train_head(setup, ckpt, "--mc-dropout", 0.3)  # bald and batchbald need dropout before the head
    result = invoke("fisher", "--ckpt", ckpt, "--out", tmp_path / "mask.safetensors", "--device", "cpu")
    assert result.exit_code == 0, result.output
    labeled = set(torch.load(ckpt, weights_only=True)["labeled_ids"])
    for strategy in list_strategies():
        extra = ["--mask", tmp_path / "mask.safetensors"] if get_strategy(strategy).needs_mask else []
        result = invoke("query", "--ckpt", ckpt, "--strategy", strategy, "--batch", 6, "--device", "cpu",
                        "--out", tmp_path / f"{strategy}.json", *extra)
        assert result.exit_code == 0, (strategy, result.output)
        selected = json.loads((tmp_path / f"{strategy}.json").read_text())["selected"]
        assert len(set(selected)) == 6 and not labeled & set(selected), strategy


def test_the_fishermask_mask_covers_the_head_alone(setup, tmp_path):
    ckpt = tmp_path / "head.pt"
    state = train_head(setup, ckpt)
    sparsity = 0.01
    result = invoke("fisher", "--ckpt", ckpt, "--out", tmp_path / "mask.safetensors", "--sparsity", sparsity,
                    "--no-head", "--device", "cpu")
    assert result.exit_code == 0, result.output
    mask = load_file(str(tmp_path / "mask.safetensors"))
    assert set(mask) == {"fisher.head.weight", "fisher.head.bias", "mask.head.weight", "mask.head.bias"}
    head_size = state["state_dict"]["head.weight"].numel() + state["state_dict"]["head.bias"].numel()
    k = round(sparsity * head_size)
    assert int(mask["mask.head.weight"].sum() + mask["mask.head.bias"].sum()) == k
    # The Fisher diagonal of the head from its formula on the cached features:
    # d log p_y / dW = (e_y - p) h^T, d log p_y / db = e_y - p, weighted by p_y, averaged over the unlabeled pool.
    pool = load_pool(setup["pool"])
    unlabeled = [i for i in pool.ids if i not in set(state["labeled_ids"])]
    h = load_file(str(setup["pool"] / state["features"]))["train"][[pool.ids.index(i) for i in unlabeled]].double()
    weight, bias = state["state_dict"]["head.weight"].double(), state["state_dict"]["head.bias"].double()
    p = torch.softmax(h @ weight.T + bias, dim=1)
    residual = torch.eye(3, dtype=torch.float64)[None] - p[:, None, :]  # (n, y, k): e_y - p
    fisher_bias = (p[:, :, None] * residual ** 2).sum(1).mean(0)
    fisher_weight = torch.einsum("ny,nyk,nj->kj", p, residual ** 2, h ** 2) / len(h)
    torch.testing.assert_close(mask["fisher.head.weight"].double(), fisher_weight, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(mask["fisher.head.bias"].double(), fisher_bias, rtol=1e-4, atol=1e-7)
    everything = torch.cat([fisher_weight.flatten(), fisher_bias])
    chosen = torch.cat([mask["mask.head.weight"].flatten(), mask["mask.head.bias"]])
    assert everything[chosen].min() >= everything[~chosen].max()


def test_a_head_checkpoint_is_small_and_bound_to_its_backbone(setup, tmp_path):
    moved = tmp_path / "backbone.pt"
    shutil.copy(setup["tv"], moved)
    ckpt = tmp_path / "head.pt"
    state = train_head(setup, ckpt, weights=moved)
    assert ckpt.stat().st_size < 64 * 1024 < moved.stat().st_size
    assert state["weights"]["sha256"] == hashlib.sha256(moved.read_bytes()).hexdigest()
    query = ["query", "--ckpt", ckpt, "--strategy", "entropy", "--batch", 4, "--device", "cpu"]
    line = refused_line(invoke(*query, "--weights", setup["tv_other"], "--out", tmp_path / "q.json"))
    assert "are not the ones" in line and state["weights"]["sha256"][:12] in line
    moved.unlink()
    line = refused_line(invoke(*query, "--out", tmp_path / "q.json"))
    assert "missing; pass --weights" in line
    assert not (tmp_path / "q.json").exists()
    # The same bytes elsewhere are the same backbone.
    result = invoke(*query, "--weights", setup["tv"], "--out", tmp_path / "q.json")
    assert result.exit_code == 0, result.output


# ---- the fine-tuning recipe and full fine-tuning ---------------------------------------------------------------


def test_fine_tuning_recipe_defaults_are_recorded_and_from_scratch_stays_the_papers(setup, tmp_path):
    scratch = make_train_config(TrainConfig, model="cnn")
    assert (scratch.optimizer, scratch.schedule, scratch.lr, scratch.max_epochs, scratch.target_train_accuracy,
            scratch.grad_clamp, scratch.backbone_lr_scale, scratch.augment) == \
        ("adam", "constant", 1e-3, 100, 0.99, 0.1, 1.0, True)
    result = invoke("train", "--pool", setup["pool"], "--model", TV, "--weights", setup["tv"], "--input-size", 32,
                    "--epochs", 2, "--device", "cpu", "--out", tmp_path / "full.pt")
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "full.pt", weights_only=True)
    config = state["config"]
    for key, value in FULL_FINETUNE.items():
        assert config[key] == (2 if key == "max_epochs" else value), key
    assert state["metrics"]["epochs"] == 2  # a fixed number of epochs, no early stop
    assert state["weights"]["sha256"] == hashlib.sha256(setup["tv"].read_bytes()).hexdigest()
    assert state["weights"]["source"] == str(setup["tv"].resolve())
    # The full checkpoint reloads with its input adapter and serves queries on images.
    result = invoke("query", "--ckpt", tmp_path / "full.pt", "--strategy", "badge", "--batch", 4, "--device", "cpu",
                    "--out", tmp_path / "q.json")
    assert result.exit_code == 0, result.output


def test_backbone_learning_rate_scale_and_cosine_schedule():
    model = models.build_model("cnn", in_channels=3, num_classes=4)
    config = make_train_config(TrainConfig, model="cnn", weights="w.pt", lr=0.02, backbone_lr_scale=0.25,
                               max_epochs=4)
    optimizer = make_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    by_lr = {group["lr"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}
    assert by_lr[0.02] == {id(model.head.weight), id(model.head.bias)}
    assert by_lr[0.005] == {id(p) for name, p in model.named_parameters() if not name.startswith("head.")}
    schedule = make_schedule(optimizer, config)
    for epoch in range(1, 4):
        optimizer.step()
        schedule.step()
        factor = (1 + math.cos(math.pi * epoch / 4)) / 2
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.02 * factor, 0.005 * factor])


# ---- cold start -------------------------------------------------------------------------------------------------


def test_cold_start_kcenter_on_a_pool_without_labels(setup, tmp_path):
    pool = load_pool(setup["cold"])
    assert pool.labels([]).numel() == 0
    cold = ["query", "--pool", setup["cold"], "--model", TV, "--weights", setup["tv"], "--input-size", SIZE,
            "--batch", 6, "--device", "cpu"]
    result = invoke(*cold, "--strategy", "kcenter", "--out", tmp_path / "q.json")
    assert result.exit_code == 0, result.output
    query = json.loads((tmp_path / "q.json").read_text())
    assert query["inputs"]["checkpoint"] is None and query["inputs"]["weights"]
    selected = query["selected"]
    # Farthest-first traversal on the cached features, brute force: each pick is farthest from the earlier ones.
    (cache,) = feature_cache_files(setup["cold"])
    features = load_file(str(cache))["train"].double()
    position = {sample: row for row, sample in enumerate(pool.ids)}
    distances = torch.cdist(features, features)
    for step in range(1, len(selected)):
        nearest = distances[:, [position[i] for i in selected[:step]]].min(dim=1).values
        assert nearest[position[selected[step]]] == pytest.approx(float(nearest.max()))
    assert len(set(selected)) == 6
    # Strategies that need predictions are refused; the batch labels and a head round trains on it.
    line = refused_line(invoke(*cold, "--strategy", "entropy", "--out", tmp_path / "never.json"))
    assert "needs a trained model's predictions" in line and "kcenter" in line
    result = invoke("label", "--query", tmp_path / "q.json", "--out", tmp_path / "labeled1.json")
    assert result.exit_code == 0, result.output
    result = invoke("train", "--pool", setup["cold"], "--labeled", tmp_path / "labeled1.json", "--model", TV,
                    "--weights", setup["tv"], "--input-size", SIZE, "--finetune", "head", "--device", "cpu",
                    "--out", tmp_path / "round1.pt")
    assert result.exit_code == 0, result.output
    assert len(feature_cache_files(setup["cold"])) == 1  # the query's features served the training too


def test_from_scratch_checkpoints_keep_their_step_key(tiny_run):
    """Fields added for pretrained weights stay out of a from-scratch step at their defaults, so checkpoints trained
    before them are still current (not retrained)."""
    step = torch.load(tiny_run / "round0.pt", weights_only=True)["step"]
    assert sorted(step["config"]) == ["augment", "batch_size", "channels_last", "compile", "grad_clamp", "lr",
                                      "max_epochs", "model", "precision", "seed", "target_train_accuracy",
                                      "weight_decay"]
    assert "weights" not in step
