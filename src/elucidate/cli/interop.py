"""Interop commands: export (a run to a diffusers pipeline folder), import (an NVlabs/edm or edm2 network to a run
directory); and the ``--diffusers DIR`` model source shared by sample and eval."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

__all__ = ["register", "add_model_source", "load_model"]


def register(sub) -> dict:
    """Add the export and import subcommands; returns their handlers."""
    p = sub.add_parser("export", help="export a run to another library's format (diffusers DDPMPipeline)")
    p.add_argument("run", type=Path, help="run directory (latest checkpoint) or checkpoint file")
    p.add_argument("--diffusers", type=Path, required=True, metavar="OUT",
                   help="write a diffusers DDPMPipeline folder (runs with network.arch diffusers_unet2d and "
                        "diffusion.type DDPM, with a DDPMScheduler, or Flow, with a FlowMatchEulerDiscreteScheduler)")
    p.add_argument("--ema", dest="ema", action="store_true", default=True, help="export the EMA weights (default)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="export the raw training weights")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    from ..interop.edm import IMPORT_SOURCES, PRECONDS

    p = sub.add_parser("import", help="make a run directory of an NVlabs/edm or edm2 network (a safetensors export, "
                                      "docs/edm.md) to sample, eval, sweep or tune it")
    p.add_argument("source", type=Path, help="the network's tensors: a .safetensors export of edm's net.model or "
                                             "edm2's net.unet state dict (docs/edm.md)")
    p.add_argument("--out", type=Path, required=True, metavar="RUN", help="the run directory to write (must not "
                                                                          "exist)")
    p.add_argument("--from", dest="source_kind", choices=IMPORT_SOURCES, required=True,
                   help="edm (SongUNet/DhariwalUNet of NVlabs/edm) or edm2 (the UNet of NVlabs/edm2)")
    p.add_argument("--arch", choices=("ddpmpp", "ncsnpp", "adm", "edm2"), default=None,
                   help="the network (default: read off the tensors: adm for DhariwalUNet, ncsnpp for SongUNet with "
                        "Fourier noise features, else ddpmpp; edm2 for --from edm2)")
    p.add_argument("--precond", choices=list(PRECONDS), default=None,
                   help="the edm Precond the network was trained with: EDMPrecond -> EDM (sigma_data 0.5), "
                        "VPPrecond -> VP, VEPrecond -> VE, iDDPMPrecond -> iDDPM (default: EDM, or iDDPM for a "
                        "network with twice the image channels at its output; edm2: EDM)")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="the data the network was trained on, as `elucidate train --data` takes it (digits, a folder, "
                        "zip or .npz); eval's default reference (default: none recorded, so eval/sweep need --ref)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the written config, e.g. --set sampling.steps=32 or --set "
                        "network.channels_per_head=32 (a hyper-parameter the tensors do not show; repeatable)")
    return {"export": cmd_export, "import": cmd_import}


def cmd_import(args) -> int:
    from ..interop import import_edm
    from ..run.model import load_run

    out = import_edm(args.source, args.out, source=args.source_kind, arch=args.arch, precond=args.precond,
                     data=args.data, overrides=args.overrides)
    run = load_run(out)
    f, s = run.denoiser.formulation, run.config.sampling
    H, W = run.info.resolution
    classes = f", {run.label_dim} classes" if run.label_dim else ""
    print(f"wrote {out}: {run.config.network['arch']} {run.info.channels}x{H}x{W}{classes}, {f.name} formulation, "
          f"sampling {s.sampler} {s.steps} steps (elucidate sample {out} --out samples.png)")
    return 0


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
