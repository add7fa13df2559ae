"""The README and the docs cannot drift: every ```python block and every `elucidate ...` line of a ```bash
block in README.md and docs/*.md (every page the README reaches) runs here on tiny inputs and must succeed;
a failure names the page, the line and the command.

* A block runs in its own temporary directory with ``configs/`` linked in. The lines of a bash block run in
  order, in this process (``elucidate.cli.main``), so `train ... --out runs/edm` makes the run the next lines
  use. Lines that are not `elucidate` commands (make, pip, python scripts, curl) are not run; ``[--flag x]``
  synopsis groups are left out.
* :func:`tiny_argv` makes a command tiny without changing what it does: `train`/`train-vae` get ``--set``
  overrides (a tiny network for the config's arch, 2 steps, 64 images), ``--seeds`` keep their first 8,
  ``--num`` is at most 16, `tune` gets a small search budget; :func:`tiny_patches`: `demo` trains the tiny network
  for 2 steps, a fitted configuration (`train --data`, `init`) times 1 step instead of 8.
* A path a line reads that no earlier line wrote (`runs/edm` in a block without its `train`, `RUN`, `DIR`, ...)
  is provided (:class:`Provider`): made once per session by the same tiny commands, copied in.
* A python block runs with the names its page's text assumes (:data:`GIVEN`: `D`, `x`, `images`, ...) and the
  :data:`SHRINK` substitutions; tracebacks point at the markdown lines.
* :data:`SKIP` lists what a test cannot run, each with its reason. Skipped command lines are still parsed (their
  flags must exist). An entry of SKIP, SHRINK, SLOW or GIVEN that matches nothing fails, so the lists cannot rot.
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"bash", "sh", "shell", "console", "zsh"}

# ------------------------------------------------------------------------------------------------ what is not run
#: (page or None for every page, regex, reason): a command line (searched in the line) or a python block (searched in
#: its code) that needs what a test cannot have. Skipped command lines are still parsed by the CLI's parser.
SKIP = [
    (None, r"^torchrun ", "several processes (torchrun): tests/runtime/test_distributed.py runs train, sample and "
                          "eval under torchrun; here the command after `-m elucidate` is parsed"),
    ("docs/edm.md", r"import dnnlib", "runs in NVlabs/edm's checkout (its dnnlib) and downloads a 56M-parameter "
                                      "network"),
    ("docs/edm.md", r"load_edm_network\(\"edm-cifar10",
     "needs the .safetensors the block above writes in edm's environment; tests/nets/test_edm_port.py loads ported "
     "weights"),
    ("docs/edm.md", r"load_edm2_network\(\"edm2-img64",
     "needs the .safetensors the block above writes in edm2's environment; tests/nets/test_edm2_port.py loads ported "
     "weights"),
    (None, r"^elucidate import \S+\.safetensors", "needs the .safetensors a user exports in edm's / edm2's environment "
                                                  "(docs/edm.md); tests/cli/test_import.py imports ported weights"),
    ("docs/edm.md", r"^elucidate (sample|eval) runs/(cifar10-vp|edm2-img64-s)",
     "samples the run the `elucidate import` line above makes from a user's export; tests/cli/test_import.py samples "
     "imported runs"),
    (None, r"pt_inception-2015-12-05|--inception", "needs the Inception weights file (91 MB, downloaded by hand; "
                                                   "elucidate never downloads weights)"),
    ("docs/training.md", r"^elucidate train my-cifar10\.yaml .*--init edm-cifar10",
     "needs the .safetensors a user exports in edm's environment (docs/edm.md) and a config for it; "
     "tests/training/test_init.py starts runs from edm-layout exports"),
    ("docs/latent.md", r"path/to/sd-vae", "needs a local copy of a Stable Diffusion VAE (a diffusers AutoencoderKL "
                                          "folder, 335 MB); tests/latent/test_diffusers_vae.py trains, samples and "
                                          "encodes with a tiny one"),
    ("docs/edm2.md", r"--step 400|ema-0\.050-step00000400",
     "the snapshot at step 400 of the full run (a tiny run has steps 1 and 2); tests/cli/test_phema_cli.py "
     "reconstructs an earlier step and autoguides the final model by it"),
    ("docs/plots.md", r"^image_grid\(images, nrow=None", "a signature listing, not a program"),
    ("docs/plots.md", r"^plot_flow\(mixture=None", "a signature listing, not a program"),
    ("docs/extending.md", r"^@register_|^# src/elucidate/|^class Flow\(Formulation\)",
     "recipes: excerpts of source files that declare a part into the global registries; tests/test_extending.py "
     "declares and checks them"),
]

#: (page, regex on the block's code): blocks too long for `make test` even when tiny; they run in `make test-all`.
SLOW: list[tuple[str, str]] = []

#: (page, old, new): substitutions that make a python block of the page tiny; each must occur in the page.
SHRINK = [
    ("README.md", 'build_network("unet", img_resolution=8, in_channels=1)',
     'build_network("unet", img_resolution=8, in_channels=1, **TINY_UNET)'),
    ("docs/ddpm.md", 'build_network("unet", img_resolution=8, in_channels=1)',
     'build_network("unet", img_resolution=8, in_channels=1, **TINY_UNET)'),
    ("docs/ddpm.md", "f.sampling_sigmas(1000)", "f.sampling_sigmas(20)"),
    ("docs/latent.md", 'train_vae("configs/digits-vae.yaml", "runs/vae")',
     'train_vae("configs/digits-vae.yaml", "runs/vae", overrides=TINY_VAE)'),
    ("docs/likelihood.md", 'run_likelihood(load_run("runs/demo"), 512,', 'run_likelihood(load_run("runs/demo"), 8,'),
    ("docs/likelihood.md", 'steps=None, method="rk4"', 'steps=8, method="rk4"'),
    ("docs/likelihood.md", "log_likelihood(D, x, return_latent=True)",
     "log_likelihood(D, x, return_latent=True, steps=8)"),
    ("docs/likelihood.md", 'trace="hutchinson", seed=0,', 'trace="hutchinson", seed=0, steps=8,'),
    ("docs/lucidrains.md", "Unet(dim=64,", "Unet(dim=8,"),
    ("docs/lucidrains.md", "image_size=128,", "image_size=16,"),
    ("docs/lucidrains.md", "num_sample_steps=32,", "num_sample_steps=3,"),
    ("docs/lucidrains.md", "torch.rand(2, 3, 128, 128)", "torch.rand(2, 3, 16, 16)"),
    ("docs/diffusers.md", "num_inference_steps=1000", "num_inference_steps=10"),
    ("docs/distillation.md", 'method="cd", steps=2000)', 'method="cd", steps=2)'),
    ("docs/sampling.md", "tune(D, (64, 1, 8, 8), nfe=9)",
     "tune(D, (64, 1, 8, 8), nfe=9, samplers=['heun', 'dpmpp_2m'], finalists=1, max_evals=4, reference_steps=16)"),
]

#: page -> python run before each of its python blocks: the names the page's text assumes ("D: any denoiser",
#: "x: [B, 1, 32, 32]"). ``provide(path, ...)`` copies a provided run or folder in (:class:`Provider`);
#: ``tiny_net(**kw)`` and ``tiny_denoiser(**kw)`` are an 8x8 one-channel tiny U-Net and its EDM denoiser.
GIVEN = {
    "docs/ddpm.md": "images = torch.rand(8, 1, 8, 8) * 2 - 1",
    "docs/diffusers.md": "provide('path/to/unet', 'path/to/scheduler', 'path/to/pipeline', 'out/ddpm-digits')",
    "docs/distillation.md": "provide('runs/edm')",
    "docs/latent.md": "x = torch.rand(2, 1, 32, 32) * 2 - 1",
    "docs/likelihood.md": "D = tiny_denoiser(label_dim=10); x = torch.rand(2, 1, 8, 8) * 2 - 1; "
                          "labels = torch.arange(2); provide('runs/demo')",
    "docs/metrics.md": "from elucidate.metrics import digits_split; generated_images = digits_split().x_test[:100]",
    "docs/plots.md": "D = tiny_denoiser(); x_T = torch.randn(4, 1, 8, 8) * 80; "
                     "sigmas = elucidate.EDM().sampling_sigmas(4); provide('runs/digits')",
    "docs/sampling.md": "D = tiny_denoiser(); noise = torch.randn(64, 1, 8, 8); "
                        "run = elucidate.run.load_run(provide('runs/edm'))",
    "docs/training.md": "net = tiny_net(); steps, snapshot_every, batch_size = 4, 2, 8; run = Path('run')",
}

# ------------------------------------------------------------------------------------------------ tiny inputs
#: A tiny network per arch (the config's other network keys stay); an arch not listed keeps its network.
TINY_NETWORK = {
    "unet": {"model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []},
    "ddpmpp": {"model_channels": 16, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []},
    "ncsnpp": {"model_channels": 16, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []},
    "adm": {"model_channels": 16, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []},
    "diffusers_unet2d": {"block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4},
    "dit": {"hidden_size": 32, "depth": 1, "num_heads": 2},
}
TINY_TRAINING = {"training.steps": 2, "training.batch_size": 8, "training.checkpoint_every": 2,
                 "training.sample_every": 0, "data.max_size": 64, "sampling.steps": 2}
TINY_VAE = ["model.ch=8", "model.ch_mult=[1,2,2]", "loss.disc_start=1", "loss.disc_layers=1", "loss.disc_channels=8",
            "training.steps=2", "training.batch_size=8", "training.checkpoint_every=2", "training.sample_every=0",
            "training.eval_every=0", "training.holdout=8", "data.max_size=64"]
#: What `tune` searches when the line does not say (its defaults take 5-20 s on a tiny run).
TINY_TUNE = {"--num": "2", "--max-evals": "2", "--finalists": "1", "--reference-steps": "8",
             "--samplers": "heun,dpmpp_2m"}
MAX_SEEDS, MAX_NUM = 8, 16
#: (command, word) -> what stands for a placeholder of a synopsis line in that command (any other placeholder, e.g.
#: RUN, DIR, is a provided path of that name, :class:`Provider`).
PLACEHOLDERS = {("train-vae", "CONFIG"): "configs/digits-vae.yaml", ("train-vae", "RUN"): "runs/vae"}


def _flag(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _shrink_seeds(spec: str) -> str:
    """``--seeds``: each range cut to its first MAX_SEEDS, at most MAX_SEEDS parts."""
    parts = []
    for part in spec.split(",")[:MAX_SEEDS]:
        a, _, b = part.partition("-")
        parts.append(f"{a}-{min(int(b), int(a) + MAX_SEEDS - 1)}" if a.isdigit() and b.isdigit() else part)
    return ",".join(parts)


def _train_overrides(argv: list[str]) -> list[str]:
    """The tiny ``--set`` overrides of a `train`/`train-vae` line (after its own, so they win)."""
    if argv[0] == "train-vae":
        return TINY_VAE
    raw: dict = {}
    if len(argv) > 1 and Path(argv[1]).is_file():
        raw = yaml.safe_load(Path(argv[1]).read_text()) or {}
    own = dict(item.split("=", 1) for i, item in enumerate(argv) if i and argv[i - 1] == "--set" and "=" in item)
    arch = own.get("network.arch", (raw.get("network") or {}).get("arch", "unet"))
    sets = {**{f"network.{k}": v for k, v in TINY_NETWORK.get(arch, {}).items()}, **TINY_TRAINING}
    if (raw.get("training") or {}).get("ema") or any(k.startswith("training.ema") for k in own):
        sets["training.ema.snapshot_every"] = 1
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in sets.items()]


def tiny_argv(argv: list[str]) -> list[str]:
    """``argv`` (after ``elucidate``) made tiny: the same command on a tiny network, few seeds and samples."""
    command = argv[0] if argv else ""
    argv = [PLACEHOLDERS.get((command, a), a) for a in argv]
    for i, a in enumerate(argv[:-1]):
        if a == "--seeds":
            argv[i + 1] = _shrink_seeds(argv[i + 1])
        elif a in ("--num", "--num-samples") and argv[i + 1].isdigit():
            argv[i + 1] = str(min(int(argv[i + 1]), MAX_NUM if command != "likelihood" else 8))
    if command in ("train", "train-vae"):
        argv += [x for item in _train_overrides(argv) for x in ("--set", item)]
    if command in ("eval", "sweep") and _flag(argv, "--num") is None and _flag(argv, "--num-samples") is None:
        argv += ["--num", str(MAX_NUM)]
    if command == "likelihood":
        argv += [x for k, v in (("--num", "8"), ("--steps", "8")) if _flag(argv, k) is None for x in (k, v)]
    if command == "tune":  # a distilled run's tuner (docs/distillation.md) takes only --num of these
        config = Path(argv[1]) / "config.yaml" if len(argv) > 1 else None
        distilled = bool(config and config.is_file() and (yaml.safe_load(config.read_text()) or {}).get("distill"))
        argv += [x for k, v in TINY_TUNE.items() if _flag(argv, k) is None and (k == "--num" or not distilled)
                 for x in (k, v)]
    if command == "distill":  # `--steps 2000` -> 2 (4000 -> 4: a resume still resumes); tests/training/test_distill.py
        argv = [str(max(1, int(a) // 1000)) if i and argv[i - 1] == "--steps" and a.isdigit() else a
                for i, a in enumerate(argv)]
    if command == "reflow":  # 10000 pairs -> 16, `--steps 1000` -> 1, `--ode-steps 40` -> 4 (see test_reflow.py)
        small = {"--pairs": lambda n: min(n, 16), "--steps": lambda n: max(1, n // 1000), "--ode-steps": lambda n: 4}
        argv = [str(small[argv[i - 1]](int(a))) if i and argv[i - 1] in small and a.isdigit() else a
                for i, a in enumerate(argv)]
    if command == "demo" and _flag(argv, "--steps") is None:
        argv += ["--steps", "2"]
    if command in ("train", "train-vae", "demo") and "--no-progress" not in argv:
        argv.append("--no-progress")
    return argv


@contextlib.contextmanager
def tiny_patches(argv: list[str]):
    """What no flag reaches: `demo` trains its preset (not a config file) on the tiny network; a fitted
    configuration (`train --data`, `init`) times 1 training step instead of 8 (its timing is 10-20 s)."""
    import importlib

    with pytest.MonkeyPatch.context() as mp:
        if argv[:1] == ["demo"]:
            from elucidate.cli import demo

            mp.setitem(demo.DEMO_CONFIG, "network", {"arch": "unet", **TINY_NETWORK["unet"]})
            mp.setitem(demo.DEMO_CONFIG, "data", {**demo.DEMO_CONFIG["data"], "max_size": 64})
            mp.setitem(demo.DEMO_CONFIG, "sampling", {**demo.DEMO_CONFIG["sampling"], "steps": 2})
        with contextlib.suppress(ImportError):
            fit = importlib.import_module("elucidate.training.fit")
            if hasattr(fit, "_time_steps"):
                timed = fit._time_steps
                mp.setattr(fit, "_time_steps", lambda *a, **kw: timed(*a, **{**kw, "steps": 1}))
        yield


# ------------------------------------------------------------------------------------------------ the docs
@dataclass(frozen=True)
class Block:
    """A fenced code block: its page (relative to the repository), the line of its opening fence, its language
    and its lines (line number, text)."""
    page: str
    line: int
    lang: str
    lines: tuple[tuple[int, str], ...]

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def code(self) -> str:
        return "\n".join(text for _, text in self.lines)


@dataclass(frozen=True)
class Command:
    """One `elucidate` command of a bash block: where it is, the text as written, argv after `elucidate`, and
    whether it runs under torchrun."""
    page: str
    line: int
    text: str
    argv: tuple[str, ...]
    torchrun: bool = False

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}: `{self.text}`"


def read_blocks(path: Path) -> list[Block]:
    page = str(path.relative_to(ROOT))
    blocks, current, body = [], None, []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"\s*```(\S*)", text)
        if fence and current is None:
            current, body = (number, fence.group(1).lower()), []
        elif fence:
            blocks.append(Block(page, current[0], current[1], tuple(body)))
            current = None
        elif current is not None:
            body.append((number, text))
    return blocks


def commands(block: Block) -> list[Command]:
    """The `elucidate` commands of a bash block: continuation lines joined, comments and ``[--flag ...]``
    synopsis groups dropped, ``a && b`` split; `torchrun ... -m elucidate ARGS` and `python -m elucidate ARGS`
    count too."""
    out, pending, start = [], "", 0
    for number, text in block.lines:
        if not pending:
            start = number
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        line, pending = (pending + text).strip().removeprefix("$ "), ""
        words = shlex.split(re.sub(r"\s\[-[^\]]*\]", "", line), comments=True)
        segments, current = [], []
        for word in words + ["&&"]:
            if word in ("&&", ";", "||"):
                segments.append(current)
                current = []
            else:
                current.append(word)
        for seg in filter(None, segments):
            text_of = " ".join(seg)
            if seg[0] == "elucidate":
                out.append(Command(block.page, start, text_of, tuple(seg[1:])))
            elif re.fullmatch(r"python3?", seg[0]) and seg[1:3] == ["-m", "elucidate"]:
                out.append(Command(block.page, start, text_of, tuple(seg[3:])))
            elif seg[0] == "torchrun" and "-m" in seg and seg[seg.index("-m") + 1:seg.index("-m") + 2] == ["elucidate"]:
                out.append(Command(block.page, start, text_of, tuple(seg[seg.index("-m") + 2:]), torchrun=True))
    return out


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in read_blocks(page)]


def _skip_reason(page: str, text: str) -> str | None:
    for where, pattern, reason in SKIP:
        if where in (None, page) and re.search(pattern, text, re.M):
            return reason
    return None


def _runnable(block: Block) -> bool:
    return block.lang == "python" or (block.lang in SHELLS and bool(commands(block)))


def _param(block: Block):
    marks = [pytest.mark.slow] if any(p == block.page and re.search(r, block.code, re.M) for p, r in SLOW) else []
    return pytest.param(block, id=block.id, marks=marks)


BLOCKS = [b for b in all_blocks() if _runnable(b)]


# ------------------------------------------------------------------------------------------------ provided inputs
def _make_image_folder(out: Path) -> None:
    """32 real digits as 8x8 grey PNGs (a folder of "your images")."""
    from PIL import Image

    from elucidate.metrics import digits_split

    out.mkdir(parents=True)
    for i, image in enumerate(digits_split().x_test[:32]):
        Image.fromarray(image[0].to(torch.uint8).numpy()).save(out / f"{i:03d}.png")


def _make_conditions(out: Path) -> None:
    """What the `python -c` lines of conditioning.md / guidance.md write: lowres.npz, the low-resolution copies of
    the first 8 digits (concat); away7.npz, class label 7 as guidance's null condition."""
    import numpy as np

    from elucidate.data import build_dataset

    if out.name == "away7.npz":
        np.savez(out, class_labels=np.array([7]))
    else:
        np.savez(out, concat=build_dataset({"dataset": "digits", "condition": "lowres"}).concat[:8].numpy())


