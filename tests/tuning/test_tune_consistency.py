"""Tuning the consistency sampler's intermediate levels (elucidate.tuning.consistency, `elucidate tune` of a distill
run): the search finds a known best, every candidate sees the same randomness, the schedule is stored like an ODE
one and `sample/sweep --nfe/--tuned` replay it; the ODE tuner's options are refused in one line."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from elucidate import GaussianMixture, sample
from elucidate.config.sampling import SamplingConfig
from elucidate.metrics import frechet_distance
from elucidate.run import RunDir
from elucidate.tuning.consistency import consistency_levels, consistency_seeds, search_consistency, tune_consistency
from elucidate.tuning.stored import TunedSchedule, load_tuned

f64 = torch.float64


# ------------------------------------------------------------------------------------------------ the search
@pytest.mark.parametrize("nfe", [2, 3, 4])
def test_search_finds_the_minimum_of_an_independent_objective(nfe):
    # a smooth objective of the levels with its minimum at sigma_last = 0.3 and (nfe >= 3) a level near 6 before it
    def objective(sigmas):
        u = math.log(sigmas[-2] / 0.3) ** 2
        return u + (math.log(sigmas[-3] / 6.0) ** 2 if nfe >= 3 else 0.0)

    sigmas, value, found = search_consistency(objective, nfe, 80.0, 0.004, 40.0)
    assert len(sigmas) == nfe + 1 and sigmas[0] == 80.0 and sigmas[-1] == 0.0 and found["evaluations"] <= 32
    # brute force over the same family: sigma_last on a fine grid, rho among those searched
    best = min(objective(consistency_levels(nfe, math.exp(u), 80.0, rho))
               for u in np.linspace(math.log(0.004), math.log(40.0), 400) for rho in ([7.0] if nfe == 2 else
                                                                                       [1.0, 3.0, 7.0, 15.0, 40.0]))
    assert value == objective(sigmas) and value <= best + 1e-3
    assert abs(math.log(found["sigma_last"] / 0.3)) < 0.05


def test_levels_and_seeds():
    assert consistency_levels(1, 0.5, 80.0) == [80.0, 0.0]
    assert consistency_levels(2, 0.821, 80.0) == [80.0, pytest.approx(0.821), 0.0]
    assert consistency_seeds(0, 3) == [0x7E5E_0000 + i for i in range(3)]
    assert not set(consistency_seeds(0, 500)) & set(consistency_seeds(1, 500))


# ------------------------------------------------------------------------------------------------ a known best level
def gaussian_score(gmm: GaussianMixture, calls: list):
    """FD of the consistency sampler's samples (f = the Gaussian's denoiser) to the data N(0, 0.5^2 I)."""
    def score(sigmas, seeds):
        calls.append((tuple(sigmas), tuple(seeds)))
        x = sample(gmm.denoise, (len(seeds), gmm.dim), sampler="consistency", dtype=f64,
                   sigmas=torch.tensor(sigmas, dtype=f64), seeds=seeds).numpy()
        return frechet_distance(x.mean(0), np.cov(x, rowvar=False), np.zeros(gmm.dim), 0.25 * np.eye(gmm.dim))
    return score


def test_tune_finds_the_known_best_level_on_common_random_numbers():
    # f = D of N(0, s^2): x0 = D(80 n, 80) ~ 0, re-noised to sigma and denoised again has std s^2 sigma / (s^2 +
    # sigma^2), largest (nearest the data's s) at sigma = s. The default level 0.821 is not s = 0.5.
    gmm, calls = GaussianMixture(torch.zeros(1, 4), [0.5]), []
    tuned = tune_consistency(gaussian_score(gmm, calls), 2, sigma_max=80.0, lo=0.004, default=[80.0, 0.821, 0.0],
                             options={"epsilon": 0.0}, num=1000, seed=3, objective={"metric": "fd_gaussian"})
    assert abs(math.log(tuned.sigmas[1] / 0.5)) < 0.05, tuned.sigmas
    default = tuned.baselines[0]
    assert tuned.tuning_error < default["tuning_error"] and tuned.heldout_error < default["heldout_error"]
    seeds, held = tuple(consistency_seeds(3, 1000)), tuple(consistency_seeds(4, 1000))
    assert {s for _, s in calls} == {seeds, held}  # every candidate on the tuning seeds, the final two held out
    assert [sig for sig, s in calls if s == held] == [tuple(tuned.sigmas), (80.0, 0.821, 0.0)]
    assert tuned.objective["metric"] == "fd_gaussian" and tuned.objective["num"] == 1000
    assert tuned.sampler == "consistency" and tuned.evaluations == len(calls) and tuned.loss == "fd_gaussian"
    back = TunedSchedule.from_dict(json.loads(json.dumps(tuned.to_dict())))
    assert back.sigmas == tuned.sigmas and back.objective == tuned.objective


def test_a_stored_consistency_schedule_is_validated():
    good = TunedSchedule("consistency", [80.0, 0.5, 0.0], {"epsilon": 0.002}, 2)
    assert good.steps == 2
    with pytest.raises(ValueError, match="epsilon"):
        TunedSchedule("consistency", [80.0, 0.001, 0.0], {"epsilon": 0.002}, 2)
    with pytest.raises(ValueError, match="more than nfe"):
        TunedSchedule("consistency", [80.0, 2.0, 0.5, 0.0], {}, 2)
    with pytest.raises(ValueError, match="draws noise"):
        TunedSchedule("euler_ancestral", [80.0, 0.5, 0.0], {}, 2)


# ------------------------------------------------------------------------------------------------ the command line
@pytest.fixture(scope="module")
def distilled(trained_run, tmp_path_factory):
    """A tiny ect run of the session's trained digits run (1 step)."""
    from elucidate.cli import main

    out = tmp_path_factory.mktemp("tune_consistency") / "ect"
    assert main(["distill", str(trained_run), "--method", "ect", "--out", str(out), "--steps", "1",
                 "--no-progress"]) == 0
    return out


