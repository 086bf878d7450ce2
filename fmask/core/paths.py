"""The one place that names fmask's files."""

from __future__ import annotations

from pathlib import Path

POOL_MANIFEST = "manifest.json"  # in a pool directory: dataset, classes, ids, hashes
POOL_IMAGES = "images.npy"  # in a pool directory: decoded uint8 pool images (n, C, H, W), read memory-mapped
POOL_LABELS = "labels.npy"  # in a pool directory: int64 class of each pool image, -1 where unknown
POOL_TEST_IMAGES = "test_images.npy"  # in a pool directory: decoded uint8 test images (may hold none)
POOL_TEST_LABELS = "test_labels.npy"  # in a pool directory: int64 class of each test image
POOL_CACHE = (POOL_IMAGES, POOL_TEST_IMAGES, POOL_LABELS, POOL_TEST_LABELS)  # the cache the manifest hashes
POOL_LABELED = "labeled.json"  # in a pool directory: the round-0 labeled set (labeled.csv beside it)
POOL_SAMPLES_CSV = "samples.csv"  # pools from your own files: sample_id, path, sha256, width, height, label
POOL_SKIPPED_CSV = "skipped.csv"  # pools from your own files: path, reason, split of every file left out
POOL_DUPLICATES_CSV = "duplicates.csv"  # pools from your own files: path, duplicate_of, split of byte-identical copies
METRICS_CSV = "metrics.csv"  # beside checkpoints: one row per trained checkpoint
LEARNING_CURVES_PNG = "learning_curves.png"  # written by `fmask plot`
SUMMARY_CSV = "summary.csv"  # written by `fmask plot`
MASK_PROFILE_PNG = "mask_profile.png"  # written by `fmask plot` when masks are found
CLASS_PICKS_PNG = "class_picks.png"  # written by `fmask plot`
STEP_TIMES_PNG = "step_times.png"  # written by `fmask plot` when timings.csv exists
TIMINGS_CSV = "timings.csv"  # written by `fmask run`: seconds per executed step
EXPERIMENT_JSON = "experiment.json"  # written by `fmask run`: its configuration
FEATURES_PREFIX = "features-"  # in a pool directory: a frozen backbone's cached features, features-<key>.safetensors


def pool_manifest(pool_dir: str | Path) -> Path:
    return Path(pool_dir) / POOL_MANIFEST


def pool_images(pool_dir: str | Path) -> Path:
    return Path(pool_dir) / POOL_IMAGES


def pool_labeled(pool_dir: str | Path) -> Path:
    return Path(pool_dir) / POOL_LABELED


def pool_file(pool_dir: str | Path, name: str) -> Path:
    return Path(pool_dir) / name


def labeled_csv(labeled_json: str | Path) -> Path:
    """The CSV beside every labeled-set JSON: sample_id, path, label, round, source (what --labels reads back)."""
    return Path(labeled_json).with_suffix(".csv")


def query_csv(query_json: str | Path) -> Path:
    """The CSV beside every query JSON: rank, sample_id, path, score."""
    return Path(query_json).with_suffix(".csv")


def skipped_csv_beside(out: str | Path) -> Path:
    """Files `fmask predict --images` could not read, listed beside its output CSV."""
    out = Path(out)
    return out.with_name(out.stem + ".skipped.csv")


def feature_cache(pool_dir: str | Path, key: str) -> Path:
    """A frozen backbone's features of a pool's images, beside the pool; ``key`` hashes the backbone's weights
    and preprocessing (one file per backbone)."""
    return Path(pool_dir) / f"{FEATURES_PREFIX}{key[:16]}.safetensors"


def metrics_csv(checkpoint: str | Path) -> Path:
    return Path(checkpoint).parent / METRICS_CSV


def embeddings_cache(mask: str | Path) -> Path:
    """Masked gradient embeddings cached beside the mask file that defines their columns."""
    mask = Path(mask)
    return mask.with_name(mask.name.removesuffix(".safetensors") + ".embeddings.safetensors")


# Written by `fmask export` into its --out directory (a batch for human annotators):
EXPORT_IMAGES_DIR = "images"  # one PNG per selected sample: <sample id>_<original stem>.png (<sample id>.png without)
EXPORT_MANIFEST_CSV = "manifest.csv"  # sample_id, path, file, the model's top-3 guesses, a blank label column
CONTACT_SHEET_PNG = "contact_sheet.png"  # the batch in selection order, sample id under each tile
LABEL_STUDIO_TASKS = "label_studio_tasks.json"  # Label Studio import file: one task per image, with predictions
LABEL_STUDIO_CONFIG = "label_studio_config.xml"  # Label Studio labeling config: Choices over the pool's classes
EXPORT_INFO = "export.json"  # provenance (query, checkpoint, pool hashes); marks the directory as an export
