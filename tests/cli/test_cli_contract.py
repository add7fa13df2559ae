"""A command line that explains itself (issue 35): --version; every model-running command takes --device and
--no-progress (one default, honoured); every option has help and shows its default; --set, --guidance and --seeds
errors name the flag; Ctrl-C during training checkpoints and skips the final grid; only elucidate's own warnings
carry its label; the package metadata is modern (SPDX license)."""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import signal
import types
import warnings
from pathlib import Path

import pytest
import torch

import elucidate
from elucidate.cli import build_parser, main
from elucidate.cli.options import DEVICE_HELP, PROGRESS_HELP, HelpFormatter, check_guidance
from elucidate.config import ConfigWarning
from elucidate.errors import UserError
from elucidate.run import RunDir
from elucidate.training import TrainingLoop

ROOT = Path(__file__).resolve().parents[2]

#: The commands that run a model (a network, a feature extractor or the training loop), each with the smallest
#: argv that parses. A new command that runs one belongs here.
MODEL_COMMANDS = {
    "train": ["CONFIG", "--out", "OUT"], "train-vae": ["CONFIG", "--out", "OUT"], "init": ["digits", "--out", "c.yaml"],
    "encode": ["digits", "--vae", "VAE", "--out", "x.npz"], "demo": [], "sample": ["RUN", "--out", "g.png"],
    "eval": ["RUN"], "ref": ["digits", "--out", "s.npz"], "sweep": ["RUN"], "likelihood": ["RUN"],
    "tune": ["RUN", "--nfe", "5"],
}


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _option(parser, flag: str):
    return next((a for a in parser._actions if flag in a.option_strings), None)


# --------------------------------------------------------------------------------------------- --version
def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"elucidate {elucidate.__version__}"
    assert importlib.metadata.version("elucidate") == elucidate.__version__  # one version: pyproject reads it


# --------------------------------------------------------------------------------------------- --device, --no-progress
def test_every_model_command_takes_device_and_no_progress_alike():
    commands = _commands()
    assert set(MODEL_COMMANDS) <= set(commands)
    for name, parser in commands.items():
        device, progress = _option(parser, "--device"), _option(parser, "--no-progress")
        if name in MODEL_COMMANDS:
            assert device is not None and progress is not None, f"{name}: add_run_options(p)"
        if device is not None or progress is not None:  # the shared helper's flags, the same everywhere
            assert device is not None and progress is not None, name
            assert (device.default, device.help) == (None, DEVICE_HELP), name
            assert (progress.dest, progress.default, progress.help) == ("progress", True, PROGRESS_HELP), name


@pytest.mark.parametrize("cuda", [False, True])
def test_one_default_device_for_every_command(monkeypatch, cuda):
    """``--device`` unset is resolved once, in main(), the same for every command (cuda if available)."""
    import elucidate.cli as cli

    seen = {}
    build = cli._build

    def capture(name):
        def handler(args) -> int:
            seen[name] = args
            return 0
        return handler

    def capturing():
        parser, handlers = build()
        return parser, {name: capture(name) for name in handlers}

    monkeypatch.setattr(cli, "_build", capturing)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for name, argv in MODEL_COMMANDS.items():
        assert main([name, *argv]) == 0
        assert seen.pop(name).device == ("cuda:0" if cuda else "cpu"), name
        assert main([name, *argv, "--device", "cpu", "--no-progress"]) == 0
        args = seen.pop(name)
        assert args.device == "cpu" and args.progress is False, name


def test_the_device_reaches_the_model(trained_run, tmp_path, monkeypatch):
    from elucidate.run import model

    devices = []
    load_run, sample = model.load_run, model.LoadedRun.sample

    def spy_load(path, **kw):
        devices.append(("load", kw.get("device")))
        return load_run(path, **kw)

    def spy_sample(self, seeds, cfg=None, **kw):
        devices.append(("sample", kw.get("device")))
        return sample(self, seeds, cfg, **kw)

    monkeypatch.setattr(model, "load_run", spy_load)
    monkeypatch.setattr(model.LoadedRun, "sample", spy_sample)
    assert main(["sample", str(trained_run), "--seeds", "0-1", "--out", str(tmp_path / "g.png"), "--device",
                 "cpu:0", "--no-progress"]) == 0
    assert devices == [("load", "cpu:0"), ("sample", "cpu:0")]


