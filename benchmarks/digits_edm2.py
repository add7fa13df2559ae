"""Does the EDM2 recipe give the 8x8 demo better digits at the demo's wall-clock budget? (issue 32)

1. Runs (``--variants``, each trained into RUNS/NAME; skipped when it has its last checkpoint):
   ``digits-edm``    configs/digits-edm.yaml, the demo (DDPM++-style U-Net 1.83 M, 3,000 steps)
   ``digits-edm2``   configs/digits-edm2.yaml, the recipe (MP U-Net, uncertainty weighting, inv-sqrt decay,
                     post-hoc EMA) with the steps that cost the demo's wall-clock (its network is slower per step)
   ``--steps NAME=K`` overrides a run's steps (into RUNS/NAME-K) to see what more time would buy.
2. Each run's sampler (Heun 18 steps, NFE 35) on seeds 0..num-1, its EMA (post-hoc EMA of each ``--ema-stds`` for a
   power-EMA run), scored three ways:
   * fd_digits against the 1,797 real digits;
   * ``bundled``: the share the bundled digits classifier recognizes (confidence >= 0.8), what ``elucidate demo``
     reports;
   * ``strict``: the share an *independent* classifier accepts (confidence >= 0.8): scikit-learn's RBF SVM with
     Platt-calibrated probabilities, trained on all the real digits (96.9 % accurate held out). It was chosen and
     fitted without seeing a generated digit. Its reference is the share of real digits it accepts when held out
     (5-fold cross-validation): a generator cannot be expected to beat that.
3. Training seconds are each run's own (its checkpoint's metadata), measured on whatever else the machine ran; the
   ratio of the two networks' cost per step is printed from an interleaved measurement in this process.

    python benchmarks/digits_edm2.py [--runs runs/digits_bench] [--variants digits-edm,digits-edm2] [--num 2000]
                                     [--ema-stds 0.05,0.10] [--steps digits-edm2=3000] [--no-train]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distillation import cost, seconds_per_step  # noqa: E402  (a checkpoint's steps and seconds; interleaved timing)
from mnist_edm2 import train_run  # noqa: E402  (elucidate train, unless the run has its last checkpoint)

VARIANTS = {"digits-edm": "configs/digits-edm.yaml", "digits-edm2": "configs/digits-edm2.yaml"}


def strict_classifier(seed: int = 0):
    """(an RBF SVM with calibrated probabilities fitted on all real digits, the held-out real digits' accepted
    share): the independent judge. Pixels scaled to 0..1."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.datasets import load_digits
    from sklearn.model_selection import cross_val_predict
    from sklearn.svm import SVC

    x, y = load_digits(return_X_y=True)
    x = x / 16.0

    def make():
        return CalibratedClassifierCV(SVC(gamma=0.05, C=10.0, random_state=seed), method="sigmoid", cv=5,
                                      ensemble=False)  # one SVM, Platt-scaled on cross-validated scores

    held_out = cross_val_predict(make(), x, y, cv=5, method="predict_proba")
    return make().fit(x, y), float((held_out.max(1) >= 0.8).mean())


class Scorer:
    """fd_digits, the bundled classifier's and the strict classifier's accepted shares of seeds 0..num-1."""

    def __init__(self, num: int):
        from elucidate.evaluation import feature_extractor, load_dataset_stats

        self.num, self.extractor = num, feature_extractor("fd_digits")
        self.ref = load_dataset_stats("digits", "fd_digits")
        self.strict, self.strict_real = strict_classifier()

    def __call__(self, run, cfg=None) -> dict:
        from elucidate.data.pixels import to_pixels
        from elucidate.evaluation.evaluate import compute_metric, recognizability
        from elucidate.metrics import FeatureStats

        x = run.sample(range(self.num), cfg, batch_size=500)
        pixels = to_pixels(x, run.normalizer)
        stats = FeatureStats(keep_features=True)
        stats.update(self.extractor(pixels))
        p = self.strict.predict_proba(pixels.reshape(len(pixels), -1).cpu().numpy() / 255.0)
        return {"fd": compute_metric("fd_digits", stats, self.ref)["value"],
                "bundled": recognizability(x, run.normalizer)["confident_fraction"],
                "strict": float((p.max(1) >= 0.8).mean()), "classes": int(len(np.unique(p.argmax(1))))}


