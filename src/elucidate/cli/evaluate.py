"""Evaluation commands: eval, ref, sweep."""
from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from ..data import DATASETS, data_section_for
from ..errors import UserError
from ..evaluation import (
    FEATURE_ALIASES,
    METRICS,
    checkpoint_label,
    choose_metric,
    evaluate,
    feature_extractor,
    feature_name,
    load_dataset_stats,
    result_path,
    sweep,
)
from ..likelihood import run_likelihood
from ..metrics import save_stats
from ..run import RunDir, load_run
from ..runtime.distributed import process_group, world
from ..runtime.files import atomic_write_text
from ..sampling import sweep_samplers
from ..tuning import sandbox_sweep, tuned_config
from ..viz import plot_quality_vs_nfe, save_figure
from .conditions import add_condition_options, attach_conditions
from .interop import add_model_source, load_model
from .options import add_run_options, add_sampling_options, int_list, print_table, sampling_from_args

__all__ = ["register"]


def register(sub) -> dict:
    """Add the eval/ref/sweep subcommands; returns their handlers."""
    metric_help = "; ".join(f"{m.name}: {m.description}" for m in METRICS.values())
    fits = ", ".join(f"{m.name} for {'/'.join(m.datasets)}" for m in METRICS.values() if m.datasets)
    default_help = f"default: the metric of the run's data ({fits}); other data needs --metric; "
    p = sub.add_parser("eval", help="sample a run and score it (" + ", ".join(METRICS) + ")")
    add_model_source(p, "run directory (latest checkpoint) or checkpoint file")
    p.add_argument("--metric", default=None, choices=list(METRICS),
                   help=default_help + metric_help)
    p.add_argument("--num", "--num-samples", dest="num", type=int, default=10000,
                   help="samples per repeat (seeds 0..num-1, then num..2num-1 ...); under torchrun spell it "
                        "--num-samples (torchrun takes --num for its own --numa-binding)")
    p.add_argument("--ref", default=None, help="the real data: dataset statistics .npz (mu, sigma; written by "
                                               "`elucidate ref`), 'digits', a folder, zip or array (default: the "
                                               "run's training data)")
    p.add_argument("--repeats", type=int, default=1, help="repeat over disjoint seed ranges; report mean and min "
                                                          "(the EDM paper uses 3)")
    p.add_argument("--features", default=None, choices=list(FEATURE_ALIASES),
                   help="feature network of kid/pr (default: the dataset's, else inception)")
    p.add_argument("--inception", default=None, help="local path to pt_inception-2015-12-05-6726825d.pth (needed by "
                                                     "fid and the inception features; default: none, never downloaded)")
    add_condition_options(p, evaluating=True)
    add_sampling_options(p)

    p = sub.add_parser("ref", help="compute a dataset's feature statistics (what eval/sweep --ref take)")
    p.add_argument("data", help="'digits', an image folder, a .zip or an .npz/.npy array")
    p.add_argument("--metric", default=None, choices=[m.name for m in METRICS.values() if m.features],
                   help=f"which feature network's statistics (default: the metric of the data: {fits}; other data "
                        f"needs --metric)")
    p.add_argument("--out", type=Path, required=True, help="the statistics .npz to write (mu, sigma)")
    p.add_argument("--keep-features", action="store_true", help="also store the features (for KID / PR)")
    p.add_argument("--inception", default=None, help="local path to pt_inception-2015-12-05-6726825d.pth (needed by "
                                                     "fid and the inception features; default: none, never downloaded)")
    add_run_options(p)

    p = sub.add_parser("sweep", help="quality vs NFE for several samplers (or the exact-denoiser sandbox)")
    p.add_argument("run", type=Path, nargs="?", help="run directory (omit with --sandbox)")
    p.add_argument("--sandbox", action="store_true", help="no model: RMSE to the converged ODE solution of the "
                                                           "digits Gaussian mixture")
    p.add_argument("--samplers", default=None,
                   help="comma-separated solver names (default: the solvers declared for sweeps; "
                        "deterministic ones only with --sandbox)")
    p.add_argument("--nfe", default="5,9,17,35,63", help="comma-separated NFE budgets (evaluations per image)")
    p.add_argument("--metric", default=None, choices=list(METRICS),
                   help=default_help + metric_help)
    p.add_argument("--num", "--num-samples", dest="num", type=int, default=2000,
                   help="samples per point (--num-samples under torchrun)")
    p.add_argument("--ref", default=None, help="the real data, as for eval (default: the run's training data)")
    p.add_argument("--features", default=None, choices=list(FEATURE_ALIASES),
                   help="feature network of kid/pr (default: the dataset's, else inception)")
    p.add_argument("--inception", default=None, help="local path to pt_inception-2015-12-05-6726825d.pth (needed by "
                                                     "fid and the inception features; default: none, never downloaded)")
    p.add_argument("--schedules", default="karras,exponential,vp", help="sandbox discretizations")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN/sweep or ./sweep)")
    p.add_argument("--tuned", action="store_true",
                   help="also the run's tuned schedules (RUN/schedules/nfeN.json) at the --nfe budgets that have one")
    p.add_argument("--ema-std", type=float, default=None, metavar="S",
                   help="sweep the post-hoc EMA of relative std S (reconstructed from RUN/phema snapshots; "
                        "default: the EMA the run trained)")
    p.add_argument("--ema-stds", default=None, metavar="S1,S2,...",
                   help="instead of samplers x NFE: quality at the configured sampler for each post-hoc EMA "
                        "length (relative std), plotted to RUN/sweep/METRIC-vs-ema-std.png (default: samplers x "
                        "NFE)")
    add_condition_options(p, evaluating=True)
    add_sampling_options(p, tuned=False)
    p = sub.add_parser("likelihood", help="bits/dim of the run's data by the probability-flow ODE")
    p.add_argument("run", type=Path, help="run directory (latest checkpoint) or checkpoint file")
    p.add_argument("--num", type=int, default=256, help="images of the training data (a seeded subset)")
    p.add_argument("--trace", choices=["hutchinson", "exact"], default="hutchinson",
                   help="divergence estimator (exact: one backward pass per dimension)")
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per image")
    p.add_argument("--steps", type=int, default=None, help="integrator steps in log sigma (default 64 for rk4)")
    p.add_argument("--method", choices=["rk4", "heun"], default="rk4", help="ODE integrator in log sigma")
    p.add_argument("--seed", type=int, default=0, help="dequantization noise and probes")
    p.add_argument("--batch", type=int, default=64, help="images per batch (does not change results)")
    p.add_argument("--ema", dest="ema", action="store_true", default=True, help="use the EMA weights (default)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw training weights")
    add_run_options(p)
    return {"eval": cmd_eval, "ref": cmd_ref, "sweep": cmd_sweep, "likelihood": cmd_likelihood}


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


