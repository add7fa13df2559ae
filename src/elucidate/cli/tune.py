"""``elucidate tune``: a schedule and solver tuned per NFE budget for a run (or the exact-GMM sandbox); for a
consistency run (``elucidate distill``) the consistency sampler's intermediate levels, by Frechet distance."""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from ..errors import UserError
from ..run import RunDir, load_run
from ..run.rundir import tuned_schedule_name
from ..sampling.registry import get_sampler
from .options import add_run_options, int_list

__all__ = ["register"]

#: Samples per candidate when tuning a consistency run (and as many held out).
CONSISTENCY_NUM = 500
#: Options of the ODE tuner that mean nothing for a consistency run (refused when given).
ODE_ONLY = {"samplers": "--samplers", "boundary": "--boundary", "pool": "--pool", "reference_steps":
            "--reference-steps", "loss": "--loss", "finalists": "--finalists", "max_evals": "--max-evals"}


def register(sub) -> dict:
    """Add the tune subcommand; returns its handler."""
    p = sub.add_parser("tune", help="tune where the steps go and which ODE solver takes them, per NFE budget")
    p.add_argument("run", type=Path, nargs="*", help="run directory or checkpoint (omit with --sandbox); several "
                                                     "runs of one sample shape get one schedule tuned for all")
    p.add_argument("--nfe", required=True, help="NFE budget(s), e.g. 10 or 5,10,20 (one tuned schedule each)")
    p.add_argument("--sandbox", action="store_true",
                   help="no model: tune on the exact denoiser of the digits Gaussian mixture")
    p.add_argument("--num", type=int, default=None,
                   help="noise draws to tune on (and as many held out; default 64 for a run, 256 for --sandbox, "
                        f"{CONSISTENCY_NUM} samples for a consistency run)")
    p.add_argument("--seed", type=int, default=0, help="tuning noise (the held-out noise uses seed + 1)")
    p.add_argument("--samplers", default=None,
                   help="comma-separated ODE solvers to choose from (default: the deterministic sweep solvers)")
    p.add_argument("--reference-steps", dest="reference_steps", type=int, default=None,
                   help="Heun steps of the reference solution (default max(128, 8 x NFE); with --boundary, the "
                        "pools of budgets with equal reference steps are solved once)")
    p.add_argument("--max-evals", dest="max_evals", type=int, default=None,
                   help="solver runs of the search per finalist solver (default 150)")
    p.add_argument("--finalists", type=int, default=None, help="solvers whose schedules are searched (default 3)")
    p.add_argument("--loss", choices=["rmse", "mean", "l4"], default=None,
                   help="what the search minimizes: rmse over all pixels, or the mean of each sample's RMS error "
                        "(less swayed by the few samples that land in another mode; default: tune()'s)")
    p.add_argument("--boundary", type=int, default=0,
                   help="also tune on the N draws of a larger pool that plain solvers at the budget solve worst, "
                        "each draw weighted by its share of the pool: rare draws that end in another mode are then "
                        "seen (costs a reference solution of the pool; unconditional runs, each its own pool)")
    p.add_argument("--pool", type=int, default=None, help="draws the --boundary ones are picked from "
                                                          "(default 16 x --num)")
    p.add_argument("--out", type=Path, default=None, help="folder for nfeN.json and tuned.png "
                                                          "(default RUN/schedules, or ./schedules with --sandbox)")
    p.add_argument("--ema", dest="ema", action="store_true", default=True, help="use the EMA weights (default)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw training weights")
    add_run_options(p)
    return {"tune": cmd_tune}


class _Target(NamedTuple):
    """What is tuned: a denoiser, its sample shape and sigma range, what to record about it and where
    its schedules go by default."""

    D: Callable
    shape: tuple
    sigma_min: float
    sigma_max: float
    info: dict
    folder: Path
    run: object = None  # the LoadedRun of a consistency run (its levels are tuned by tune_consistency)


