"""Sample-quality metrics: Fréchet distance (FID / fd_digits / fd_mnist), KID, precision/recall.

Library level; feature networks never download anything:

* :func:`frechet_distance`, :class:`FeatureStats`, :func:`save_stats` / :func:`load_stats`
  (``.npz`` with ``mu`` / ``sigma``, the NVlabs/edm and pytorch-fid format);
* :func:`kid` (Bińkowski et al. 2018), :func:`precision_recall` (Kynkäänniemi et al. 2019);
* :func:`copy_check`: nearest-neighbour distances of samples to the training set against real vs real
  (are samples copies?);
* feature extractors (:func:`get_feature_extractor`): the bundled digits classifiers
  (``"fd_digits"`` 8x8, ``"fd_mnist"`` 28x28) and FID Inception-v3 from a local weights file (``"fid"``);
  :func:`compute_stats` and :func:`classifier_score`.

See ``docs/metrics.md``.

May import: data, runtime, errors.
"""
from .digits_net import (
    DigitsClassifier,
    DigitsSplit,
    digits_split,
    load_bundled_classifier,
    load_classifier_metadata,
    load_digits_classifier,
    load_digits_metadata,
    load_mnist_classifier,
    load_mnist_metadata,
    mnist_split,
)
from .features import (
    ClassifierScore,
    FeatureExtractor,
    ModuleExtractor,
    classifier_score,
    compute_stats,
    get_feature_extractor,
)
from .frechet import (
    FeatureStats,
    MissingFileError,
    frechet_distance,
    load_stats,
    save_stats,
)
from .inception import (
    FID_WEIGHTS_FILENAME,
    FID_WEIGHTS_SHA256_PREFIX,
    FID_WEIGHTS_URL,
    FIDInceptionV3,
    file_sha256,
    load_inception,
)
from .kid import kid, mmd2_unbiased
from .memorization import copy_check, nearest_neighbors
from .precision_recall import knn_radii, precision_recall

__all__ = [
    "copy_check", "nearest_neighbors", "ClassifierScore", "DigitsClassifier", "DigitsSplit", "FID_WEIGHTS_FILENAME",
    "FID_WEIGHTS_SHA256_PREFIX", "FID_WEIGHTS_URL", "FIDInceptionV3", "FeatureExtractor",
    "FeatureStats", "MissingFileError", "ModuleExtractor", "classifier_score", "compute_stats",
    "digits_split", "file_sha256", "frechet_distance", "get_feature_extractor", "kid",
    "knn_radii", "load_bundled_classifier", "load_classifier_metadata", "load_digits_classifier",
    "load_digits_metadata", "load_inception", "load_mnist_classifier", "load_mnist_metadata", "load_stats",
    "mmd2_unbiased", "mnist_split", "precision_recall", "save_stats",
]