def step_cost(names: list[str], steps: int = 30) -> dict:
    """Seconds per training step of each variant's config (its batch, precision and network on the digits),
    interleaved (distillation.seconds_per_step): their ratio is what equal wall-clock means."""
    from elucidate.config import load_config
    from elucidate.training import Trainer

    sets = [f"training.steps={steps}", f"training.checkpoint_every={steps}", "training.sample_every=0"]
    configs = {n: load_config(ROOT / VARIANTS[n], sets) for n in names}
    return seconds_per_step({n: lambda out, c=c: Trainer(c, out, progress=False, log=lambda *a, **k: None)
                             for n, c in configs.items()}, steps)


def fmt(r: dict) -> str:
    return f"{r['fd']:.2f} | {100 * r['bundled']:.1f} % | {100 * r['strict']:.1f} %"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "digits_bench")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--ema-stds", default="0.05,0.10")
    p.add_argument("--steps", action="append", default=[], metavar="NAME=K", help="train NAME for K steps instead")
    p.add_argument("--no-train", action="store_true", help="score only the runs that are trained")
    p.add_argument("--no-cost", action="store_true", help="skip the interleaved cost-per-step measurement")
    args = p.parse_args(argv)

    from elucidate.run import RunDir
    from elucidate.run.model import load_run
    from elucidate.training.ema import write_ema_checkpoint

    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--variants {','.join(unknown)}: expected names from {', '.join(VARIANTS)}")
    steps = {k: int(v) for k, v in (s.split("=", 1) for s in args.steps)}
    per_step = {} if args.no_cost else step_cost(names)
    if per_step:
        base = per_step[names[0]]
        print("seconds per training step (interleaved, this machine): " + ", ".join(
            f"{n} {s:.3f} ({s / base:.2f}x)" for n, s in per_step.items()), flush=True)
    score, results_path = Scorer(args.num), args.runs / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["strict_real"] = score.strict_real
    rows = []
    for name in names:
        key = name + (f"-{steps[name]}" if name in steps else "")
        path = args.runs / key
        if not args.no_train:
            train_run(path, VARIANTS[name], [f"training.steps={steps[name]}"] if name in steps else [])
        ckpts = RunDir(path).list_checkpoints()
        if not ckpts:
            continue
        res = results.setdefault(key, {})
        res.update(cost(ckpts[-1]))
        run = load_run(path)
        power = (run.config.training.ema or {}).get("type") == "power"
        for ema in ([f"post-hoc EMA {float(s):.2f}" for s in args.ema_stds.split(",")] if power else ["EMA"]):
            if ema not in res:
                if power:
                    std = float(ema.split()[-1])
                    write_ema_checkpoint(path, std)  # elucidate ema RUN --std S
                    res[ema] = score(load_run(RunDir(path).ema_checkpoint(std)))
                else:
                    res[ema] = score(run)
                results_path.parent.mkdir(parents=True, exist_ok=True)
                results_path.write_text(json.dumps(results, indent=1))
            rows.append((key, ema, res))
            print(f"  {key:<18} {ema:<18} {fmt(res[ema])}", flush=True)

    print(f"\nHeun 18 steps (NFE 35), {args.num} samples; strict = an independent SVM's accepted share (real digits "
          f"held out: {100 * score.strict_real:.1f} %)\n")
    print("| run | steps | training s | weights | fd_digits | bundled classifier | strict classifier |")
    print("|---|---|---|---|---|---|---|")
    for key, ema, res in rows:
        print(f"| {key} | {res['steps']} | {res['seconds']:.0f} | {ema} | {fmt(res[ema])} |")


if __name__ == "__main__":
    main()