def _target(args, run_arg) -> _Target:
    """The target of one run, or the sandbox's."""
    if args.sandbox:
        if run_arg is not None:
            raise UserError("give a RUN or --sandbox, not both")
        from ..tuning.sandbox import digits_mixture

        gmm = digits_mixture()
        info = {"sandbox": "digits Gaussian mixture (min std 0.02)", "shape": [gmm.dim]}
        return _Target(gmm.denoise, (gmm.dim,), 0.002, 80.0, info, RunDir(".").schedules)
    if run_arg is None:
        raise UserError("tune needs a RUN directory (or --sandbox)")
    import torch

    run = load_run(run_arg, ema=args.ema, device=args.device)
    cfg, formulation = run.config.sampling, run.denoiser.formulation
    lo, hi = formulation.schedule_range(cfg.sigma_min, cfg.sigma_max)
    guide = run.load_guide(cfg.guide, args.device) if cfg.guide is not None and cfg.guidance != 1 else None
    info = {"run": str(RunDir.of(run_arg)), "checkpoint": run.checkpoint.name, "step": run.step,
            "formulation": formulation.name, "shape": list(run.shape), "ema": bool(args.ema)}
    if get_sampler(cfg.sampler).consistency:  # a distilled run: samples by the consistency sampler
        return _Target(None, tuple(run.shape), float(lo), float(hi), info, RunDir.of(run_arg).schedules, run)
    D = cfg.guided(run.denoiser, guide=guide)  # the run's sampling.guide (autoguidance), if any
    label_dim = run.label_dim
    if label_dim and args.boundary:
        raise UserError(f"{run_arg}: --boundary needs an unconditional run (the hard draws would change class)")
    if label_dim:  # class-conditional: image i gets label i % classes, as sample/eval do with seeds
        num = args.num or 64
        D = functools.partial(D, class_labels=torch.arange(num, device=args.device) % label_dim)
    return _Target(D, tuple(run.shape), float(lo), float(hi), info, RunDir.of(run_arg).schedules)


def _targets(args) -> list[_Target]:
    """One target per run (or the sandbox's); several must share the sample shape and sigma range."""
    targets = [_target(args, run) for run in args.run] if args.run else [_target(args, None)]
    first = targets[0]
    for other in targets[1:]:
        if (other.shape, other.sigma_min, other.sigma_max) != (first.shape, first.sigma_min, first.sigma_max):
            raise UserError(f"{other.info['run']}: sample shape {list(other.shape)}, sigma {other.sigma_min:g}.."
                            f"{other.sigma_max:g} differ from {first.info['run']}'s {list(first.shape)}, "
                            f"{first.sigma_min:g}..{first.sigma_max:g}; one schedule is tuned for runs of one "
                            "shape and range")
    return targets


def cmd_tune(args) -> int:
    import torch

    from ..tuning.boundary import POOL_FACTOR, ReferenceCache
    from ..tuning.tuner import tune

    nfes = int_list(args.nfe, "--nfe")
    targets = _targets(args)
    if any(t.run is not None for t in targets):
        return _tune_consistency(args, targets, nfes)
    args.finalists = 3 if args.finalists is None else args.finalists
    args.max_evals = 150 if args.max_evals is None else args.max_evals
    shape, lo, hi = targets[0].shape, targets[0].sigma_min, targets[0].sigma_max
    D = [t.D for t in targets] if len(targets) > 1 else targets[0].D
    outs = [args.out] if args.out else [t.folder for t in targets]  # --out: one file for all the runs
    num = args.num or (256 if args.sandbox else 64)
    if num < 2:
        raise UserError(f"--num must be >= 2, got {num}")
    if args.boundary < 0 or (args.pool is not None and args.pool < 2):
        raise UserError(f"--boundary must be >= 0 and --pool >= 2, got {args.boundary} and {args.pool}")
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()] if args.samplers else None
    device = torch.device(args.device) if args.device else None
    references = ReferenceCache()  # the --boundary pools are solved once for all the budgets
    for nfe in nfes:
        models = f" for each of {len(targets)} runs" if len(targets) > 1 else ""
        hard = f" (+ the {args.boundary} hardest of {args.pool or POOL_FACTOR * num} each)" if args.boundary else ""
        print(f"elucidate tune: NFE {nfe}, {num} + {num} noise draws{hard}{models}, sigma {lo:g}..{hi:g}")
        try:
            tuned = tune(D, (num, *shape), nfe, seed=args.seed, sigma_min=lo, sigma_max=hi, samplers=samplers,
                         progress=args.progress, reference_steps=args.reference_steps, finalists=args.finalists,
                         max_evals=args.max_evals, boundary=args.boundary, pool=args.pool, device=device,
                         references=references,
                         **({"loss": args.loss} if args.loss else {}))
        except ValueError as e:  # unknown / stochastic solver names, a budget no solver fits
            raise UserError(str(e)) from None
        paths = []
        served = {"tuned_with": [t.info["run"] for t in targets]} if len(targets) > 1 else {}
        for target, folder in zip(targets, outs):  # each run's copy names its own checkpoint
            tuned.model = {**target.info, **served}
            paths.append(tuned.save(folder / tuned_schedule_name(nfe)))
        best = min((b for b in tuned.baselines), key=lambda b: b["heldout_error"])
        print(f"  {tuned.sampler} {tuned.options or ''} with {tuned.steps} steps: RMSE to the reference "
              f"{tuned.tuning_error:.3g} (held-out {tuned.heldout_error:.3g}; best Karras/exponential baseline "
              f"{best['sampler']}/{best['schedule']} {best['heldout_error']:.3g}) in {tuned.seconds:.0f} s")
        print("  wrote " + ", ".join(map(str, paths)))
    for folder in outs:
        _plot(folder)
    if not args.sandbox:
        print(f"next: elucidate sample {args.run[0]} --nfe {nfes[0]} --seeds 0-63 --out grid.png")
    return 0


