"""Commands that generate from a trained run: sample."""
from __future__ import annotations

from pathlib import Path

from .conditions import add_condition_options, attach_conditions
from .editing import add_editing_options, check_editing_args, edit_rows, editing_inputs, write_compare
from .interop import add_model_source, load_model
from .options import add_sampling_options, class_labels_for, parse_seed_arg, sampling_from_args

__all__ = ["register"]


def register(sub) -> dict:
    """Add the sample subcommand; returns its handler."""
    p = sub.add_parser("sample", help="generate images from a run directory or checkpoint")
    add_model_source(p, "run directory (latest checkpoint) or checkpoint file")
    p.add_argument("--seeds", default="0-63", help="e.g. 0-63 or 1,5,9, each seed once (image i depends on its seed "
                                                   "only)")
    p.add_argument("--out", type=Path, required=True,
                   help="grid.png (one grid), DIR/ (one PNG per seed) or samples.npz (uint8 N,H,W,C + seeds)")
    p.add_argument("--trajectory", type=Path, default=None, metavar="PNG",
                   help="also draw the denoising trajectory (x_i and D(x_i), decoded for a latent run) of the "
                        "first 4 seeds (default: not drawn)")
    p.add_argument("--class", dest="class_label", type=int, default=None,
                   help="class label for a class-conditional model (default: seed %% number of classes)")
    add_condition_options(p)
    add_editing_options(p)
    p.add_argument("--compile", action="store_true",
                   help="run the network through torch.compile (eager, with one warning, where compilation fails)")
    add_sampling_options(p)
    return {"sample": cmd_sample}


def cmd_sample(args) -> int:
    import torch

    from ..run.outputs import check_finite, output_kind, write_samples
    from ..runtime.distributed import map_batches, process_group, world

    seeds = parse_seed_arg(args.seeds)
    output_kind(args.out)  # a bad --out fails before any sampling, on every rank
    check_editing_args(args)
    with process_group(args.device, sampling=True) as info:
        if info.world_size > 1:
            args.device = str(info.device)
        run = load_model(args)
        if args.compile:  # the first batch compiles; a failure falls back to eager (runtime.compile)
            from ..runtime.compile import compiled
            if isinstance(getattr(run.denoiser, "net", None), torch.nn.Module):
                run.denoiser.net = compiled(run.denoiser.net)
        cfg = sampling_from_args(run.config.sampling, args, run=run)
        attach_conditions(run, args, seeds, cfg)  # --cond / --unconditional / --null-cond (run.conditions)
        labels = class_labels_for(run, seeds, args.class_label)
        edit = editing_inputs(run, args, seeds)  # --init with --strength or --mask: {} when sampling from noise
        if info.world_size == 1:
            x = run.images(run.sample(seeds, cfg, class_labels=labels, batch_size=args.batch, device=args.device,
                                      precision=args.precision, progress=args.progress, **edit))
        else:  # each rank samples its batches (the same batches one process would), rank 0 writes them all
            def one(b: range):
                return run.images(run.sample(seeds[b.start:b.stop], cfg, batch_size=args.batch, device=args.device,
                                             class_labels=None if labels is None else labels[b.start:b.stop],
                                             precision=args.precision, progress=info.is_main and args.progress,
                                             **edit_rows(edit, b)))
            x = torch.cat(map_batches(one, len(seeds), args.batch)).float()
        if world()[0] != 0:
            return 0
        check_finite(x, seeds)  # never write garbage silently
        if args.compare:  # input | mask | result, one row per seed
            out = write_compare(x, edit, args.out)
        else:
            out = write_samples(x, seeds, args.out, normalizer=run.normalizer)
        ranks = f" on {info.world_size} processes" if info.world_size > 1 else ""
        print(f"wrote {len(seeds)} samples ({cfg.sampler}, {cfg.steps} steps) from {run.checkpoint} to {out}{ranks}")
        if args.trajectory is not None:
            print(f"wrote {_trajectory(run, seeds[:4], cfg, labels, args)}")
        return 0


def _trajectory(run, seeds, cfg, labels, args) -> Path:
    """The trajectory figure of ``seeds`` (x_i above D(x_i) per step), decoded for a latent run."""
    from ..viz import TrajectoryRecorder, plot_trajectory, save_figure

    recorder = TrajectoryRecorder(max_images=len(seeds), decode=run.decode)
    final = run.sample(seeds, cfg, device=args.device, class_labels=None if labels is None else labels[:len(seeds)],
                       precision=args.precision, callback=recorder)
    recorder.finish(final)
    return save_figure(plot_trajectory(recorder, num_columns=8, max_images=len(seeds)), args.trajectory)
