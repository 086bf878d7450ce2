"""Your own images: pools from a folder or a CSV of files (any size and mode, labels optional, bad files skipped and
listed, duplicates kept once, paths kept end to end), pools without ground truth (no oracle, no test set),
`fmask predict`, and every refusal with one line, exit 2 and nothing written.

Fixtures are made here: real CIFAR-10 JPEGs from ../shared re-encoded at mixed sizes and modes with PIL, plus
corrupt, truncated, zero-byte and macOS sidecar files."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmask import load_model, load_pool
from fmask.core import paths
from fmask.pool.cache import PixelStats, create_rows, keep_rows
from fmask.train.validation import validation_split
from tests.conftest import SHARED_CIFAR10, invoke, refused_line, snapshot

pytestmark = pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="../shared/datasets/cifar10 is absent")

CLASSES = ("cat", "dog", "ship")
PER_CLASS = 6
SIZE = 16  # --image-size of most pools here: small, so the tiny CNN trains in a blink
BAD = {"broken.jpg": "corrupt", "truncated.jpg": "truncated", "empty.png": "zero-byte", "._cat_0.jpg": "sidecar"}
TRAIN = ("--model", "cnn", "--epochs", "1", "--batch-size", "8", "--device", "cpu")


def cifar(cls: str, index: int) -> Image.Image:
    return Image.open(SHARED_CIFAR10 / "train" / cls / f"{index:04d}.jpg").convert("RGB")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def exif_rotated_png(upright: Image.Image) -> bytes:
    """The pixels stored turned a quarter, with EXIF orientation 6 saying how to turn them upright (lossless)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(upright.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif)


def variant(cls: str, index: int) -> tuple[str, bytes]:
    """File name and bytes of sample ``index`` of ``cls``: each index another size, mode or format."""
    image = cifar(cls, index)
    name = f"{cls}_{index}"
    if index == 0:
        return f"{name}.jpg", (SHARED_CIFAR10 / "train" / cls / "0000.jpg").read_bytes()
    if index == 1:
        return f"{name}.png", encode(image.resize((48, 40)), "PNG")
    if index == 2:
        return f"{name}.png", encode(image.convert("L"), "PNG")
    if index == 3:
        rgba = image.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(image.size))
        return f"{name}.png", encode(rgba, "PNG")
    if index == 4:
        return f"{name}.png", encode(image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG",
                                     transparency=0)
    if index == 5:
        return f"{name}.jpg", encode(image.resize((40, 56)).convert("CMYK"), "JPEG")
    if index == 6:
        sixteen = Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)
        return f"{name}.png", encode(sixteen, "PNG")
    return f"{name}.png", exif_rotated_png(image.resize((40, 32)))


def make_photos(root: Path, per_class: int = PER_CLASS, start: int = 0) -> list[str]:
    """A flat folder of photos (one in a subfolder), bad files and a byte copy; returns the good paths."""
    root.mkdir(parents=True, exist_ok=True)
    good = []
    for cls in CLASSES:
        for index in range(start, start + per_class):
            if index < 8:
                name, data = variant(cls, index)
            else:  # later photos: the JPEGs as they are
                name, data = f"{cls}_{index}.jpg", (SHARED_CIFAR10 / "train" / cls / f"{index:04d}.jpg").read_bytes()
            (root / name).write_bytes(data)
            good.append(name)
    (root / "more").mkdir(exist_ok=True)
    (root / "more" / "dog_extra.png").write_bytes(encode(cifar("dog", 40), "PNG"))
    good.append("more/dog_extra.png")
    return good


