"""The one place that names fmask's files."""

from __future__ import annotations

from pathlib import Path

POOL_MANIFEST = "manifest.json"  # in a pool directory: dataset, classes, ids, hashes
POOL_IMAGES = "images.safetensors"  # in a pool directory: decoded uint8 images, cached once
POOL_LABELED = "labeled.json"  # in a pool directory: the round-0 labeled set
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
EXPORT_IMAGES_DIR = "images"  # one PNG per selected sample, named <sample id>.png
EXPORT_MANIFEST_CSV = "manifest.csv"  # sample_id, file, the model's top-3 guesses, a blank label column to fill in
CONTACT_SHEET_PNG = "contact_sheet.png"  # the batch in selection order, sample id under each tile
LABEL_STUDIO_TASKS = "label_studio_tasks.json"  # Label Studio import file: one task per image, with predictions
LABEL_STUDIO_CONFIG = "label_studio_config.xml"  # Label Studio labeling config: Choices over the pool's classes
EXPORT_INFO = "export.json"  # provenance (query, checkpoint, pool hashes); marks the directory as an export