def _tune_consistency(args, targets: list[_Target], nfes: list[int]) -> int:
    """The consistency sampler's levels per budget, minimizing the Frechet distance of samples in the metric
    features ``elucidate eval`` chooses for the run's data, on common random numbers (:mod:`..tuning.consistency`)."""
    import dataclasses

    from ..config.sampling import schedule_for
    from ..evaluation import METRICS, compute_metric, domain_metric, feature_extractor, load_dataset_stats
    from ..evaluation.evaluate import sample_features
    from ..sampling import num_steps
    from ..tuning.consistency import tune_consistency

    if len(targets) > 1:
        raise UserError("tune takes one consistency run at a time (its levels are scored on its own samples)")
    given = [flag for key, flag in ODE_ONLY.items() if getattr(args, key) not in (None, 0)]
    if given:
        raise UserError(f"{', '.join(given)}: not for a consistency run (its sampler is fixed; tune places the "
                        "intermediate levels by Frechet distance); --num, --seed, --out, --ema apply")
    target = targets[0]
    run, path = target.run, target.info["run"]
    num = args.num or CONSISTENCY_NUM
    if num < 2:
        raise UserError(f"--num must be >= 2, got {num}")
    dataset = run.config.data.get("dataset")
    frechet = [m for m in METRICS if METRICS[m].features and not METRICS[m].needs_features]
    metric = domain_metric(dataset, frechet)
    if metric is None:
        fits = ", ".join(f"{m.name} for {'/'.join(m.datasets)}" for m in map(METRICS.get, frechet) if m.datasets)
        raise UserError(f"{path} was trained on {dataset} data: tuning a consistency run needs a Frechet metric with "
                        f"offline features for its data ({fits}); choose its levels with --sigma-min or "
                        "sampling.sigmas instead")
    name = METRICS[metric].features
    print(f"elucidate tune: {metric} reference statistics of the {dataset} data")
    ref = load_dataset_stats(dataset, name, device=args.device)
    extractor = feature_extractor(name, None, args.device)
    base, formulation = run.config.sampling, run.denoiser.formulation
    options = dict(base.options)
    epsilon = float(options.get("epsilon", 0.0))
    lo = max(float(formulation.schedule_range()[0]), 2 * epsilon)

    def score(sigmas, seeds) -> float:  # every candidate on the same seeds: the same initial and re-noise draws
        cfg = dataclasses.replace(base, sigmas=list(sigmas), steps=num_steps(sigmas))
        stats = sample_features(run, extractor, seeds, cfg, device=args.device)
        return float(compute_metric(metric, stats, ref)["value"])

    objective = {"metric": metric, "features": extractor.name, "reference": ref.source}
    for nfe in nfes:
        default = schedule_for(dataclasses.replace(base, steps=nfe, sigmas=None), formulation)
        print(f"elucidate tune: consistency sampler, NFE {nfe}: {metric} of {num} + {num} samples "
              f"(common random numbers), sigma_last in {lo:g}..{target.sigma_max / 2:g}")
        tuned = tune_consistency(score, nfe, sigma_max=float(default[0]), lo=lo, default=default.tolist(),
                                 options=options, num=num, seed=args.seed, objective=objective)
        tuned.model = dict(target.info)
        written = tuned.save((args.out or target.folder) / tuned_schedule_name(nfe))
        b = tuned.baselines[0]
        print(f"  levels {', '.join(f'{s:.4g}' for s in tuned.sigmas[:-1])}: {metric} {tuned.tuning_error:.4g} "
              f"(held-out {tuned.heldout_error:.4g}; default levels {', '.join(f'{s:.4g}' for s in b['sigmas'][:-1])}"
              f": {b['tuning_error']:.4g}, held-out {b['heldout_error']:.4g}) in {tuned.evaluations} scorings, "
              f"{tuned.seconds:.0f} s")
        print(f"  wrote {written}")
    print(f"next: elucidate sample {args.run[0]} --nfe {nfes[0]} --seeds 0-63 --out grid.png")
    return 0


def _plot(out: Path) -> None:
    """tuned.png of every tuned schedule stored in ``out``."""
    from ..tuning.stored import TunedSchedule
    from ..viz import plot_tuned_schedules, save_figure

    stored = []
    for path in out.glob("nfe*.json"):
        try:
            tuned = TunedSchedule.load(path)
        except UserError as e:  # an old or foreign file next to ours: leave it out of the plot
            print(f"elucidate tune: warning: {e}")
            continue
        if not get_sampler(tuned.sampler).consistency:  # a consistency run's levels are scored by FD, not RMSE
            stored.append(tuned)
    stored.sort(key=lambda t: t.nfe)
    print(f"wrote {save_figure(plot_tuned_schedules(stored), out / 'tuned.png')}")