def add_bad_files(root: Path) -> None:
    (root / "broken.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "truncated.jpg").write_bytes((SHARED_CIFAR10 / "train" / "cat" / "0001.jpg").read_bytes()[:300])
    (root / "empty.png").write_bytes(b"")
    (root / "._cat_0.jpg").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(encode(cifar("cat", 50), "PNG"))  # hidden: ignored, not listed
    shutil.copyfile(root / "cat_0.jpg", root / "copy_of_cat_0.jpg")  # a byte-identical duplicate


def write_csv(path: Path, header: tuple, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def byte_order(names) -> list[str]:
    return sorted(names, key=lambda name: name.encode("utf-8"))


def ok(*args) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own") / "photos"
    make_photos(root)
    add_bad_files(root)
    write_csv(root.parent / "labels.csv", ("path", "label"),
              [(f"{cls}_{i}.{'jpg' if i == 0 else 'png'}", cls) for cls in CLASSES for i in (0, 1)])
    return root


@pytest.fixture(scope="module")
def built(photos) -> Path:
    """The flat folder built once with the labels CSV (tests copy it before changing anything)."""
    out = photos.parent / "pool"
    ok("build-pool", "--images", photos, "--labels", photos.parent / "labels.csv", "--image-size", SIZE,
       "--workers", "1", "--out", out)
    return out


def kept_paths(photos: Path) -> list[str]:
    """The files a build keeps, computed from the folder: image suffixes, not hidden, decodable, first copy."""
    names = [p.relative_to(photos).as_posix() for p in photos.rglob("*") if p.is_file()]
    names = [n for n in names if not Path(n).name.startswith(".") and Path(n).suffix in (".jpg", ".png")]
    return byte_order([n for n in names if Path(n).name not in BAD and n != "copy_of_cat_0.jpg"])


# ---- Building a pool from a folder --------------------------------------------------------------------------------

def test_flat_folder_ids_in_utf8_byte_order_with_samples_csv(photos, built):
    pool = load_pool(built)
    expected = kept_paths(photos)
    assert pool.paths(pool.ids) == expected and pool.ids == list(range(len(expected)))
    samples = read_csv(built / paths.POOL_SAMPLES_CSV)
    assert [row["path"] for row in samples] == expected
    for row in samples:
        data = (photos / row["path"]).read_bytes()
        import hashlib
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        with Image.open(photos / row["path"]) as image:  # width x height as displayed (EXIF turns cat_7 upright)
            width, height = image.size[::-1] if image.getexif().get(0x0112) == 6 else image.size
        assert (int(row["width"]), int(row["height"])) == (width, height)
    labeled = {row["path"]: row["label"] for row in samples if row["label"]}
    assert labeled == {f"{cls}_{i}.{'jpg' if i == 0 else 'png'}": cls for cls in CLASSES for i in (0, 1)}
    assert pool.classes == sorted(CLASSES) and not pool.ground_truth and not pool.has_test_set
    assert pool.image_shape == (3, SIZE, SIZE)
    # The round-0 labeled set is the labels CSV, and a CSV beside it says the same by path.
    data = json.loads((built / paths.POOL_LABELED).read_text())
    assert sorted(pool.paths(data["ids"])) == sorted(labeled)
    beside = read_csv(paths.labeled_csv(built / paths.POOL_LABELED))
    assert {row["path"]: row["label"] for row in beside} == labeled
    assert all(row["source"] == "initial" and row["round"] == "0" for row in beside)


def test_bad_files_skipped_and_listed_duplicates_listed(photos, built):
    skipped = read_csv(built / paths.POOL_SKIPPED_CSV)
    assert sorted(row["path"] for row in skipped) == sorted(BAD)
    reasons = {row["path"]: row["reason"] for row in skipped}
    assert reasons["empty.png"] == "zero-byte file"
    assert "sidecar" in reasons["._cat_0.jpg"]
    assert "corrupt or truncated" in reasons["truncated.jpg"] and "not an image" in reasons["broken.jpg"]
    duplicates = read_csv(built / paths.POOL_DUPLICATES_CSV)
    assert duplicates == [{"path": "copy_of_cat_0.jpg", "duplicate_of": "cat_0.jpg", "split": "pool"}]


def test_summary_line_counts_skipped_files(photos, tmp_path):
    output = ok("build-pool", "--images", photos, "--classes", ",".join(CLASSES), "--image-size", SIZE,
                "--out", tmp_path / "pool")
    listed = len(kept_paths(photos)) + len(BAD) + 1  # + the duplicate
    assert f"skipped {len(BAD)} of {listed} files; see" in " ".join(output.split())


def test_every_mode_gives_the_same_cache_shape_and_the_expected_pixels(tmp_path):
    folder = tmp_path / "modes"
    folder.mkdir()
    for index in range(8):
        name, data = variant("cat", index)
        (folder / name).write_bytes(data)
    for channels in (3, 1):
        out = tmp_path / f"pool{channels}"
        ok("build-pool", "--images", folder, "--classes", "cat,dog", "--image-size", 32, "--resize", "stretch",
           "--channels", channels, "--out", out)
        pool = load_pool(out)
        assert pool.images(pool.ids).shape == (8, channels, 32, 32)
    pool = load_pool(tmp_path / "pool3")
    row = dict(zip(pool.paths(pool.ids), pool.images(pool.ids).numpy()))
    assert (row["cat_2.png"] == np.asarray(cifar("cat", 2).convert("L"))).all()  # gray -> RGB: gray in every channel
    assert (row["cat_6.png"] == np.asarray(cifar("cat", 6).convert("L"))).all()  # 16-bit: / 257 gives the 8 bits back
    upright = np.asarray(cifar("cat", 3)).transpose(2, 0, 1)
    # RGBA on white, by the alpha-blending formula in integers.
    alpha = np.asarray(Image.linear_gradient("L").resize((32, 32))).astype(np.int64)
    blended = (upright.astype(np.int64) * alpha + 255 * (255 - alpha) + 127) // 255
    assert np.abs(row["cat_3.png"].astype(np.int64) - blended).max() <= 1
    palette = Image.open(io.BytesIO(variant("cat", 4)[1]))
    reference = np.asarray(palette.convert("RGBA")).astype(np.int64)
    on_white = (reference[..., :3] * reference[..., 3:] + 255 * (255 - reference[..., 3:]) + 127) // 255
    assert np.abs(row["cat_4.png"].astype(np.int64) - on_white.transpose(2, 0, 1)).max() <= 1
    # EXIF orientation 6: the stored quarter turn is undone (40x32 upright, stretched back to 32x32).
    turned = np.asarray(cifar("cat", 7).resize((40, 32)).resize((32, 32), Image.Resampling.BICUBIC))
    assert (row["cat_7.png"] == turned.transpose(2, 0, 1)).all()
    assert not (row["cat_7.png"] == np.rot90(turned, 1).transpose(2, 0, 1)).all()


def test_resize_modes_crop_pad_stretch(tmp_path):
    """A 64x32 image: left quarter red, right quarter blue, centre green."""
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :16] = (255, 0, 0)
    pixels[:, 16:48] = (0, 255, 0)
    pixels[:, 48:] = (0, 0, 255)
    folder = tmp_path / "wide"
    folder.mkdir()
    Image.fromarray(pixels).save(folder / "wide.png")
    Image.fromarray(pixels[:, ::-1].copy()).save(folder / "wide2.png")
    images = {}
    for mode in ("crop", "pad", "stretch"):
        ok("build-pool", "--images", folder, "--classes", "a,b", "--image-size", 16, "--resize", mode,
           "--out", tmp_path / mode)
        images[mode] = load_pool(tmp_path / mode).images([0]).numpy()[0].transpose(1, 2, 0).astype(int)
    crop, pad, stretch = images["crop"], images["pad"], images["stretch"]
    # crop: the centre 32x32 (all green) scaled by 1/2; the bicubic filter reaches 4 source pixels past its edge,
    # so the outer two columns may take a little red or blue, never much.
    assert (crop[:, 2:14] == (0, 255, 0)).all() and crop[..., 0].max() < 64 and crop[..., 2].max() < 64
    assert (pad[:4] == 0).all() and (pad[-4:] == 0).all()  # 16x8 content centred, black rows above and below
    assert (pad[4:12, 0] == (255, 0, 0)).all() and (pad[4:12, -1] == (0, 0, 255)).all()
    assert (stretch[:, 0] == (255, 0, 0)).all() and (stretch[:, -1] == (0, 0, 255)).all()


def test_one_size_needs_no_image_size_and_mixed_sizes_are_refused(tmp_path):
    folder = tmp_path / "same"
    folder.mkdir()
    for index in range(3):
        shutil.copyfile(SHARED_CIFAR10 / "train" / "cat" / f"{index:04d}.jpg", folder / f"{index}.jpg")
    ok("build-pool", "--images", folder, "--classes", "cat,dog", "--out", tmp_path / "pool")
    pool = load_pool(tmp_path / "pool")
    assert pool.image_shape == (3, 32, 32)
    reference = np.asarray(Image.open(folder / "1.jpg").convert("RGB")).transpose(2, 0, 1)
    assert (pool.images([1]).numpy()[0] == reference).all()  # decoded as is, no resizing
    Image.new("RGB", (53, 37)).save(folder / "odd.png")
    before = snapshot(tmp_path)
    line = refused_line(invoke("build-pool", "--images", folder, "--classes", "cat,dog", "--out", tmp_path / "p2"))
    assert "odd.png" in line and "53x37" in line and "--image-size" in line
    assert snapshot(tmp_path) == before and not (tmp_path / "p2").exists()


def test_strict_refuses_naming_the_first_bad_file(photos, tmp_path):
    before = snapshot(photos.parent)
    line = refused_line(invoke("build-pool", "--images", photos, "--classes", ",".join(CLASSES), "--image-size",
                               SIZE, "--strict", "--out", tmp_path / "pool"))
    assert "broken.jpg" in line and "--strict" in line  # broken.jpg is the first bad file in path order
    assert not (tmp_path / "pool").exists() and snapshot(photos.parent) == before


@pytest.mark.slow
def test_workers_give_the_same_pool_as_one_process(tmp_path):
    folder = tmp_path / "many"
    for cls in CLASSES:  # 75 files: more than two worker tasks
        (folder / cls).mkdir(parents=True)
        for index in range(25):
            shutil.copyfile(SHARED_CIFAR10 / "train" / cls / f"{index:04d}.jpg", folder / cls / f"{index}.jpg")
    (folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    for workers in (1, 2):
        ok("build-pool", "--images", folder, "--classes", ",".join(CLASSES), "--image-size", 24,
           "--workers", workers, "--out", tmp_path / f"w{workers}")
    assert snapshot(tmp_path / "w1") == snapshot(tmp_path / "w2")
    assert len(load_pool(tmp_path / "w2").ids) == 75


# ---- The CSV form, ids, labels ------------------------------------------------------------------------------------

def test_csv_form_ids_identical_in_any_order_and_labels_column(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    names = ["Zebra.jpg", "apple.jpg", "éclair.jpg", "b/inner.jpg", "a b.jpg"]
    for index, name in enumerate(names):
        (folder / name).parent.mkdir(exist_ok=True)
        shutil.copyfile(SHARED_CIFAR10 / "train" / CLASSES[index % 3] / f"{index:04d}.jpg", folder / name)
    rows = [(f"files/{name}", CLASSES[index % 3]) for index, name in enumerate(names)]
    forward = write_csv(tmp_path / "forward.csv", ("path", "label"), rows[:2] + [(p, "") for p, _ in rows[2:]])
    backward = write_csv(tmp_path / "backward.csv", ("label", "path"),
                         [(label, p) for p, label in reversed(rows[:2])] + [("", p) for p, _ in reversed(rows[2:])])
    for name, listing in (("fwd", forward), ("bwd", backward)):
        ok("build-pool", "--images", listing, "--classes", ",".join(CLASSES), "--out", tmp_path / name)
    # Same ids, same cache, same samples and labeled set: the same pool hash (only the recorded source differs).
    fwd, bwd = snapshot(tmp_path / "fwd"), snapshot(tmp_path / "bwd")
    assert {k: v for k, v in fwd.items() if k != paths.POOL_MANIFEST} == \
        {k: v for k, v in bwd.items() if k != paths.POOL_MANIFEST}
    assert load_pool(tmp_path / "fwd").hash == load_pool(tmp_path / "bwd").hash
    pool = load_pool(tmp_path / "fwd")
    assert pool.paths(pool.ids) == byte_order(p for p, _ in rows)  # "Zebra" < "a b" < "apple" < "b/" < "é"
    labeled = json.loads((tmp_path / "fwd" / paths.POOL_LABELED).read_text())
    assert {pool.paths([i])[0]: pool.classes[y] for i, y in zip(labeled["ids"], labeled["labels"])} == dict(rows[:2])
    # Labels given twice (the CSV's label column and --labels) are refused.
    line = refused_line(invoke("build-pool", "--images", forward, "--labels", forward, "--out", tmp_path / "x"))
    assert "--labels" in line and not (tmp_path / "x").exists()


def test_labels_by_class_index_with_classes_file(photos, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("ship\ncat\ndog\nbird\n")  # a class no label shows
    labels = write_csv(tmp_path / "labels.csv", ("path", "label"), [("cat_0.jpg", "1"), ("ship_0.jpg", "ship")])
    ok("build-pool", "--images", photos, "--labels", labels, "--classes", classes, "--image-size", SIZE,
       "--out", tmp_path / "pool")
    pool = load_pool(tmp_path / "pool")
    assert pool.classes == ["ship", "cat", "dog", "bird"]
    labeled = json.loads((tmp_path / "pool" / paths.POOL_LABELED).read_text())
    assert dict(zip(pool.paths(labeled["ids"]), labeled["labels"])) == {"cat_0.jpg": 1, "ship_0.jpg": 0}


# ---- The whole loop on a pool without ground truth ----------------------------------------------------------------

def test_flat_folder_whole_loop_with_answers_keyed_by_path_and_a_grown_folder_keeps_every_label(photos, built,
                                                                                                tmp_path):
    exp = tmp_path / "exp"
    ok("train", "--pool", built, *TRAIN, "--out", exp / "round0.pt")
    ok("query", "--ckpt", exp / "round0.pt", "--strategy", "entropy", "--batch", 5, "--device", "cpu",
       "--out", exp / "query0.json")
    query = json.loads((exp / "query0.json").read_text())
    pool = load_pool(built)
    assert query["selected_paths"] == pool.paths(query["selected"])
    listed = read_csv(paths.query_csv(exp / "query0.json"))
    assert [(int(r["rank"]), int(r["sample_id"]), r["path"]) for r in listed] == \
        [(k, i, p) for k, (i, p) in enumerate(zip(query["selected"], query["selected_paths"]), start=1)]
    assert [float(r["score"]) for r in listed] == pytest.approx(query["scores"])

    ok("export", "--query", exp / "query0.json", "--device", "cpu", "--out", exp / "batch1")
    manifest = read_csv(exp / "batch1" / paths.EXPORT_MANIFEST_CSV)
    assert [row["path"] for row in manifest] == query["selected_paths"]
    for row in manifest:
        stem = Path(row["path"]).stem
        assert row["file"] == f"images/{row['sample_id']}_{stem}.png" and (exp / "batch1" / row["file"]).is_file()
    tasks = json.loads((exp / "batch1" / paths.LABEL_STUDIO_TASKS).read_text())
    assert [task["data"]["path"] for task in tasks] == query["selected_paths"]

    # The annotator answers by path (the class is in the file name), one left blank.
    truth = {p: Path(p).name.split("_")[0] for p in query["selected_paths"]}
    answers = write_csv(exp / "answers.csv", ("path", "label"),
                        [(p, truth[p]) for p in query["selected_paths"][:-1]] + [(query["selected_paths"][-1], "")])
    ok("label", "--query", exp / "query0.json", "--answers", answers, "--out", exp / "labeled1.json")
    labeled1 = json.loads((exp / "labeled1.json").read_text())
    added = dict(zip(labeled1["ids"][6:], labeled1["labels"][6:]))
    assert {pool.paths([i])[0]: pool.classes[y] for i, y in added.items()} == \
        {p: truth[p] for p in query["selected_paths"][:-1]}
    beside = read_csv(paths.labeled_csv(exp / "labeled1.json"))
    assert [(int(r["sample_id"]), r["path"]) for r in beside] == list(zip(labeled1["ids"], pool.paths(labeled1["ids"])))
    assert [r["source"] for r in beside] == ["initial"] * 6 + ["human"] * 4
    ok("train", "--pool", built, "--labeled", exp / "labeled1.json", *TRAIN, "--out", exp / "round1.pt")
    metrics = read_csv(exp / paths.METRICS_CSV)
    assert [int(r["labeled"]) for r in metrics] == [6, 10]

    # New photos arrive: the grown folder rebuilt with --labels <the labeled-set CSV> keeps every label.
    grown = tmp_path / "grown"
    shutil.copytree(photos, grown)
    make_photos(grown, per_class=2, start=10)
    ok("build-pool", "--images", grown, "--labels", paths.labeled_csv(exp / "labeled1.json"), "--image-size", SIZE,
       "--out", tmp_path / "grown_pool")
    regrown = load_pool(tmp_path / "grown_pool")
    assert len(regrown.ids) == len(pool.ids) + 2 * len(CLASSES)
    labeled = json.loads((tmp_path / "grown_pool" / paths.POOL_LABELED).read_text())
    kept = {regrown.paths([i])[0]: regrown.classes[y] for i, y in zip(labeled["ids"], labeled["labels"])}
    assert kept == {row["path"]: row["label"] for row in beside}


def test_first_batch_of_a_pool_without_labels_needs_no_checkpoint(photos, tmp_path):
    out = tmp_path / "pool"
    ok("build-pool", "--images", photos, "--classes", ",".join(CLASSES), "--image-size", SIZE, "--out", out)
    line = refused_line(invoke("train", "--pool", out, *TRAIN, "--out", tmp_path / "r.pt"))
    assert "--strategy random" in line
    ok("query", "--pool", out, "--strategy", "random", "--batch", 6, "--out", tmp_path / "first.json")
    query = json.loads((tmp_path / "first.json").read_text())
    assert query["inputs"]["checkpoint"] is None and len(query["selected"]) == 6
    ok("export", "--query", tmp_path / "first.json", "--out", tmp_path / "batch0")
    manifest = read_csv(tmp_path / "batch0" / paths.EXPORT_MANIFEST_CSV)
    assert all(row["guess_1"] == "" for row in manifest)  # no model, no guesses
    tasks = json.loads((tmp_path / "batch0" / paths.LABEL_STUDIO_TASKS).read_text())
    assert all(task["predictions"] == [] for task in tasks)
    # Answered in Label Studio, tasks keyed by data.path only.
    export = [{"id": k, "data": {"path": task["data"]["path"]},
               "annotations": [{"result": [{"value": {"choices": [task["data"]["path"].split("_")[0]]}}]}]}
              for k, task in enumerate(tasks)]
    (tmp_path / "ls.json").write_text(json.dumps(export))
    ok("label", "--query", tmp_path / "first.json", "--answers", tmp_path / "ls.json", "--out", tmp_path / "l1.json")
    assert len(json.loads((tmp_path / "l1.json").read_text())["ids"]) == 6
    # entropy needs a model.
    line = refused_line(invoke("query", "--pool", out, "--strategy", "entropy", "--batch", 2,
                               "--out", tmp_path / "q2.json"))
    assert "--ckpt" in line and not (tmp_path / "q2.json").exists()


def test_oracle_is_refused_on_a_pool_without_ground_truth(built, tmp_path):
    ok("query", "--pool", built, "--strategy", "random", "--batch", 3, "--out", tmp_path / "q.json")
    before = snapshot(tmp_path)
    line = refused_line(invoke("label", "--query", tmp_path / "q.json", "--out", tmp_path / "l1.json"))
    assert "--answers" in line and "ground truth" in line
    assert snapshot(tmp_path) == before


def test_fmask_run_on_a_folder_of_unlabeled_photos_is_refused_naming_answers(photos, tmp_path):
    line = refused_line(invoke("run", "--dataset", f"folder:{photos}", "--strategies", "random", "--rounds", 1,
                               "--device", "cpu", "--out", tmp_path / "res"))
    assert "--answers" in line and "--images" in line
    assert not (tmp_path / "res" / "seed0" / "pool" / paths.POOL_MANIFEST).exists()


def test_training_without_a_test_set_and_with_val_fraction(built, tmp_path):
    ok("train", "--pool", built, *TRAIN, "--out", tmp_path / "none.pt")
    state = torch.load(tmp_path / "none.pt", weights_only=True)
    assert state["metrics"]["accuracy"] is None and state["metrics"]["labeled"] == 6
    row = read_csv(tmp_path / paths.METRICS_CSV)[0]
    assert row["accuracy"] == "" and row["evaluated_on"] == "none" and row["labeled"] == "6"
    plotted = invoke("plot", tmp_path)
    assert plotted.exit_code == 0 and "no test set" in " ".join(plotted.output.split())

    # --val-fraction: a stratified part of the labeled set is held out and accuracy measured on it.
    labeled = json.loads((built / paths.POOL_LABELED).read_text())
    ok("train", "--pool", built, *TRAIN, "--val-fraction", 0.5, "--out", tmp_path / "val.pt")
    metrics = torch.load(tmp_path / "val.pt", weights_only=True)["metrics"]
    per_class = np.bincount(labeled["labels"])
    held = sum(min(int(np.floor(0.5 * n + 0.5)), n - 1) for n in per_class)
    assert metrics["evaluated_on"] == "validation" and metrics["validation_samples"] == held == 3
    assert metrics["trained_on"] == 3 and metrics["accuracy"] is not None
    model, pool = load_model(tmp_path / "val.pt"), load_pool(built)
    train_ids, val_ids = validation_split(labeled["ids"], labeled["labels"], 0.5, 0)
    label_of = dict(zip(labeled["ids"], labeled["labels"]))
    with torch.no_grad():
        predicted = model(pool.inputs(val_ids)).argmax(1).tolist()
    assert metrics["accuracy"] == pytest.approx(np.mean([p == label_of[i] for p, i in zip(predicted, val_ids)]))


@pytest.mark.parametrize("fraction,counts", [(0.2, [10, 3, 1, 7]), (0.5, [2, 2, 5]), (0.34, [3, 3, 3])])
def test_validation_split_is_stratified_and_a_partition(fraction, counts):
    labels = np.repeat(np.arange(len(counts)), counts)
    ids = np.random.default_rng(1).permutation(1000)[: len(labels)]
    train_ids, val_ids = validation_split(ids.tolist(), labels.tolist(), fraction, seed=3)
    assert sorted(train_ids + val_ids) == sorted(ids.tolist()) and not set(train_ids) & set(val_ids)
    label_of = dict(zip(ids.tolist(), labels.tolist()))
    for cls, n in enumerate(counts):
        expected = min(int(np.floor(fraction * n + 0.5)), n - 1)
        assert sum(label_of[i] == cls for i in val_ids) == expected
    assert validation_split(ids.tolist(), labels.tolist(), fraction, seed=3) == (train_ids, val_ids)


def test_test_folder_evaluates_and_its_copies_of_pool_images_are_listed(photos, tmp_path):
    test = tmp_path / "test"
    for cls in CLASSES:
        (test / cls).mkdir(parents=True)
        for index in range(3):
            shutil.copyfile(SHARED_CIFAR10 / "test" / cls / f"{index:04d}.jpg", test / cls / f"{index}.jpg")
    shutil.copyfile(photos / "cat_0.jpg", test / "cat" / "leak.jpg")  # the same bytes as a pool image
    ok("build-pool", "--images", photos, "--labels", photos.parent / "labels.csv", "--test", test,
       "--image-size", SIZE, "--out", tmp_path / "pool")
    pool = load_pool(tmp_path / "pool")
    assert pool.test_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # cat/0..2, dog/0..2, ship/0..2
    assert {"path": "cat/leak.jpg", "duplicate_of": "cat_0.jpg", "split": "test (also in the pool)"} in \
        read_csv(tmp_path / "pool" / paths.POOL_DUPLICATES_CSV)
    ok("train", "--pool", tmp_path / "pool", *TRAIN, "--out", tmp_path / "r.pt")
    metrics = torch.load(tmp_path / "r.pt", weights_only=True)["metrics"]
    assert metrics["evaluated_on"] == "test" and metrics["test_samples"] == 9


def test_predict_every_pool_sample_and_every_file_of_a_folder(photos, built, tmp_path):
    ok("train", "--pool", built, *TRAIN, "--out", tmp_path / "r.pt")
    model, pool = load_model(tmp_path / "r.pt"), load_pool(built)
    with torch.no_grad():
        probs = torch.softmax(model(pool.inputs(pool.ids)), 1)
    ok("predict", "--ckpt", tmp_path / "r.pt", "--out", tmp_path / "preds.csv")
    rows = read_csv(tmp_path / "preds.csv")
    assert [r["path"] for r in rows] == pool.paths(pool.ids)
    assert [r["predicted"] for r in rows] == [pool.classes[i] for i in probs.argmax(1).tolist()]
    assert [float(r["probability"]) for r in rows] == pytest.approx(probs.max(1).values.tolist(), abs=1e-4)
    # The same files decoded from the folder get the same predictions; bad files are listed beside.
    ok("predict", "--ckpt", tmp_path / "r.pt", "--images", photos, "--out", tmp_path / "files.csv")
    by_path = {r["path"]: r for r in read_csv(tmp_path / "files.csv")}
    assert {p: by_path[p]["predicted"] for p in pool.paths(pool.ids)} == {r["path"]: r["predicted"] for r in rows}
    assert by_path["copy_of_cat_0.jpg"]["predicted"] == by_path["cat_0.jpg"]["predicted"]
    assert sorted(r["path"] for r in read_csv(paths.skipped_csv_beside(tmp_path / "files.csv"))) == sorted(BAD)


# ---- Refusals: one line, exit 2, nothing written --------------------------------------------------------------------

def _labels(tmp, text):
    path = tmp / "l.csv"
    path.write_text(text)
    return path


REFUSALS = [
    ("images-and-dataset", lambda p, t: ["--dataset", "digits"], "--dataset"),
    ("images-and-initial", lambda p, t: ["--initial", "5"], "--initial"),
    ("labels-unknown-path", lambda p, t: ["--labels", _labels(t, "path,label\nnope.jpg,cat\n")], "nope.jpg"),
    ("labels-not-a-class", lambda p, t: ["--classes", "cat,dog", "--labels", _labels(t, "path,label\ncat_0.jpg,"
                                                                                     "giraffe\n")], "giraffe"),
    ("labels-conflict", lambda p, t: ["--labels", _labels(t, "path,label\ncat_0.jpg,cat\ncat_0.jpg,dog\n")],
     "one label per path"),
    ("labels-no-header", lambda p, t: ["--labels", _labels(t, "cat_0.jpg,cat\n")], "header"),
    ("copies-labeled-differently", lambda p, t: ["--image-size", "8", "--labels", _labels(
        t, "path,label\ncat_0.jpg,cat\ncopy_of_cat_0.jpg,dog\n")], "same image"),
    ("no-labels-no-classes", lambda p, t: [], "--classes"),
    ("one-class", lambda p, t: ["--classes", "cat"], "two"),
    ("resize-without-size", lambda p, t: ["--classes", "cat,dog", "--resize", "pad"], "--image-size"),
    ("size-zero", lambda p, t: ["--classes", "cat,dog", "--image-size", "0"], "--image-size"),
    ("resize-unknown", lambda p, t: ["--classes", "cat,dog", "--image-size", "8", "--resize", "zoom"], "--resize"),
    ("channels-two", lambda p, t: ["--classes", "cat,dog", "--image-size", "8", "--channels", "2"], "--channels"),
    ("workers-zero", lambda p, t: ["--classes", "cat,dog", "--image-size", "8", "--workers", "0"], "--workers"),
    ("test-missing", lambda p, t: ["--classes", "cat,dog", "--image-size", "8", "--test", t / "none"], "--test"),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_build_pool_refusals(case, photos, tmp_path):
    _, extra, expected = case
    args = ["build-pool", "--images", photos, "--out", tmp_path / "pool", *extra(photos, tmp_path)]
    before, shared = snapshot(tmp_path), snapshot(photos.parent)
    line = refused_line(invoke(*args))
    assert expected.lower() in line.lower(), line
    assert snapshot(tmp_path) == before and snapshot(photos.parent) == shared


def test_other_refusals(photos, built, tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    cases = [
        (["build-pool", "--images", empty, "--classes", "a,b", "--out", tmp_path / "p"], "no image files"),
        (["build-pool", "--images", tmp_path / "missing", "--classes", "a,b", "--out", tmp_path / "p"], "--images"),
        (["build-pool", "--dataset", "digits", "--labels", photos.parent / "labels.csv", "--out", tmp_path / "p"],
         "--images"),
        (["query", "--strategy", "random", "--batch", "2", "--out", tmp_path / "q.json"], "--pool"),
        (["predict", "--ckpt", tmp_path / "none.pt", "--pool", built, "--images", photos,
          "--out", tmp_path / "p.csv"], "not both"),
    ]
    ok("query", "--pool", built, "--strategy", "random", "--batch", 2, "--out", tmp_path / "sel.json")
    selected = json.loads((tmp_path / "sel.json").read_text())
    pool = load_pool(built)
    other = next(p for p in pool.paths(pool.ids) if p not in selected["selected_paths"])
    cases += [
        (["label", "--query", tmp_path / "sel.json", "--out", tmp_path / "l.json", "--answers",
          write_csv(tmp_path / "a1.csv", ("path", "label"), [("nowhere.jpg", "cat")])], "not in the pool"),
        (["label", "--query", tmp_path / "sel.json", "--out", tmp_path / "l.json", "--answers",
          write_csv(tmp_path / "a2.csv", ("path", "label"), [(other, "cat")])], "not in the query"),
        (["label", "--query", tmp_path / "sel.json", "--out", tmp_path / "l.json", "--answers",
          write_csv(tmp_path / "a3.csv", ("sample_id", "path", "label"),
                    [(selected["selected"][0], selected["selected_paths"][1], "cat")])], "must agree"),
    ]
    for args, expected in cases:
        before = snapshot(tmp_path)
        line = refused_line(invoke(*args))
        assert expected.lower() in line.lower(), (args, line)
        assert snapshot(tmp_path) == before, args


# ---- The cache itself ----------------------------------------------------------------------------------------------

def test_keep_rows_compacts_in_place_like_fancy_indexing(tmp_path):
    rng = np.random.default_rng(4)
    data = rng.integers(0, 256, size=(3000, 3, 4, 5), dtype=np.uint8)
    rows = create_rows(tmp_path / "a.npy", data.shape)
    rows[:] = data
    rows.flush()
    del rows
    keep = np.sort(rng.choice(3000, size=1700, replace=False))
    keep_rows(tmp_path / "a.npy", keep)
    assert (np.load(tmp_path / "a.npy") == data[keep]).all()
    assert (tmp_path / "a.npy").stat().st_size == 128 + data[keep].nbytes


def test_pixel_stats_match_numpy(tmp_path):
    images = np.random.default_rng(5).integers(0, 256, size=(37, 3, 9, 7), dtype=np.uint8)
    stats = PixelStats(3)
    for start in range(0, 37, 10):
        stats.add_images(images[start:start + 10])
    mean, std = stats.mean_std()
    pixels = images.astype(np.float64) / 255.0
    assert mean == pytest.approx(pixels.mean(axis=(0, 2, 3)).tolist(), rel=1e-12)
    assert std == pytest.approx(pixels.std(axis=(0, 2, 3)).tolist(), rel=1e-12)
