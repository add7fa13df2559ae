"""Commands that write a run: train, train-vae; and encode (a dataset into a VAE's latents)."""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]


class _HelpConfig(argparse.Action):
    """``--help-config``: print every config key, formulation parameter and solver option, then exit."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from ..config.docs import config_docs

        print(config_docs())
        parser.exit()


def register(sub) -> dict:
    """Add the train/train-vae/encode subcommands; returns their handlers."""
    for verb, what in (("train", "a model"), ("train-vae", "a KL autoencoder for latent diffusion")):
        p = sub.add_parser(verb, help=f"train (or resume) {what} from a YAML config")
        p.add_argument("config", type=Path)
        p.add_argument("--out", type=Path, required=True, help="run directory (resumed if it has checkpoints)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set training.steps=200 (repeatable)")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
        p.add_argument("--help-config", action=_HelpConfig,
                       help="list every config key, formulation parameter, sampler and schedule, and exit")

    p = sub.add_parser("encode", help="pre-encode a dataset with a trained VAE (for latent.encoded)")
    p.add_argument("data", help="digits, mnist, an image folder, a .zip, an .npz/.npy array, or a config YAML "
                                "(its data section); resized to the VAE's resolution unless it sets one")
    p.add_argument("--vae", required=True, type=Path, help="train-vae run directory or checkpoint")
    p.add_argument("--out", type=Path, required=True, help="latents.npz (posterior mean and std of every image)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default=None)
    return {"train": cmd_train, "train-vae": cmd_train_vae, "encode": cmd_encode}


def cmd_train(args) -> int:
    from ..config import load_config
    from ..runtime.distributed import process_group
    from ..training import Trainer

    config = load_config(args.config, args.overrides)
    with process_group(args.device):
        summary = Trainer(config, args.out, device=args.device, progress=args.progress).train()
    print(f"trained to step {summary['step']} ({summary['skipped_steps']} skipped); "
          f"checkpoint: {summary['checkpoint']}" + (f"; samples: {summary['samples']}" if summary["samples"] else ""))
    return 130 if summary.get("interrupted") else 0


def cmd_train_vae(args) -> int:
    from ..training import train_vae

    summary = train_vae(args.config, args.out, overrides=args.overrides, device=args.device, progress=args.progress)
    fd = f", fd {summary['fd']:.3g}" if summary.get("fd") is not None else ""
    psnr = f"; held-out PSNR {summary['psnr']:.2f} dB{fd}" if summary.get("psnr") is not None else ""
    print(f"trained to step {summary['step']}; checkpoint: {summary['checkpoint']}{psnr}")
    return 130 if summary.get("interrupted") else 0


def cmd_encode(args) -> int:
    from ..training.latent import encode_dataset, resolve_data_spec

    if args.batch < 1:
        from ..errors import UserError
        raise UserError(f"--batch {args.batch}: expected an integer >= 1")
    meta = encode_dataset(resolve_data_spec(args.data), args.vae, args.out, batch_size=args.batch, device=args.device)
    print(f"wrote {args.out}: {meta['count']} posteriors of shape {meta['latent_shape']} (VAE {meta['vae']}, "
          f"step {meta['vae_step']}); train with latent: {{vae: {args.vae}, encoded: {args.out}}}")
    return 0
