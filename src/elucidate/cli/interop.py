"""Interop commands: export (a run to a diffusers pipeline folder); and the ``--diffusers DIR`` model
source shared by sample and eval."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

__all__ = ["register", "add_model_source", "load_model"]


def register(sub) -> dict:
    """Add the export subcommand; returns its handler."""
    p = sub.add_parser("export", help="export a run to another library's format (diffusers DDPMPipeline)")
    p.add_argument("run", type=Path, help="run directory (latest checkpoint) or checkpoint file")
    p.add_argument("--diffusers", type=Path, required=True, metavar="OUT",
                   help="write a diffusers DDPMPipeline folder (runs with network.arch diffusers_unet2d and "
                        "diffusion.type DDPM, with a DDPMScheduler, or Flow, with a FlowMatchEulerDiscreteScheduler)")
    p.add_argument("--ema", dest="ema", action="store_true", default=True, help="export the EMA weights (default)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="export the raw training weights")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return {"export": cmd_export}


def cmd_export(args) -> int:
    from ..interop import export_diffusers

    out = export_diffusers(args.run, args.diffusers, ema=args.ema, force=args.force)
    print(f"wrote {out} (diffusers DDPMPipeline: DDPMPipeline.from_pretrained({str(out)!r}))")
    return 0


def add_model_source(p, help: str) -> None:
    """The model of sample/eval: a RUN positional or ``--diffusers DIR``."""
    p.add_argument("run", type=Path, nargs="?", help=help + " (or use --diffusers DIR)")
    p.add_argument("--diffusers", type=Path, default=None, metavar="DIR",
                   help="sample a local diffusers pipeline / UNet folder instead of a run (safetensors; never "
                        "downloads; default: the RUN)")
    p.add_argument("--ema-std", type=float, default=None, metavar="S",
                   help="use the post-hoc EMA of relative std S, reconstructed from RUN/phema snapshots (cached as "
                        "RUN/phema/ema-S.safetensors; see elucidate ema; default: the EMA the run trained)")


def load_model(args):
    """The LoadedRun of ``args.run`` or ``args.diffusers`` (exactly one must be given)."""
    if (args.run is None) == (getattr(args, "diffusers", None) is None):
        raise UserError("give either a RUN directory or --diffusers DIR" + (" (not both)" if args.run else ""))
    if args.run is None:
        from ..interop import load_diffusers

        return load_diffusers(args.diffusers, device=args.device)
    from ..run.model import load_run

    if getattr(args, "ema_std", None) is not None:
        from ..training.ema import ema_checkpoint

        return load_run(ema_checkpoint(args.run, args.ema_std), device=args.device)
    return load_run(args.run, ema=args.ema, device=args.device)
