"""The config keys, generated from the declarations: data keys, network presets, every formulation's
parameters, the training, sampling and latent sections, the samplers with their options, the named schedules,
and the autoencoder's config (train-vae).

``elucidate train --help-config`` prints it; docs/config.md holds its Markdown form (written by
``python -m elucidate.cli.docs``; a test keeps them equal).
"""
from __future__ import annotations

import inspect
import math

from ..data.build import KEY_DOCS
from ..formulations import FORMULATIONS
from ..nets import PRESETS
from ..params import ParamDoc, describe
from ..sampling import CONFIG_OPTIONS, SAMPLERS, SCHEDULES
from . import SECTION_TYPES
from .diffusion import SCHEDULE_KEYS
from .distill import DistillConfig
from .latent import LatentConfig
from .training import AUGMENT_LABEL_DIM, AugmentSettings, LoopConfig
from .vae import VAE_SECTION_TYPES

__all__ = ["config_docs", "sampler_table", "schedule_table", "section_table"]


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


def section_table(cls, markdown: bool = True) -> list[str]:
    """The declared keys of a section class as a table (key, symbol, default, meaning)."""
    return _table(["key", "symbol", "default", "meaning"], _param_rows(describe(cls)), markdown)


def sampler_table(markdown: bool = True) -> list[str]:
    """Every registered sampler: order, NFE, whether it draws noise, options, description."""
    config_name = {arg: key for key, arg in CONFIG_OPTIONS.items()}
    rows = []
    for name, spec in SAMPLERS.items():
        nfe = "N" if spec.evals_per_step == 1 else f"{spec.evals_per_step}N - {spec.evals_per_step - 1}"
        options = ", ".join(f"{config_name.get(o, o)}={_fmt(d)}" for o, d in spec.options.items()) or "-"
        rows.append([name, str(spec.order), nfe, "yes" if spec.stochastic else "no", options, spec.description])
    return _table(["name", "order", "NFE", "noise", "options", "description"], rows, markdown)


def sampler_option_table(markdown: bool = True) -> list[str]:
    """Every sampler option (by its config name) with its meaning."""
    config_name = {arg: key for key, arg in CONFIG_OPTIONS.items()}
    docs = {}
    for spec in SAMPLERS.values():
        for option in spec.options:
            docs.setdefault(config_name.get(option, option), spec.doc(option))
    return _table(["option", "meaning"], [[k, v] for k, v in docs.items()], markdown)


def schedule_table(markdown: bool = True) -> list[str]:
    """Every named schedule with its options and description."""
    rows = []
    for name, spec in SCHEDULES.items():
        options = ", ".join(f"{o}={_fmt(d)}" + (f" ({spec.option_docs[o]})" if o in spec.option_docs else "")
                            for o, d in spec.options.items()) or "-"
        rows.append([name, options, spec.description])
    return _table(["name", "options", "description"], rows, markdown)


def config_docs(markdown: bool = False) -> str:
    """Every config key, formulation parameter, network preset, sampler and schedule, with its meaning."""
    out = [] if markdown else ["elucidate config keys", "", "(generated from the declarations; docs/config.md "
                                                            "has the same in Markdown)"]

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
        out += section_table(cls, markdown)

    out += _heading("training", markdown)
    training = SECTION_TYPES["training"]
    shared = [p.name for p in describe(LoopConfig)]
    out.append(f"The keys every training loop reads (`train` and `train-vae`: {', '.join(shared)}), then the "
               f"diffusion trainer's. Keys that may change when a run is resumed: "
               f"{', '.join(sorted(p.name for p in describe(training) if p.resumable))}.")
    out.append("")
    out += section_table(training, markdown)
    out += _heading("training.augment", markdown, 3)
    out += [f"Non-leaky augmentation (docs/training.md): each transform is applied to an image with "
            f"probability min(1, p x its multiplier); keys not given take these defaults; the network "
            f"gets augment_dim = {AUGMENT_LABEL_DIM}.", ""]
    out += _table(["key", "default", "meaning"],
                  [[r[0], r[2], r[3]] for r in _param_rows(describe(AugmentSettings))], markdown)
    for section, cls in (("sampling", SECTION_TYPES["sampling"]), ("latent", LatentConfig), ("distill", DistillConfig)):
        out += _heading(section, markdown)
        out += section_table(cls, markdown)

    out += _heading("samplers (sampling.sampler)", markdown)
    out.append("Options in the sampling section use the config names (`s_min`/`s_max` are the samplers' "
               "`s_tmin`/`s_tmax`); any other option goes in `sampling.options` or `--option KEY=VALUE`.")
    out += sampler_table(markdown)
    out += _heading("sampler options", markdown, 3)
    out += sampler_option_table(markdown)
    out += _heading("schedules (sampling.schedule)", markdown)
    out.append("Over `[sigma_min, sigma_max]` (clipped to the model's range); an option comes from the sampling "
               "key of that name if set, else from the formulation's parameter of that name, else its default.")
    out += schedule_table(markdown)

    out += _heading("train-vae (the autoencoder's config)", markdown)
    out.append("Sections `data` (as above), `model`, `loss`, `training` (the loop's keys as above, with the "
               "defaults below).")
    for section, cls in VAE_SECTION_TYPES.items():
        out += _heading(f"train-vae: {section}", markdown, 3)
        out += section_table(cls, markdown)
    return "\n".join(out).rstrip() + "\n"
