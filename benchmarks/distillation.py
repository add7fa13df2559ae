"""One- and few-step generation by consistency distillation (cd) and easy consistency tuning (ect) of the demo model
(issue 34): quality at NFE 1, 2, 4 next to the teacher's at NFE 5, 9, 35, and what the distillation costs.

1. The teacher: ``--config`` (default configs/digits-edm.yaml) trained into ``--teacher`` (skipped when it has
   checkpoints); with ``--teacher-std S`` (a run trained with post-hoc EMA, e.g. configs/mnist-edm2.yaml) the
   teacher is its post-hoc EMA of std S, written as the run RUNS/teacher (``elucidate ema --out``). It is tuned at
   ``--tuned-nfe`` (``elucidate tune``, skipped when stored). Scored with its tuned schedules,
   DPM-Solver++(2M) at every ``--teacher-nfe`` and Heun at NFE 35 (18 steps, the demo's default).
2. Each ``--methods`` entry: ``elucidate distill TEACHER --method M --out RUNS/M --steps S`` with every checkpoint
   kept (``--eval-every`` steps apart); the final student scored with the consistency sampler at NFE 1, 2 and 4 (its
   levels: Karras from sigma_max down to 0.821), every checkpoint at NFE 1 and 2 (the FD-vs-steps curve).
3. Scores: the FD of ``--num`` samples (seeds 0..num-1) against the real data and the share the bundled classifier
   recognizes (confidence >= 0.8): fd_digits and the digits classifier for the 8x8 digits (as
   benchmarks/flow_vs_edm.py), fd_mnist and the MNIST classifier for MNIST (as benchmarks/mnist_edm2.py). Cost:
   optimizer steps and wall-clock seconds of training (from the checkpoints' metadata), the distillation's relative
   to the teacher's; those seconds are only as good as the machine was quiet, so ``--step-cost cd,ect`` also
   measures seconds per step of the teacher's training and of each method, interleaved in one process.

Prints two markdown tables and writes RUNS/results.json (and RUNS/fd_vs_steps.png if matplotlib is installed).

    python benchmarks/distillation.py [--teacher runs/demo] [--runs runs/distill_bench] [--steps 2000]
                                      [--eval-every 500] [--num 2000] [--methods cd,ect] [--teacher-nfe 5,9,35]
                                      [--tuned-nfe 5,9] [--set KEY=VALUE ...] [--config configs/digits-edm.yaml]
                                      [--teacher-std S] [--picture ect:2500] [--step-cost cd,ect]
    python benchmarks/distillation.py --teacher runs/mnist_bench/mnist-edm2 --teacher-std 0.05 \
        --runs runs/distill_bench/mnist --methods ect --steps 1200 --eval-every 400 --num 500 --tuned-nfe ""
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flow_vs_edm import Scorer  # noqa: E402  (fd_digits and recognizable share of a run's samples)


def elucidate(*args: str) -> None:
    print("  $ elucidate " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "elucidate", *args, "--no-progress"], check=True)


def cost(ckpt: Path) -> dict:
    """Optimizer steps and wall-clock seconds of training up to ``ckpt`` (its metadata)."""
    from elucidate.run.checkpoint import check_run_checkpoint

    meta = check_run_checkpoint(ckpt)[1]
    return {"steps": int(meta["step"]), "seconds": float(meta["seconds"])}


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def scorer_for(teacher: Path, num: int):
    """The scorer of the teacher's data: (scorer, the FD's name)."""
    from elucidate.run.model import load_run

    if load_run(teacher).config.data.get("dataset") == "mnist":
        from mnist_edm2 import Scorer as MnistScorer  # fd_mnist and the MNIST classifier's recognized share
        return MnistScorer(num), "fd_mnist"
    return Scorer(num), "fd_digits"


def posthoc_teacher(run: Path, std: float, out: Path) -> Path:
    """The post-hoc EMA of std ``std`` of ``run`` (trained with power EMA) as a run directory of its own, ``out``
    (the run's config and one checkpoint, at the run's last step): what can be tuned and distilled."""
    import shutil

    from elucidate.run.rundir import RunDir

    last = RunDir(run).list_checkpoints()[-1]
    ckpt = RunDir(out).checkpoints / last.name
    if not ckpt.is_file():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(RunDir(run).config, RunDir(out).config)
        elucidate("ema", str(run), "--std", str(std), "--out", str(ckpt))
    return out


def teacher_rows(path: Path, score: Scorer, teacher_nfe: list[int], tuned_nfe: list[int]) -> list[dict]:
    from elucidate.run.model import load_run
    from elucidate.run.rundir import RunDir
    from elucidate.sampling import steps_for_nfe
    from elucidate.tuning import tuned_config

    missing = [n for n in tuned_nfe if not RunDir(path).tuned_schedule(n).is_file()]
    if missing:
        elucidate("tune", str(path), "--nfe", ",".join(map(str, missing)))
    run = load_run(path)
    base = dataclasses.replace(run.config.sampling, s_churn=0.0, schedule="auto", eta=None, sigmas=None)
    configs = [(f"tuned NFE {n}", tuned_config(base, path, n, shape=run.shape, checkpoint=run.checkpoint.name))
               for n in tuned_nfe]
    configs += [("dpmpp_2m", dataclasses.replace(base, sampler="dpmpp_2m", steps=steps_for_nfe("dpmpp_2m", n)))
                for n in teacher_nfe]
    configs += [("heun", dataclasses.replace(base, sampler="heun", steps=18))]
    rows = []
    for name, cfg in configs:
        r = {"model": "teacher", "sampler": name, **score(run, cfg)}
        print(f"  teacher {name:<12} NFE {r['nfe']:>3}  fd {r['fd']:8.3f}  recognizable "
              f"{100 * r['recognizable']:5.1f} %", flush=True)
        rows.append(r)
    return rows


def picture(teacher: Path, student: Path, results: dict, method: str, step: int | None, out: Path) -> Path:
    """Seeds 0-63: the teacher with Heun (NFE 35) next to the student (its checkpoint at ``step``, default the last)
    at NFE 1 and 2, each titled with its FD."""
    import dataclasses

    from elucidate.run.model import load_run
    from elucidate.run.rundir import RunDir
    from elucidate.viz import image_grid, new_figure, save_figure

    t = load_run(teacher)
    s = load_run(RunDir(student).checkpoint(step) if step is not None else student)
    fd = {r["nfe"]: r for r in results["curves"][method] if r["step"] == s.step}
    heun = next(r for r in results["teacher"] if r["sampler"] == "heun")
    panels = [(t, dataclasses.replace(t.config.sampling, sampler="heun", steps=18, s_churn=0.0),
               f"teacher, Heun NFE 35: {heun['fd']:.2f}")]
    panels += [(s, dataclasses.replace(s.config.sampling, steps=n), f"{method} ({s.step} steps), NFE {n}: "
                                                                    f"{fd[n]['fd']:.2f}") for n in (1, 2)]
    fig = new_figure(3.2 * len(panels), 3.6)
    for k, (run, cfg, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        ax.imshow(image_grid(run.images(run.sample(range(64), cfg)), nrow=8, scale=4)[..., 0], cmap="gray",
                  vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return save_figure(fig, out)


def seconds_per_step(trainers: dict, steps: int, repeats: int = 3) -> dict:
    """{name: seconds per optimizer step}: each ``trainers[name](run_dir)`` (a new trainer of ``steps`` steps in a
    temporary run directory) trained in turn, ``repeats`` rounds interleaved, the best round of each: ratios measured
    this way hold on a machine that runs nothing else."""
    import tempfile

    seconds = {name: [] for name in trainers}
    for _ in range(repeats):
        for name, make in trainers.items():
            with tempfile.TemporaryDirectory() as tmp:
                trainer = make(Path(tmp) / "run")
                t0 = time.perf_counter()
                trainer.train()
                seconds[name].append((time.perf_counter() - t0) / steps)
    return {name: min(v) for name, v in seconds.items()}


def step_cost(teacher: Path, methods: list[str], steps: int = 20) -> dict:
    """Seconds per optimizer step of the teacher's own training and of each method's distillation (their configs as
    `train` and `distill` make them, precision included), interleaved (:func:`seconds_per_step`)."""
    from elucidate.config import parse_config
    from elucidate.config.schema import apply_overrides
    from elucidate.run.model import load_run, resolve_checkpoint
    from elucidate.training import Trainer
    from elucidate.training.distill import CD_EPSILON, DistillTrainer, distill_config

    ckpt = resolve_checkpoint(teacher)
    run = load_run(ckpt)
    dim = run.info.channels * math.prod(run.info.resolution)
    sets = [f"training.steps={steps}", f"training.checkpoint_every={steps}", "training.sample_every=0"]
    quiet = dict(progress=False, log=lambda *a, **k: None)

    def distiller(method: str):
        def make(out: Path):
            config = distill_config(run.config, ckpt, method, steps=steps, dim=dim, overrides=sets[1:],
                                    epsilon=CD_EPSILON if method == "cd" else 0.0)
            trainer = DistillTrainer(config, out, **quiet)
            state = {k: v.clone() for k, v in run.denoiser.net.state_dict().items()}
            trainer.start_from({"net": state, "ema": state}, source="step_cost")
            return trainer
        return make

    teacher_config = parse_config(apply_overrides(run.config.to_dict(), sets))
    return seconds_per_step({"teacher": lambda out: Trainer(teacher_config, out, **quiet),
                             **{m: distiller(m) for m in methods}}, steps)


def student_rows(path: Path, method: str, score: Scorer, nfes=(1, 2, 4)) -> tuple[list[dict], list[dict]]:
    """(the final student at each NFE, the curve: every checkpoint at NFE 1 and 2)."""
    from elucidate.run.model import load_run
    from elucidate.run.rundir import RunDir

    final, curve = [], []
    checkpoints = RunDir(path).list_checkpoints()
    for ckpt in checkpoints:
        run = load_run(ckpt)
        last = ckpt == checkpoints[-1]
        for nfe in (nfes if last else (1, 2)):
            cfg = dataclasses.replace(run.config.sampling, steps=nfe)  # the consistency sampler: NFE = steps
            r = {"model": method, "sampler": "consistency", "step": run.step, **score(run, cfg)}
            if nfe in (1, 2):
                curve.append(r)
            if last:
                final.append(r)
                print(f"  {method:<7} consistency  NFE {r['nfe']:>3}  fd {r['fd']:8.3f}  recognizable "
                      f"{100 * r['recognizable']:5.1f} %", flush=True)
    return final, curve


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, default=ROOT / "runs" / "demo", help="the trained run (trained if empty)")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "digits-edm.yaml",
                   help="the teacher's config, if it has to be trained")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "distill_bench", help="where the students go")
    p.add_argument("--steps", type=int, default=2000, help="distillation steps of each method")
    p.add_argument("--eval-every", type=int, default=500, help="steps between the checkpoints of the FD curve")
    p.add_argument("--num", type=int, default=2000, help="samples per score")
    p.add_argument("--methods", default="cd,ect")
    p.add_argument("--teacher-nfe", default="5,9,35", help="NFEs of the teacher's dpmpp_2m rows")
    p.add_argument("--tuned-nfe", default="5,9", help="NFEs of the teacher's tuned rows ('' = none)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to every `elucidate distill` (e.g. training.lr=1e-4)")
    p.add_argument("--step-cost", default="", metavar="METHODS",
                   help="measure seconds per step of the teacher's training and these methods', interleaved")
    p.add_argument("--picture", default=None, metavar="METHOD[:STEP]",
                   help="draw the teacher next to this student (at STEP) at NFE 1 and 2 (RUNS/samples.png)")
    p.add_argument("--teacher-std", type=float, default=None,
                   help="distill the teacher's post-hoc EMA of this std (a run trained with power EMA)")
    args = p.parse_args(argv)

    from elucidate.run.rundir import RunDir

    if not RunDir(args.teacher).list_checkpoints():
        elucidate("train", str(args.config), "--out", str(args.teacher))
    teacher_cost = cost(RunDir(args.teacher).list_checkpoints()[-1])
    if args.teacher_std is not None:
        args.teacher = posthoc_teacher(args.teacher, args.teacher_std, args.runs / "teacher")
    score, fd_name = scorer_for(args.teacher, args.num)
    path = args.runs / "results.json"  # the students not run this time keep their rows (same teacher only)
    old = json.loads(path.read_text()) if path.is_file() else {}
    keep = old.get("teacher_path") == str(args.teacher.resolve())
    results = {"teacher_path": str(args.teacher.resolve()), "teacher_cost": teacher_cost,
               "teacher": teacher_rows(args.teacher, score, ints(args.teacher_nfe), ints(args.tuned_nfe)),
               **{k: old.get(k, {}) if keep else {} for k in ("students", "curves", "costs")}}
    for method in [m for m in args.methods.split(",") if m]:
        out = args.runs / method
        sets = [f"training.checkpoint_every={args.eval_every}", "training.keep_checkpoints=0", *args.overrides]
        elucidate("distill", str(args.teacher), "--method", method, "--out", str(out), "--steps", str(args.steps),
                  *[a for s in sets for a in ("--set", s)])
        results["costs"][method] = cost(RunDir(out).list_checkpoints()[-1])
        results["students"][method], results["curves"][method] = student_rows(out, method, score)

    if args.step_cost:
        per_step = step_cost(args.teacher, [m for m in args.step_cost.split(",") if m])
        results["step_cost"] = per_step
        print("\nseconds per step (interleaved, nothing else running): " + ", ".join(
            f"{name} {sec:.3f} ({sec / per_step['teacher']:.2f}x)" for name, sec in per_step.items()))
    t = results["teacher_cost"]
    print(f"\nteacher: {t['steps']} steps, {t['seconds']:.0f} s of training\n")
    print(f"| model | sampler | NFE | {fd_name} | recognizable | training steps (x teacher) | seconds (x teacher) |")
    print("|---|---|---|---|---|---|---|")
    for r in results["teacher"]:
        print(f"| teacher | {r['sampler']} | {r['nfe']} | {r['fd']:.2f} | {100 * r['recognizable']:.1f} % | "
              f"{t['steps']} | {t['seconds']:.0f} |")
    for method, rows in results["students"].items():
        c = results["costs"][method]
        for r in rows:
            print(f"| {method} | consistency | {r['nfe']} | {r['fd']:.2f} | {100 * r['recognizable']:.1f} % | "
                  f"+{c['steps']} ({c['steps'] / max(t['steps'], 1):.2f}) | +{c['seconds']:.0f} "
                  f"({c['seconds'] / max(t['seconds'], 1e-9):.2f}) |")
    print(f"\nFD vs distillation steps ({fd_name} at NFE 1 / NFE 2):\n")
    methods = list(results["curves"])
    print("| step | " + " | ".join(methods) + " |")
    print("|---" * (1 + len(methods)) + "|")
    steps = sorted({r["step"] for rows in results["curves"].values() for r in rows})
    for step in steps:
        cells = []
        for m in methods:
            by = {r["nfe"]: r["fd"] for r in results["curves"][m] if r["step"] == step}
            cells.append(" / ".join(f"{by[n]:.2f}" if n in by else "—" for n in (1, 2)))
        print(f"| {step} | " + " | ".join(cells) + " |")
    args.runs.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    if args.picture:
        method, _, step = args.picture.partition(":")
        drawn = picture(args.teacher, args.runs / method, results, method, int(step) if step else None,
                        args.runs / "samples.png")
        print(f"wrote {drawn}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in methods:
        for nfe, style in ((1, "-o"), (2, "--s")):
            pts = [(r["step"], r["fd"]) for r in results["curves"][m] if r["nfe"] == nfe]
            ax.plot(*zip(*pts), style, label=f"{m}, NFE {nfe}")
    ax.set(xlabel="distillation steps", ylabel=fd_name, yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.runs / "fd_vs_steps.png", dpi=120)
    print(f"\nwrote {args.runs / 'results.json'} and {args.runs / 'fd_vs_steps.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
