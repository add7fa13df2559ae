"""Schedules tuned per NFE budget (elucidate.tuning.tune, `elucidate tune`, `sample/eval --nfe`,
`sweep --tuned`) and the samplers added for them: UniPC against diffusers' UniPCMultistepScheduler on
identical inputs, iPNDM against a literal transcription of its published recurrence."""
from __future__ import annotations

import json
import math

import pytest
import torch

from elucidate import GaussianMixture
from elucidate.cli import main
from elucidate.config.sampling import SamplingConfig
from elucidate.errors import ConfigError, UserError
from elucidate.run import RunDir
from elucidate.sampling import SAMPLERS, exponential_sigmas, ipndm, karras_sigmas, unipc
from elucidate.tuning import tune
from elucidate.tuning.stored import TunedSchedule, load_tuned
from elucidate.tuning.tuner import LOSSES, rmse, tuning_noise

f64 = torch.float64


# --- UniPC and iPNDM against references --------------------------------------------------------

class EpsNet:
    """A fixed smooth eps-prediction function of (x_vp, sigma) standing in for a network."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(2, 2, generator=g, dtype=f64) * 0.3
        self.b = torch.randn(2, generator=g, dtype=f64) * 0.1

    def __call__(self, x_vp, sigma):
        s = torch.as_tensor(sigma, dtype=f64).reshape(-1, 1, 1, 1)
        return torch.tanh(torch.einsum("oc,bchw->bohw", self.w, x_vp) + self.b[:, None, None] * torch.cos(s))

    def denoiser(self, x, sigma):  # VE x = x_vp / alpha, alpha = 1 / sqrt(1 + sigma^2): D = x - sigma eps
        s = sigma.reshape(-1, 1, 1, 1).to(f64)
        return x - s * self(x / torch.sqrt(1 + s ** 2), s)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh2", "bh1"])
@pytest.mark.parametrize("steps", [5, 12])
def test_unipc_equals_diffusers(order, variant, steps):
    diffusers = pytest.importorskip("diffusers")
    # diffusers' bh1 step into sigma = 0 multiplies B(h) = -inf by 0 (NaN), so bh1 ends at its sigma_min
    scheduler = diffusers.UniPCMultistepScheduler(solver_order=order, solver_type=variant, beta_start=0.00085,
                                                  beta_end=0.012, beta_schedule="scaled_linear",
                                                  final_sigmas_type="zero" if variant == "bh2" else "sigma_min")
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double().clone()
    scheduler.sigmas = sigmas  # its step arithmetic in float64 too, so the comparison is exact
    net = EpsNet()
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=f64)
    sample = x_T.clone()
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps):
            sample = scheduler.step(net(sample, sigmas[k]), t, sample).prev_sample
    ours = unipc(net.denoiser, x_T * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, order=order, variant=variant)
    ours = ours / math.sqrt(1 + float(sigmas[-1]) ** 2)  # back to diffusers' VP scale at the last level
    assert torch.allclose(ours, sample, rtol=0, atol=1e-10), (ours - sample).abs().max()


def ipndm_transcribed(D, x, t, max_order=4):
    """iPNDM as published (Zhang & Chen, DEIS; as in the EDM-style samplers of its follow-ups), line by line."""
    buffer = []
    for i in range(len(t) - 1):
        d_cur = (x - D(x, torch.full((x.shape[0],), float(t[i]), dtype=x.dtype))) / t[i]
        order = min(max_order, i + 1)
        if order == 1:
            x = x + (t[i + 1] - t[i]) * d_cur
        elif order == 2:
            x = x + (t[i + 1] - t[i]) * (3 * d_cur - buffer[-1]) / 2
        elif order == 3:
            x = x + (t[i + 1] - t[i]) * (23 * d_cur - 16 * buffer[-1] + 5 * buffer[-2]) / 12
        else:
            x = x + (t[i + 1] - t[i]) * (55 * d_cur - 59 * buffer[-1] + 37 * buffer[-2] - 9 * buffer[-3]) / 24
        buffer.append(d_cur)
    return x


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_is_the_published_recurrence(gmm, order):
    t = karras_sigmas(9)
    x = torch.randn(16, gmm.dim, generator=torch.Generator().manual_seed(0), dtype=f64) * 80
    expected = ipndm_transcribed(gmm.denoise, x, t.tolist(), order)
    assert torch.allclose(ipndm(gmm.denoise, x, t, order=order), expected, rtol=0, atol=1e-12)


def test_unipc_final_step_integrates_a_polynomial_slope_exactly():
    # the Adams-Bashforth step into sigma = 0 through k slopes is exact for a slope polynomial of degree k - 1
    from elucidate.sampling.multistep import adams_bashforth_step

    c = torch.tensor([0.7, -1.3, 2.1, 0.4], dtype=f64)
    x = torch.tensor([0.25], dtype=f64)
    for k in (1, 2, 3, 4):
        levels = [0.41, 0.23, 0.15, 0.09][-k:]  # oldest first; the newest (last) is where the step starts
        slopes = [(s, sum(c[j] * s ** j for j in range(k)) * torch.ones(1, dtype=f64)) for s in reversed(levels)]
        exact = x - sum(c[j] * levels[-1] ** (j + 1) / (j + 1) for j in range(k))
        assert torch.allclose(adams_bashforth_step(x, slopes, 0.0), exact, rtol=0, atol=1e-14)


def test_unipc_final_order_keeps_the_spread_the_last_level_has_not_resolved():
    # one Gaussian N(mu, 0.1^2 I): the exact ODE solution is mu + 0.1 / sqrt(0.1^2 + 80^2) (x - mu). Ending
    # at sigma 0.1, the data prediction D (final_order 1) shrinks the spread by half; the extrapolation keeps it
    mu = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=f64)
    gmm = GaussianMixture(mu[None], torch.tensor([0.1], dtype=f64))
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=f64) * 80
    exact = mu + 0.1 / math.sqrt(0.1 ** 2 + 80 ** 2) * (x - mu)
    sigmas = exponential_sigmas(32, sigma_min=0.1)
    err = {k: rmse(unipc(gmm.denoise, x, sigmas, final_order=k), exact) for k in (1, 2, 3, 4)}
    assert err[4] < err[3] < err[2] < 0.5 * err[1], err
    assert err[4] < 0.1 * err[1], err
    assert torch.equal(unipc(gmm.denoise, x, sigmas), unipc(gmm.denoise, x, sigmas, final_order=1))


def test_new_sampler_options_are_checked(gmm):
    x = torch.zeros(2, gmm.dim, dtype=f64)
    with pytest.raises(ValueError, match="order"):
        ipndm(gmm.denoise, x, karras_sigmas(3), order=5)
    with pytest.raises(ValueError, match="order"):
        unipc(gmm.denoise, x, karras_sigmas(3), final_order=0)
    with pytest.raises(ValueError, match="variant"):
        unipc(gmm.denoise, x, karras_sigmas(3), variant="bh3")


# --- tune() on an exact mixture ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tuned_gmm():
    # a 4-D mixture with a stiff component (std 0.03): the default schedules leave error on the table
    gmm = GaussianMixture(torch.tensor([[1.0, -0.5, 0.3, 0.0], [-1.0, 0.8, -0.2, 0.5], [0.2, 0.1, 1.2, -1.0]]),
                          torch.tensor([0.2, 0.03, 0.15]), [0.5, 0.3, 0.2])
    result = tune(gmm.denoise, (128, gmm.dim), 6, seed=3, samplers=["euler", "dpmpp_2m", "ipndm", "unipc"],
                  reference_steps=256, max_evals=60, finalists=2)
    return gmm, result


def test_tune_returns_a_valid_schedule(tuned_gmm):
    _, t = tuned_gmm
    s = t.sigmas
    assert isinstance(s, list) and all(isinstance(v, float) for v in s)
    assert s[0] == 80.0 and s[-1] == 0.0 and all(b < a for a, b in zip(s, s[1:]))
    assert s[-2] >= 0.002 * (1 - 1e-12)
    assert t.sampler in SAMPLERS and not SAMPLERS[t.sampler].stochastic and t.nfe == 6
    assert math.isfinite(t.tuning_error) and math.isfinite(t.heldout_error)
    assert t.baselines and all({"sampler", "schedule", "nfe", "tuning_error", "heldout_error"} <= set(b)
                               for b in t.baselines)


def test_tuned_schedule_replays_within_its_budget(tuned_gmm):
    gmm, t = tuned_gmm
    calls = []

    def counting(x, sigma):
        calls.append(1)
        return gmm.denoise(x, sigma)

    import elucidate.sampling as sampling

    x = torch.randn(8, gmm.dim, generator=torch.Generator().manual_seed(0), dtype=f64) * 80
    out = getattr(sampling, t.sampler)(counting, x, torch.tensor(t.sigmas, dtype=f64), **t.options)
    assert 1 <= len(calls) <= t.nfe and torch.equal(out, t(gmm.denoise, x))


def test_tuned_schedule_beats_karras_on_held_out_noise(tuned_gmm):
    gmm, t = tuned_gmm
    x = tuning_noise((256, gmm.dim), 1234, 80.0)  # neither the tuning nor the held-out draw
    reference = SAMPLERS["heun"](gmm.denoise, x, karras_sigmas(1000))
    tuned_error = rmse(t(gmm.denoise, x), reference)
    karras = {name: rmse(SAMPLERS[name](gmm.denoise, x, karras_sigmas(SAMPLERS[name].steps_for_nfe(6))), reference)
              for name in ("euler", "heun", "dpmpp_2m", "lms", t.sampler)}
    assert tuned_error < 0.7 * min(karras.values()), (tuned_error, karras)


def test_losses_weigh_outlying_samples_differently(gmm):
    a, b = torch.zeros(4, 2, dtype=f64), torch.zeros(4, 2, dtype=f64)
    b[0] = 2.0  # one sample of four is off by 2 in both elements
    assert LOSSES["rmse"](a, b) == pytest.approx(1.0)  # sqrt(8 / 8)
    assert LOSSES["mean"](a, b) == pytest.approx(0.5)  # per-sample RMS [2, 0, 0, 0]
    assert LOSSES["l4"](a, b) == pytest.approx(2 ** 0.5)  # per-sample MSE [4, 0, 0, 0] -> (16 / 4)^(1/4)
    with pytest.raises(ValueError, match="loss"):
        tune(gmm.denoise, (8, gmm.dim), 4, loss="l1")


def test_several_models_route_blocks_and_weigh_relative_errors():
    from elucidate.tuning.objectives import Models, geometric_mean_loss

    x, sigma = torch.arange(12, dtype=f64).reshape(6, 2), torch.ones(6, dtype=f64)
    both = Models([lambda x, s: x * 0 + 1, lambda x, s: x * 0 + 2], per=3)
    assert both(x, sigma)[:, 0].tolist() == [1, 1, 1, 2, 2, 2]
    a, b = torch.zeros(4, 1, dtype=f64), torch.zeros(4, 1, dtype=f64)
    b[:2], b[2:] = 0.1, 10.0  # model 1 is off by 0.1, model 2 by 10: each is judged relative to itself
    geometric = geometric_mean_loss(rmse, 2)
    assert geometric(a, b) == pytest.approx(1.0)
    b[:2] = 0.05  # halving the small model's error counts as much as halving the large one's
    assert geometric(a, b) == pytest.approx(2 ** -0.5)
    b[2:] = 5.0
    assert geometric(a, b) == pytest.approx(0.5)
    assert geometric_mean_loss(rmse, 1) is rmse
    b[:2] = 0.0  # one model exact: the geometric mean is 0, not a failure
    assert geometric(a, b) == 0.0
    b[2:] = math.nan  # one model's samples not finite: the schedule fails
    assert geometric(a, b) == math.inf


def test_tune_on_several_mixtures_serves_each(tuned_gmm):
    gmm, _ = tuned_gmm
    narrow = GaussianMixture(torch.tensor([[2.0, 0.0, -1.0, 1.0], [0.0, -2.0, 1.0, -1.0]]), torch.tensor([0.01, 0.3]),
                             [0.5, 0.5])
    models = [gmm.denoise, narrow.denoise]
    t = tune(models, (48, 4), 5, seed=2, samplers=["dpmpp_2m", "unipc"], reference_steps=256, max_evals=40,
             finalists=1)
    assert t.num_samples == 96 and t.nfe == 5
    with pytest.raises(ValueError, match="list of them"):
        tune([], (8, 4), 5)

    def relative(sigmas, sampler, options):  # geometric mean over the two models of the RMSE on new draws
        errors = []
        for m in (gmm, narrow):
            x = tuning_noise((256, 4), 99, 80.0)
            reference = SAMPLERS["heun"](m.denoise, x, karras_sigmas(1000))
            errors.append(rmse(SAMPLERS[sampler](m.denoise, x, torch.tensor(sigmas, dtype=f64), **options), reference))
        return math.sqrt(errors[0] * errors[1]), errors

    tuned, per_model = relative(t.sigmas, t.sampler, t.options)
    karras = [relative(karras_sigmas(SAMPLERS[s].steps_for_nfe(5)).tolist(), s, {}) for s in ("dpmpp_2m", "unipc")]
    assert tuned < 0.5 * min(k[0] for k in karras), (tuned, karras)
    for i in range(2):  # better on each model than either solver on Karras rho = 7 (measured: 0.094, 0.18)
        assert per_model[i] < min(k[1][i] for k in karras), (per_model, karras)


def test_held_out_noise_drops_a_search_result_that_does_not_generalize(tuned_gmm, monkeypatch):
    import elucidate.tuning.tuner as tuning

    gmm, _ = tuned_gmm
    def bad(problem, u, lo, hi, max_evals):  # claims a perfect fit with every level crammed below sigma_max
        return [("start", u, problem(u)), ("levels", [hi - 0.01 * (k + 1) for k in range(len(u))], 0.0)]

    monkeypatch.setattr(tuning, "search_levels", bad)
    t = tune(gmm.denoise, (32, gmm.dim), 6, samplers=["dpmpp_2m"], reference_steps=128, finalists=1)
    (final,) = t.finalists
    assert final["stage"] == "start" and t.sigmas == final["sigmas"]
    assert t.sigmas[1] < 40  # a classic start, not the crammed levels (80 -> 79.2 -> ...)
    start = {"karras_rho7": karras_sigmas(6), "exponential": None}.get(final["start"])
    if start is not None:
        assert torch.allclose(torch.tensor(t.sigmas, dtype=f64), start)


def test_a_finalist_that_fits_only_its_own_draws_does_not_win():
    from elucidate.tuning.tuner import HELDOUT_SLACK, choose_finalist

    overfit = {"name": "overfit", "tuning_loss": 1.0, "heldout_loss": 4.0}  # best on its draws, 4x worse held out
    steady = {"name": "steady", "tuning_loss": 2.0, "heldout_loss": 1.0}
    assert HELDOUT_SLACK == 1.5
    assert choose_finalist([overfit, steady])["name"] == "steady"
    assert choose_finalist([overfit])["name"] == "overfit"
    # within the slack the geometric mean of both losses decides: sqrt(1.5 * 1.4) > sqrt(2 * 1)
    close = {"name": "close", "tuning_loss": 1.5, "heldout_loss": 1.4}
    assert choose_finalist([overfit, steady, close])["name"] == "steady"
    assert choose_finalist([overfit, close])["name"] == "close"  # overfit is out: 4.0 > 1.5 x 1.4
    assert choose_finalist([overfit, steady], slack=5.0)["name"] == "steady"  # in, but sqrt(4) > sqrt(2)


def test_the_result_is_the_finalist_the_rule_chooses(tuned_gmm):
    from elucidate.tuning.tuner import choose_finalist

    _, t = tuned_gmm
    assert len(t.finalists) == 2
    rows = t.finalists  # the stored finalists are what the rule reads
    assert all(r["tuning_loss"] > 0 and r["heldout_loss"] > 0 for r in rows)
    chosen = choose_finalist(rows)
    assert (t.sampler, t.options, t.sigmas) == (chosen["sampler"], chosen["options"], chosen["sigmas"])
    # the default loss is l4, so the stored losses are not the stored RMSEs
    assert all(r["tuning_loss"] != r["tuning_error"] for r in rows)


def test_a_near_tie_on_the_tuning_draws_goes_to_the_held_out_draws():
    from elucidate.tuning.tuner import choose_finalist

    # random C at NFE 9 (self-tuned, boundary draws): UniPC order 3 bh1 fitted its draws 0.4 % better than plain
    # UniPC and was 23 % worse held out; on 8,192 new draws it flipped 31 draws against 6 (RMSE ratio 0.52 vs 0.34)
    bh1 = {"name": "unipc(order=3, variant=bh1)", "tuning_loss": 2.489e-2, "heldout_loss": 3.045e-2}
    plain = {"name": "unipc", "tuning_loss": 2.500e-2, "heldout_loss": 2.474e-2}
    assert choose_finalist([bh1, plain])["name"] == "unipc"
    # a clear win on the tuning draws survives a small held-out deficit (noise on 64 draws)
    fitted = {"name": "ipndm(order=3)", "tuning_loss": 1.0, "heldout_loss": 1.05}
    plain = {"name": "ipndm", "tuning_loss": 1.2, "heldout_loss": 1.0}
    assert choose_finalist([plain, fitted])["name"] == "ipndm(order=3)"


def test_json_round_trip_and_validation(tuned_gmm, tmp_path):
    _, t = tuned_gmm
    path = t.save(tmp_path / "nfe6.json")
    again = TunedSchedule.load(path)
    assert again == t and again.sigmas == t.sigmas
    data = json.loads(path.read_text())
    assert {"sampler", "sigmas", "options", "nfe", "seed", "created", "tuning_error", "heldout_error",
            "baselines", "model"} <= set(data)
    for broken, needle in [({**data, "sigmas": data["sigmas"][:-1] + [data["sigmas"][-2] / 2]}, "exactly 0"),
                           ({**data, "sigmas": [1.0, 2.0, 0.0]}, "non-increasing"),
                           ({**data, "sampler": "euler_ancestral"}, "draws noise"),
                           ({**data, "nfe": 2}, "more than nfe"),
                           ({**data, "format": "other"}, "not a tuned schedule")]:
        path.write_text(json.dumps(broken))
        with pytest.raises(UserError, match=needle) as info:
            TunedSchedule.load(path)
        assert "\n" not in str(info.value)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not a readable"):
        TunedSchedule.load(path)


def test_missing_or_mismatched_tuned_file_names_the_command(tuned_gmm, tmp_path):
    _, t = tuned_gmm
    with pytest.raises(UserError, match=r"elucidate tune .* --nfe 6"):
        load_tuned(tmp_path, 6)
    t.save(RunDir(tmp_path).tuned_schedule(7))  # stored under the wrong budget
    with pytest.raises(UserError, match="tuned for NFE 6, not 7"):
        load_tuned(tmp_path, 7)


def test_sampling_config_takes_explicit_sigmas():
    cfg = SamplingConfig(sampler="dpmpp_2m", sigmas=[80, 3, 0.5, 0])
    cfg.validate()
    assert cfg.steps == 3 and cfg.sigmas == [80.0, 3.0, 0.5, 0.0]
    with pytest.raises(ConfigError, match="sampling.sigmas"):
        SamplingConfig(sigmas=[1, 2, 0]).validate()


# --- command line ------------------------------------------------------------------------------

def test_cli_tune_sandbox_writes_json_and_plot(tmp_path, capsys):
    assert main(["tune", "--sandbox", "--nfe", "4,6", "--num", "32", "--reference-steps", "48", "--max-evals", "20",
                 "--finalists", "1", "--samplers", "euler,dpmpp_2m,unipc", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"nfe4.json", "nfe6.json", "tuned.png"}
    t = TunedSchedule.load(tmp_path / "nfe6.json")
    assert t.nfe == 6 and t.model["shape"] == [64] and t.sigmas[0] == 80.0
    assert "wrote" in capsys.readouterr().out
    assert main(["tune", "--sandbox", "--nfe", "4", "--samplers", "euler_ancestral", "--out", str(tmp_path)]) == 2


def test_cli_tune_run_then_sample_with_nfe(trained_copy, tmp_path, capsys):
    import shutil

    import numpy as np

    from elucidate.run.model import load_run

    run = trained_copy
    assert main(["tune", str(run), "--nfe", "4", "--num", "8", "--reference-steps", "16", "--max-evals", "10",
                 "--finalists", "1", "--samplers", "euler,dpmpp_2m"]) == 0
    assert RunDir(run).tuned_schedule(4).is_file() and (RunDir(run).schedules / "tuned.png").is_file()
    t = load_tuned(run, 4)
    assert t.model["step"] == 6 and t.model["shape"] == [1, 8, 8]

    assert main(["sample", str(run), "--nfe", "4", "--seeds", "0-3", "--out", str(tmp_path / "s.npz")]) == 0
    loaded = load_run(run)
    expected = loaded.sample(range(4), SamplingConfig(sampler=t.sampler, options=t.options, sigmas=t.sigmas))
    with np.load(tmp_path / "s.npz") as data:
        values = loaded.normalizer.from_model(expected).permute(0, 2, 3, 1).numpy()
        assert np.allclose(data["values"], values, atol=1e-4)
    capsys.readouterr()
    assert main(["sample", str(run), "--nfe", "6", "--seeds", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert f"elucidate tune {run} --nfe 6" in capsys.readouterr().err
    assert main(["sample", str(run), "--nfe", "4", "--steps", "3", "--seeds", "0",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "drop --steps" in capsys.readouterr().err
    assert main(["sweep", str(run), "--samplers", "euler", "--nfe", "4", "--num", "16", "--tuned",
                 "--out", str(tmp_path / "sweep")]) == 0
    rows = (tmp_path / "sweep" / "fd_digits-vs-nfe.csv").read_text().splitlines()
    assert rows[0].startswith("sampler,steps,nfe,value") and any(r.startswith("tuned,") for r in rows)
    assert main(["sweep", str(run), "--samplers", "euler", "--nfe", "6", "--num", "16", "--tuned"]) == 2
    assert f"elucidate tune {run} --nfe 6" in capsys.readouterr().err

    # one schedule for two runs (each adding the 2 hardest of its own pool of 8): written to each, each with
    # its own checkpoint and the runs it serves
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    assert main(["tune", str(run), str(twin), "--nfe", "3", "--num", "4", "--reference-steps", "16",
                 "--max-evals", "6", "--finalists", "1", "--samplers", "euler", "--boundary", "2",
                 "--pool", "8"]) == 0
    a, b = load_tuned(run, 3), load_tuned(twin, 3)
    assert a.sigmas == b.sigmas and a.num_samples == 8 and (a.boundary, a.pool) == (2, 8)
    assert a.model["run"] == str(run) and b.model["run"] == str(twin)
    assert a.model["tuned_with"] == b.model["tuned_with"] == [str(run), str(twin)]
    assert (RunDir(twin).schedules / "tuned.png").is_file()


def test_cli_tune_refuses_runs_of_different_shapes(monkeypatch, tmp_path, capsys):
    import elucidate.cli.tune as cli_tune

    shapes = {"a": (1, 8, 8), "b": (3, 8, 8)}
    monkeypatch.setattr(cli_tune, "_target", lambda args, run: cli_tune._Target(None, shapes[run.name], 0.002, 80.0,
                                                                                 {"run": run.name}, tmp_path))
    assert main(["tune", "a", "b", "--nfe", "4"]) == 2
    err = capsys.readouterr().err
    assert "b: sample shape [3, 8, 8]" in err and "differ from a's [1, 8, 8]" in err
