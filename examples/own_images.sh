#!/usr/bin/env bash
# Active learning on your own photos: a folder of images (any sizes and modes, no class folders) and a CSV that
# labels a few of them. The loop: build-pool, train, query, export, answers, label, train, ..., predict, plot.
#
#   bash examples/own_images.sh PHOTOS_DIR LABELS_CSV [EXP_DIR]   # your photos; you answer each batch
#   bash examples/own_images.sh --demo [EXP_DIR]                  # a demo folder made from ../shared CIFAR-10
#
# Answers: with your own photos the script stops after each export and says which file to fill in (the label
# column of manifest.csv); run the same command again once it is filled in: every step skips what is done.
# In the demo the class is the file name's prefix (cat_0007.png -> cat), standing in for the person.
# Environment: CLASSES (a,b,c; default: the names the labels use), TEST (a folder of <class>/ subfolders or a
# path,label CSV), IMAGE_SIZE, BATCH, ROUNDS, STRATEGY, MODEL, EPOCHS, VAL_FRACTION (used without TEST), DEVICE,
# FMASK (the command to run), PYTHON (a Python with Pillow, for the demo folder and its stand-in annotator).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
FMASK=${FMASK:-fmask}
PYTHON=${PYTHON:-python3}
IMAGE_SIZE=${IMAGE_SIZE:-32}
BATCH=${BATCH:-100}
ROUNDS=${ROUNDS:-2}
STRATEGY=${STRATEGY:-entropy}
MODEL=${MODEL:-cnn}
EPOCHS=${EPOCHS:-15}
VAL_FRACTION=${VAL_FRACTION:-0.2}
DEVICE=${DEVICE:-auto}

if [ "${1:-}" = "--demo" ]; then
    EXP=${2:-exp/own_images}
    PHOTOS="$EXP/photos"
    LABELS="$EXP/labels.csv"
    TEST=${TEST:-$EXP/test}
    ANSWERS=filename
    # 600 photos of 10 classes re-encoded at mixed sizes and modes (JPEG, PNG, grayscale, RGBA), 5 labeled per
    # class; a test folder of 50 per class. Made once.
    "$PYTHON" - "$HERE/../../shared/datasets/cifar10" "$PHOTOS" "$LABELS" "$TEST" <<'EOF'
import csv, sys
from pathlib import Path
from PIL import Image

source, photos, labels, test = (Path(p) for p in sys.argv[1:])
if not (photos / ".complete").exists():
    photos.mkdir(parents=True, exist_ok=True)
    rows = []
    for cls in sorted(p.name for p in (source / "train").iterdir()):
        for index in range(60):
            image = Image.open(source / "train" / cls / f"{index:04d}.jpg").convert("RGB")
            side = (32, 48, 64, 40)[index % 4]
            image = image.resize((side, side + 8 * (index % 3)))
            if index % 5 == 3:
                image = image.convert("L")
            elif index % 5 == 4:
                image = image.convert("RGBA")
            name = f"{cls}_{index:04d}" + (".jpg" if index % 2 and image.mode != "RGBA" else ".png")
            image.save(photos / name)
            if index < 5:
                rows.append((name, cls))
        for index in range(50):
            (test / cls).mkdir(parents=True, exist_ok=True)
            Image.open(source / "test" / cls / f"{index:04d}.jpg").save(test / cls / f"{index:04d}.png")
    with open(labels, "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *rows])
    (photos / ".complete").touch()
EOF
else
    [ $# -ge 2 ] || { echo "usage: $0 PHOTOS_DIR LABELS_CSV [EXP_DIR] | $0 --demo [EXP_DIR]" >&2; exit 2; }
    PHOTOS=$1
    LABELS=$2
    EXP=${3:-exp/own_images}
    TEST=${TEST:-}
    ANSWERS=manual
fi

pool_opts=(--images "$PHOTOS" --labels "$LABELS" --image-size "$IMAGE_SIZE")
[ -n "${CLASSES:-}" ] && pool_opts+=(--classes "$CLASSES")
train_opts=(--model "$MODEL" --epochs "$EPOCHS" --device "$DEVICE")
if [ -n "$TEST" ]; then
    pool_opts+=(--test "$TEST")
else
    train_opts+=(--val-fraction "$VAL_FRACTION")  # no test set: measure on a held-out part of the labeled set
fi

$FMASK build-pool "${pool_opts[@]}" --out "$EXP/pool"
$FMASK train --pool "$EXP/pool" "${train_opts[@]}" --out "$EXP/round0.pt"
for ((r = 0; r < ROUNDS; r++)); do
    $FMASK query --ckpt "$EXP/round$r.pt" --strategy "$STRATEGY" --batch "$BATCH" --device "$DEVICE" \
        --out "$EXP/query$r.json"
    # The batch for the annotator: images/<id>_<your file name>.png, manifest.csv (path, the model's guesses,
    # a blank label column), a contact sheet and Label Studio files.
    [ -d "$EXP/batch$r" ] || $FMASK export --query "$EXP/query$r.json" --device "$DEVICE" --out "$EXP/batch$r"
    manifest="$EXP/batch$r/manifest.csv"
    if [ "$ANSWERS" = filename ]; then
        answers="$EXP/answers$r.csv"
        "$PYTHON" - "$manifest" "$answers" <<'EOF'
import csv, sys
from pathlib import Path

rows = list(csv.DictReader(open(sys.argv[1], newline="")))
with open(sys.argv[2], "w", newline="") as handle:  # keyed by path, as a person's own list would be
    csv.writer(handle).writerows([("path", "label")] + [(r["path"], Path(r["path"]).name.split("_")[0]) for r in rows])
EOF
    else
        answers=$manifest
        if ! "$PYTHON" -c 'import csv,sys; sys.exit(0 if any(r["label"].strip() for r in csv.DictReader(open(sys.argv[1], newline=""))) else 1)' "$manifest"; then
            echo "fill in the label column of $manifest, then run this command again"
            exit 0
        fi
    fi
    $FMASK label --query "$EXP/query$r.json" --answers "$answers" --out "$EXP/labeled$((r + 1)).json"
    $FMASK train --pool "$EXP/pool" --labeled "$EXP/labeled$((r + 1)).json" "${train_opts[@]}" \
        --out "$EXP/round$((r + 1)).pt"
done
# The deliverable: every image of the pool with the last model's class and probability.
$FMASK predict --ckpt "$EXP/round$ROUNDS.pt" --device "$DEVICE" --out "$EXP/predictions.csv"
$FMASK plot "$EXP"