_BUNDLED = ("digits", "faces", "mnist")


def _default_metric(args, run) -> None:
    """``--metric`` unless given: the domain metric of the run's data (fd_digits for digits, fd_mnist for mnist);
    for other data a one-line error naming what works. A --diffusers model records no data: its --ref names it."""
    dataset = run.config.data.get("dataset")
    subject = f"{args.run} was trained on {dataset} data"
    if getattr(args, "diffusers", None) is not None:
        dataset = args.ref if args.ref in _BUNDLED else None
        subject = (f"--ref {args.ref} is the {dataset} dataset" if dataset else
                   f"{args.diffusers} does not record the data it was trained on (--ref {args.ref})")
    args.metric = choose_metric(args.metric, dataset, subject)


def _require_ref(args, run) -> None:
    """Without ``--ref`` the run's training data is the reference: a model that records none (a --diffusers folder,
    a run made by `elucidate import` without --data) needs --ref, said before anything else is chosen."""
    if args.ref is not None:
        return
    if getattr(args, "diffusers", None) is not None:
        raise UserError("--ref is required with --diffusers (the real data, or its statistics, to compare with)")
    data = run.config.data
    if data.get("dataset") not in DATASETS:
        raise UserError(f"--ref is required: {args.run} does not record the data it was trained on (data.dataset = "
                        f"{data.get('dataset')!r}); give --ref with the real data (a folder, zip, .npz or 'digits') "
                        "or its statistics (elucidate ref)")


def _dataset_stats(args, run, extractor_name: str, need_features: bool):
    spec = args.ref
    if spec is None:
        data = run.config.data
        spec = data["dataset"] if data["dataset"] in ("digits", "faces", "mnist") else data.get("path")
        if spec is None:
            raise UserError("--ref is required (the run's data section has no path)")
    return load_dataset_stats(spec, extractor_name, inception=args.inception, device=args.device,
                          need_features=need_features)