def test_cli_tune_writes_the_schedule_and_sample_uses_it(distilled, tmp_path, cli_main):
    import shutil

    from elucidate.run.model import load_run

    run = shutil.copytree(distilled, tmp_path / "run")
    code, err = cli_main(["tune", run, "--nfe", "1,2", "--num", "32", "--seed", "2"])
    assert code == 0, err
    assert {p.name for p in RunDir(run).schedules.iterdir()} == {"nfe1.json", "nfe2.json"}  # no RMSE plot
    t = load_tuned(run, 2)
    assert t.sampler == "consistency" and t.options == {"epsilon": 0.0} and len(t.sigmas) == 3
    assert t.objective["metric"] == "fd_digits" and t.objective["num"] == 32 and t.num_samples == 32
    assert t.objective["seeds"] == f"{consistency_seeds(2, 32)[0]}-{consistency_seeds(2, 32)[-1]}"
    assert t.baselines[0]["sigmas"] == pytest.approx([80.0, 0.821, 0.0])
    assert all(math.isfinite(v) for v in (t.tuning_error, t.heldout_error, t.baselines[0]["heldout_error"]))
    assert t.tuning_error <= t.baselines[0]["tuning_error"] and t.model["step"] == 1
    assert load_tuned(run, 1).sigmas == [80.0, 0.0]

    assert cli_main(["sample", run, "--nfe", "2", "--seeds", "0-3", "--out", tmp_path / "s.npz"])[0] == 0
    loaded = load_run(run)
    expected = loaded.sample(range(4), SamplingConfig(sampler="consistency", options=t.options, sigmas=t.sigmas))
    with np.load(tmp_path / "s.npz") as data:
        values = loaded.normalizer.from_model(expected).permute(0, 2, 3, 1).numpy()
        assert np.allclose(data["values"], values, atol=1e-4)
    code, err = cli_main(["sweep", run, "--samplers", "consistency", "--nfe", "2", "--num", "16", "--tuned",
                          "--out", tmp_path / "sweep"])
    assert code == 0, err
    rows = (tmp_path / "sweep" / "fd_digits-vs-nfe.csv").read_text().splitlines()
    assert any(r.startswith("tuned,2,2,") for r in rows) and any(r.startswith("consistency,2,2,") for r in rows)


@pytest.mark.parametrize("flags, message", [
    (["--samplers", "euler"], "--samplers: not for a consistency run"),
    (["--finalists", "2"], "--finalists: not for a consistency run"),
    (["--reference-steps", "16", "--loss", "rmse"], "--reference-steps, --loss: not for a consistency run"),
    (["--boundary", "2"], "--boundary: not for a consistency run"),
    (["--num", "1"], "--num must be >= 2"),
])
def test_cli_bad_inputs_are_one_line_errors(distilled, flags, message, cli_main):
    code, err = cli_main(["tune", distilled, "--nfe", "2", *flags])
    assert code == 2 and len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not RunDir(distilled).schedules.exists()


def test_cli_data_without_a_metric_is_a_one_line_error(distilled, cli_main, monkeypatch):
    import elucidate.evaluation as evaluation

    monkeypatch.setattr(evaluation, "domain_metric", lambda dataset, choices=None: None)
    code, err = cli_main(["tune", distilled, "--nfe", "2"])
    assert code == 2 and len(err) == 1 and "needs a Frechet metric with offline features" in err[0]
    assert "fd_digits for digits" in err[0]
