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


def pool_manifest(pool_dir: str | Path) -> Path:
    return Path(pool_dir) / POOL_MANIFEST


def pool_images(pool_dir: str | Path) -> Path:
    return Path(pool_dir) / POOL_IMAGES


def pool_labeled(pool_dir: str | Path) -> Path:
    return Path(pool_dir) / POOL_LABELED


def metrics_csv(checkpoint: str | Path) -> Path:
    return Path(checkpoint).parent / METRICS_CSV


def embeddings_cache(mask: str | Path) -> Path:
    """Masked gradient embeddings cached beside the mask file that defines their columns."""
    mask = Path(mask)
    return mask.with_name(mask.name.removesuffix(".safetensors") + ".embeddings.safetensors")
