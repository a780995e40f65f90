"""Sample-quality evaluation: FID, sFID, Precision/Recall, IS, and PSNR/SSIM against FP samples.

Start with :func:`evaluate` (all metrics of one sample npz) and :func:`build_reference` (cache
the statistics of a reference image set). Differences from ADM's evaluation suite are listed in
the docstrings of :mod:`ditq.eval.inception`, :mod:`ditq.eval.features` and
:mod:`ditq.eval.metrics`.
"""

from ditq.eval.features import (
    FeatureSet,
    InceptionStatistics,
    build_reference,
    extract_features,
    feature_statistics,
    load_statistics,
    reference_statistics,
    save_statistics,
)
from ditq.eval.images import iterate_batches, load_images
from ditq.eval.inception import (
    FIDInceptionV3,
    InceptionFeatureExtractor,
    InceptionWeights,
    load_inception,
    resolve_inception_weights,
)
from ditq.eval.metrics import (
    distance_to_reference,
    evaluate,
    fid_from_features,
    format_table,
    frechet_distance,
    inception_score,
    precision_recall,
    psnr,
    save_evaluation,
    ssim,
)

__all__ = [
    "FIDInceptionV3",
    "FeatureSet",
    "InceptionFeatureExtractor",
    "InceptionStatistics",
    "InceptionWeights",
    "build_reference",
    "distance_to_reference",
    "evaluate",
    "extract_features",
    "feature_statistics",
    "fid_from_features",
    "format_table",
    "frechet_distance",
    "inception_score",
    "iterate_batches",
    "load_images",
    "load_inception",
    "load_statistics",
    "precision_recall",
    "psnr",
    "reference_statistics",
    "resolve_inception_weights",
    "save_evaluation",
    "save_statistics",
    "ssim",
]
