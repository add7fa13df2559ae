"""fp32 vs bf16 autocast where it matters: training steps and sampling with the shipped configs' networks
at 8x8 (digits-edm), 28x28 (mnist-edm) and 32x32 (faces-edm), and the quality of bf16-sampled images
next to fp32 ones from the same trained runs and seeds.

Speed goes through the framework's own code (``Trainer.train_step`` of a real run on the real data,
and ``generate``), fp32 and bf16 interleaved in every round so a shared machine slows both alike;
medians of the rounds, one run. Quality (``--runs``): fd (the dataset's classifier features: fd_digits
or fd_mnist; none for faces) of ``--num`` samples drawn in fp32 and in bf16 from the same seeds,
against the training data, and the largest pixel difference between the two.

    python benchmarks/precision.py [--rounds 3] [--runs digits=runs/demo,mnist=runs/mnist] [--num 2000]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from elucidate.runtime.precision import native_bf16

ROOT = Path(__file__).resolve().parents[1]
CASES = {"digits": ("configs/digits-edm.yaml", "fd_digits"), "mnist": ("configs/mnist-edm.yaml", "fd_mnist"),
         "faces": ("configs/faces-edm.yaml", None)}


def training_speed(config_path: Path, rounds: int, steps: int) -> dict[str, float]:
    """Median training steps/s of the config's run (its data, network, batch) in fp32 and in bf16."""
    from elucidate.config import parse_config
    from elucidate.training import Trainer

    raw = yaml.safe_load(config_path.read_text())
    trainers = {}
    for precision in ("fp32", "bf16"):
        cfg = json.loads(json.dumps(raw))
        cfg["training"].update(precision=precision, ema=None)
        tmp = Path(tempfile.mkdtemp(prefix=f"precision-{precision}-"))
        trainers[precision] = Trainer(parse_config(cfg), tmp / "run", progress=False, log=lambda *a: None)
    times: dict[str, list[float]] = {p: [] for p in trainers}
    for trainer in trainers.values():
        trainer.train_step(0)  # warm-up
    for r in range(rounds):
        for p, trainer in trainers.items():
            t0 = time.perf_counter()
            for k in range(steps):
                trainer.train_step(1 + r * steps + k)
            times[p].append(steps / (time.perf_counter() - t0))
    for trainer in trainers.values():
        trainer._lock.release()
    return {p: statistics.median(v) for p, v in times.items()}


def sampling_speed(config_path: Path, rounds: int, batch: int) -> dict[str, float]:
    """Median images/s of Heun, 18 steps, on the config's (untrained) network in fp32 and bf16."""
    from elucidate.config import parse_config
    from elucidate.config.network import DataInfo, build_network_for
    from elucidate.data import build_dataset
    from elucidate.denoiser import Denoiser
    from elucidate.sampling import sample

    config = parse_config(yaml.safe_load(config_path.read_text()))
    info = DataInfo.from_dataset(build_dataset(config.data))
    net = build_network_for(config, info).eval()
    D = Denoiser(net, config.formulation()).requires_grad_(False)
    shape = (info.channels, *info.resolution)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    kwargs = config.sampling.sample_kwargs(D.formulation)
    sample(D, (4, *shape), **kwargs)
    for _ in range(rounds):
        for p in times:
            t0 = time.perf_counter()
            sample(D, (batch, *shape), precision=p, **kwargs)
            times[p].append(batch / (time.perf_counter() - t0))
    return {p: statistics.median(v) for p, v in times.items()}


def sampling_quality(run: Path, metric: str | None, num: int) -> dict:
    """fd of fp32- and bf16-sampled images (same seeds) and their largest pixel difference."""
    from elucidate.data.pixels import to_pixels
    from elucidate.evaluation import feature_extractor, load_dataset_stats
    from elucidate.metrics import compute_stats, frechet_distance
    from elucidate.run import load_run

    loaded = load_run(run)
    out, result = {}, {}
    for p in ("fp32", "bf16"):
        out[p] = loaded.images(loaded.sample(range(num), batch_size=250, precision=p))
    a, b = (to_pixels(out[p], loaded.normalizer) for p in ("fp32", "bf16"))
    result["max_pixel_diff"] = float((a - b).abs().max())
    result["mean_pixel_diff"] = float((a - b).abs().mean())
    if metric is not None:
        extractor = feature_extractor(metric)
        ref = load_dataset_stats(loaded.config.data["dataset"], metric)
        for p, pixels in (("fp32", a), ("bf16", b)):
            stats = compute_stats(extractor, pixels)
            result[f"fd_{p}"] = float(frechet_distance(stats.mean, stats.cov, ref.mu, ref.sigma))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=5, help="training steps per round")
    parser.add_argument("--batch", type=int, default=64, help="sampling batch")
    parser.add_argument("--runs", default="", help="CASE=RUN,... trained runs for the quality comparison")
    parser.add_argument("--num", type=int, default=2000)
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in args.runs.split(",") if item)
    print(f"torch threads {torch.get_num_threads()}; medians of {args.rounds} interleaved rounds; bf16 hardware: "
          f"{'yes' if native_bf16('cpu') else 'no (bf16 is emulated; precision auto would use fp32)'}")
    print(f"{'case':<8}{'train fp32':>11}{'train bf16':>11}{'ratio':>7}{'sample fp32':>13}{'sample bf16':>13}"
          f"{'ratio':>7}   (training steps/s, sampling images/s, Heun 18 steps)")
    for case in args.cases.split(","):
        config_path, metric = CASES[case]
        train = training_speed(ROOT / config_path, args.rounds, args.train_steps)
        samp = sampling_speed(ROOT / config_path, args.rounds, args.batch)
        print(f"{case:<8}{train['fp32']:>11.2f}{train['bf16']:>11.2f}{train['bf16'] / train['fp32']:>7.2f}"
              f"{samp['fp32']:>13.1f}{samp['bf16']:>13.1f}{samp['bf16'] / samp['fp32']:>7.2f}", flush=True)
    for case, run in runs.items():
        quality = sampling_quality(Path(run), CASES[case][1], args.num)
        print(f"quality {case} ({run}, {args.num} samples, same seeds): " + json.dumps(quality), flush=True)


if __name__ == "__main__":
    main()
