"""The config reference, generated from the declarations: data keys, network presets, every
formulation's parameters, the training and sampling sections, and every solver with its options.

``elucidate train --help-config`` prints it; ``docs/reference.md`` is its Markdown form
(``python -m elucidate.reference > docs/reference.md``; a test keeps the two equal).
"""
from __future__ import annotations

import inspect
import math

from .params import ParamDoc, describe

__all__ = ["config_reference"]


def _fmt(value) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)


def _param_rows(params: list[ParamDoc]) -> list[list[str]]:
    rows = []
    for p in params:
        meaning = p.doc + (f" ({p.range_text()})" if p.range_text() and not p.choices else "")
        if p.choices:
            meaning += f" ({p.range_text()})"
        rows.append([p.name, p.symbol if p.symbol != p.name else "", _fmt(p.default), meaning])
    return rows


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    keep = [i for i in range(len(header)) if any(r[i] for r in rows) or i == 0]
    header, rows = [header[i] for i in keep], [[r[i] for i in keep] for r in rows]
    if markdown:
        esc = [[c.replace("|", "\\|") for c in r] for r in rows]
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
               ["| " + " | ".join(f"`{r[0]}`" if j == 0 else c for j, c in enumerate(r)) + " |"
                for r in esc for _ in [0]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header[:-1])]
    lines = ["  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  " + header[-1]]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    return lines


def _heading(text: str, markdown: bool, level: int = 2) -> list[str]:
    return ["", "#" * level + " " + text, ""] if markdown else ["", text, "-" * len(text)]


def config_reference(markdown: bool = False) -> str:
    """Every config key, formulation parameter, network preset and solver option, with its meaning."""
    from .augment_config import AUGMENT_LABEL_DIM, AugmentSettings
    from .config import SCHEDULE_KEYS, SamplingConfig, TrainingConfig
    from .data.build import KEY_DOCS
    from .formulations import FORMULATIONS
    from .latent_config import LatentConfig
    from .nets import PRESETS
    from .sampling import CONFIG_OPTIONS, SOLVERS

    out = ["# Config reference" if markdown else "elucidate config reference", ""]
    out.append("Generated from the declarations (`python -m elucidate.reference`); `elucidate train --help-config` "
               "prints the same." if markdown else "(generated from the declarations; docs/reference.md has the "
                                                     "same in Markdown)")

    out += _heading("data", markdown)
    out += _table(["key", "meaning"], [[k, v] for k, v in KEY_DOCS.items()], markdown)

    out += _heading("network", markdown)
    out.append("`arch` picks a preset; its other keys are the constructor arguments below (`img_resolution`, "
               "`in_channels`, `out_channels` come from the data; `label_dim: auto` = the dataset's classes).")
    for arch, (cls, preset) in PRESETS.items():
        args = []
        for name, p in inspect.signature(cls).parameters.items():
            if name in ("self", "img_resolution", "in_channels", "out_channels") or p.kind is p.VAR_KEYWORD:
                continue
            default = preset.get(name, p.default)
            args.append(f"{name}={_fmt(default)}")
        out += _heading(f"arch: {arch} ({cls.__name__})", markdown, 3)
        out.append(", ".join(args))

    out += _heading("diffusion", markdown)
    out.append(f"`type` and that formulation's parameters (keys match case-insensitively, `p_mean` = `P_mean`). "
               f"`{'`, `'.join(SCHEDULE_KEYS)}` are accepted for every type: where they are not parameters "
               f"they set the sampling schedule (Karras over that range, clipped to the model's). `shift` "
               f"(default 1) multiplies every noise level: the resolution-aware shift of simple diffusion, "
               f"log-SNR - 2 log(shift), with shift = resolution / base resolution. Keys of another type give "
               f"a warning and are ignored.")
    for name, cls in FORMULATIONS.items():
        out += _heading(f"type: {name}", markdown, 3)
        if cls.description:
            out.append(cls.description)
            out.append("")
        out += _table(["key", "symbol", "default", "meaning"], _param_rows(describe(cls)), markdown)

    for section, cls in (("training", TrainingConfig), ("sampling", SamplingConfig), ("latent", LatentConfig)):
        out += _heading(section, markdown)
        out += _table(["key", "symbol", "default", "meaning"], _param_rows(describe(cls)), markdown)
        if cls is TrainingConfig:
            out += _heading("training.augment", markdown, 3)
            out += [f"Non-leaky augmentation (docs/training.md): each transform is applied to an image with "
                    f"probability min(1, p x its multiplier); keys not given take these defaults; the network "
                    f"gets augment_dim = {AUGMENT_LABEL_DIM}.", ""]
            out += _table(["key", "default", "meaning"],
                          [[r[0], r[2], r[3]] for r in _param_rows(describe(AugmentSettings))], markdown)

    out += _heading("solvers (sampling.sampler)", markdown)
    config_name = {arg: key for key, arg in CONFIG_OPTIONS.items()}
    out.append("Options in the sampling section use the config names (`s_min`/`s_max` are the solvers' "
               "`s_tmin`/`s_tmax`); any other option goes in `sampling.options` or `--option KEY=VALUE`.")
    rows = []
    for name, spec in SOLVERS.items():
        nfe = "N" if spec.evals_per_step == 1 else f"{spec.evals_per_step}N - {spec.evals_per_step - 1}"
        options = ", ".join(f"{config_name.get(o, o)}={_fmt(d)}" for o, d in spec.options.items()) or "-"
        rows.append([name, str(spec.order), nfe, "yes" if spec.stochastic else "no", options, spec.description])
    out += _table(["name", "order", "NFE", "noise", "options", "description"], rows, markdown)
    docs = {}
    for spec in SOLVERS.values():
        for option in spec.options:
            docs.setdefault(config_name.get(option, option), spec.doc(option))
    out += _heading("solver options", markdown, 3)
    out += _table(["option", "meaning"], [[k, v] for k, v in docs.items()], markdown)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(config_reference(markdown=True), end="")
