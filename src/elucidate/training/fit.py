"""A configuration fitted to the data and the machine (``elucidate train --data PATH`` and ``elucidate init``).

:func:`fit_config` looks at the data (count, resolution, channels, labels, value range and spread) and the machine
(device, bf16 hardware, threads), times real training steps of the chosen network on this data and this machine,
and sets the network size, batch, learning rate and its ramp-up, EMA length, number of steps and the checkpoint
and sample intervals so that training takes about ``minutes``. Each choice carries its reason in one line: printed
when training starts, written as comments by ``elucidate init``.

The rules come from the shipped configs measured on 2 CPU cores (the demo's U-Net on 8x8 digits, the faces
config at 32x32, the MNIST config at 28x28; docs/own-data.md has the measurements): the small fast U-Net, Adam at
2e-3 with batch 64, the ramp-up and the EMA half-life each about a tenth of the images the run will see, Heun with
18 steps. Only the step count depends on the clock, so the same data on the same machine gives the same
configuration up to the steps.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..config import Config, parse_config
from ..data import DataError, build_dataset, data_section_for
from ..data.dataset import ImageDataset
from ..errors import UserError
from ..runtime.distributed import pick_device
from ..runtime.precision import resolve_precision

__all__ = ["FittedConfig", "DataSummary", "fit_config", "DEFAULT_MINUTES"]

DEFAULT_MINUTES = 10.0
BATCH = 64                  # the shipped configs' batch (images per step)
LR = 2e-3                   # Adam on the small U-Net at batch 64 (demo, faces)
MIN_STEPS = 400             # fewer steps than this give noise: use a smaller network
ROOMY_STEPS = 8000          # more steps than this at the base width: a wider network pays off
COPY_PASSES = 300           # passes over the data beyond which samples come back as near-copies (own-data.md)
GRIDS = 3                   # periodic sample grids (a third, two thirds, the end)
SHARE_TRAINING = 0.85       # of the budget for training steps; the rest: loading, timing, checkpoints, final grid
_NATURAL_CHANNELS = {1: "gray", 2: "gray + alpha", 3: "RGB", 4: "RGBA"}


@dataclass
class DataSummary:
    """What the fit saw in the data (``line()`` is the one-line summary printed when training starts)."""

    source: str
    kind: str
    count: int
    channels: int
    native: tuple[int, int]
    resolution: tuple[int, int]
    classes: int
    dtype: str
    value_range: tuple[float, float]
    std: float  # in model units, after normalization

    def line(self) -> str:
        size = f"{self.native[0]}x{self.native[1]}"
        if self.resolution != self.native:
            size += f" -> {self.resolution[0]}x{self.resolution[1]}"
        labels = f"{self.classes} classes" if self.classes else "no labels"
        lo, hi = self.value_range
        return (f"data: {self.count} images from {self.source} ({self.kind}), {size}, {self.channels} channel"
                f"{'s' if self.channels > 1 else ''} ({_NATURAL_CHANNELS.get(self.channels, '?')}), {self.dtype} "
                f"{lo:.4g}..{hi:.4g}, {labels}, std {self.std:.3f} in model units")


@dataclass
class Machine:
    """The device the run trains on and what it can do."""

    device: str
    precision: str
    threads: int

    def line(self) -> str:
        where = f"{self.threads} CPU threads" if self.device == "cpu" else self.device
        bf16 = "bf16 hardware" if self.precision == "bf16" else "no bf16 hardware"
        return f"machine: {self.device} ({where}), {bf16}: precision auto -> {self.precision}"


@dataclass
class FittedConfig:
    """The fitted run configuration (``raw``: the YAML sections) with a reason for each chosen key."""

    raw: dict
    reasons: dict[str, str]
    data: DataSummary
    machine: Machine
    minutes: float
    seconds_per_step: float
    notes: list[str] = field(default_factory=list)
    dataset: ImageDataset | None = field(default=None, repr=False)  # the data as fitted (training reuses it)

    @property
    def config(self) -> Config:
        return parse_config(self.raw)

    def lines(self) -> list[str]:
        """The chosen configuration, each key with its reason (printed after the data and machine lines)."""
        out = [f"configuration for about {self.minutes:g} minutes ({self.seconds_per_step * 1000:.0f} ms per step "
               f"measured here):"]
        for key, reason in self.reasons.items():
            out.append(f"{f'  {key} = {_flow(_get(self.raw, key))}':<40} # {reason}")
        return out + [f"note: {n}" for n in self.notes]

    def yaml(self) -> str:
        """The configuration as a commented YAML file (what ``elucidate init`` writes)."""
        head = [f"# Fitted by `elucidate init` to {self.data.source} for about {self.minutes:g} minutes of training",
                f"# on this machine ({self.machine.line()[len('machine: '):]}).",
                f"# {self.data.line()}",
                "# Train it:  elucidate train THIS_FILE --out runs/NAME    (edit freely; every key: --help-config)"]
        head += [f"# note: {n}" for n in self.notes]
        lines = head
        for section, values in self.raw.items():
            lines.append(f"{section}:")
            for key, value in values.items():
                text = f"  {key}: {_flow(value)}"
                reason = self.reasons.get(f"{section}.{key}")
                lines.append(f"{text:<40} # {reason}" if reason else text)
        return "\n".join(lines) + "\n"


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()


def _get(raw: dict, dotted: str):
    section, key = dotted.split(".", 1)
    return raw[section][key]


# ---------------------------------------------------------------------------------------------- the data
def _resolution_limit(device: str, minutes: float) -> int:
    """The largest side the budget can train to recognizable samples (measured: docs/own-data.md)."""
    if device == "cpu":
        return 32 if minutes <= 30 else 64
    return 64 if minutes <= 60 else 128


def _fit_side(side: int, limit: int) -> int:
    """The training side: the data's own if the U-Net can halve it twice and the budget allows it, else the
    nearest multiple of 4 (ties down), at most ``limit``."""
    if side <= limit and side % 4 == 0:
        return side
    return max(8, min(limit, 4 * round((side - 0.01) / 4)))


def _load(section: dict, limit: int, reasons: dict[str, str]) -> ImageDataset:
    """The dataset of ``section``; a folder or zip of mixed sizes is loaded center-cropped at ``limit`` x ``limit``
    and one of mixed modes as RGB, each recorded in ``section`` (so training loads the same) and in ``reasons``."""
    try:
        return build_dataset(section)
    except DataError as e:
        if "mixed image sizes" in str(e) and "resolution" not in section:
            section.update(resolution=limit, center_crop=True)
            reasons["data.resolution"] = f"images of mixed sizes: center-cropped and resized to {limit}x{limit}"
            return _load(section, limit, reasons)
        if "mixed image modes" in str(e) and "channels" not in section:
            section["channels"] = 3
            reasons["data.channels"] = "gray and colour images mixed: all as RGB"
            return _load(section, limit, reasons)
        raise


def _summarize(dataset: ImageDataset, section: dict, native: tuple[int, int]) -> DataSummary:
    lo, hi = dataset.stored_range()  # one streamed pass for a memory-mapped or lazily decoded dataset
    n = min(len(dataset), 4096)
    x, _ = dataset.get_batch(torch.linspace(0, len(dataset) - 1, n).long())
    return DataSummary(source=str(section.get("path", section["dataset"])), kind=section["dataset"],
                       count=dataset.num_images, channels=dataset.channels, native=native,
                       resolution=tuple(dataset.resolution), classes=dataset.num_classes,
                       dtype=str(dataset.stored_dtype).removeprefix("torch."), value_range=(lo, hi),
                       std=float(x.float().std()))


# ---------------------------------------------------------------------------------------------- the fit
def fit_config(data: str | os.PathLike, *, minutes: float = DEFAULT_MINUTES, device: str | None = None,
               log=print) -> FittedConfig:
    """Fit a configuration to ``data`` (a folder, a .zip, an .npz/.npy array, or digits/mnist/faces) and this
    machine for about ``minutes`` of training (see the module docstring)."""
    if not (isinstance(minutes, (int, float)) and math.isfinite(minutes) and 0.5 <= minutes <= 100_000):
        raise UserError(f"--minutes {minutes}: expected a number of minutes >= 0.5")
    spec = os.fspath(data)
    section = data_section_for(spec)
    if section is None:
        what = "not an image folder, .zip or .npz/.npy array" if os.path.exists(spec) else "no such folder or file"
        raise UserError(f"--data {spec}: {what} (expected an image folder, a .zip, an .npz/.npy array, or digits, "
                        f"mnist, faces)")
    dev = pick_device(device)
    machine = Machine(str(dev), resolve_precision("auto", dev), torch.get_num_threads())
    reasons: dict[str, str] = {}
    notes: list[str] = []

    limit = _resolution_limit(dev.type, minutes)
    section = dict(section)
    dataset = _load(section, limit, reasons)
    native = tuple(dataset.resolution)
    h, w = native
    side = _fit_side(min(h, w), limit)
    if (side, side) != native:
        section["resolution"] = side
        why = f"{h}x{w} images"
        if h != w:
            section["center_crop"] = True
            why += ", cropped to a square"
        if max(h, w) > limit:
            why += f"; {minutes:g} minutes on {machine.device} train up to {limit}x{limit} well"
        else:
            why += "; the U-Net halves the size twice (multiple of 4)"
        reasons["data.resolution"] = why
        if h != w:
            reasons["data.center_crop"] = "non-square images: crop the center to the square before resizing"
        dataset = build_dataset(section)
    if len(dataset) < BATCH:
        notes.append(f"only {len(dataset)} images: the run will memorize them; more data helps more than time")
    summary = _summarize(dataset, section, native)
    log(summary.line())
    log(machine.line())
    section.setdefault("normalize", "auto")
    reasons["data.normalize"] = ("8-bit images to [-1, 1]" if summary.dtype == "uint8"
                                 else "float data as stored (set standardize or minmax to rescale)")
    section.setdefault("xflip", False)
    reasons["data.xflip"] = "off: set true if mirrored images are valid data (faces, scenes: doubles the data)"

    res = summary.resolution[0]
    width, mult, attn = 32, ([1, 2, 3] if res <= 16 else [1, 2, 2] if res <= 32 else [1, 2, 2, 2]), []
    if res > 16:
        attn = [res // 2 ** (len(mult) - 1)]
    network = {"arch": "unet", "model_channels": width, "channel_mult": mult, "num_blocks": 2,
               "attn_resolutions": attn, "label_dim": "auto"}
    sigma_data = round(min(max(summary.std, 0.1), 2.0), 3)
    raw = {"data": section, "network": network,
           "diffusion": {"type": "EDM", "sigma_data": sigma_data},
           "training": {"steps": 1000, "batch_size": min(BATCH, len(dataset)), "lr": LR, "lr_rampup": 0,
                        "ema_halflife": 0, "precision": "auto", "checkpoint_every": 1000, "sample_every": 0,
                        "num_sample_images": 64, "seed": 0},
           "sampling": {"sampler": "heun", "steps": 18}}
    if summary.classes:
        raw["training"]["cond_drop_prob"] = 0.1
        reasons["training.cond_drop_prob"] = (f"{summary.classes} classes: class-conditional, 10% without labels so "
                                              "that --guidance works at sample time")
    reasons["network.arch"] = "the small fast U-Net (1.6x DDPM++'s speed on a CPU)"
    reasons["network.channel_mult"] = f"{len(mult)} levels for {res}x{res}"
    if attn:
        reasons["network.attn_resolutions"] = "self-attention at the lowest level only (cheap there)"
    reasons["diffusion.sigma_data"] = "the data's std in model units (EDM's sigma_data)"
    reasons["training.batch_size"] = ("the shipped configs' batch" if len(dataset) >= BATCH
                                      else "the whole dataset in every step")

    budget = minutes * 60.0
    seconds = _time_steps(raw, dataset, dev, log)
    steps = _affordable_steps(budget, seconds)
    if steps < MIN_STEPS:
        network["model_channels"] = 16
        narrow = _time_steps(raw, dataset, dev, log)
        if narrow < 0.85 * seconds:
            reasons["network.model_channels"] = (f"16: 32 channels would leave {steps} steps, fewer than "
                                                 f"{MIN_STEPS}, in the budget")
            seconds, steps = narrow, _affordable_steps(budget, narrow)
        else:  # the time is not in the width (data, overheads or a busy machine): keep the wider network
            network["model_channels"] = width
        if steps < MIN_STEPS:
            notes.append(f"{minutes:g} minutes allow only {steps} steps here: expect rough samples; "
                         f"--minutes {math.ceil(minutes * MIN_STEPS / max(steps, 1))} or more is better")
    elif steps > ROOMY_STEPS:
        network["model_channels"] = 64
        wide = _time_steps(raw, dataset, dev, log)
        if _affordable_steps(budget, wide) >= ROOMY_STEPS // 2:
            seconds, steps = wide, _affordable_steps(budget, wide)
            reasons["network.model_channels"] = "64: the budget affords a wider network and enough steps for it"
            raw["training"]["lr"] = LR / 2
            reasons["training.lr"] = "Adam, halved for the wider network"
        else:
            network["model_channels"] = width
    reasons.setdefault("network.model_channels", f"{network['model_channels']}: fits {steps} steps in the budget")
    reasons.setdefault("training.lr", "Adam at batch 64 (the demo's and faces config's)")
    images = steps * raw["training"]["batch_size"]
    t = raw["training"]
    t["steps"] = steps
    reasons["training.steps"] = f"{minutes:g} minutes x {SHARE_TRAINING:.0%} at {seconds * 1000:.0f} ms per step"
    t["lr_rampup"] = _round(images // 10)
    reasons["training.lr_rampup"] = "a tenth of the images seen (full learning rate after 10% of the steps)"
    t["ema_halflife"] = _round(images // 10)
    reasons["training.ema_halflife"] = "a tenth of the images seen (the demo's ratio)"
    passes = images / len(dataset)
    if passes > 1000:
        t["augment"] = {"p": 0.12}
        reasons["training.augment"] = (f"each image is seen ~{passes:.0f} times: non-leaky augmentation against "
                                       "memorization")
    elif passes > COPY_PASSES:  # measured: 100 faces seen ~560 times each came back as near-copies (own-data.md)
        notes.append(f"each image is seen ~{passes:.0f} times: expect near-copies of your images (check: python "
                     "scripts/copy_check.py RUN); --set 'training.augment={p: 0.2}' trades speed for new images")
    t["checkpoint_every"] = max(1, min(steps, round(120 / seconds)))
    reasons["training.checkpoint_every"] = "about every 2 minutes (Ctrl-C also writes one; resume loses little)"
    t["sample_every"] = max(1, steps // GRIDS)
    reasons["training.sample_every"] = f"{GRIDS} sample grids over the run (RUN/samples/)"
    reasons["training.precision"] = f"bf16 where the hardware has it ({machine.precision} here)"
    reasons["sampling.steps"] = "Heun, 18 steps = 35 evaluations (EDM's choice; tune RUN --nfe 9 for fewer)"
    order = [f"{s}.{k}" for s in raw for k in raw[s]]
    reasons = {k: reasons[k] for k in order if k in reasons}
    return FittedConfig(raw, reasons, summary, machine, float(minutes), seconds, notes, dataset)


def _round(images: int) -> int:
    """``images`` to two significant digits (readable config values)."""
    if images < 100:
        return int(images)
    scale = 10 ** (len(str(int(images))) - 2)
    return int(round(images / scale) * scale)


def _affordable_steps(budget: float, seconds: float) -> int:
    """Steps that fit the budget: its training share, less the grids (a grid of 64 images with Heun's 35
    evaluations costs about 12 training steps: a forward pass is a third of a step)."""
    if seconds <= 0:
        return ROOMY_STEPS * 10
    return max(1, int(budget * SHARE_TRAINING / seconds) - GRIDS * 12)


def _time_steps(raw: dict, dataset: ImageDataset, device: torch.device, log, steps: int = 8) -> float:
    """Seconds per training step of ``raw``'s run on ``dataset``: real steps of the framework's own trainer in a
    scratch run directory, each as the training loop takes it (the step with its EMA update, then its statistics);
    one warm-up step, then the median of ``steps``."""
    from .diffusion import Trainer

    probe = {**raw, "training": {**raw["training"], "steps": steps + 1, "sample_every": 0,
                                 "checkpoint_every": steps + 1}}
    log(f"timing training steps of a {probe['network']['model_channels']}-channel U-Net on {device} ...")
    with tempfile.TemporaryDirectory(prefix="elucidate-fit-") as tmp:
        trainer = Trainer(parse_config(probe), Path(tmp) / "probe", device=str(device), progress=False,
                          log=lambda *a: None, dataset=dataset)
        try:
            stats = trainer.make_stats()
            times = []
            for k in range(steps + 1):
                t0 = time.perf_counter()
                result, _ = trainer.train_step(k)
                trainer.after_step(k + 1, False)
                stats.add(result)
                times.append(time.perf_counter() - t0)
            times = times[1:]  # the first step warms up (allocations, kernels, the optimizer's imports)
        finally:
            trainer.close()
    times.sort()
    return times[len(times) // 2]
