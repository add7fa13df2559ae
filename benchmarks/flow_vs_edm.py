"""EDM vs flow matching vs DDPM at equal training budget, and rectified flow's reflow (issue 31).

1. ``configs/digits-{edm,flow,ddpm}.yaml`` train the same U-Net for the same 3,000 steps at batch 64 (into
   RUNS/<config>, skipped when it exists), each gets tuned schedules (``elucidate tune RUN --nfe ...``), and each is
   sampled with Euler, Heun, DPM-Solver++(2M) and its tuned schedule at every NFE: fd_digits of ``--num`` samples
   (seeds 0..num-1) against the 1,797 real digits, and the share the bundled digits classifier recognizes
   (confidence >= 0.8). Euler/Heun/DPM-Solver++ use each model's own discretization (``schedule: auto``: EDM
   Karras rho = 7, DDPM its trailing timesteps, Flow t uniform from 1 to 0).
2. Reflow: ``elucidate reflow`` of the Flow run (and the EDM run) with ``--pairs`` pairs (made by
   ``--ode-sampler``/``--ode-steps``, by default DPM-Solver++(2M) with 40 steps: an accurate ODE) and
   ``--reflow-steps`` steps, then fd_digits at NFE 1, 2 and 4 (Euler) before and after; as a control, the same run
   fine-tuned for the same steps on the real digits (``--set training.steps=...`` on a copy), so extra training
   alone is not credited to the pairs.

    python benchmarks/flow_vs_edm.py [--runs runs/flow_bench] [--num 2000] [--nfe 5,9,17,35] [--tuned-nfe 5,9]
                                     [--models EDM,Flow,DDPM] [--pairs 10000] [--reflow-steps 1000]
                                     [--reflow-models Flow,EDM] [--ode-sampler dpmpp_2m] [--ode-steps 40]
                                     [--skip-reflow] [--skip-table]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"EDM": "digits-edm", "Flow": "digits-flow", "DDPM": "digits-ddpm"}
SAMPLERS = ("euler", "heun", "dpmpp_2m")


def elucidate(*args: str) -> None:
    print("  $ elucidate " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "elucidate", *args, "--no-progress"], check=True)


def train(runs: Path, name: str) -> Path:
    out = runs / name
    if not (out / "checkpoints").is_dir() or not any((out / "checkpoints").iterdir()):
        elucidate("train", str(ROOT / "configs" / f"{name}.yaml"), "--out", str(out))
    return out


class Scorer:
    """fd_digits and recognizable share of a run's samples from seeds 0..num-1."""

    def __init__(self, num: int):
        from elucidate.evaluation import feature_extractor, load_dataset_stats

        self.num, self.extractor = num, feature_extractor("fd_digits")
        self.ref = load_dataset_stats("digits", "fd_digits")

    def __call__(self, run, cfg) -> dict:
        from elucidate.data.pixels import to_pixels
        from elucidate.evaluation.evaluate import compute_metric, recognizability, sampler_nfe
        from elucidate.metrics import FeatureStats

        x = run.sample(range(self.num), cfg, batch_size=500)
        stats = FeatureStats(keep_features=True)
        stats.update(self.extractor(to_pixels(x, run.normalizer)))
        fd = compute_metric("fd_digits", stats, self.ref)["value"]
        rec = recognizability(x, run.normalizer)["confident_fraction"]
        return {"fd": fd, "recognizable": rec, "nfe": sampler_nfe(cfg, run.denoiser.formulation)}


def table(runs: Path, nfes: list[int], score: Scorer, models: list[str], tuned_nfes: list[int]) -> dict:
    from elucidate.run.model import load_run
    from elucidate.run.rundir import RunDir
    from elucidate.sampling import steps_for_nfe
    from elucidate.tuning import tuned_config

    results = {}
    for model in models:
        path = train(runs, MODELS[model])
        missing = [n for n in tuned_nfes if not RunDir(path).tuned_schedule(n).is_file()]
        if missing:
            t0 = time.perf_counter()
            elucidate("tune", str(path), "--nfe", ",".join(map(str, missing)))
            print(f"  tuned {model} in {time.perf_counter() - t0:.0f} s", flush=True)
        run = load_run(path)
        base = dataclasses.replace(run.config.sampling, s_churn=0.0, schedule="auto", eta=None)
        for nfe in nfes:
            for sampler in (*SAMPLERS, "tuned"):
                if sampler == "tuned" and nfe not in tuned_nfes:
                    continue
                if sampler == "tuned":
                    cfg = tuned_config(base, path, nfe, shape=run.shape, checkpoint=run.checkpoint.name)
                else:
                    cfg = dataclasses.replace(base, sampler=sampler, steps=steps_for_nfe(sampler, nfe))
                r = score(run, cfg)
                results[(model, sampler, nfe)] = r
                print(f"  {model:<5} {sampler:<9} NFE {r['nfe']:>3}  fd_digits {r['fd']:8.3f}  recognizable "
                      f"{100 * r['recognizable']:5.1f} %", flush=True)
    return results


