"""Human in the loop: `fmask export` writes a query's batch for annotators, `fmask label --answers` reads their CSV
or Label Studio JSON export back; bad answer files and accidental mixing of label sources are refused."""

from __future__ import annotations

import csv
import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from fmask.core.hashing import seal_json
from fmask import load_model, load_pool
from fmask.core import paths
from fmask.core.errors import FmaskError
from fmask.label import export as export_module
from fmask.label.answers import read_answers
from fmask.label.export import CAPTION_HEIGHT, PAD, TILE_TARGET, contact_sheet, image_url, run_export
from tests.conftest import invoke, refused_line, snapshot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_query(run, name="q.json", batch=6, labeled=None):
    args = ["query", "--ckpt", run / "round0.pt", "--strategy", "random", "--batch", batch, "--device", "cpu",
            "--out", run / name]
    result = invoke(*args, *(["--labeled", labeled] if labeled else []))
    assert result.exit_code == 0, result.output
    return run / name, json.loads((run / name).read_text())["selected"]


def export(run, query, name="batch", *extra):
    result = invoke("export", "--query", query, "--out", run / name, "--device", "cpu", *extra)
    assert result.exit_code == 0, result.output
    return run / name


def read_manifest(batch):
    with open(batch / paths.EXPORT_MANIFEST_CSV, newline="") as handle:
        return list(csv.DictReader(handle))


