"""Schedules tuned per NFE budget: where the steps go and which solver takes them, for one denoiser.

:func:`tune` solves the probability-flow ODE of ``D`` from its own noise with a fine reference solver
(Heun, ``reference_steps`` Karras steps). Every candidate solver is scored on Karras rho = 7, the
exponential schedule and a GITS-like dynamic program over the reference trajectory (the Euler steps
between its levels with the least summed one-step error); the best few (finalists) also try Karras
rho in {3, 5, 10} and VP, then move the interior log-sigmas from their best start to minimize the error
of the final samples to the reference (:data:`LOSSES`; default ``l4``, which weighs the samples that
come out worst most): coarse-to-fine (:mod:`.search`), a pattern search over the knots of a piecewise-linear warp of
the step index, then over every level. A second (held-out) draw of noise picks among each finalist's
start, warp and per-level results, so a search that fitted its own noise at the expense of other draws
does not win: among the finalists whose held-out loss is within :data:`HELDOUT_SLACK` times the best one's,
the lowest geometric mean of tuning and held-out loss wins (:func:`choose_finalist`). The search replays the
registered solver itself, so the tuned ``(sampler, sigmas, options)`` costs at most ``nfe`` evaluations
by construction.
``D`` may be several denoisers: one schedule for all, each judged relatively. ``boundary`` adds the hardest
draws of a larger pool, weighted by the share of the pool each stands for (:mod:`.boundary`).
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from ..sampling.registry import SAMPLERS, check_options, get_sampler, sweep_samplers
from ..sampling.schedules import exponential_sigmas, karras_sigmas, vp_range_sigmas
from .boundary import (
    POOL_SEED_OFFSET,
    ReferenceCache,
    check_boundary,
    picker_evaluations,
    stratify_models,
    tensor_digest,
)
from .objectives import LOSSES, Models, geometric_mean_loss, rmse, weighted_loss
from .search import search_levels
from .stored import TunedSchedule

__all__ = ["tune", "candidate_samplers", "choose_finalist", "OPTION_VARIANTS", "NOISE_SEED_OFFSET", "HELDOUT_SLACK",
           "tuning_noise", "rmse"]

#: Option sets tried for a solver besides its defaults (the search picks among them by error).
OPTION_VARIANTS: dict[str, list[dict]] = {
    "lms": [{"order": 3}],
    "ipndm": [{"order": 3}, {"order": 2}],
    "unipc": [{"order": 3}, {"variant": "bh1"}, {"order": 3, "variant": "bh1"}, {"final_order": 3},
              {"order": 3, "final_order": 3}],
}
#: Tuning noise for ``seed`` comes from ``torch.Generator().manual_seed(NOISE_SEED_OFFSET + seed)``, a
#: stream no ``elucidate sample/eval`` seed uses (those seed one generator per image).
NOISE_SEED_OFFSET = 0x7E5E_0000
#: Initial schedules: Karras rho values (plus exponential and VP) and the DP over the reference; every
#: candidate is screened on :data:`SCREEN` (rho 7, exponential, DP: also its baselines), finalists on all.
INIT_RHOS = (3.0, 5.0, 7.0, 10.0)
SCREEN = (7.0,)
#: A finalist can win only if its held-out loss is within this factor of the best finalist's: on the demo
#: model at NFE 17, iPNDM order 3 fitted its draws best (RMSE 0.0026) but had 3.8x the held-out error of
#: plain iPNDM (0.025 vs 0.0064), while at NFE 9 the finalists were within 1.1x of each other.
HELDOUT_SLACK = 1.5


def candidate_samplers(samplers: Sequence[str] | None = None) -> list[tuple[str, dict]]:
    """(solver, options) pairs to tune: each named deterministic solver with its defaults and
    :data:`OPTION_VARIANTS` (default: the deterministic sweep solvers)."""
    names = sweep_samplers(deterministic=True) if samplers is None else list(samplers)
    out = []
    for name in names:
        spec = get_sampler(name)
        if spec.stochastic:
            raise ValueError(f"sampler {name!r} draws noise; tuning needs a deterministic (ODE) solver")
        for options in [{}, *OPTION_VARIANTS.get(name, [])]:
            if all(k in spec.options for k in options):
                check_options(name, options)
                out.append((name, dict(options)))
    return out


def tuning_noise(shape: Sequence[int], seed: int, sigma_max: float, *, dtype=torch.float64, device=None):
    """The initial x = sigma_max n of a tuning run (float32 draws, as ``sample()``)."""
    g = torch.Generator().manual_seed(NOISE_SEED_OFFSET + int(seed))
    return (torch.randn(tuple(shape), generator=g) * sigma_max).to(device=device, dtype=dtype)


class _Memo:
    """D with its answers remembered by (sigma, bits of x): a schedule that shares its first levels with
    one tried before replays those steps without evaluating D again. Counts real evaluations."""

    def __init__(self, D: Callable, size: int = 512):
        self.D, self.size, self.cache, self.calls = D, size, OrderedDict(), 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        key = (float(sigma.reshape(-1)[0]), tensor_digest(x))
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            return hit
        self.calls += 1
        out = self.D(x, sigma)
        self.cache[key] = out
        if len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return out


def _to_sigmas(u: list[float], sigma_max: float) -> torch.Tensor:
    return torch.tensor([sigma_max, *(math.exp(v) for v in u), 0.0], dtype=torch.float64)


def _from_sigmas(sigmas: torch.Tensor) -> list[float]:
    return [math.log(float(s)) for s in sigmas[1:-1]]


def _dp_schedule(ref_sigmas: list[float], states: list[torch.Tensor], denoised: list[torch.Tensor],
                 final: torch.Tensor, steps: int, points: int = 80) -> torch.Tensor | None:
    """GITS-style initial schedule: ``steps`` Euler steps between levels of the reference trajectory
    (every k-th of its levels, ``points`` at most) minimizing the sum of the one-step errors to it."""
    n, points = len(ref_sigmas), max(points, steps + 1)
    if n < steps:
        return None  # the reference has fewer levels than the schedule needs
    idx = sorted(set(round(i * (n - 1) / (points - 1)) for i in range(points))) if n > points else list(range(n))
    s = [ref_sigmas[i] for i in idx] + [0.0]
    X = [states[i] for i in idx] + [final]
    d = [(states[i] - denoised[i]) / ref_sigmas[i] for i in idx]
    G = len(s)
    cost = [[math.inf] * G for _ in range(G)]
    for i in range(G - 1):
        for j in range(i + 1, G):
            cost[i][j] = rmse(X[i] + (s[j] - s[i]) * d[i], X[j])
    best = [[math.inf] * G for _ in range(steps + 1)]  # best[k][j]: k steps from node 0 to node j
    back = [[-1] * G for _ in range(steps + 1)]
    best[0][0] = 0.0
    for k in range(1, steps + 1):
        for j in range(1, G):
            for i in range(j):
                value = best[k - 1][i] + cost[i][j]
                if value < best[k][j]:
                    best[k][j], back[k][j] = value, i
    path, j = [G - 1], G - 1
    for k in range(steps, 0, -1):
        j = back[k][j]
        path.append(j)
    return torch.tensor([s[j] for j in reversed(path)], dtype=torch.float64)


class _Problem:
    """One solver's loss as a function of the interior log-sigmas, on fixed noise and reference."""

    def __init__(self, D, x, reference, sampler: str, options: dict, sigma_max: float,
                 loss: Callable = rmse, report: Callable = rmse):
        self.D, self.x, self.reference = D, x, reference
        self.fn, self.options, self.sigma_max = SAMPLERS[sampler].fn, options, sigma_max
        self.loss, self.report, self.evals = loss, report, 0

    def rmse(self, sigmas: torch.Tensor) -> float:
        """RMSE of the final samples to the reference (what is reported; weighted as the batch is)."""
        return self.report(self.fn(self.D, self.x, sigmas, **self.options), self.reference)

    def error(self, sigmas: torch.Tensor) -> float:
        self.evals += 1
        return self.loss(self.fn(self.D, self.x, sigmas, **self.options), self.reference)

    def __call__(self, u: list[float]) -> float:
        return self.error(_to_sigmas(u, self.sigma_max))