def _distributed(handler):
    """Run ``handler(args)`` in torchrun's process group if there is one (seed batches sharded over ranks)."""
    def wrapped(args) -> int:
        with process_group(args.device, sampling=True) as info:
            if info.world_size > 1:
                args.device = str(info.device)
            return handler(args, info.is_main)
    return wrapped


def cmd_eval(args) -> int:
    return _distributed(_eval)(args)


def _eval(args, main: bool) -> int:
    run = load_model(args)
    _require_ref(args, run)
    cfg = sampling_from_args(run.config.sampling, args, run=run)
    attach_conditions(run, args, None, cfg)  # --cond / --unconditional / the training data's conditions
    _default_metric(args, run)
    name = feature_name(args.metric, args.features, run.config.data.get("dataset"))
    ref = _dataset_stats(args, run, name, need_features=METRICS[args.metric].needs_features)
    extractor = feature_extractor(name, args.inception, args.device)
    settings = {"ema": args.ema, "ema_std": getattr(args, "ema_std", None),
                "tuned_nfe": getattr(args, "tuned_nfe", None)}
    result = evaluate(run, args.metric, num=args.num, ref=ref, extractor=extractor, cfg=cfg, repeats=args.repeats,
                      batch_size=args.batch, device=args.device, progress=args.progress,
                      precision=getattr(args, "precision", "fp32"), settings=settings)
    if not main:  # every rank has the same figure; rank 0 reports it
        return 0
    out = result_path(run.checkpoint, result)  # one file per setting: a later eval with other settings adds one
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    columns = ["metric", "value", "min", "num", "repeats", "sampler", "steps", "nfe", "features", "step"]
    columns += [k for k in ("precision", "recall", "std") if k in result]
    print_table([result], columns)
    print(f"wrote {out}")
    return 0


def cmd_ref(args) -> int:
    section = data_section_for(args.data)
    if section is None:
        raise UserError(f"{args.data!r} is not a dataset: expected 'digits', 'faces', 'mnist', an image folder, "
                        f"a .zip or an .npz/.npy array")
    if "path" in section and not Path(section["path"]).exists():
        raise UserError(f"{args.data} does not exist")
    kind = section["dataset"]
    subject = f"{args.data} is the bundled {kind} dataset" if kind in _BUNDLED else f"{args.data} is {kind} data"
    args.metric = choose_metric(args.metric, kind, subject, choices=[m.name for m in METRICS.values() if m.features])
    name = METRICS[args.metric].features
    ref = load_dataset_stats(args.data, name, inception=args.inception, device=args.device)
    extra = {"features": ref.features} if args.keep_features else {}
    save_stats(args.out, ref.mu, ref.sigma, **extra)
    print(f"wrote {args.out}: {name} statistics of {args.data} ({ref.mu.shape[0]}-d)")
    return 0


