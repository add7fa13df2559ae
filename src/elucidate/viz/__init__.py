"""Pictures of diffusion: sample grids, denoising trajectories, schedules, 1-D flows, training curves.

Every ``plot_*`` function returns a ``matplotlib.figure.Figure`` built on the Agg canvas without
pyplot (no global figure state, headless-safe); write it with :func:`save_figure` (atomic, closes
the figure) or turn it into PNG bytes with :func:`figure_to_png`. Sample grids are plain uint8
arrays (:func:`image_grid`) or PNGs (:func:`save_image_grid`). See ``docs/plots.md``.

May import: analytic, formulations, sampling, data, runtime, errors.
"""
from .common import atomic_write_bytes, figure_to_png, new_figure, save_figure
from .flow import default_mixture, flow_paths, plot_flow, plot_flow_comparison
from .grid import image_grid, save_image_grid, to_uint8
from .quality import plot_quality_vs_nfe, quality_series
from .schedules import (
    default_alpha_bar_curves,
    plot_alpha_bar,
    plot_schedules,
    schedule_table,
    shifted_alpha_bar_curves,
)
from .training import loss_by_sigma_stages, plot_loss, plot_loss_by_sigma, read_metrics, smooth
from .trajectory import TrajectoryRecorder, plot_trajectory
from .tuned import plot_tuned_schedules, tuned_error_series

__all__ = [
    "shifted_alpha_bar_curves", "atomic_write_bytes", "figure_to_png", "new_figure", "save_figure",
    "image_grid", "save_image_grid", "to_uint8",
    "TrajectoryRecorder", "plot_trajectory",
    "plot_schedules", "schedule_table", "plot_alpha_bar", "default_alpha_bar_curves",
    "default_mixture", "flow_paths", "plot_flow", "plot_flow_comparison",
    "read_metrics", "smooth", "plot_loss", "plot_loss_by_sigma", "loss_by_sigma_stages",
    "plot_quality_vs_nfe", "quality_series", "plot_tuned_schedules", "tuned_error_series",
]
