"""Commands that write a run: train, train-vae, reflow (a new run from a run's ODE couplings); and encode (a
dataset into a VAE's latents)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..training.fit import DEFAULT_MINUTES
from ..training.reflow import DEFAULT_STEPS as REFLOW_STEPS

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
    from .options import add_run_options

    for verb, what in (("train", "a model"), ("train-vae", "a KL autoencoder for latent diffusion")):
        p = sub.add_parser(verb, help=f"train (or resume) {what} from a YAML config"
                           + (", or from --data alone (a configuration fitted to the data and this machine)"
                              if verb == "train" else ""))
        if verb == "train":
            p.add_argument("config", type=Path, nargs="?", default=None,
                           help="YAML config (omit with --data: the configuration is fitted, see `elucidate init`)")
            p.add_argument("--data", default=None, metavar="PATH",
                           help="train on PATH (image folder, .zip, .npz/.npy, or digits/mnist/faces) with a "
                                "configuration fitted to it and this machine; resuming uses the run's stored one "
                                "(default: none, train CONFIG)")
            p.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, metavar="M",
                           help="with --data: the training time to fit the configuration to")
            p.add_argument("--init", default=None, metavar="SOURCE",
                           help="fine-tune: start the new run from these weights (optimizer and step from zero): a "
                                "run directory or checkpoint (its EMA weights), a diffusers UNet2DModel folder "
                                "(network.arch diffusers_unet2d) or an exported NVlabs/edm (ddpmpp, ncsnpp, adm) or "
                                "edm2 network .safetensors (default: none, random initial weights)")
            p.add_argument("--init-ema", action="store_true",
                           help="with --init RUN: the network starts from RUN's raw weights and the EMA from RUN's "
                                "EMA (default: both from RUN's EMA)")
        else:
            p.add_argument("config", type=Path, help="YAML config (see configs/digits-vae.yaml)")
        p.add_argument("--out", type=Path, required=True, help="run directory (resumed if it has checkpoints)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set training.steps=200 (repeatable)")
        add_run_options(p)
        p.add_argument("--help-config", action=_HelpConfig,
                       help="list every config key, formulation parameter, sampler and schedule, and exit")

    p = sub.add_parser("init", help="write a training configuration fitted to your data and this machine "
                                    "(commented, for editing)")
    p.add_argument("data", help="image folder, .zip, .npz/.npy array, or digits/mnist/faces")
    p.add_argument("--out", type=Path, required=True, help="the YAML file to write (e.g. config.yaml)")
    p.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, metavar="M",
                   help="the training time to fit the configuration to")
    add_run_options(p)  # --device: the device the configuration is fitted for (its steps are timed there)
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")

    p = sub.add_parser("reflow", help="straighten a run's ODE: fine-tune it on (noise, sample) pairs of its own "
                                      "ODE into a new run (rectified flow's reflow; docs/flow.md)")
    p.add_argument("run", type=Path, help="the trained run directory or checkpoint (its EMA weights)")
    p.add_argument("--out", type=Path, required=True, help="the new run directory (resumed if it has started)")
    p.add_argument("--pairs", type=int, default=None, metavar="N",
                   help="(noise, sample) pairs to generate with the run's ODE (default: none; required to start a "
                        "new --out)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help=f"fine-tuning steps (default {REFLOW_STEPS}; sets training.steps)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pairs' noise")
    p.add_argument("--ode-sampler", default=None, metavar="NAME",
                   help="deterministic sampler of the pairs (default: the run's sampling.sampler)")
    p.add_argument("--ode-steps", type=int, default=None, metavar="K",
                   help="its steps (default: the run's sampling.steps)")
    p.add_argument("--batch", type=int, default=256, help="samples per batch while generating the pairs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the new run's config, e.g. --set training.lr=1e-3 (repeatable)")
    add_run_options(p)

    p = sub.add_parser("encode", help="pre-encode a dataset with a trained VAE (for latent.encoded)")
    p.add_argument("data", help="digits, mnist, an image folder, a .zip, an .npz/.npy array, or a config YAML "
                                "(its data section); resized to the VAE's resolution unless it sets one")
    p.add_argument("--vae", required=True, type=Path,
                   help="train-vae run directory or checkpoint, or a diffusers AutoencoderKL folder")
    p.add_argument("--out", type=Path, required=True, help="latents.npz (posterior mean and std of every image)")
    p.add_argument("--batch", type=int, default=256, help="images per encoding batch (does not change results)")
    add_run_options(p)
    return {"train": cmd_train, "train-vae": cmd_train_vae, "init": cmd_init, "reflow": cmd_reflow,
            "encode": cmd_encode}


def cmd_train(args) -> int:
    from ..config import load_config
    from ..runtime.distributed import process_group
    from ..training import Trainer

    dataset = None
    if args.data is None:
        if args.config is None:
            raise UserError("give a config file (elucidate train CONFIG --out RUN) or --data PATH (a configuration "
                            "fitted to your data, see `elucidate init`)")
        config = load_config(args.config, args.overrides)
    elif args.config is not None:
        raise UserError(f"give a config file or --data, not both (to train {args.config} on other data: "
                        f"--set data.path={args.data})")
    if args.init_ema and args.init is None:
        raise UserError("--init-ema needs --init SOURCE (the run whose network and EMA the new run starts from)")
    if args.init is not None:  # before any work: what SOURCE is, and that --out is a new run
        from ..training.init import check_new_run, resolve_source

        resolve_source(args.init)
        check_new_run(args.out, args.init)
    if args.data is not None:
        config, dataset = _fitted(args)
    with process_group(args.device):
        trainer = Trainer(config, args.out, device=args.device, progress=args.progress, dataset=dataset)
        if args.init is not None:
            from ..training.init import start_from_weights

            start_from_weights(trainer, args.init, ema=args.init_ema)
        summary = trainer.train()
    samples = f"; samples: {summary['samples']}" if summary["samples"] else ""
    return _report(summary, f"trained to step {summary['step']} ({summary['skipped_steps']} skipped); "
                            f"checkpoint: {summary['checkpoint']}{samples}",
                   again="run the same command without --init to resume" if args.init is not None else None)


def _report(summary: dict, line: str, again: str | None = None) -> int:
    """Print a training's last line (rank 0 only under torchrun); exit status 130 if it was interrupted."""
    from ..runtime.distributed import is_main_process

    if summary.get("interrupted"):  # Ctrl-C / SIGTERM: the step finished and checkpointed, nothing else
        line = (f"checkpoint: {summary['checkpoint']}\n"
                f"interrupted at step {summary['step']} \N{EM DASH} {again or 'run the same command to resume'}")
    if is_main_process():
        print(line)
    return 130 if summary.get("interrupted") else 0


