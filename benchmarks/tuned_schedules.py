"""Tuned schedules (elucidate.sampling.tune) against k-diffusion's samplers x schedules, side by side in one run.

Part ``gmm``: tune at NFE 9, 17 and 35 (``--nfes``; ``--tune-on``: by default one schedule per NFE for a family
of six other exact mixtures at once; ``siblings``: each evaluated mixture's own schedules, tuned on the same recipe
fitted to other samples or another seed; ``self``: each evaluated mixture itself, on its own tuning draws;
``evaluated``: one schedule for all the evaluated mixtures at once, an upper bound for one schedule; or one named
mixture; ``--boundary K`` adds the K hardest draws of a pool, see ``tune(boundary=...)``), then solve the
probability-flow ODE of six mixtures (two fitted to the real digits, one to patches
of scikit-learn's sample photos, three random ones; none of them tuned on unless ``self``, ``evaluated`` or named) from
``--eval-draws`` new noise draws and report the RMSE to the converged solution (Heun, 1000 Karras steps) of the
tuned (sampler, sigmas, options) and of the best of k-diffusion 0.1.1's euler / heun / dpm_2 / lms / dpmpp_2m x
karras (rho 7) / exponential / polyexponential (rho 1 = exponential, so rho 2 and 0.5 are used) at the same NFE.
Target: tuned <= 0.5 x best. Also shown: the ratio of the median per-sample errors (the bulk), the ratio without
the draws that either run flips, how much of each RMSE the 4 worst samples carry, and how many samples end in
another component than the reference's (mode flips: draws near a mode boundary that a solver's small error sends
across), a 95 % paired-bootstrap interval of the ratio over the draws, and per NFE the geometric mean of the
ratios over the six mixtures.

Part ``demo``: tune NFE 9 and NFE 5 on a trained demo run (``--run``, made by ``elucidate demo``; the
results are stored in RUN/schedules as ``elucidate tune`` does) and measure fd_digits (``--num``
samples, seeds 0..num-1, vs the 1,797 real digits) of the tuned schedules and of dpmpp_2m on the
run's Karras rho = 7 schedule at NFE 9 and 17 (and Heun at NFE 9 and 35; ``--figure`` saves seeds 0-63 side
by side).
Targets: tuned NFE 9 <= dpmpp_2m NFE 17, tuned NFE 5 <= dpmpp_2m NFE 9.

Part ``origin`` (not in ``all``): where the mode flips come from. For every family and evaluated mixture, the
largest variances of its covariance and the flips after one DDIM step from sigma 80 to 40 or 10 (then converged);
and for photo patches at NFE 9 and 35 and random A at NFE 35, the flips of a solver run down to sigma s* and
converged below it: the oracle (the best k-diffusion sampler x schedule) and, with ``--schedules`` (the JSON
``--out`` wrote for the gmm part), the tuned schedule.

    python benchmarks/tuned_schedules.py [--part gmm|demo|all|origin] [--run runs/demo] [--num 2000]
    python benchmarks/tuned_schedules.py --part gmm --schedules A.json [B.json ...] [--eval-draws 65536] [--seed S]
        [--nfes 17 35] [--mixtures NAME ...]   # re-evaluate stored schedules, no tuning
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from elucidate import GaussianMixture
from elucidate.sampling import SAMPLERS, ReferenceCache, TunedSchedule, karras_sigmas, tune
from elucidate.tuning.boundary import POOL_FACTOR
from elucidate.tuning.objectives import per_sample_rms, rmse
from elucidate.tuning.sandbox import class_mixture, digits_mixture

NFES = (9, 17, 35)
KDIFF_SAMPLERS = {"euler": ("sample_euler", 1), "heun": ("sample_heun", 2), "dpm_2": ("sample_dpm_2", 2),
                  "lms": ("sample_lms", 1), "dpmpp_2m": ("sample_dpmpp_2m", 1)}


def kdiffusion():
    """k-diffusion 0.1.1's sampling.py without its package __init__ (which imports torchvision)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        sys.exit("needs the test dependency k-diffusion: pip install --no-deps k-diffusion torchsde torchdiffeq "
                 "trampoline")
    root = spec.submodule_search_locations[0]
    package, utils = types.ModuleType("_kdiff_ref"), types.ModuleType("_kdiff_ref.utils")
    package.__path__, package.utils = [root], utils
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules.setdefault("_kdiff_ref", package)
    sys.modules.setdefault("_kdiff_ref.utils", utils)
    loader = importlib.util.spec_from_file_location("_kdiff_ref.sampling", f"{root}/sampling.py")
    module = importlib.util.module_from_spec(loader)
    sys.modules["_kdiff_ref.sampling"] = module
    loader.loader.exec_module(module)
    return module


