"""`--guide RUN_OR_CKPT`, `--guidance-interval LO,HI` and `--clip-denoised` on sample / eval / sweep: an unconditional
run autoguided by its own early checkpoint samples what the library's Guided does, and every bad value is one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from elucidate import Clipped, Guided, sample
from elucidate.run import load_run


def _early(run):
    return sorted((run / "checkpoints").glob("*.safetensors"))[0]


def test_autoguided_sampling_equals_the_library(trained_run, tmp_path, cli_main):
    early = _early(trained_run)
    args = ["--seeds", "0-3", "--steps", "4", "--guidance", "2.5", "--guide", early]
    code, err = cli_main(["sample", trained_run, *args, "--guidance-interval", "0.2,inf", "--clip-denoised",
                          "--out", tmp_path / "ag.npz"])
    assert code == 0, err
    code, err = cli_main(["sample", trained_run, "--seeds", "0-3", "--steps", "4", "--out", tmp_path / "plain.npz"])
    assert code == 0, err
    with np.load(tmp_path / "ag.npz") as a, np.load(tmp_path / "plain.npz") as b:
        guided, plain = a["samples"], b["samples"]
    assert not np.array_equal(guided, plain)
    run, guide = load_run(trained_run), load_run(early)
    cfg = run.config.sampling
    cfg.steps = 4
    D = Clipped(Guided(run.denoiser, 2.5, guide=guide.denoiser, interval=(0.2, float("inf"))))
    x = sample(D, (4, *run.shape), seeds=range(4), **cfg.sample_kwargs(run.denoiser.formulation))
    ours = ((x.clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1).numpy().astype(np.int32)
    assert np.abs(ours - guided.astype(np.int32)).max() <= 1


def test_eval_and_sweep_take_a_guide(trained_copy, cli_main):
    early = _early(trained_copy)
    code, err = cli_main(["eval", trained_copy, "--num", "8", "--steps", "3", "--guidance", "2", "--guide", early,
                          "--guidance-interval", "0.1,10", "--no-progress"])
    assert code == 0, err
    results = [json.loads(p.read_text()) for p in (trained_copy / "eval").glob("*.json")]
    settings = next(r["settings"] for r in results if "settings" in r)
    assert settings["guide"] == str(early) and settings["guidance_interval"] == [0.1, 10.0]
    code, err = cli_main(["sweep", trained_copy, "--num", "8", "--nfe", "3", "--samplers", "euler", "--guidance", "2",
                          "--guide", early, "--no-progress"])
    assert code == 0, err


def test_bad_guide_and_interval_values_are_one_line(trained_run, tiny_config, write_config, tmp_path, cli_main,
                                                   capsys):
    cfg = write_config(tiny_config(network={"label_dim": "auto", "label_dropout": 0.1}), tmp_path / "cond.yaml")
    assert cli_main(["train", cfg, "--out", tmp_path / "cond", "--no-progress"])[0] == 0
    out = ["--out", tmp_path / "x.png", "--seeds", "0"]
    guided = ("--guidance", "2", "--guide", _early(trained_run))
    cases = {(*guided, "--guidance-interval", "5,1"): "guidance_interval",
             (*guided, "--guidance-interval", "a,b"): "expected comma-separated numbers",
             (*guided, "--guidance-interval", "1,2,3"): "guidance_interval",
             ("--guide", _early(trained_run)): "--guide has no effect without guidance",
             ("--guidance-interval", "0.1,1"): "--guidance-interval has no effect without guidance",
             ("--guidance", "2", "--guide", tmp_path / "nothing"): "nothing",
             ("--guidance", "2", "--guide", tmp_path / "cond"): "does not match"}
    for flags, message in cases.items():
        try:
            code, err = cli_main(["sample", trained_run, *flags, *out])
        except SystemExit as e:  # argparse's own errors (one line too)
            code, err = e.code, capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (flags, err)
    assert not (tmp_path / "x.png").exists()
    # a model without a condition still refuses classifier-free guidance (no --guide)
    code, err = cli_main(["sample", trained_run, "--guidance", "2", *out])
    assert code == 2 and len(err) == 1 and "no condition to guide" in err[0], err


def test_the_config_keys_validate(trained_run):
    from elucidate.config.sampling import SamplingConfig
    from elucidate.errors import ConfigError, UserError

    for bad in ([1.0], [3.0, 1.0], "x", [-1, 2]):
        with pytest.raises(ConfigError, match="sampling.guidance_interval"):
            SamplingConfig(guidance_interval=bad).validate()
    cfg = SamplingConfig(guidance=2.0, guidance_interval=[0.5, 4], clip_denoised=True)
    cfg.validate()
    assert cfg.guidance_interval == [0.5, 4.0]
    with pytest.raises(UserError, match="sampling.guide"):
        SamplingConfig(guidance=2.0, guide="somewhere").guided(torch.nn.Identity())
