"""The ``distill`` section of a distilled run (``elucidate distill``, docs/distillation.md): which method made it from
which trained run, and that method's settings. A run without it is an ordinary diffusion run. Like every section
but ``sampling`` it must not change when the run resumes (the resume check names a changed key).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..params import param
from .schema import typed_section, validate_section

__all__ = ["DistillConfig", "check_distill", "METHODS"]

#: the distillation methods: consistency distillation (Song et al. 2023), easy consistency tuning (Geng et al. 2024)
METHODS = ("cd", "ect")


@dataclass
class DistillConfig:
    """Consistency distillation / tuning of a trained run into one- and few-step generation."""

    method: str = param("cd", "cd: consistency distillation on the teacher's ODE (Song et al. 2023); ect: easy "
                              "consistency tuning, no teacher calls (Geng et al. 2024)", choices=METHODS)
    teacher: str = param("", "the trained run's checkpoint the student started from (its EMA weights); cd loads it "
                             "again as the frozen teacher when the run resumes")
    metric: str = param("l2", "d(., .): l2 = mean squared difference; pseudo_huber = sqrt(||.||^2 + c^2) - c (improved "
                              "CT, Song & Dhariwal 2023)", choices=("l2", "pseudo_huber"))
    huber_c: float = param(0.0, "c of pseudo_huber (improved CT: 0.00054 sqrt(d); ECT's default 0 gives ||.||)",
                           symbol="c", minimum=0)
    levels: int = param(18, "cd: N, the levels of the Karras discretization pairs are drawn from (Song et al.: 18)",
                        symbol="N", minimum=2)
    solver: str = param("heun", "cd: the frozen teacher's ODE step from sigma_{n+1} to sigma_n",
                        choices=("heun", "euler"))
    p_mean: float = param(-1.1, "ect: mean of ln t (ECT's P_mean)", symbol="P_mean")
    p_std: float = param(2.0, "ect: standard deviation of ln t (ECT's P_std)", symbol="P_std", minimum=0,
                         exclusive=True)
    q: float = param(2.0, "ect: r = t (1 - (1/q)^(stage+1) adj(t)): dt shrinks by q each stage", symbol="q",
                     minimum=1, exclusive=True)
    double: int = param(500, "ect: optimizer steps per stage (ECT's --double, in steps)", minimum=1)
    mapping: str = param("sigmoid", "ect: adj(t) = 1 + k sigmoid(-b t) (sigmoid) or 1 (const)",
                         choices=("sigmoid", "const"))
    k: float = param(8.0, "ect: k of the sigmoid mapping", symbol="k")
    b: float = param(1.0, "ect: b of the sigmoid mapping", symbol="b")

    def validate(self) -> None:
        validate_section(self, "distill")
        if not self.teacher:
            raise ConfigError("distill.teacher is required: the checkpoint of the run that was distilled")


def check_distill(raw: Any) -> DistillConfig | None:
    """The validated ``distill`` section (None when absent or null)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"section 'distill' must be a mapping {{method: cd, teacher: CKPT, ...}}, got "
                          f"{type(raw).__name__}")
    return typed_section(DistillConfig, "distill", raw)