def write_manifest(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def grid_size(count, height, width, columns):
    """The contact sheet's size, computed from the documented grid: whole-number upscale, PAD, CAPTION_HEIGHT."""
    scale = max(1, math.ceil(TILE_TARGET / max(height, width)))
    rows = math.ceil(count / columns)
    return PAD + columns * (width * scale + PAD), PAD + rows * (height * scale + CAPTION_HEIGHT + PAD)


def ls_annotation(*choices, cancelled=False):
    """One Label Studio annotation as its JSON export writes it (a Choices result per class list given)."""
    result = [{"id": f"r{i}", "from_name": "label", "to_name": "image", "type": "choices", "origin": "manual",
               "value": {"choices": list(c)}} for i, c in enumerate(choices)]
    return {"id": 1, "completed_by": 1, "result": result, "was_cancelled": cancelled, "ground_truth": False}


def ls_task(sample_id, *annotations, task_id=1):
    return {"id": task_id, "data": {"image": f"/data/local-files/?d=batch/images/{sample_id}.png",
                                    "sample_id": sample_id}, "annotations": list(annotations), "predictions": []}


def test_export_writes_images_manifest_sheet_and_label_studio_files(run_dir):
    query, ids = make_query(run_dir)
    batch = export(run_dir, query)
    pool = load_pool(run_dir / "pool")

    for sample_id in ids:  # one PNG per id, the pool's exact pixels (8x8 grayscale)
        png = batch / paths.EXPORT_IMAGES_DIR / f"{sample_id}.png"
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(png) as image:
            assert image.mode == "L" and image.size == (8, 8)
            assert torch.equal(torch.from_numpy(np.array(image)), pool.images([sample_id])[0, 0])

    probs = torch.softmax(load_model(run_dir / "round0.pt")(pool.inputs(ids)), dim=1)
    top_probs, top_classes = torch.topk(probs, 3, dim=1)
    rows = read_manifest(batch)
    assert [int(r["sample_id"]) for r in rows] == ids  # selection order
    for row, p, c in zip(rows, top_probs.tolist(), top_classes.tolist()):
        assert (batch / row["file"]).is_file() and row["label"] == ""
        assert [row[f"guess_{k}"] for k in (1, 2, 3)] == [pool.classes[i] for i in c]
        assert [float(row[f"prob_{k}"]) for k in (1, 2, 3)] == pytest.approx(p, abs=6e-5)

    sheet_bytes = (batch / paths.CONTACT_SHEET_PNG).read_bytes()
    assert sheet_bytes[:8] == PNG_SIGNATURE
    with Image.open(batch / paths.CONTACT_SHEET_PNG) as sheet:
        assert sheet.size == grid_size(6, 8, 8, columns=3)  # default: about square, ceil(sqrt(6)) columns
        first_tile = sheet.convert("L").crop((PAD, PAD, PAD + 64, PAD + 64))
        expected = pool.images([ids[0]])[0, 0].repeat_interleave(8, 0).repeat_interleave(8, 1)
        assert torch.equal(torch.from_numpy(np.array(first_tile)), expected)

    config = ET.fromstring((batch / paths.LABEL_STUDIO_CONFIG).read_text())
    choices, image_tag = config.find("Choices"), config.find("Image")
    assert [c.get("value") for c in choices.findall("Choice")] == pool.classes
    assert choices.get("toName") == image_tag.get("name") and image_tag.get("value") == "$image"
    tasks = json.loads((batch / paths.LABEL_STUDIO_TASKS).read_text())
    assert [t["data"]["sample_id"] for t in tasks] == ids
    for task, sample_id, c in zip(tasks, ids, top_classes.tolist()):
        assert task["data"]["image"] == f"/data/local-files/?d=batch/images/{sample_id}.png"
        result = task["predictions"][0]["result"][0]
        assert result["from_name"] == choices.get("name") and result["to_name"] == image_tag.get("name")
        assert result["value"]["choices"] == [pool.classes[c[0]]]
    info = json.loads((batch / paths.EXPORT_INFO).read_text())
    assert info["kind"] == "export" and info["selected"] == ids and info["checkpoint_sha256"] == \
        json.loads(query.read_text())["inputs"]["checkpoint"]


def test_contact_sheet_columns_option_sets_the_grid(run_dir):
    query, _ = make_query(run_dir, batch=7)
    batch = export(run_dir, query, "batch", "--columns", "4")
    with Image.open(batch / paths.CONTACT_SHEET_PNG) as sheet:
        assert sheet.size == grid_size(7, 8, 8, columns=4) == (4 + 4 * 68, 4 + 2 * 82)


def test_contact_sheet_rgb_tiles_upscaled_nearest_with_ids_under_them():
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sheet = contact_sheet(images, [10, 11, 12, 13, 41234], columns=2)
    assert sheet.mode == "RGB" and sheet.size == grid_size(5, 32, 32, columns=2) == (4 + 2 * 68, 4 + 3 * 82)
    pixels = torch.from_numpy(np.array(sheet)).permute(2, 0, 1)  # (3, H, W)
    x, y = PAD + 68, PAD + 82  # position 3: second row, second column
    assert torch.equal(pixels[:, y:y + 64, x:x + 64], images[3].repeat_interleave(2, 1).repeat_interleave(2, 2))
    caption = pixels[:, y + 64:y + 64 + CAPTION_HEIGHT, x:x + 64]
    assert (caption < 128).any()  # the id is drawn under the tile
    assert (pixels[:, :PAD, :] == 255).all()  # the border stays white
    big = contact_sheet(torch.zeros(2, 1, 100, 80, dtype=torch.uint8), [1, 2])
    assert big.size == grid_size(2, 100, 80, columns=2) == (4 + 2 * 84, 4 + 118)  # no upscale past TILE_TARGET


def test_export_then_filled_in_manifest_csv_labels_by_name(run_dir):
    query, ids = make_query(run_dir)
    batch = export(run_dir, query)
    rows = read_manifest(batch)
    for row, name in zip(rows[:4], ["3", "7", "7", "0"]):  # two rows left blank: unanswered
        row["label"] = name
    answers = write_manifest(run_dir / "answers.csv", rows)
    result = invoke("label", "--query", query, "--answers", answers, "--out", run_dir / "l1.json")
    assert result.exit_code == 0, result.output
    labeled = json.loads((run_dir / "l1.json").read_text())
    assert labeled["ids"][-4:] == ids[:4] and labeled["labels"][-4:] == [3, 7, 7, 0]
    assert labeled["sources"][-4:] == ["human"] * 4 and len(labeled["ids"]) == 20 + 4
    assert "stay unlabeled" in result.output and str(ids[4]) in result.output and str(ids[5]) in result.output


def test_export_then_label_studio_json_export_round_trip(run_dir):
    query, ids = make_query(run_dir)
    batch = export(run_dir, query)
    classes = load_pool(run_dir / "pool").classes
    tasks = json.loads((batch / paths.LABEL_STUDIO_TASKS).read_text())
    # Answer with a class other than the model's guess, so predictions read as answers would show.
    wanted = {}
    for number, task in enumerate(tasks, start=1):
        task["id"] = 100 + number
        guess = classes.index(task["predictions"][0]["result"][0]["value"]["choices"][0])
        wanted[task["data"]["sample_id"]] = (guess + 1) % len(classes)
    answered = ids[:4]
    for task in tasks[:4]:
        name = classes[wanted[task["data"]["sample_id"]]]
        task["annotations"] = [ls_annotation([name])]
    tasks[0]["annotations"].append(ls_annotation([classes[wanted[ids[0]]]]))  # a second annotator agrees
    tasks[1]["annotations"][0]["result"].append({"from_name": "note", "to_name": "image", "type": "textarea",
                                                 "value": {"text": ["blurry"]}})  # not a class: ignored
    tasks[4]["annotations"] = [ls_annotation(["1"], cancelled=True)]  # skipped by the annotator
    tasks[5]["annotations"] = []
    export_file = run_dir / "project-1-at-2024.json"
    export_file.write_text(json.dumps(tasks))

    result = invoke("label", "--query", query, "--answers", export_file, "--out", run_dir / "l1.json")
    assert result.exit_code == 0, result.output
    labeled = json.loads((run_dir / "l1.json").read_text())
    assert labeled["ids"][-4:] == answered and labeled["labels"][-4:] == [wanted[i] for i in answered]
    assert labeled["sources"][-4:] == ["human"] * 4
    assert str(ids[4]) in result.output and str(ids[5]) in result.output


def csv_answers(text):
    return lambda ids: ("answers.csv", text.format(a=ids[0], b=ids[1]).encode())


def ls_answers(tasks):
    return lambda ids: ("export.json", json.dumps(tasks(ids)).encode())


# Each case: (id, function(selected ids) -> (file name, bytes), a word the one-line error must contain)
BAD_ANSWERS = [
    ("csv-unclosed-quote", csv_answers('sample_id,label\n"{a},3\n'), "well-formed"),
    ("csv-ragged-row", csv_answers("sample_id,label\n{a},3,extra\n"), "fields"),
    ("csv-not-utf8", lambda ids: ("answers.csv", b"sample_id,label\n\xff\xfe,3\n"), "UTF-8"),
    ("csv-missing-header", csv_answers("{a},3\n{b},4\n"), "header"),
    ("csv-empty", csv_answers(""), "empty"),
    ("csv-non-integer-id", csv_answers("sample_id,label\nabc,3\n"), "not an integer"),
    ("csv-unknown-class", csv_answers("sample_id,label\n{a},giraffe\n"), "unknown label"),
    ("csv-class-index-out-of-range", csv_answers("sample_id,label\n{a},10\n"), "unknown label"),
    ("csv-id-not-in-query", csv_answers("sample_id,label\n999999,3\n"), "not in the query"),
    ("csv-blank-label-of-id-not-in-query", csv_answers("sample_id,label\n{a},3\n999999,\n"), "not in the query"),
    ("csv-conflicting-duplicates", csv_answers("sample_id,label\n{a},1\n{b},4\n{a},2\n"), "conflicting"),
    ("csv-no-answers", csv_answers("sample_id,label\n{a},\n"), "none of the queried"),
    ("ls-not-a-list", lambda ids: ("export.json", b'{"data": {"sample_id": 1}}'), "list of tasks"),
    ("ls-broken-json", lambda ids: ("export.json", b'[{"data": {"sample_id": '), "not valid JSON"),
    ("ls-task-not-an-object", ls_answers(lambda ids: ["task"]), "not an object"),
    ("ls-task-without-sample-id", ls_answers(lambda ids: [{"id": 7, "data": {"image": "x.png"},
                                                           "annotations": [ls_annotation(["3"])]}]), "sample_id"),
    ("ls-json-min-export", ls_answers(lambda ids: [{"image": "x.png", "sample_id": ids[0], "label": "3"}]),
     "sample_id"),
    ("ls-choice-not-a-class", ls_answers(lambda ids: [ls_task(ids[0], ls_annotation(["giraffe"]))]), "not a class"),
    ("ls-two-classes-in-one-answer", ls_answers(lambda ids: [ls_task(ids[0], ls_annotation(["1", "2"]))]),
     "exactly one"),
    ("ls-annotators-disagree", ls_answers(lambda ids: [ls_task(ids[0], ls_annotation(["1"]), ls_annotation(["2"]))]),
     "conflicting"),
    ("ls-duplicate-tasks-disagree", ls_answers(lambda ids: [ls_task(ids[0], ls_annotation(["1"])),
                                                            ls_task(ids[0], ls_annotation(["2"]), task_id=2)]),
     "conflicting"),
    ("ls-id-not-in-query", ls_answers(lambda ids: [ls_task(999999, ls_annotation(["1"]))]), "not in the query"),
    ("ls-non-integer-id", ls_answers(lambda ids: [ls_task("abc", ls_annotation(["1"]))]), "not an integer"),
    ("ls-nothing-annotated", ls_answers(lambda ids: [ls_task(ids[0]), ls_task(ids[1], ls_annotation(["1"],
                                                                                                      cancelled=True))]),
     "none of the queried"),
]


@pytest.mark.parametrize("case", BAD_ANSWERS, ids=[c[0] for c in BAD_ANSWERS])
def test_malformed_answers_refused_exit_2_nothing_written(case, run_dir, tiny_run):
    _, make_file, expected = case
    query, ids = make_query(run_dir, batch=3)
    name, content = make_file(ids)
    (run_dir / name).write_bytes(content)
    before, shared_before = snapshot(run_dir), snapshot(tiny_run)
    line = refused_line(invoke("label", "--query", query, "--answers", run_dir / name, "--out", run_dir / "l1.json"))
    assert expected.lower() in line.lower(), line
    assert snapshot(run_dir) == before and snapshot(tiny_run) == shared_before


def test_answers_reader_accepts_spreadsheet_csv_and_sniffs_label_studio(tmp_path):
    classes = ["cat", "dog", "T-shirt/top"]
    spreadsheet = tmp_path / "answers.csv"  # Excel: byte-order mark, CRLF, reordered and extra columns
    spreadsheet.write_bytes("\ufeffnote,Label,Sample_ID\r\nx,Dog,5\r\n,,6\r\ny,t-shirt/top,7\r\nz,0,8\r\n\r\n"
                            .encode("utf-8"))
    assert read_answers(spreadsheet, classes, {5, 6, 7, 8}) == {5: 1, 7: 2, 8: 0}
    no_suffix = tmp_path / "export"  # a Label Studio export saved without .json
    no_suffix.write_text(json.dumps([ls_task(5, ls_annotation(["dog"])), ls_task("6", ls_annotation(["cat"]))]))
    assert read_answers(no_suffix, classes, {5, 6}) == {5: 1, 6: 0}
    ambiguous = tmp_path / "ambiguous.csv"
    ambiguous.write_text("sample_id,label\n5,DOG\n")
    with pytest.raises(FmaskError, match="unknown label"):  # case folding only when it is unambiguous
        read_answers(ambiguous, ["dog", "Dog"], {5})


def test_mixed_label_sources_refused_unless_allowed(run_dir, tiny_run):
    # Round 1 human, round 2 without --answers: refused; human again is fine; the flag allows oracle.
    query1, ids1 = make_query(run_dir, "q1.json", batch=3)
    answers = run_dir / "answers.csv"
    answers.write_text("sample_id,label\n" + "".join(f"{i},2\n" for i in ids1))
    assert invoke("label", "--query", query1, "--answers", answers, "--out", run_dir / "l1.json").exit_code == 0
    query2, ids2 = make_query(run_dir, "q2.json", batch=3, labeled=run_dir / "l1.json")
    before = snapshot(run_dir)
    refused = invoke("label", "--query", query2, "--out", run_dir / "l2.json")
    assert refused.exit_code == 2 and snapshot(run_dir) == before
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "human labels" in lines[0] and "--allow-mixed-sources" in lines[0], refused.stderr
    answers2 = run_dir / "answers2.csv"
    answers2.write_text("sample_id,label\n" + "".join(f"{i},4\n" for i in ids2))
    human = invoke("label", "--query", query2, "--answers", answers2, "--out", run_dir / "l2h.json")
    assert human.exit_code == 0, human.output
    allowed = invoke("label", "--query", query2, "--out", run_dir / "l2.json", "--allow-mixed-sources")
    assert allowed.exit_code == 0, allowed.output
    sources = json.loads((run_dir / "l2.json").read_text())["sources"]
    assert sources == ["initial"] * 20 + ["human"] * 3 + ["oracle"] * 3

    # The reverse: oracle rounds, then human answers.
    assert invoke("label", "--query", query1, "--out", run_dir / "o1.json").exit_code == 0
    query3, ids3 = make_query(run_dir, "q3.json", batch=3, labeled=run_dir / "o1.json")
    answers3 = run_dir / "answers3.csv"
    answers3.write_text("sample_id,label\n" + "".join(f"{i},1\n" for i in ids3))
    before = snapshot(run_dir)
    refused = invoke("label", "--query", query3, "--answers", answers3, "--out", run_dir / "o2.json")
    assert refused.exit_code == 2 and snapshot(run_dir) == before
    assert "oracle labels" in refused.stderr and "--allow-mixed-sources" in refused.stderr
    allowed = invoke("label", "--query", query3, "--answers", answers3, "--out", run_dir / "o2.json",
                     "--allow-mixed-sources")
    assert allowed.exit_code == 0, allowed.output
    assert json.loads((run_dir / "o2.json").read_text())["sources"][-6:] == ["oracle"] * 3 + ["human"] * 3


def other_checkpoint_query(run):
    query, _ = make_query(run)
    data = json.loads(query.read_text())
    data["inputs"]["checkpoint"] = "0" * 64
    query.write_text(json.dumps(seal_json(data)))  # resealed, so the checkpoint check itself must refuse it
    return query


def stray_directory(run):
    (run / "batch").mkdir()
    (run / "batch" / "notes.txt").write_text("mine")
    return run / "batch"


# Each case: (id, function(run) -> extra argv after `export --query Q --out RUN/batch`, word in the error)
BAD_EXPORTS = [
    ("out-not-empty", lambda r: stray_directory(r) and [], "--force"),
    ("force-on-a-directory-that-is-no-export", lambda r: stray_directory(r) and ["--force"], "not an fmask export"),
    ("out-is-a-file", lambda r: (r / "batch").write_text("x") and [], "is a file"),
    ("image-root-and-url-prefix", lambda r: ["--image-root", "b", "--url-prefix", "http://h/b"], "not both"),
    ("absolute-image-root", lambda r: ["--image-root", "/srv/b"], "relative"),
    ("columns-zero", lambda r: ["--columns", "0"], "--columns"),
    ("checkpoint-hash-differs", lambda r: ["--query", other_checkpoint_query(r)], "is not the one query"),
    ("missing-query", lambda r: ["--query", r / "none.json"], "query"),
]


@pytest.mark.parametrize("case", BAD_EXPORTS, ids=[c[0] for c in BAD_EXPORTS])
def test_bad_export_refused_exit_2_nothing_written(case, run_dir, tiny_run):
    _, make_args, expected = case
    query, _ = make_query(run_dir, "base.json", batch=3)
    extra = make_args(run_dir)
    before, shared_before = snapshot(run_dir), snapshot(tiny_run)
    names_before = sorted(p.name for p in run_dir.iterdir())
    line = refused_line(invoke("export", "--query", query, "--out", run_dir / "batch", "--device", "cpu", *extra))
    assert expected.lower() in line.lower(), line
    assert snapshot(run_dir) == before and snapshot(tiny_run) == shared_before
    assert sorted(p.name for p in run_dir.iterdir()) == names_before  # no directory created either


def test_force_replaces_an_earlier_export_and_url_prefix_sets_image_urls(run_dir):
    query, ids = make_query(run_dir)
    batch = export(run_dir, query)
    (batch / "stale.txt").write_text("from an earlier export")
    assert invoke("export", "--query", query, "--out", batch, "--device", "cpu").exit_code == 2
    export(run_dir, query, "batch", "--force", "--url-prefix", "http://annotate.local:8000/batch1/")
    assert not (batch / "stale.txt").exists()
    tasks = json.loads((batch / paths.LABEL_STUDIO_TASKS).read_text())
    assert [t["data"]["image"] for t in tasks] == [f"http://annotate.local:8000/batch1/images/{i}.png" for i in ids]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".batch.")]  # no temporary directories left
    assert image_url("images/5.png", image_root="exp/batch 1") == "/data/local-files/?d=exp/batch%201/images/5.png"
    assert image_url("images/5.png", image_root="") == "/data/local-files/?d=images/5.png"


def test_failed_export_leaves_the_earlier_export_and_no_temporary_files(run_dir, monkeypatch):
    query, _ = make_query(run_dir)
    batch = export(run_dir, query)
    before = snapshot(batch)

    def broken_sheet(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "contact_sheet", broken_sheet)
    with pytest.raises(FmaskError, match="No space left"):
        run_export(query=query, out=batch, device="cpu", force=True)
    with pytest.raises(FmaskError, match="No space left"):
        run_export(query=query, out=run_dir / "fresh", device="cpu")
    assert snapshot(batch) == before and not (run_dir / "fresh").exists()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]