def _write_sweep(rows: list[dict], out_dir: Path, stem: str, metric: str, title: str) -> list[Path]:
    columns = list(rows[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    csv_path, md_path, png_path = (out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "png"))
    atomic_write_text(csv_path, buffer.getvalue())
    atomic_write_text(md_path, print_table(rows, columns) + "\n")
    save_figure(plot_quality_vs_nfe(rows, metric, title=title), png_path)
    return [csv_path, md_path, png_path]


def _tuned_rows(args, run, base, nfes: list[int], ref, extractor, progress: bool = True) -> list[dict]:
    """Sweep rows of the run's tuned schedules at the budgets that have one (sampler ``tuned``)."""
    have = [n for n in nfes if RunDir(args.run).tuned_schedule(n).is_file()]
    if not have:
        raise UserError(f"--tuned: no tuned schedule for NFE {args.nfe} in {RunDir(args.run).schedules}; "
                        f"run `elucidate tune {args.run} --nfe {args.nfe}` first")
    rows = []
    for n in have:
        cfg = tuned_config(base, args.run, n, shape=run.shape, checkpoint=run.checkpoint.name)
        result = evaluate(run, args.metric, num=args.num, ref=ref, extractor=extractor, cfg=cfg, batch_size=args.batch,
                          device=args.device)
        rows.append({"sampler": "tuned", "steps": cfg.steps, "nfe": result["nfe"], "value": result["value"]})
        rows[-1].update({k: result[k] for k in ("precision", "recall", "std") if k in result})
        if progress:
            print(f"  tuned ({cfg.sampler})  steps {cfg.steps:>3}  NFE {result['nfe']:>3}  "
                  f"{args.metric} {result['value']:.4g}")
    return rows


def cmd_sweep(args) -> int:
    if args.sandbox:
        return _sweep(args, True)
    return _distributed(_sweep)(args)


def _sweep(args, main: bool) -> int:
    nfes = int_list(args.nfe, "--nfe")
    if args.tuned and (args.sandbox or args.run is None):
        raise UserError("--tuned needs a RUN (tuned schedules live in RUN/schedules; see `elucidate tune`)")
    if args.sandbox:
        samplers = _names(args.samplers) if args.samplers else sweep_samplers(deterministic=True)
        try:
            rows = sandbox_sweep(samplers=samplers, schedules=args.schedules.split(","), nfes=nfes,
                                 progress=args.progress)
        except ValueError as e:  # unknown sampler / schedule names
            raise UserError(str(e)) from None
        rows = [{"sampler": f"{r['sampler']}/{r['schedule']}", "steps": r["steps"], "nfe": r["nfe"],
                 "value": r["rmse"]} for r in rows]
        out_dir = args.out or Path("sweep")
        paths = _write_sweep(rows, out_dir, "sandbox-rmse", "RMSE to converged solution",
                             "Exact digits-mixture denoiser: RMSE vs NFE")
    else:
        if args.run is None:
            raise UserError("sweep needs a RUN directory (or --sandbox)")
        if args.ema_stds is not None and (args.ema_std is not None or args.tuned):
            raise UserError("--ema-stds cannot be combined with --ema-std or --tuned")
        run = load_model(argparse.Namespace(run=args.run, ema=args.ema, ema_std=args.ema_std, device=args.device))
        _require_ref(args, run)
        base = sampling_from_args(run.config.sampling, args, run=run)
        attach_conditions(run, args, None, base)  # --cond / --unconditional / the training data's conditions
        samplers = _names(args.samplers) if args.samplers else sweep_samplers()
        _default_metric(args, run)
        name = feature_name(args.metric, args.features, run.config.data.get("dataset"))
        ref = _dataset_stats(args, run, name, need_features=METRICS[args.metric].needs_features)
        extractor = feature_extractor(name, args.inception, args.device)
        if args.ema_stds is not None:
            from .phema import ema_sweep

            if world()[1] > 1:
                raise UserError("sweep --ema-stds runs in one process (use torchrun for sample, eval and sweep "
                                "over NFE)")

            def score(r):
                r.conditions, r.null_cond = run.conditions, run.null_cond  # the same conditions for every EMA
                return evaluate(r, args.metric, num=args.num, ref=ref, extractor=extractor, cfg=base,
                                batch_size=args.batch, device=args.device), base
            print("wrote " + ", ".join(str(p) for p in ema_sweep(args, score)))
            return 0
        rows = sweep(run, args.metric, samplers=samplers, nfes=nfes, num=args.num, ref=ref, extractor=extractor,
                     base=base, batch_size=args.batch, device=args.device,
                     progress=main and args.progress)
        if args.tuned:
            rows += _tuned_rows(args, run, base, nfes, ref, extractor, progress=main and args.progress)
        if not main:  # every rank has the same rows; rank 0 writes them
            return 0
        out_dir = args.out or RunDir(args.run).sweep
        paths = _write_sweep(rows, out_dir, f"{args.metric}-vs-nfe", args.metric,
                             f"{args.metric} vs NFE ({args.num} samples, step {run.step})")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0




def cmd_likelihood(args) -> int:
    run = load_run(args.run, ema=args.ema, device=args.device)
    result = run_likelihood(run, args.num, batch_size=args.batch, trace=args.trace, seed=args.seed,
                            device=args.device, progress=args.progress, steps=args.steps, method=args.method,
                            num_probes=args.probes)
    s = result["settings"]
    s.update(checkpoint=checkpoint_label(run.checkpoint), num=args.num, ema=args.ema)  # every setting names the file
    out = result_path(run.checkpoint, result)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"{result['mean']:.4f} bits/dim (+- {result['sem']:.4f} s.e.m., {result['num']} images, {s['trace']} trace, "
          f"{s['method']} {s['steps']} steps, sigma {s['sigma_min']:g}..{s['sigma_max']:g})")
    print(f"wrote {out}")
    return 0
