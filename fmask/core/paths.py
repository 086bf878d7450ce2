"""The one place that names fmask's files: the files a step writes beside its output, a pool directory's files,
and the layout of the results tree ``fmask run`` writes (which ``fmask plot`` reads back by these names)."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Optional

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
SAFETENSORS_SUFFIX = ".safetensors"  # masks, their embeddings caches and feature caches
EMBEDDINGS_SUFFIX = ".embeddings" + SAFETENSORS_SUFFIX  # a mask's cached embeddings: <mask stem>.embeddings.safetensors
# Every file a pool directory may hold, in the order a build publishes them (the manifest last: a manifest means
# the pool is complete).
POOL_OUTPUTS = (*POOL_CACHE, POOL_SAMPLES_CSV, POOL_SKIPPED_CSV, POOL_DUPLICATES_CSV,
                Path(POOL_LABELED).with_suffix(".csv").name, POOL_LABELED, POOL_MANIFEST)


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
    return Path(pool_dir) / f"{FEATURES_PREFIX}{key[:16]}{SAFETENSORS_SUFFIX}"


def metrics_csv(checkpoint: str | Path) -> Path:
    return Path(checkpoint).parent / METRICS_CSV


def embeddings_cache(mask: str | Path) -> Path:
    """Masked gradient embeddings cached beside the mask file that defines their columns."""
    mask = Path(mask)
    return mask.with_name(mask.name.removesuffix(SAFETENSORS_SUFFIX) + EMBEDDINGS_SUFFIX)


# Written by `fmask export` into its --out directory (a batch for human annotators):
EXPORT_IMAGES_DIR = "images"  # one PNG per selected sample: <sample id>_<original stem>.png (<sample id>.png without)
EXPORT_MANIFEST_CSV = "manifest.csv"  # sample_id, path, file, the model's top-3 guesses, a blank label column
CONTACT_SHEET_PNG = "contact_sheet.png"  # the batch in selection order, sample id under each tile
LABEL_STUDIO_TASKS = "label_studio_tasks.json"  # Label Studio import file: one task per image, with predictions
LABEL_STUDIO_CONFIG = "label_studio_config.xml"  # Label Studio labeling config: Choices over the pool's classes
EXPORT_INFO = "export.json"  # provenance (query, checkpoint, pool hashes); marks the directory as an export


def export_image(sample_id: int, path: Optional[str]) -> str:
    """``images/<sample id>_<original stem>.png`` (the stem cut to 80 characters, characters that are awkward in
    file names and URLs replaced by _), or ``images/<sample id>.png`` without a source file."""
    stem = re.sub(r"[^\w.-]+", "_", PurePosixPath(path).stem).strip("._")[:80] if path else ""
    return f"{EXPORT_IMAGES_DIR}/{sample_id}_{stem}.png" if stem else f"{EXPORT_IMAGES_DIR}/{sample_id}.png"


# The results tree of `fmask run` (OUT is its --out):
#   OUT/seed{S}/pool/                         the seed's pool
#   OUT/seed{S}/round0.pt                     the seed's round-0 checkpoint, shared by its strategies
#   OUT/seed{S}/round0-mc-dropout.pt          the same with MC dropout, for the strategies that sample it
#   OUT/seed{S}/{strategy}/                   one chain per strategy: round{R}.pt, fisher{R}.safetensors (masked
#                                             strategies), query{R}.json, labeled{R+1}.json, metrics.csv
#   OUT/experiment.json, OUT/timings.csv
_MASK_ROUND = re.compile(r"\D*(\d+)")  # the round a mask's name gives: fisher3 -> 3 (mask3 of a hand-made loop too)


def run_seed_dir(results: str | Path, seed: int) -> Path:
    return Path(results) / f"seed{seed}"


def run_pool(results: str | Path, seed: int) -> Path:
    return run_seed_dir(results, seed) / "pool"


def run_round0(results: str | Path, seed: int, *, mc_dropout: bool = False) -> Path:
    """The seed's round-0 checkpoint every chain of the seed starts from (copied into each chain)."""
    return run_seed_dir(results, seed) / ("round0-mc-dropout.pt" if mc_dropout else "round0.pt")


def run_chain(results: str | Path, seed: int, strategy: str) -> Path:
    """The folder of one strategy's chain of rounds for one seed."""
    return run_seed_dir(results, seed) / strategy


def chain_checkpoint(chain: str | Path, round_: int) -> Path:
    """The checkpoint trained on the labeled set of round ``round_`` (round0.pt: the initial set)."""
    return Path(chain) / f"round{round_}.pt"


def chain_mask(chain: str | Path, round_: int) -> Path:
    """The Fisher mask of the round-``round_`` checkpoint (it picks round ``round_ + 1``'s batch)."""
    return Path(chain) / f"fisher{round_}{SAFETENSORS_SUFFIX}"


def chain_query(chain: str | Path, round_: int) -> Path:
    """The batch the round-``round_`` checkpoint selects."""
    return Path(chain) / f"query{round_}.json"


def chain_labeled(chain: str | Path, round_: int) -> Path:
    """The labeled set of round ``round_`` (the previous set plus the query of round ``round_ - 1``)."""
    return Path(chain) / f"labeled{round_}.json"


def is_mask(path: str | Path) -> bool:
    """True for a name a Fisher mask may have: any .safetensors but an embeddings cache or a feature cache."""
    name = Path(path).name
    return name.endswith(SAFETENSORS_SUFFIX) and not name.endswith(EMBEDDINGS_SUFFIX) \
        and not name.startswith(FEATURES_PREFIX)


def mask_round(path: str | Path) -> Optional[int]:
    """The round a mask's name gives (:func:`chain_mask`'s ``fisher{R}.safetensors``: R), None when it gives none."""
    found = _MASK_ROUND.fullmatch(Path(path).name.removesuffix(SAFETENSORS_SUFFIX))
    return int(found.group(1)) if found else None
