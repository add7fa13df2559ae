"""Schedule tuning: the sampler and noise levels that solve a model's ODE best for an NFE budget (the search,
boundary draws, objectives), tuned schedules stored as data in a run, and the exact-denoiser sandbox.

May import: sampling, formulations, analytic, data, runtime, run, errors.
"""
from .boundary import ReferenceCache
from .sandbox import class_mixture, digits_mixture, sandbox_sweep
from .stored import TunedSchedule, load_tuned, tuned_config
from .tuner import tune

__all__ = ["tune", "ReferenceCache", "TunedSchedule", "load_tuned", "tuned_config", "sandbox_sweep", "digits_mixture",
           "class_mixture"]