def print_table(results: dict, nfes: list[int], models: list[str]) -> None:
    print("\n| NFE | " + " | ".join(f"{m} + {s}" for m in models for s in (*SAMPLERS, "tuned")) + " |")
    print("|---" * (1 + len(models) * (len(SAMPLERS) + 1)) + "|")
    for nfe in nfes:
        cells = [f"{results[(m, s, nfe)]['fd']:.2f} ({100 * results[(m, s, nfe)]['recognizable']:.0f} %)"
                 if (m, s, nfe) in results else "—" for m in models for s in (*SAMPLERS, "tuned")]
        print(f"| {nfe} | " + " | ".join(cells) + " |")


def reflow_study(runs: Path, models: list[str], pairs: int, steps: int, score: Scorer, ode: list[str]) -> list[dict]:
    from elucidate.run.model import load_run
    from elucidate.sampling import steps_for_nfe

    rows = []
    for model in models:
        teacher = train(runs, MODELS[model])
        reflowed = runs / f"{MODELS[model]}-reflow"
        t0 = time.perf_counter()
        elucidate("reflow", str(teacher), "--out", str(reflowed), "--pairs", str(pairs), "--steps", str(steps), *ode)
        reflow_seconds = time.perf_counter() - t0
        control = runs / f"{MODELS[model]}-more"  # the same extra steps on the real data
        if not control.exists():
            shutil.copytree(teacher, control)
        base_steps = load_run(teacher).step
        t0 = time.perf_counter()
        elucidate("train", str(control / "config.yaml"), "--out", str(control), "--set",
                  f"training.steps={base_steps + steps}")
        control_seconds = time.perf_counter() - t0
        for label, path in (("teacher", teacher), ("+ steps on data", control), ("reflow", reflowed)):
            run = load_run(path)
            row = {"model": model, "run": label, "step": run.step}
            for nfe in (1, 2, 4):
                cfg = dataclasses.replace(run.config.sampling, sampler="euler", steps=steps_for_nfe("euler", nfe),
                                          s_churn=0.0, schedule="auto")
                r = score(run, cfg)
                row[nfe] = r
                print(f"  {model:<5} {label:<16} euler NFE {nfe}  fd_digits {r['fd']:8.3f}  recognizable "
                      f"{100 * r['recognizable']:5.1f} %", flush=True)
            rows.append(row)
        print(f"  {model}: reflow (pairs + {steps} steps) {reflow_seconds:.0f} s, {steps} more steps on the data "
              f"{control_seconds:.0f} s", flush=True)
    print("\n| model | run | NFE 1 | NFE 2 | NFE 4 |\n|---|---|---|---|---|")
    for row in rows:
        cells = [f"{row[n]['fd']:.2f} ({100 * row[n]['recognizable']:.0f} %)" for n in (1, 2, 4)]
        print(f"| {row['model']} | {row['run']} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/flow_bench"))
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--nfe", default="5,9,17,35")
    parser.add_argument("--models", default="EDM,Flow,DDPM")
    parser.add_argument("--tuned-nfe", default="5,9", help="the NFEs that get a tuned schedule (tuning is slow)")
    parser.add_argument("--pairs", type=int, default=10000)
    parser.add_argument("--reflow-steps", type=int, default=1000)
    parser.add_argument("--reflow-models", default="Flow,EDM")
    parser.add_argument("--ode-sampler", default="dpmpp_2m", help="the sampler of reflow's pairs (an accurate ODE)")
    parser.add_argument("--ode-steps", type=int, default=40)
    parser.add_argument("--skip-reflow", action="store_true")
    parser.add_argument("--skip-table", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    nfes = [int(n) for n in args.nfe.split(",")]
    score = Scorer(args.num)
    out = {}
    if not args.skip_table:
        models = args.models.split(",")
        results = table(args.runs, nfes, score, models, [int(n) for n in args.tuned_nfe.split(",")])
        print_table(results, nfes, models)
        out["table"] = {f"{m}/{s}/{n}": r for (m, s, n), r in results.items()}
    if not args.skip_reflow:
        rows = reflow_study(args.runs, args.reflow_models.split(","), args.pairs, args.reflow_steps, score,
                            ["--ode-sampler", args.ode_sampler, "--ode-steps", str(args.ode_steps)])
        out["reflow"] = [{k if isinstance(k, str) else f"nfe{k}": v for k, v in r.items()} for r in rows]
    args.runs.mkdir(parents=True, exist_ok=True)
    name = "results-" + args.models.replace(",", "-") + ("" if args.skip_reflow else "-reflow") + ".json"
    (args.runs / name).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
