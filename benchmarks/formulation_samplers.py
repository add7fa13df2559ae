"""The EDM paper's "our sampler on VP, VE and iDDPM models" comparison (Table 2), reproduced twice:

1. Sandbox (no network): the exact denoiser of the 10-component digits Gaussian mixture. Each
   formulation's original deterministic sampler (Euler on its own Table-1 discretization, time
   variable and scaling: `ablation(discretization=X, schedule=X, scaling=X)`) vs EDM's sampler (Heun,
   Karras rho = 7 over [0.002, 80] clipped to the formulation's range) at about the same NFE. Quality is
   the Fréchet distance in pixel space between 5,000 samples and 5,000 exact draws of the mixture.
2. Trained digits models (configs/digits-{vp,ve,iddpm,edm,ddpm}.yaml, trained here if RUNS/<name> is
   missing): fd_digits of 2,000 samples with the formulation's own discretization + Euler vs the EDM
   sampler (Heun, `--schedule karras`), both at NFE 35.

    python benchmarks/formulation_samplers.py [--runs runs/table2] [--num 2000] [--skip-trained]
"""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"VP": "vp", "VE": "ve", "iDDPM": "iddpm"}


def pixel_fd(a: torch.Tensor, b: torch.Tensor) -> float:
    from elucidate.metrics import frechet_distance

    a, b = a.reshape(len(a), -1).double().numpy(), b.reshape(len(b), -1).double().numpy()
    return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


def sandbox(num: int = 5000, min_std: float = 0.02) -> list[dict]:
    from elucidate.formulations import IDDPM, VE, VP
    from elucidate.sampling import ablation
    from elucidate.tuning.sandbox import digits_mixture

    gmm = digits_mixture(min_std=min_std)
    truth = gmm.sample(num, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(num, gmm.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = []
    for name, formulation in (("VP", VP()), ("VE", VE()), ("iDDPM", IDDPM())):
        kind = KINDS[name]
        lo, hi = formulation.schedule_range()  # EDM's [0.002, 80] clipped to the model's range
        rnd = formulation.round_sigma if name == "iDDPM" else None
        for steps_orig, steps_edm in ((18, 9), (35, 18), (63, 32)):
            # Table 1 / edm's generate.py: VP = (vp, vp, vp), VE = (ve, ve, none), iDDPM = (iddpm, linear, none)
            original = ablation(gmm.denoise, noise, num_steps=steps_orig, discretization=kind,
                                schedule={"vp": "vp", "ve": "ve", "iddpm": "linear"}[kind],
                                scaling="vp" if kind == "vp" else "none", solver="euler", round_sigma=rnd)
            ours = ablation(gmm.denoise, noise, num_steps=steps_edm, discretization="edm", schedule="linear",
                            scaling="none", solver="heun", sigma_min=lo, sigma_max=hi, round_sigma=rnd)
            rows.append({"model": name, "nfe": steps_orig, "original": pixel_fd(original, truth),
                         "edm_sampler": pixel_fd(ours, truth), "edm_nfe": 2 * steps_edm - 1})
    return rows


def train(config: str, out: Path) -> None:
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        return
    print(f"training {config} -> {out}", flush=True)
    subprocess.run([sys.executable, "-m", "elucidate", "train", str(ROOT / "configs" / config), "--out", str(out),
                    "--no-progress"], check=True)


def trained(runs: Path, num: int) -> list[dict]:
    from elucidate.config.sampling import SamplingConfig
    from elucidate.evaluation import evaluate, feature_extractor, load_dataset_stats
    from elucidate.run.model import load_run

    extractor = feature_extractor("fd_digits")
    ref = load_dataset_stats("digits", "fd_digits")
    rows = []
    for name, config in (("VP", "digits-vp.yaml"), ("VE", "digits-ve.yaml"), ("iDDPM", "digits-iddpm.yaml"),
                         ("EDM", "digits-edm.yaml"), ("DDPM", "digits-ddpm.yaml")):
        out = runs / config.removesuffix(".yaml")
        train(config, out)
        run = load_run(out)
        own = SamplingConfig(sampler="euler", steps=35, schedule="auto")
        edm = SamplingConfig(sampler="heun", steps=18, schedule="karras")
        row = {"model": name}
        for label, cfg in (("original", own), ("edm_sampler", edm)):
            t0 = time.perf_counter()
            result = evaluate(run, "fd_digits", num=num, ref=ref, extractor=extractor, cfg=dataclasses.replace(cfg))
            row[label], row[label + "_nfe"] = result["value"], result["nfe"]
            print(f"  {name:<6} {label:<12} NFE {result['nfe']:>3}  fd_digits {result['value']:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/table2"))
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--skip-trained", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print("Sandbox: exact digits-mixture denoiser, pixel-space FD of 5,000 samples (lower is better)")
    print(f"{'model':<7}{'NFE':>5}{'original sampler':>18}{'EDM sampler':>13}  (EDM NFE)")
    for r in sandbox():
        print(f"{r['model']:<7}{r['nfe']:>5}{r['original']:>18.4f}{r['edm_sampler']:>13.4f}  ({r['edm_nfe']})")
    if args.skip_trained:
        return
    print(f"\nTrained digits models (3000 steps each), fd_digits of {args.num} samples (lower is better)")
    rows = trained(args.runs, args.num)
    print(f"{'model':<7}{'original (Euler, own discretization)':>38}{'EDM sampler (Heun, Karras)':>30}")
    for r in rows:
        print(f"{r['model']:<7}{r['original']:>30.3f} (NFE {r['original_nfe']}){r['edm_sampler']:>22.3f} "
              f"(NFE {r['edm_sampler_nfe']})")


if __name__ == "__main__":
    main()