def _initial_schedules(steps: int, sigma_min: float, sigma_max: float, dp: torch.Tensor | None,
                       rhos: Sequence[float]) -> dict:
    inits = {f"karras_rho{rho:g}": karras_sigmas(steps, sigma_min, sigma_max, rho) for rho in rhos}
    inits["exponential"] = exponential_sigmas(steps, sigma_min, sigma_max)
    if len(rhos) > 1:
        inits["vp"] = vp_range_sigmas(steps, sigma_min, sigma_max)
    if dp is not None:
        inits["dp"] = dp
    return inits


def _reference(D, x, sigma_min, sigma_max, reference_steps, keep_trajectory):
    states, denoised = [], []

    def record(info):
        if keep_trajectory:
            states.append(info["x"])
            denoised.append(info["denoised"])

    sigmas = karras_sigmas(reference_steps, sigma_min, sigma_max)
    final = SAMPLERS["heun"].fn(D, x, sigmas, callback=record)
    return final, sigmas[:-1].tolist(), states, denoised


def tune(D: Callable | Sequence[Callable], shape: Sequence[int], nfe: int, *, seed: int = 0, sigma_min: float = 0.002,
         sigma_max: float = 80.0, samplers: Sequence[str] | None = None, progress: bool = False,
         heldout_seed: int | None = None, reference_steps: int | None = None, finalists: int = 3,
         max_evals: int = 150, loss: str = "l4", boundary: int = 0, pool: int | None = None,
         references: ReferenceCache | None = None, dtype: torch.dtype = torch.float64, device=None) -> TunedSchedule:
    """The solver, options and noise levels (``sigma_max`` down to 0) that solve ``D``'s probability-flow
    ODE from ``shape[0]`` draws of noise (``seed``) closest to a converged solution in ``nfe`` evaluations.

    ``D(x, sigma)`` is any denoiser; ``shape`` is ``[batch, *sample_shape]`` of the tuning batch, whose
    noise comes from ``seed`` (:func:`tuning_noise`). Each candidate solver (``samplers``, default the
    deterministic sweep solvers, with the option sets of :data:`OPTION_VARIANTS`) is scored on its best
    start; the ``finalists`` best are searched (``max_evals`` solver runs each) and the lowest tuning
    ``loss`` wins (``rmse`` over all elements, ``mean`` of per-sample RMS errors, or ``l4``: per-sample
    mean squares averaged in the square, which weighs the worst samples most; on the demo model it gave
    the best FD, ``mean`` the best transfer between exact mixtures). Interior levels stay in
    [sigma_min, sigma_max]. The result reports (as RMSE, whatever the loss) the tuning error, the error
    on held-out noise (``heldout_seed``, default ``seed + 1``), the finalists and the Karras rho = 7 and
    exponential baselines of every candidate at the same NFE on both draws. The held-out draw also
    chooses, per finalist, between its start and the two search stages, rules out finalists whose
    held-out loss is over :data:`HELDOUT_SLACK` times the best one's and settles near-ties of the tuning
    loss (:func:`choose_finalist`), so its error is slightly optimistic; measure on new noise to be sure.

    ``D`` may also be a list of denoisers of the same sample shape (several models, or the exact denoisers
    of several distributions): each gets its own ``shape[0]`` draws and the search minimizes the geometric
    mean of their losses, so that one schedule serves them all, each judged by its relative error.

    The reference is Heun with ``reference_steps`` Karras steps (default ``max(128, 8 nfe)``: its error
    must stay well below the tuned one's, or the search fits the reference's own error).

    ``boundary`` > 0 adds to each batch the ``boundary`` draws of ``pool`` more (default ``POOL_FACTOR * shape[0]``;
    each denoiser of a list its own) that plain solvers at this NFE solve worst, weighted so that loss and
    errors estimate the pool's: the rare draws that end in another mode, which dominate the RMSE, are seen.
    The pools' references do not depend on ``nfe``: one :class:`ReferenceCache` as ``references`` for the calls
    at several budgets (same ``reference_steps``) solves each pool once.
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    models = list(D) if isinstance(D, (list, tuple)) else [D]
    if not models or not all(callable(m) for m in models):
        raise ValueError("D must be a denoiser D(x, sigma) or a non-empty list of them")
    per = int(shape[0])
    pool, n = check_boundary(boundary, pool, per), len(models)
    shape, objective, report = (per * n, *shape[1:]), geometric_mean_loss(LOSSES[loss], n), rmse
    t0 = time.perf_counter()
    heldout_seed = seed + 1 if heldout_seed is None else heldout_seed
    reference_steps = reference_steps or max(128, 8 * nfe)
    say = print if progress else (lambda *a, **k: None)
    x = tuning_noise(shape, seed, sigma_max, dtype=dtype, device=device)
    x_held = tuning_noise(shape, heldout_seed, sigma_max, dtype=dtype, device=device)
    references = ReferenceCache() if references is None else references
    solved = references.rows_solved
    if boundary:  # each model's block becomes [its hardest of its own pool, its random draws]
        say(f"tune: adding the {boundary} of {pool} + {pool} more draws that plain solvers solve worst")
        (x, weights), (x_held, _) = (stratify_models(models, draws, tuning_noise(
            (pool * n, *shape[1:]), s + POOL_SEED_OFFSET, sigma_max, dtype=dtype, device=device), nfe, boundary,
            sigma_min=sigma_min, sigma_max=sigma_max, reference_steps=reference_steps, references=references)
            for draws, s in ((x, seed), (x_held, heldout_seed)))
        objective = geometric_mean_loss([weighted_loss(loss, w) for w in weights], n)
        report, shape = weighted_loss("rmse", torch.cat(weights) / n), (x.shape[0], *shape[1:])
        if references.rows_solved == solved:
            say("tune: the pools' reference solutions came from the cache (references)")
    D = Models(models, shape[0] // n) if n > 1 else models[0]
    memo = _Memo(D)
    say(f"tune: reference solutions (heun, {reference_steps} steps) for {shape[0]} + {shape[0]} noise draws")
    ref, ref_sigmas, states, denoised = _reference(D, x, sigma_min, sigma_max, reference_steps, True)
    ref_held = _reference(D, x_held, sigma_min, sigma_max, reference_steps, False)[0]
    reference_evals = (SAMPLERS["heun"].nfe(reference_steps) * (2 * shape[0] + references.rows_solved - solved)
                       + (2 * n * pool * picker_evaluations(nfe) if boundary else 0))  # a cached pool: no evaluations
    lo, hi = math.log(sigma_min), math.log(sigma_max)

    scored = []
    dp_cache: dict[int, torch.Tensor] = {}
    for sampler, options in candidate_samplers(samplers):
        spec = SAMPLERS[sampler]
        steps = spec.steps_for_nfe(nfe)
        if spec.nfe(steps) > nfe:
            continue
        if steps not in dp_cache:
            dp_cache[steps] = _dp_schedule(ref_sigmas, states, denoised, ref, steps)
        problem = _Problem(memo, x, ref, sampler, options, sigma_max, objective, report)
        screen = _initial_schedules(steps, sigma_min, sigma_max, dp_cache[steps], SCREEN)
        inits = {name: (s, problem.error(s)) for name, s in screen.items()}
        start = min(inits, key=lambda k: inits[k][1])
        scored.append({"sampler": sampler, "options": options, "steps": steps, "start": start,
                       "inits": inits, "problem": problem})
        say(f"  {_label(sampler, options):<28} steps {steps:>3}  best start {start:<14} "
            f"{loss} {inits[start][1]:.3e}")
    if not scored:
        raise ValueError(f"no candidate solver fits NFE {nfe}")
    scored.sort(key=lambda c: c["inits"][c["start"]][1])

    results = []
    for cand in scored[:max(1, finalists)]:
        problem = cand["problem"]
        for name, s in _initial_schedules(cand["steps"], sigma_min, sigma_max, None, INIT_RHOS).items():
            if name not in cand["inits"]:  # the other classic starts, for the finalists only
                cand["inits"][name] = (s, problem.error(s))
        cand["start"] = min(cand["inits"], key=lambda k: cand["inits"][k][1])
        sigmas0 = cand["inits"][cand["start"]][0]
        stages = (search_levels(problem, _from_sigmas(sigmas0), lo, hi, max_evals) if cand["steps"] > 1
                  else [("start", [], cand["inits"][cand["start"]][1])])
        # the held-out draw picks the stage: a search that fitted this noise at the expense of others loses
        held_problem = _Problem(memo, x_held, ref_held, cand["sampler"], cand["options"], sigma_max, objective,
                                report)
        checked = [(held_problem.error(_to_sigmas(u, sigma_max)), name, u, err) for name, u, err in stages]
        held_loss, stage, u, err = min(checked, key=lambda c: c[0])
        sigmas = _to_sigmas(u, sigma_max)
        held = held_problem.rmse(sigmas)
        results.append({**cand, "sigmas": sigmas, "tuning_loss": err, "error": problem.rmse(sigmas),
                        "heldout": held, "heldout_loss": held_loss, "stage": stage})
        say(f"  tuned {_label(cand['sampler'], cand['options']):<22} RMSE {results[-1]['error']:.3e} "
            f"(held-out {held:.3e}, stage {stage}) after {problem.evals} solver runs")
    best = choose_finalist(results)

    baselines = []
    for cand in scored:
        for name in ("karras_rho7", "exponential"):
            sigmas = cand["inits"][name][0]
            err = cand["problem"].rmse(sigmas)
            held = _Problem(memo, x_held, ref_held, cand["sampler"], cand["options"], sigma_max,
                            report=report).rmse(sigmas)
            baselines.append({"sampler": cand["sampler"], "options": cand["options"],
                              "schedule": "karras" if name == "karras_rho7" else name,
                              "nfe": SAMPLERS[cand["sampler"]].nfe(cand["steps"]), "tuning_error": err,
                              "heldout_error": held})
    finals = [{"sampler": r["sampler"], "options": r["options"], "start": r["start"], "tuning_error": r["error"],
               "heldout_error": r["heldout"], "tuning_loss": r["tuning_loss"], "heldout_loss": r["heldout_loss"],
               "stage": r["stage"], "sigmas": r["sigmas"].tolist()}
              for r in results]
    return TunedSchedule(
        sampler=best["sampler"], sigmas=best["sigmas"].tolist(), options=best["options"], nfe=nfe, seed=seed,
        heldout_seed=heldout_seed, num_samples=per * n, boundary=boundary, pool=pool if boundary else 0,
        sigma_min=sigma_min, sigma_max=sigma_max,
        tuning_error=best["error"], heldout_error=best["heldout"], baselines=baselines, finalists=finals,
        reference={"solver": "heun", "schedule": "karras", "steps": reference_steps}, loss=loss,
        evaluations=memo.calls * int(shape[0]) + reference_evals, seconds=round(time.perf_counter() - t0, 2))


def choose_finalist(results: list[dict], slack: float = HELDOUT_SLACK) -> dict:
    """The finalist (``results`` as in a result's ``finalists``) with the lowest geometric mean of its
    ``tuning_loss`` and ``heldout_loss`` among those whose held-out loss is within ``slack`` times the lowest:
    the tuning loss is optimistic (the search fitted those draws) and the held-out one noisy, so near-ties on
    the tuning draws go to the held-out draws, and a large held-out gap rules a schedule fitted to its own
    draws out."""
    floor = min(r["heldout_loss"] for r in results)
    return min((r for r in results if r["heldout_loss"] <= slack * floor),
               key=lambda r: math.sqrt(r["tuning_loss"] * r["heldout_loss"]))


def _label(sampler: str, options: dict) -> str:
    return sampler + ("(" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")" if options else "")