def _make_top_half_mask(out: Path) -> None:
    """What editing.md's `python -c` line writes: an 8x8 PNG mask, white (keep) in the top half."""
    import numpy as np
    from PIL import Image

    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 255
    Image.fromarray(mask).save(out)


def _make_diffusers_rgb(out: Path) -> None:
    """A random 3-channel 32x32 UNet2DModel with a DDIM scheduler, as a pipeline folder."""
    import diffusers

    unet = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 8),
                                 layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler()).save_pretrained(out)


class Provider:
    """Inputs the docs read without writing them first, made once (per session) in ``root`` by the same tiny
    commands the docs run. ``runs/NAME`` is trained from configs/digits-NAME.yaml, configs/NAME-edm.yaml or
    configs/digits-edm.yaml (`runs/vae` with train-vae; `runs/latent` on `runs/vae`); the other paths are
    :data:`PATHS`."""

    #: path -> how to make it: a list of `elucidate` argv run in ``root`` (OUT = the path), or a function of it.
    PATHS = {
        "RUN": [["train", "configs/digits-edm.yaml", "--out", "OUT", "--set",
                 "training.ema={type: power, stds: [0.05, 0.10]}"]],
        "CONFIG": lambda out: shutil.copy(ROOT / "configs" / "digits-edm.yaml", out),
        "DIR": [["train", "configs/digits-ddpm.yaml", "--out", "DIR-run", "--set", "network.arch=diffusers_unet2d"],
                ["export", "DIR-run", "--diffusers", "OUT"]],
        "path/to/pipeline": _make_diffusers_rgb,
        "path/to/images": _make_image_folder,
        "my-faces": _make_image_folder,  # own-data.md writes it with a `python -c` line the test does not run
        "lowres.npz": _make_conditions,  # conditioning.md and guidance.md: the same (`python -c` lines)
        "away7.npz": _make_conditions,
        "top-half.png": _make_top_half_mask,  # editing.md (a `python -c` line)
    }
    ALIASES = {"out/ddpm-digits": "DIR", "path/to/unet": "path/to/pipeline/unet",
               "path/to/scheduler": "path/to/pipeline/scheduler"}

    def __init__(self, root: Path):
        self.root = root
        (root / "configs").symlink_to(ROOT / "configs")

    def root_of(self, path: str) -> str | None:
        """The provided path that ``path`` is or lies in (``runs/edm`` for runs/edm/eval/x.json), or None."""
        if path in self.ALIASES or path in self.PATHS:
            return path
        within = next((p for p in self.PATHS if path.startswith(p + "/")), None)
        run = re.match(r"runs/[\w.-]+", path)
        return within or (run.group(0) if run else None)

    def get(self, path: str) -> Path:
        """The made path (made now if it is not yet)."""
        path = self.ALIASES.get(path, path)
        target = self.root / path
        if target.exists():
            return target
        base = next((p for p in self.PATHS if path.startswith(p + "/")), None)
        if base is not None:
            self.get(base)
            return target
        recipe = self.PATHS.get(path) or self._run_recipe(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.chdir(self.root):
            if callable(recipe):
                recipe(target)
            else:
                for argv in recipe:
                    argv = tiny_argv([path if a == "OUT" else a for a in argv])
                    code, err = _main(argv)
                    assert code == 0, f"making {path} for the docs: elucidate {' '.join(argv)} exited {code}: {err}"
        return target

    def _run_recipe(self, path: str) -> list[list[str]]:
        name = path.split("/", 1)[1]
        if name == "vae":
            return [["train-vae", "configs/digits-vae.yaml", "--out", path]]
        if name == "latent":
            self.get("runs/vae")
        config = next((c for c in (f"configs/digits-{name}.yaml", f"configs/{name}-edm.yaml")
                       if (ROOT / c).is_file()), None)
        if config is None:      # runs/demo, runs/a, ...: a copy of runs/edm (trained once)
            return lambda out: shutil.copytree(self.get("runs/edm"), out)
        return [["train", config, "--out", path]]

    def copy(self, path: str, cwd: Path) -> Path:
        """The provided ``path`` copied to ``cwd / path``."""
        source, target = self.get(path), cwd / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        return target


@pytest.fixture(scope="session")
def provider(tmp_path_factory) -> Provider:
    return Provider(tmp_path_factory.mktemp("provided"))


def _main(argv: list[str]) -> tuple[int, str]:
    """`elucidate ARGV` in this process: (exit status, the tail of what it wrote to stderr)."""
    from elucidate.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    return code or 0, "\n".join(err.getvalue().strip().splitlines()[-5:])


# ------------------------------------------------------------------------------------------------ the tests
@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return tmp_path


def _outputs(argv: tuple[str, ...]) -> set[str]:
    """What a command writes: ``--out X`` (and `export --diffusers X`)."""
    flags = {"--out", "--diffusers"} if argv[:1] == ("export",) else {"--out"}
    return {argv[i + 1].rstrip("/") for i, a in enumerate(argv[:-1]) if a in flags}


def run_shell_block(block: Block, provider: Provider, cwd: Path) -> None:
    from elucidate.cli import build_parser

    for command in commands(block):
        reason = _skip_reason(block.page, command.text)
        if reason or command.torchrun:
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    build_parser().parse_args(list(command.argv))
            except SystemExit as e:
                pytest.fail(f"{command.where} (not run: {reason}) does not parse: exit status {e.code}")
            continue
        for word in command.argv:
            for path in {word.rstrip("/"), word.split("=", 1)[-1].rstrip("/")} - _outputs(command.argv):
                root = provider.root_of(path)
                if root and not (cwd / root).exists():
                    provider.copy(root, cwd)
        argv = tiny_argv(list(command.argv))
        with tiny_patches(argv):
            try:
                code, err = _main(argv)
            except Exception as e:
                raise AssertionError(f"{command.where} raised {type(e).__name__}: {e}\n  ran: elucidate "
                                     f"{shlex.join(argv)}") from e
        if code != 0:
            pytest.fail(f"{command.where} exited with status {code}\n  ran: elucidate {shlex.join(argv)}\n  {err}",
                        pytrace=False)


def _shrunk(block: Block) -> str:
    code = block.code
    for page, old, new in SHRINK:
        if page == block.page:
            code = code.replace(old, new)
    return code


def run_python_block(block: Block, provider: Provider, cwd: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import elucidate
    import elucidate.run
    from elucidate import EDM, Denoiser, build_network

    def tiny_net(**kw):
        return build_network("unet", img_resolution=8, in_channels=1, **{**TINY_NETWORK["unet"], **kw})

    def provide(*paths):
        made = [provider.copy(p, cwd) if not (cwd / p).exists() else cwd / p for p in paths]
        return made[0] if len(made) == 1 else made

    namespace = {"__name__": "__docs__", "torch": torch, "Path": Path, "elucidate": elucidate, "provide": provide,
                 "tiny_net": tiny_net, "tiny_denoiser": lambda **kw: Denoiser(tiny_net(**kw), EDM()).eval(),
                 "TINY_VAE": TINY_VAE, "TINY_UNET": TINY_NETWORK["unet"]}
    exec(GIVEN.get(block.page, ""), namespace)
    source = "\n" * (block.lines[0][0] - 1) + _shrunk(block)
    try:
        exec(compile(source, str(ROOT / block.page), "exec"), namespace)
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(ROOT / block.page)]
        line = frames[-1].lineno if frames else block.line
        text = dict(block.lines).get(line, "").strip()
        raise AssertionError(f"{block.page}:{line}: `{text}` raised {type(e).__name__}: {e}") from e
    finally:
        plt.close("all")


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_doc_block_runs(block, provider, workdir, one_thread):
    reason = _skip_reason(block.page, block.code) if block.lang == "python" else None
    if reason:
        pytest.skip(reason)
    with torch.random.fork_rng(devices=[]):     # the blocks' random draws leave the other tests' alone
        torch.manual_seed(0)
        if block.lang == "python":
            run_python_block(block, provider, workdir)
        else:
            run_shell_block(block, provider, workdir)


def test_every_exception_matches_something():
    """Entries of SKIP, SLOW, SHRINK and GIVEN that match no line of the docs fail: the lists cannot rot."""
    blocks = all_blocks()
    texts = [(b.page, b.code) for b in blocks if b.lang == "python"]
    texts += [(c.page, c.text) for b in blocks if b.lang in SHELLS for c in commands(b)]
    stale = [f"SKIP {page or '*'} {pattern!r}" for page, pattern, _ in SKIP
             if not any(page in (None, p) and re.search(pattern, t, re.M) for p, t in texts)]
    stale += [f"SLOW {page} {pattern!r}" for page, pattern in SLOW
              if not any(page == p and re.search(pattern, t, re.M) for p, t in texts)]
    stale += [f"SHRINK {page} {old!r}" for page, old, _ in SHRINK
              if not any(page == p and old in t for p, t in texts)]
    stale += [f"GIVEN {page}" for page in GIVEN if not any(page == p for p, _ in texts)]
    assert stale == [], "entries that match nothing in the docs (remove or update them):\n" + "\n".join(stale)


def test_the_extraction_finds_the_readme_examples():
    """The extraction itself: the README's python example and its command lines are found and made tiny."""
    readme = [b for b in BLOCKS if b.page == "README.md"]
    assert any(b.lang == "python" for b in readme)
    found = [c.argv[0] for b in readme if b.lang in SHELLS for c in commands(b)]
    assert "train" in found and "sample" in found
    block = Block("x.md", 1, "bash", ((2, "elucidate likelihood RUN --num 512 [--trace hutchinson|exact] \\"),
                                      (3, "  --seeds 0-999  # comment && elucidate x"),
                                      (4, "torchrun --nproc_per_node=2 -m elucidate eval RUN && make test")))
    cmds = commands(block)
    assert [c.argv for c in cmds] == [("likelihood", "RUN", "--num", "512", "--seeds", "0-999"), ("eval", "RUN")]
    assert [c.line for c in cmds] == [2, 4] and cmds[1].torchrun
    assert tiny_argv(list(cmds[0].argv)) == ["likelihood", "RUN", "--num", "8", "--seeds", "0-7", "--steps", "8"]