@pytest.mark.parametrize("argv, marker", [
    (["sample", "{run}", "--seeds", "0-3", "--out", "{tmp}/g.png"], "sampling ("),
    (["eval", "{run}", "--num", "8", "--batch", "4", "--metric", "fd_digits"], "sampled 8/8"),
    (["likelihood", "{run}", "--num", "1", "--steps", "1", "--method", "heun"], "likelihood:"),
    (["tune", "--sandbox", "--nfe", "3", "--num", "2", "--reference-steps", "4", "--max-evals", "2",
      "--finalists", "1", "--samplers", "euler", "--out", "{tmp}/schedules"], "tune: reference solutions"),
], ids=["sample", "eval", "likelihood", "tune"])
def test_no_progress_turns_progress_off(trained_copy, tmp_path, capsys, argv, marker):
    argv = [a.format(run=trained_copy, tmp=tmp_path) for a in argv]
    for flags, shown in (([], True), (["--no-progress"], False)):
        capsys.readouterr()
        assert main(argv + flags) == 0
        out = capsys.readouterr()
        assert (marker in out.err + out.out) == shown, (flags, out)


# --------------------------------------------------------------------------------------------- help and defaults
def test_every_option_has_help_and_shows_its_default():
    missing, silent = [], []
    for name, parser in _commands().items():
        formatter = HelpFormatter(name)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help:
                missing.append(where)
                continue
            text = formatter._get_help_string(action) % {**vars(action), "default": action.default}
            has_value = (action.option_strings and action.nargs != 0 and not isinstance(action.default, bool)
                         and action.default != [])  # flags and repeatable options (none by default) aside
            if has_value and not action.required and "default" not in text.lower():
                silent.append(where)  # a value default shown, or (None) the help says what leaving it out does
            assert "(default: None)" not in text, where
    assert missing == [], f"options without help: {missing}"
    assert silent == [], f"options whose help does not say their default: {silent}"


