"""Evaluation: the metric registry (FD / FID, KID, precision-recall), scoring a run against dataset statistics,
sweeps of samplers over NFE, the digits recognizability check, and the HTML report of a run.

May import: run, config, metrics, viz, tuning, data, sampling, formulations, denoiser, runtime, errors.
"""
from .evaluate import (
    DATASET_FEATURES,
    FEATURE_ALIASES,
    METRICS,
    OUTCOMES,
    DatasetStats,
    Metric,
    checkpoint_label,
    choose_metric,
    compute_metric,
    domain_metric,
    evaluate,
    feature_extractor,
    feature_name,
    get_metric,
    load_dataset_stats,
    no_domain_metric,
    recognizability,
    register_metric,
    result_path,
    result_prefix,
    result_settings,
    sample_features,
    sampler_nfe,
    sweep,
)
from .report import format_number, render_report, write_report

__all__ = ["METRICS", "Metric", "register_metric", "get_metric", "DatasetStats", "load_dataset_stats", "feature_name",
           "feature_extractor", "sample_features", "compute_metric", "evaluate", "sweep", "sampler_nfe",
           "recognizability", "FEATURE_ALIASES", "DATASET_FEATURES", "render_report", "write_report", "domain_metric",
           "choose_metric", "no_domain_metric", "OUTCOMES", "result_settings", "result_prefix", "result_path",
           "checkpoint_label", "format_number"]
