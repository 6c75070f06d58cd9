"""Evaluation: the TF-2015 Inception, ADM-compatible FID/sFID/IS/P&R, PSNR/SSIM, distributed sampling.

Ray is imported only by :mod:`rae_scale.eval.sampling_workers`.
"""
from .features import (FeatureSet, collect_generator_features, compute_metrics, evaluate_generator,
                       sample_labels, sample_seeds, work_units)
from .inception import InceptionFeatures, build_inception
from .metrics import (MomentAccumulator, fid_from_moments, frechet_distance, inception_score,
                      precision_recall, psnr, ssim)
from .reference import ReferenceStats, compare_folders, load_reference, read_reference_npz, save_reference_npz

__all__ = [
    "FeatureSet", "collect_generator_features", "compute_metrics", "evaluate_generator", "sample_labels",
    "sample_seeds", "work_units", "InceptionFeatures", "build_inception", "MomentAccumulator",
    "fid_from_moments", "frechet_distance", "inception_score", "precision_recall", "psnr", "ssim",
    "ReferenceStats", "compare_folders", "load_reference", "read_reference_npz", "save_reference_npz",
]