def test_help_shows_defaults_and_what_a_command_does(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.splitlines()[0].startswith("usage: elucidate sample")
    assert "generate images from a run directory or checkpoint" in text  # the description
    assert "(default: 64)" in text and "(default: fp32)" in text and "(default: None)" not in text
    assert "default: the run's sampling.steps" in text


# --------------------------------------------------------------------------------------------- errors naming the flag
def test_set_errors_name_the_override_not_the_file(tiny_config, tiny_vae_config, write_config, tmp_path, cli_main):
    cfg = write_config(tiny_config(), tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    cases = [(["--set", "training.stpes=100"], "--set training.stpes=100: unknown key training.stpes "
                                               "(did you mean 'steps'?)"),
             (["--set", "training.steps=3", "--set", "training.steps=abc"],
              "--set training.steps=abc: training.steps = 'abc': expected an integer"),
             (["--set", "trainin.steps=3"], "--set trainin.steps=3: unknown key config.trainin"),
             (["--set", "training.steps=5", "--set", "diffusion.sigma_dta=1"], "--set diffusion.sigma_dta=1: "),
             (["--set", "training"], "--set training: expected section.key=value")]
    for flags, needle in cases:
        code, err = cli_main(["train", cfg, "--out", out, *flags])
        assert code == 2 and len(err) == 1 and err[0].startswith("elucidate train: error: " + needle), (flags, err)
        assert str(cfg) not in err[0]
    bad = write_config(tiny_config(training={"stpes": 3}), tmp_path / "bad.yaml")  # the file's own error names it
    code, err = cli_main(["train", bad, "--out", out, "--set", "training.steps=3"])
    assert code == 2 and err == [err[0]] and err[0].startswith(f"elucidate train: error: {bad}: unknown key "
                                                              "training.stpes"), err
    vae = write_config(tiny_vae_config(), tmp_path / "vae.yaml")
    code, err = cli_main(["train-vae", vae, "--out", out, "--set", "loss.kl_wieght=1"])
    assert code == 2 and err[0].startswith("elucidate train-vae: error: --set loss.kl_wieght=1: unknown key"), err
    assert not out.exists()


def test_guidance_needs_a_condition(trained_run, tmp_path, cli_main):
    for verb, extra in (("sample", ["--out", tmp_path / "g.png"]), ("eval", ["--num", "8"]),
                        ("sweep", ["--num", "8", "--nfe", "3"])):
        code, err = cli_main([verb, trained_run, "--guidance", "2", *extra])
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"elucidate {verb}: error: --guidance 2: the model has no condition"), err
    assert not list(tmp_path.iterdir())

    def run(**net):
        return types.SimpleNamespace(denoiser=types.SimpleNamespace(net=types.SimpleNamespace(**net)))
    for ok in ({"label_dim": 10}, {"cond_channels": 2}, {"context_dim": 16}):
        check_guidance(run(**ok), 3.0)
    for unset in (None, 1, 1.0):
        check_guidance(run(label_dim=0), unset)
    with pytest.raises(UserError, match="--guidance 0: "):
        check_guidance(run(label_dim=0, cond_channels=0), 0.0)


def test_duplicate_seeds_are_an_error(trained_run, tmp_path, cli_main):
    code, err = cli_main(["sample", trained_run, "--seeds", "0-3,2", "--out", tmp_path / "g.png"])
    assert code == 2 and len(err) == 1 and err[0].startswith(
        "elucidate sample: error: --seeds 0-3,2: seed 2 appears twice"), err
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------- Ctrl-C
@pytest.mark.parametrize("verb", ["train", "train-vae"])
def test_ctrl_c_checkpoints_the_step_and_skips_the_final_grid(verb, tiny_config, tiny_vae_config, write_config,
                                                              tmp_path, capsys, monkeypatch):
    """A real SIGINT to this process at step 2 of 4 (3): the step finishes and is checkpointed; no final evaluation,
    no sample grid; the last line says how to resume (exit status 130). The same command then finishes the run."""
    raw = (tiny_config(training={"checkpoint_every": 100}) if verb == "train" else
           tiny_vae_config(training={"steps": 3, "checkpoint_every": 100, "eval_every": 0}))
    cfg, out = write_config(raw, tmp_path / "cfg.yaml"), RunDir(tmp_path / "run")
    argv = [verb, str(cfg), "--out", str(out.path), "--no-progress"]
    train_step = TrainingLoop.train_step

    def interrupted(self, step):
        result = train_step(self, step)
        if step == 1 and not self.stop_requested:  # during the 2nd step, as a Ctrl-C would
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(TrainingLoop, "train_step", interrupted)
    capsys.readouterr()
    assert main(argv) == 130
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "interrupted at step 2 \N{EM DASH} run the same command to resume", lines
    assert lines[-2] == f"checkpoint: {out.checkpoint(2)}" and out.checkpoint(2).is_file()
    assert [c.name for c in out.list_checkpoints()] == [out.checkpoint(2).name]
    assert not list(out.path.glob("samples/*.png")), "the final grid was drawn"
    assert "psnr" not in out.metrics.read_text()  # nor the final evaluation (train-vae)

    monkeypatch.setattr(TrainingLoop, "train_step", train_step)
    assert main(argv) == 0
    steps = raw["training"]["steps"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"trained to step {steps}")
    assert list(out.path.glob("samples/*.png"))


# --------------------------------------------------------------------------------------------- warnings
def test_only_elucidate_warnings_carry_its_label(capsys):
    from elucidate.cli import _one_line_warnings

    passed = []
    show = _one_line_warnings("sample", lambda *a: passed.append(a))
    show(ConfigWarning("training.x has no effect"), ConfigWarning, "/anywhere/cfg.py", 3)
    show(UserWarning("a damaged checkpoint"), UserWarning, "elucidate", 0)  # warn_explicit(..., "elucidate", 0)
    show(UserWarning("ours"), UserWarning, str(Path(elucidate.__file__).parent / "run" / "model.py"), 9)
    torch_file = str(Path(torch.__file__).parent / "nn" / "modules" / "module.py")
    show(UserWarning("TypedStorage is deprecated"), UserWarning, torch_file, 7)
    show(DeprecationWarning("old numpy"), DeprecationWarning, "<stdin>", 1)
    assert capsys.readouterr().err.splitlines() == ["elucidate sample: warning: training.x has no effect",
                                                     "elucidate sample: warning: a damaged checkpoint",
                                                     "elucidate sample: warning: ours"]
    assert [(str(a[0]), a[2]) for a in passed] == [("TypedStorage is deprecated", torch_file),
                                                   ("old numpy", "<stdin>")]


def test_a_foreign_warning_goes_to_the_default_handler(monkeypatch, capsys, recwarn):
    """End to end: torch's warning, raised while a command runs, reaches the handler that was there before (here
    pytest's recorder; Python's formatter on a terminal), not ``elucidate CMD: warning:``; ours gets the label."""
    import elucidate.cli.reports as reports

    def warns(args):
        warnings.warn_explicit("a torch warning", UserWarning, torch.__file__, 1)
        warnings.warn_explicit("an elucidate warning", ConfigWarning, "elucidate", 0)
        return 0

    monkeypatch.setattr(reports, "cmd_plot", warns)
    assert main(["plot", "schedules"]) == 0
    assert capsys.readouterr().err.splitlines() == ["elucidate plot: warning: an elucidate warning"]
    assert [str(w.message) for w in recwarn] == ["a torch warning"]


# --------------------------------------------------------------------------------------------- package metadata
def test_package_metadata_uses_an_spdx_license():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"  # an SPDX expression, not the deprecated {text = ...} table
    assert all(list(ROOT.glob(pattern)) for pattern in project["project"]["license-files"])
    assert "version" in project["project"]["dynamic"]  # elucidate.__version__, what --version prints
    requires = project["build-system"]["requires"]
    assert any(r.replace(" ", "").startswith("setuptools>=") and int(r.split(">=")[1].split(".")[0]) >= 77
               for r in requires), requires