def kdiffusion_schedules(K) -> dict:
    """k-diffusion's schedules compared against, by name: ``n`` steps from 80 down to 0.002, then 0 (float32)."""
    return {"karras": lambda n: K.get_sigmas_karras(n, 0.002, 80.0),
            "exponential": lambda n: K.get_sigmas_exponential(n, 0.002, 80.0),
            "polyexp2": lambda n: K.get_sigmas_polyexponential(n, 0.002, 80.0, rho=2.0),
            "polyexp0.5": lambda n: K.get_sigmas_polyexponential(n, 0.002, 80.0, rho=0.5)}


def evaluation_draws(m: GaussianMixture, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``--eval-draws`` noise draws of a mixture, their converged ODE solutions (Heun, 1000 Karras steps) and
    the component each solution ends in."""
    x = torch.randn(args.eval_draws, m.dim, generator=torch.Generator().manual_seed(args.seed + 12345),
                    dtype=torch.float64) * 80.0
    reference = SAMPLERS["heun"](m.denoise, x, karras_sigmas(1000))
    return x, reference, m.classify(reference)


def _fit(patches: np.ndarray, k: int, seed: int) -> GaussianMixture:
    from sklearn.mixture import GaussianMixture as SkGMM

    g = SkGMM(k, covariance_type="diag", random_state=seed, reg_covar=1e-4).fit(patches)
    return GaussianMixture(torch.tensor(g.means_), torch.tensor(g.covariances_).sqrt(), torch.tensor(g.weights_))


def photo_patches_mixture(k: int = 16, seed: int = 0) -> GaussianMixture:
    """16 diagonal Gaussians fitted to 20,000 gray 8x8 patches of scikit-learn's two sample photos
    (``seed`` picks the patches and the fit's initialization)."""
    from sklearn.datasets import load_sample_images
    from sklearn.feature_extraction.image import extract_patches_2d

    rng = np.random.RandomState(seed)
    p = np.concatenate([extract_patches_2d(im.mean(-1), (8, 8), max_patches=10000, random_state=rng)
                        for im in load_sample_images().images])
    return _fit(p.reshape(len(p), 64) / 127.5 - 1, k, seed)


def skimage_patches_mixture(k: int = 16, seed: int = 0) -> GaussianMixture:
    """16 diagonal Gaussians fitted to gray 8x8 patches of scikit-image's bundled test photos."""
    from skimage import data
    from sklearn.feature_extraction.image import extract_patches_2d

    rng = np.random.RandomState(seed)
    images = [data.camera(), data.coins(), data.moon(), data.astronaut().mean(-1), data.text()]
    p = np.concatenate([extract_patches_2d(np.asarray(im, dtype=np.float64), (8, 8), max_patches=5000,
                                           random_state=rng) for im in images])
    return _fit(p.reshape(len(p), 64) / 127.5 - 1, k, seed)


def other_photos_mixture(k: int = 16, seed: int = 0) -> GaussianMixture:
    """16 diagonal Gaussians fitted to gray 8x8 patches of scikit-image's chelsea, coffee and rocket photos."""
    from skimage import data
    from sklearn.feature_extraction.image import extract_patches_2d

    rng = np.random.RandomState(seed)
    images = [data.chelsea().mean(-1), data.coffee().mean(-1), data.rocket().mean(-1)]
    p = np.concatenate([extract_patches_2d(np.asarray(im, dtype=np.float64), (8, 8), max_patches=7000,
                                           random_state=rng) for im in images])
    return _fit(p.reshape(len(p), 64) / 127.5 - 1, k, seed)


def faces_mixture(k: int = 16, seed: int = 0) -> GaussianMixture:
    """16 diagonal Gaussians fitted to 8x8 patches of 100 of scikit-image's real 25x25 faces (lfw_subset)."""
    from skimage import data
    from sklearn.feature_extraction.image import extract_patches_2d

    rng = np.random.RandomState(seed)
    p = np.concatenate([extract_patches_2d(f, (8, 8), max_patches=100, random_state=rng)
                        for f in data.lfw_subset()[:100]])
    return _fit(p.reshape(len(p), 64) * 2 - 1, k, seed)


def half_digits_mixture(min_std: float) -> GaussianMixture:
    """The digits mixture's recipe (one component per class) fitted to the even-numbered half of the digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images[::2], dtype=torch.float64).reshape(-1, 64) / 8.0 - 1.0
    return class_mixture(x, torch.tensor(data.target[::2]), min_std)


def random_mixture(seed: int, k: int = 8, d: int = 64, lo: float = 0.01, hi: float = 0.3) -> GaussianMixture:
    """k components, means uniform in [-0.8, 0.8]^d, per-pixel stds log-uniform in [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(k, d, generator=g, dtype=torch.float64) * 2 - 1) * 0.8
    stds = torch.exp(math.log(lo) + torch.rand(k, d, generator=g, dtype=torch.float64) * math.log(hi / lo))
    return GaussianMixture(means, stds, torch.rand(k, generator=g, dtype=torch.float64) + 0.2)


def union(*mixtures: GaussianMixture) -> GaussianMixture:
    """One mixture holding every component of the given ones (each family with equal total weight)."""
    return GaussianMixture(torch.cat([m.means for m in mixtures]), torch.cat([m.stds for m in mixtures]),
                           torch.cat([m.weights / len(mixtures) for m in mixtures]))


EVALUATION = {
    "digits (std >= 0.02)": lambda: digits_mixture(0.02),
    "digits (std >= 0.1)": lambda: digits_mixture(0.1),
    "photo patches": photo_patches_mixture,
    "random A": lambda: random_mixture(0),
    "random B": lambda: random_mixture(1),
    "random C (4 comp., std 0.005-0.1)": lambda: random_mixture(2, k=4, lo=0.005, hi=0.1),
}
#: A model of the same data, not the evaluated one (as a user tunes on their model): the same recipe fitted
#: to other samples (digits: the even half; photos: other patches and initialization), or another seed.
SIBLINGS = {
    "digits (std >= 0.02)": lambda: half_digits_mixture(0.02),
    "digits (std >= 0.1)": lambda: half_digits_mixture(0.1),
    "photo patches": lambda: photo_patches_mixture(seed=1),
    "random A": lambda: random_mixture(50),
    "random B": lambda: random_mixture(51),
    "random C (4 comp., std 0.005-0.1)": lambda: random_mixture(52, k=4, lo=0.005, hi=0.1),
}
#: Several distributions at once (tune() on a list of denoisers: one schedule, each judged relatively).
FAMILY = {
    "scikit-image patches": skimage_patches_mixture,
    "other photos": other_photos_mixture,
    "faces": faces_mixture,
    "multiscale random": lambda: random_mixture(100, k=16, lo=0.002, hi=0.5),
    "low-std random": lambda: random_mixture(102, k=4, lo=0.002, hi=0.05),
    "random": lambda: random_mixture(101),
}
TUNING = {
    "union": lambda: union(skimage_patches_mixture(), random_mixture(100, k=16, lo=0.002, hi=0.5)),
    "skimage patches": skimage_patches_mixture,
    "multiscale random": lambda: random_mixture(100, k=16, lo=0.002, hi=0.5),
    "photo patches": photo_patches_mixture,  # in-distribution: tuned on one of the evaluation mixtures
}


def _tune_nfes(D, per: int, args) -> dict:
    references = ReferenceCache()  # the --boundary pools are solved once for all budgets
    return {n: tune(D, (per, 64), n, seed=args.seed, reference_steps=1000, loss=args.loss, boundary=args.boundary,
                    pool=args.pool, references=references) for n in args.nfes}


def _top_share(per_sample: torch.Tensor, k: int = 4) -> float:
    """Share of the total squared error that the ``k`` worst samples carry."""
    squares = per_sample.pow(2).sort(descending=True).values
    return (squares[:k].sum() / squares.sum()).item()


def _flipped(m: GaussianMixture, out: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
    """Which samples end in another (most likely) component than the reference's (mode flips)."""
    return m.classify(out) != mode


def _flips(m: GaussianMixture, out: torch.Tensor, mode: torch.Tensor) -> int:
    """How many samples end in another (most likely) component than the reference's."""
    return int(_flipped(m, out, mode).sum())


#: Resamples of the paired bootstrap behind each ratio's 95 % interval.
BOOTSTRAP_RESAMPLES = 2000


def _ratio_interval(tuned: torch.Tensor, candidates: list[torch.Tensor], resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = 0) -> tuple[float, float]:
    """95 % paired-bootstrap interval of tuned RMSE / best candidate's RMSE from per-sample errors (the draws are
    resampled with replacement, the best candidate re-picked on each resample as the oracle is on the draws)."""
    sq = torch.stack([tuned, *candidates]).pow(2)
    g = torch.Generator().manual_seed(seed)
    ratios = []
    for start in range(0, resamples, 50):
        idx = torch.randint(sq.shape[1], (min(50, resamples - start), sq.shape[1]), generator=g)
        ms = sq[:, idx].mean(-1)
        ratios.append((ms[0] / ms[1:].min(0).values).sqrt())
    lo, hi = torch.quantile(torch.cat(ratios), torch.tensor([0.025, 0.975], dtype=sq.dtype)).tolist()
    return lo, hi


def _tune_gmm(args) -> tuple[dict, str, float]:
    """Schedules per evaluated mixture and NFE, tuned as ``--tune-on`` says, and a line on what they were tuned on."""
    t0 = time.perf_counter()
    if args.tune_on == "siblings":  # each evaluated mixture gets the schedules tuned on its sibling
        tuned = {name: _tune_nfes(SIBLINGS[name]().denoise, args.samples, args) for name in EVALUATION}
        what = "each mixture's sibling (the same recipe on other samples or another seed)"
    elif args.tune_on == "self":  # tune() on the evaluated model itself, as a user tunes theirs; other noise draws
        tuned = {name: _tune_nfes(make().denoise, args.samples, args) for name, make in EVALUATION.items()}
        what = "each evaluated mixture itself (its own tuning draws, not the evaluation draws)"
    elif args.tune_on == "family":
        one = _tune_nfes([make().denoise for make in FAMILY.values()], args.family_draws, args)
        tuned = dict.fromkeys(EVALUATION, one)
        what = f"the family {', '.join(FAMILY)} ({args.family_draws} draws each)"
    elif args.tune_on == "evaluated":  # an upper bound, not the target's reading: one schedule fitted to them all
        one = _tune_nfes([EVALUATION[name]().denoise for name in args.mixtures], args.family_draws, args)
        tuned = dict.fromkeys(args.mixtures, one)
        what = (f"the evaluated mixtures themselves, all at once ({args.family_draws} draws each; an upper bound "
                "for one schedule)")
    else:
        one = _tune_nfes(TUNING[args.tune_on]().denoise, args.samples, args)
        tuned = dict.fromkeys(EVALUATION, one)
        what = f"'{args.tune_on}'"
    draws = args.family_draws if args.tune_on in ("family", "evaluated") else args.samples
    seconds = time.perf_counter() - t0
    hard = f", each + the {args.boundary} hardest of {args.pool or POOL_FACTOR * draws}" if args.boundary else ""
    return tuned, (f"tuned on {what}; loss {args.loss}, {draws} + {draws} draws{hard}, reference Heun 1000 steps, "
                   f"{seconds:.0f} s for NFE {', '.join(map(str, args.nfes))}"), seconds


def _tuned_from(path: Path) -> dict:
    """The ``tune_on`` and ``tuned`` schedules (as dicts) of a tuning gmm run's ``--out`` JSON (one clear error if
    it is not one)."""
    try:
        gmm = json.loads(path.read_text())["gmm"]
        return {"tune_on": gmm["tune_on"], "tuned": gmm["tuned"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"--schedules {path}: not a JSON that a tuning --part gmm --out wrote ({e!r})")


def _stored_gmm(path: Path, args) -> tuple[str, dict]:
    """``--schedules``: the tune_on and tuned schedules of an earlier gmm run's JSON, for the evaluated mixtures."""
    data = _tuned_from(path)
    try:
        return data["tune_on"], {name: {n: TunedSchedule.from_dict(data["tuned"][name][str(n)]) for n in args.nfes}
                                 for name in args.mixtures}
    except (KeyError, TypeError, ValueError) as e:
        sys.exit(f"--schedules {path}: no stored schedule for every --mixtures and --nfes {args.nfes} ({e!r})")


def gmm_part(args) -> dict:
    K = kdiffusion()
    schedules = kdiffusion_schedules(K)
    if args.schedules:  # re-evaluate stored schedules (several sets side by side, e.g. on more or other draws)
        sets = {}
        for path in args.schedules:
            tune_on, tuned = _stored_gmm(path, args)
            sets[f"{tune_on} ({path.name})" if tune_on in sets else tune_on] = tuned
        print(f"## Exact mixtures: stored schedules of {', '.join(map(str, args.schedules))} (tuned on "
              f"{', '.join(sets)})\n")
    else:
        tuned, what, seconds = _tune_gmm(args)
        sets = {args.tune_on: tuned}
        print(f"## Exact mixtures: {what}\n")
    for tune_on, tuned in sets.items():
        shown = set()
        for name, per_nfe in tuned.items():
            for n, t in per_nfe.items():
                if id(t) not in shown:
                    shown.add(id(t))
                    owner = f"{name}: " if tune_on in ("siblings", "self") else ""
                    which = f"{tune_on}, " if len(sets) > 1 else ""
                    print(f"- {which}{owner}NFE {n}: {t.sampler} {t.options or ''}, tuning RMSE {t.tuning_error:.2e}, "
                          f"held-out {t.heldout_error:.2e}; sigmas {', '.join(f'{s:.3g}' for s in t.sigmas)}")
    print(f"\nEvaluated on {args.eval_draws} new noise draws per mixture (seed {args.seed + 12345}). Median ratio: of "
          "the per-sample RMS errors (the bulk of the samples); without flips: the RMSE ratio over the draws neither "
          "run flips; top 4: the share of the squared error from the 4 worst samples; mode flips: samples that end "
          "in another component than the reference's (tuned / best); 95 % interval: of the ratio, by a paired "
          f"bootstrap over the draws ({BOOTSTRAP_RESAMPLES:,} resamples, the best re-picked on each).\n")
    print("| mixture | NFE | tuned | best k-diffusion (sampler/schedule) | ratio | target <= 0.5 | median ratio "
          "| ratio without flips | top 4 | mode flips | 95 % interval |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.mixtures:
        m = EVALUATION[name]()
        x, reference, mode = evaluation_draws(m, args)
        for n in args.nfes:
            base = []
            for sampler, (fn, per_step) in KDIFF_SAMPLERS.items():
                steps = n if per_step == 1 else (n + 1) // 2
                for sched, make_sigmas in schedules.items():
                    out = getattr(K, fn)(m.denoise, x, make_sigmas(steps), disable=True)
                    base.append((rmse(out, reference), f"{sampler}/{sched}", per_sample_rms(out, reference),
                                 _flipped(m, out, mode)))
            best = min(base, key=lambda b: b[0])
            for tune_on, tuned in sets.items():
                out = tuned[name][n](m.denoise, x)
                err, per_sample, flipped = rmse(out, reference), per_sample_rms(out, reference), _flipped(m, out, mode)
                kept = ~(flipped | best[3])  # the draws that neither the tuned run nor the best one flips
                no_flip = (per_sample[kept].pow(2).mean() / best[2][kept].pow(2).mean()).sqrt().item()
                interval = _ratio_interval(per_sample, [b[2] for b in base], seed=args.seed)
                rows.append({"mixture": name, "tune_on": tune_on, "nfe": n, "tuned": err, "best": best[0],
                             "best_name": best[1], "ratio": err / best[0], "tuned_median": per_sample.median().item(),
                             "median_ratio": (per_sample.median() / best[2].median()).item(),
                             "no_flip_ratio": no_flip, "tuned_top4": _top_share(per_sample),
                             "best_top4": _top_share(best[2]), "tuned_flips": int(flipped.sum()),
                             "best_flips": int(best[3].sum()), "ratio_interval": interval})
                r = rows[-1]
                label = (f" [{tune_on}]" if len(sets) > 1 else " (tuned on it)" if tune_on in (name, "self")
                         else " (tuned on it, with the others)" if tune_on == "evaluated" else "")
                print(f"| {name}{label} | {n} | {err:.2e} | {best[0]:.2e} ({best[1]}) | {r['ratio']:.2f} | "
                      f"{'met' if r['ratio'] <= 0.5 else 'NOT met'} | {r['median_ratio']:.2f} | {no_flip:.2f} | "
                      f"{r['tuned_top4']:.2f} / {r['best_top4']:.2f} | {r['tuned_flips']} / {r['best_flips']} | "
                      f"{interval[0]:.2f}-{interval[1]:.2f} |", flush=True)
    geo = {}
    for tune_on in sets:
        own = [r for r in rows if r["tune_on"] == tune_on]
        met = sum(r["ratio"] <= 0.5 for r in own)
        met_no_flip = sum(r["no_flip_ratio"] <= 0.5 for r in own)
        below = sum(r["ratio_interval"][1] <= 0.5 for r in own)
        above = sum(r["ratio_interval"][0] > 0.5 for r in own)
        geo[tune_on] = {n: math.exp(sum(math.log(r["ratio"]) for r in own if r["nfe"] == n) / len(args.mixtures))
                        for n in args.nfes}
        print(f"\n{tune_on}: target met in {met} of {len(own)} cases ({met_no_flip} without the flipped draws); "
              f"95 % interval below 0.5 in {below}, above in {above}, across 0.5 in {len(own) - below - above}; "
              "geometric mean of the ratios over the mixtures: "
              + ", ".join(f"NFE {n} {g:.2f}" for n, g in geo[tune_on].items()))
    print()
    result = {"rows": rows, "geometric_mean_ratio": geo if len(sets) > 1 else geo[next(iter(sets))]}
    if args.schedules:
        return {**result, "schedules": [str(path) for path in args.schedules]}
    return {**result, "tune_on": args.tune_on, "seconds": seconds, "tuned": {
        name: {n: t.to_dict() for n, t in per_nfe.items()} for name, per_nfe in sets[args.tune_on].items()}}


#: (mixture, NFE, its oracle's k-diffusion sampler and schedule) whose flips the origin part attributes.
ORIGIN_CASES = [("photo patches", 9, "dpmpp_2m", "exponential"), ("photo patches", 35, "lms", "polyexp0.5"),
                ("random A", 35, "lms", "polyexp0.5")]


def _covariance(m: GaussianMixture) -> torch.Tensor:
    """The mixture's covariance: the components' own (diagonal) plus the spread of their means."""
    w = m.weights / m.weights.sum()
    mean = w @ m.means
    centred = m.means - mean
    return torch.diag(w @ m.stds.pow(2)) + centred.T @ (w[:, None] * centred)


def _converged_from(m: GaussianMixture, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The ODE solved from level ``sigma`` to 0 with 500 Karras steps of Heun (as converged as the reference)."""
    return SAMPLERS["heun"](m.denoise, x, karras_sigmas(500, 0.002, sigma))


def origin_part(args) -> dict:
    K = kdiffusion()
    rows, cuts = [], (20.0, 5.0, 2.0, 1.0, 0.5, 0.05, 0.0)
    print(f"## Where the mode flips come from ({args.eval_draws} draws per mixture, as the gmm part)\n")
    print("| mixture | largest variances | flips after one DDIM step 80 -> 40 | 80 -> 10 |\n|---|---|---|---|")
    evaluated, attributed = {}, {case[0] for case in ORIGIN_CASES}
    for name, make in {**{f"family: {k}": v for k, v in FAMILY.items()}, **EVALUATION}.items():
        m = make()
        x, reference, mode = evaluation_draws(m, args)
        if name in attributed:
            evaluated[name] = (m, x, reference, mode)
        flips = []
        for c in (40.0, 10.0):
            step = SAMPLERS["ddim"](m.denoise, x, torch.tensor([80.0, c], dtype=torch.float64))
            flips.append(_flips(m, _converged_from(m, step, c), mode))
        top = torch.linalg.eigvalsh(_covariance(m)).flip(0)[:3].tolist()
        rows.append({"mixture": name, "variances": top, "ddim40": flips[0], "ddim10": flips[1]})
        print(f"| {name} | {', '.join(f'{v:.2f}' for v in top)} | {flips[0]} | {flips[1]} |")
    tuned = _tuned_from(args.schedules[0])["tuned"] if args.schedules else {}
    schedules = kdiffusion_schedules(K)
    print("\nFlips (RMSE) of the solver run down to s* and converged below it (s* = 0: the solver alone)\n")
    print(f"| mixture | NFE | solver | {' | '.join(f's* = {c:g}' for c in cuts)} |\n|---|---|---|{'---|' * len(cuts)}")
    for name, n, oracle, schedule in ORIGIN_CASES:
        m, x, reference, mode = evaluated[name]
        solvers = [(f"oracle: {oracle} / {schedule}", getattr(K, f"sample_{oracle}"), {"disable": True},
                    schedules[schedule](n))]
        if name in tuned:
            t = tuned[name][str(n)]
            solvers.append((f"tuned: {t['sampler']} {t['options'] or ''}", SAMPLERS[t["sampler"]].fn, t["options"],
                            torch.tensor(t["sigmas"], dtype=torch.float64)))
        for label, solve, options, sigmas in solvers:
            cells = []
            for c in cuts:
                if c == 0:
                    out = solve(m.denoise, x, sigmas, **options)
                else:
                    above = sigmas[sigmas > c]
                    out = solve(m.denoise, x, torch.cat([above, above.new_tensor([c])]), **options)
                    out = _converged_from(m, out, c)
                cells.append((_flips(m, out, mode), rmse(out, reference)))
            rows.append({"mixture": name, "nfe": n, "solver": label, "cuts": list(cuts), "flips_rmse": cells})
            print(f"| {name} | {n} | {label} | {' | '.join(f'{f} ({e:.2e})' for f, e in cells)} |")
    print()
    return {"rows": rows}


def demo_part(args) -> dict:
    from elucidate.config.sampling import SamplingConfig
    from elucidate.evaluation import evaluate, feature_extractor, load_dataset_stats
    from elucidate.run import RunDir, load_run

    run = load_run(args.run)
    lo, hi = run.denoiser.formulation.schedule_range()
    tuned, seconds = {}, {}
    for n in (9, 5):
        t0, c0 = time.perf_counter(), time.process_time()
        tuned[n] = tune(run.denoiser, (64, *run.shape), n, sigma_min=lo, sigma_max=hi, seed=args.seed,
                        loss=args.loss)
        seconds[n] = (time.perf_counter() - t0, time.process_time() - c0)
        tuned[n].model = {"run": str(args.run), "checkpoint": run.checkpoint.name, "step": run.step,
                          "formulation": run.denoiser.formulation.name, "shape": list(run.shape), "ema": True}
        path = tuned[n].save(RunDir(args.run).tuned_schedule(n))
        print(f"wrote {path} (as `elucidate tune {args.run} --nfe {n}` does)")
    extractor = feature_extractor("fd_digits")
    ref = load_dataset_stats("digits", "fd_digits")
    configs = {f"tuned NFE {n}": SamplingConfig(sampler=t.sampler, options=t.options, sigmas=t.sigmas)
               for n, t in tuned.items()}
    configs |= {"heun/karras NFE 9": SamplingConfig(sampler="heun", steps=5),
               "dpmpp_2m/karras NFE 9": SamplingConfig(sampler="dpmpp_2m", steps=9),
               "dpmpp_2m/karras NFE 17": SamplingConfig(sampler="dpmpp_2m", steps=17),
               "heun/karras NFE 35": SamplingConfig(sampler="heun", steps=18)}
    fd = {}
    for name, cfg in configs.items():
        cfg.validate()
        fd[name] = evaluate(run, "fd_digits", num=args.num, ref=ref, extractor=extractor, cfg=cfg)["value"]
    if args.figure:
        print(f"wrote {side_by_side(run, configs, fd, args.figure)}")
    print(f"## Demo model ({run.checkpoint}, fd_digits of {args.num} samples)\n")
    for n in (9, 5):
        t = tuned[n]
        print(f"- tuned NFE {n}: {t.sampler} {t.options or ''}, RMSE to the reference {t.tuning_error:.3g} "
              f"(held-out {t.heldout_error:.3g}; best Karras/exponential baseline "
              f"{min(b['heldout_error'] for b in t.baselines):.3g}); tuning took {seconds[n][0]:.0f} s wall, "
              f"{seconds[n][1]:.0f} s CPU")
    print("\n| sampling | fd_digits |\n|---|---|")
    for name, value in fd.items():
        print(f"| {name} | {value:.2f} |")
    targets = [("tuned NFE 9 <= dpmpp_2m/karras NFE 17", fd["tuned NFE 9"], fd["dpmpp_2m/karras NFE 17"]),
               ("tuned NFE 5 <= dpmpp_2m/karras NFE 9", fd["tuned NFE 5"], fd["dpmpp_2m/karras NFE 9"])]
    print()
    for text, a, b in targets:
        print(f"- {text}: {a:.2f} vs {b:.2f}: {'met' if a <= b else 'NOT met'}")
    return {"fd": fd, "seconds": seconds, "tuned": {n: t.to_dict() for n, t in tuned.items()}}


def side_by_side(run, configs: dict, fd: dict, path: Path) -> Path:
    """Seeds 0-63 of the demo model: tuned NFE 9 next to Heun and DPM-Solver++(2M) at NFE 9 (Karras rho 7)."""
    from elucidate.viz import image_grid, new_figure, save_figure

    shown = ["tuned NFE 9", "heun/karras NFE 9", "dpmpp_2m/karras NFE 9", "heun/karras NFE 35"]
    fig = new_figure(3.2 * len(shown), 3.7)
    for k, name in enumerate(shown):
        x = run.sample(range(64), configs[name])
        ax = fig.add_subplot(1, len(shown), k + 1)
        ax.imshow(image_grid(run.images(x), nrow=8, scale=4)[..., 0], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{name}\nfd_digits {fd[name]:.2f}", fontsize=10)
        ax.axis("off")
    fig.suptitle("Demo model, seeds 0-63: a tuned schedule and the classic ones")
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["gmm", "demo", "all", "origin"], default="all")
    parser.add_argument("--tune-on", dest="tune_on", choices=["family", "siblings", "self", "evaluated", *TUNING],
                        default="family", help="one mixture for all; 'family': one schedule for several mixtures at "
                        "once; 'siblings': each evaluated mixture's schedules tuned on a sibling mixture; 'self': "
                        "on the evaluated mixture itself (other noise draws); 'evaluated': one schedule for all the "
                        "evaluated mixtures at once (an upper bound for one schedule, tuned on them)")
    parser.add_argument("--samples", type=int, default=384,
                        help="tuning noise draws per mixture (--tune-on siblings, self or one mixture)")
    parser.add_argument("--eval-draws", dest="eval_draws", type=int, default=8192,
                        help="new noise draws per evaluated mixture (at 384 and 2048 the RMSE of some mixtures was "
                             "decided by <= 4 samples that land in another mode than the reference)")
    parser.add_argument("--family-draws", dest="family_draws", type=int, default=96,
                        help="noise draws per mixture of the family (--tune-on family or evaluated)")
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="demo run (elucidate demo --out RUN)")
    parser.add_argument("--num", type=int, default=2000, help="samples per fd_digits measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss", choices=["rmse", "mean", "l4"], default="l4",
                        help="what tune() minimizes (its default: l4)")
    parser.add_argument("--boundary", type=int, default=0,
                        help="tune() with the N draws of a larger pool that plain solvers solve worst (each "
                             "family member from its own pool)")
    parser.add_argument("--pool", type=int, default=None, help=f"pool of the --boundary draws (default {POOL_FACTOR} "
                                                               "x --samples, or x --family-draws for the family)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument("--schedules", type=Path, nargs="+", default=None,
                        help="JSON that --part gmm --out wrote: the gmm part re-evaluates their schedules side by side "
                             "instead of tuning (e.g. with more --eval-draws or another --seed); the origin part "
                             "attributes the first one's flips")
    parser.add_argument("--nfes", type=int, nargs="+", default=list(NFES), choices=NFES,
                        help="gmm part: the NFE budgets tuned and evaluated")
    parser.add_argument("--mixtures", nargs="+", default=list(EVALUATION), choices=list(EVALUATION),
                        metavar="NAME", help="gmm part: the evaluated mixtures (default: all six)")
    parser.add_argument("--figure", type=Path, default=None,
                        help="demo part: also save seeds 0-63 of tuned NFE 9 next to Heun and DPM-Solver++(2M)")
    args = parser.parse_args()
    results = {}
    if args.part in ("gmm", "all"):
        results["gmm"] = gmm_part(args)
    if args.part in ("demo", "all"):
        results["demo"] = demo_part(args)
    if args.part == "origin":
        results["origin"] = origin_part(args)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
