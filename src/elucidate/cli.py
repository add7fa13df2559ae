"""The ``elucidate`` command line: train, sample, demo (and evaluation commands).

User errors (bad config, missing files, bad data) print one line and exit with status 2; no
traceback. Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampler (defaults: the run's sampling section)")
    g.add_argument("--sampler", help="heun, euler, euler_ancestral, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde, lms")
    g.add_argument("--steps", type=int, help="number of steps N (Heun: NFE = 2N - 1)")
    g.add_argument("--schedule", help="auto (the formulation's own), karras, exponential, vp, ve, iddpm, linear")
    g.add_argument("--s-churn", dest="s_churn", type=float)
    g.add_argument("--s-min", dest="s_min", type=float)
    g.add_argument("--s-max", dest="s_max", type=float)
    g.add_argument("--s-noise", dest="s_noise", type=float)
    g.add_argument("--eta", type=float, help="noise for ancestral/SDE samplers")
    g.add_argument("--sigma-min", dest="sigma_min", type=float)
    g.add_argument("--sigma-max", dest="sigma_max", type=float)
    g.add_argument("--rho", type=float)
    p.add_argument("--ema", dest="ema", action="store_true", default=True, help="use the EMA weights (default)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw training weights")
    p.add_argument("--batch", type=int, default=64, help="images per sampling batch (does not change results)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elucidate", description="Diffusion models on the EDM design space.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a model from a YAML config")
    p.add_argument("config", type=Path)
    p.add_argument("--out", type=Path, required=True, help="run directory (resumed if it has checkpoints)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.steps=200 (repeatable)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false")

    p = sub.add_parser("sample", help="generate images from a run directory or checkpoint")
    p.add_argument("run", type=Path, help="run directory (latest checkpoint) or checkpoint file")
    p.add_argument("--seeds", default="0-63", help="e.g. 0-63 or 1,5,9 (image i depends on its seed only)")
    p.add_argument("--out", type=Path, required=True,
                   help="grid.png (one grid), DIR/ (one PNG per seed) or samples.npz (uint8 N,H,W,C + seeds)")
    p.add_argument("--class", dest="class_label", type=int, default=None,
                   help="class label for a class-conditional model (default: seed %% number of classes)")
    _add_sampling_options(p)

    p = sub.add_parser("demo", help="train a small EDM model on the bundled digits and write figures")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo preset)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false")

    from .cli_eval import add_eval_commands
    add_eval_commands(sub, _add_sampling_options)
    return parser


def sampling_from_args(base, args):
    """The run's SamplingConfig with the command-line overrides applied (validated)."""
    import dataclasses

    from .config import SamplingConfig

    changes = {k: getattr(args, k) for k in ("sampler", "steps", "schedule", "s_churn", "s_min", "s_max", "s_noise",
                                             "eta", "sigma_min", "sigma_max", "rho") if getattr(args, k, None) is not None}
    cfg = dataclasses.replace(base, **changes)
    SamplingConfig.validate(cfg)
    return cfg


def cmd_train(args) -> int:
    from .config import load_config
    from .training import Trainer
    from .training.distributed import shutdown_distributed

    config = load_config(args.config, args.overrides)
    try:
        summary = Trainer(config, args.out, device=args.device, progress=args.progress).train()
    finally:
        shutdown_distributed()
    print(f"trained to step {summary['step']} ({summary['skipped_steps']} skipped); "
          f"checkpoint: {summary['checkpoint']}" + (f"; samples: {summary['samples']}" if summary["samples"] else ""))
    return 130 if summary.get("interrupted") else 0


def class_labels_for(run, seeds: list[int], class_label: int | None):
    """Labels for a class-conditional model: ``--class`` for all, else ``seed % num_classes``
    (so an image's label, like its noise, depends on its seed only)."""
    import torch

    from .errors import UserError

    label_dim = int(getattr(run.denoiser.net, "label_dim", 0) or 0)
    if class_label is not None:
        if not label_dim:
            raise UserError("--class was given but the model is not class-conditional")
        if not 0 <= class_label < label_dim:
            raise UserError(f"--class {class_label} is out of range: the model has {label_dim} classes")
        return torch.full((len(seeds),), class_label, dtype=torch.long)
    return torch.tensor(seeds) % label_dim if label_dim else None


def cmd_sample(args) -> int:
    from .generate import generate, parse_seeds
    from .model import load_run
    from .output import write_samples

    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        from .errors import UserError
        raise UserError(f"--seeds: {e}") from None
    run = load_run(args.run, ema=args.ema, device=args.device)
    cfg = sampling_from_args(run.config.sampling, args)
    labels = class_labels_for(run, seeds, args.class_label)
    x = generate(run.denoiser, run.denoiser.formulation, run.shape, seeds, cfg, batch_size=args.batch,
                 device=args.device, class_labels=labels, precision=args.precision, progress=True)
    out = write_samples(x, seeds, args.out, normalizer=run.normalizer)
    print(f"wrote {len(seeds)} samples ({cfg.sampler}, {cfg.steps} steps) from {run.checkpoint} to {out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps, device=args.device, progress=args.progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``elucidate`` console script."""
    from .data import DataError
    from .errors import UserError

    args = build_parser().parse_args(argv)
    handlers = {"train": cmd_train, "sample": cmd_sample, "demo": cmd_demo}
    from .cli_eval import EVAL_HANDLERS
    handlers.update(EVAL_HANDLERS)
    try:
        return handlers[args.command](args) or 0
    except (UserError, DataError) as e:
        print(f"elucidate {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"elucidate {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