def _fitted(args):
    """``train --data``: the run's stored configuration when resuming, else one fitted to the data (printed with
    its reasons); returns (config, the fitted dataset or None)."""
    import os

    from ..config import load_config, parse_config
    from ..config.schema import parse_with_overrides
    from ..run import RunDir
    from ..training.fit import fit_config

    run = RunDir(args.out)
    if run.config.is_file():
        print(f"resuming {run.path} with its stored configuration ({run.config}; --minutes applies to new runs)")
        return load_config(run.config, args.overrides), None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"--data under torchrun: fit the configuration once (elucidate init {args.data} --out "
                        "config.yaml), then train that file on every process")
    fitted = fit_config(args.data, minutes=args.minutes, device=args.device)
    for line in fitted.lines():
        print(line)
    config = parse_with_overrides(fitted.raw, args.overrides, parse_config, source="the fitted configuration")
    same_data = not any(item.strip().startswith("data.") for item in args.overrides)
    return config, fitted.dataset if same_data else None


def cmd_init(args) -> int:
    from ..runtime.files import atomic_write_text
    from ..training.fit import fit_config

    if args.out.exists() and not args.force:
        raise UserError(f"{args.out} exists; pass --force to overwrite it")
    fitted = fit_config(args.data, minutes=args.minutes, device=args.device)
    for line in fitted.lines():
        print(line)
    atomic_write_text(args.out, fitted.yaml())
    print(f"wrote {args.out}; train it with: elucidate train {args.out} --out runs/{Path(args.out).stem}")
    return 0


def cmd_reflow(args) -> int:
    import dataclasses

    from ..run import RunDir
    from ..training.reflow import reflow

    cfg, started = None, RunDir(args.out).config.is_file()
    if not started:
        if args.pairs is None:
            raise UserError(f"--pairs N is needed to start {args.out}: how many (noise, sample) pairs to generate")
        if args.ode_sampler is not None or args.ode_steps is not None:
            from ..run.model import load_run, resolve_checkpoint

            base = load_run(resolve_checkpoint(args.run), device="cpu").config.sampling
            changes = {k: v for k, v in (("sampler", args.ode_sampler), ("steps", args.ode_steps)) if v is not None}
            cfg = dataclasses.replace(base, **changes)
            cfg.validate()
    overrides = list(args.overrides) + ([f"training.steps={args.steps}"] if args.steps is not None else [])
    summary = reflow(args.run, args.out, pairs=args.pairs, steps=REFLOW_STEPS if args.steps is None else args.steps,
                     seed=args.seed, cfg=cfg, overrides=overrides if started else list(args.overrides),
                     batch_size=args.batch, device=args.device, progress=args.progress)
    return _report(summary, f"reflowed to step {summary['step']} on {summary['pairs']}; checkpoint: "
                            f"{summary['checkpoint']}; sample it with: elucidate sample {args.out} --sampler euler "
                            f"--steps 2")


def cmd_train_vae(args) -> int:
    from ..training import train_vae

    summary = train_vae(args.config, args.out, overrides=args.overrides, device=args.device, progress=args.progress)
    fd = f", fd {summary['fd']:.3g}" if summary.get("fd") is not None else ""
    psnr = f"; held-out PSNR {summary['psnr']:.2f} dB{fd}" if summary.get("psnr") is not None else ""
    return _report(summary, f"trained to step {summary['step']}; checkpoint: {summary['checkpoint']}{psnr}")


def cmd_encode(args) -> int:
    from ..training.latent import encode_dataset, resolve_data_spec

    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: expected an integer >= 1")
    meta = encode_dataset(resolve_data_spec(args.data), args.vae, args.out, batch_size=args.batch, device=args.device,
                          progress=args.progress)
    print(f"wrote {args.out}: {meta['count']} posteriors of shape {meta['latent_shape']} (VAE {meta['vae']}, "
          f"step {meta['vae_step']}); train with latent: {{vae: {args.vae}, encoded: {args.out}}}")
    return 0
