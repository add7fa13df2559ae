"""training.lr_schedule: the factor on training.lr after the ramp-up (inv_sqrt as EDM2, cosine, constant), a
function of the step only, applied by the one loop to every optimizer of both trainers."""
from __future__ import annotations

import json
import math

import pytest

from elucidate.config import parse_config
from elucidate.config.vae import parse_vae_config
from elucidate.run import RunDir
from elucidate.training import Trainer, VAETrainer
from elucidate.training.optim import lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")


def section(tiny_config, **training):
    """The parsed training section of the tiny run with batch 8 and a ramp-up over 32 images (4 steps)."""
    return parse_config(tiny_config(training={"batch_size": 8, "lr_rampup": 32, "steps": 100, **training})).training


# step (0-based) -> factor, by hand. Ramp-up: (step + 1) x 8 / 32 images, so it ends at step 3 (the boundary).
CONSTANT = {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0, 99: 1.0}
# inv_sqrt, t_ref = 10 steps: 1 / sqrt(max(step / 10, 1)).
INV_SQRT = {0: 0.25, 3: 1.0, 10: 1.0, 11: 1 / math.sqrt(1.1), 40: 0.5, 90: 1 / 3, 250: 0.2}
# cosine over steps 4..100 (the ramp-up is 4 steps): 0.5 (1 + cos(pi (step - 4) / 96)).
COSINE = {0: 0.25, 3: 1.0, 4: 1.0, 28: 0.5 * (1 + math.sqrt(0.5)), 52: 0.5, 76: 0.5 * (1 - math.sqrt(0.5)), 100: 0.0}
# cosine to min_lr = 0.2: 0.2 + 0.8 x the above.
COSINE_MIN = {0: 0.25, 3: 1.0, 52: 0.6, 100: 0.2}


@pytest.mark.parametrize("schedule, expected", [(None, CONSTANT), ({"kind": "constant"}, CONSTANT),
                                                ({"kind": "inv_sqrt", "ref_batches": 10}, INV_SQRT),
                                                ({"kind": "cosine"}, COSINE),
                                                ({"kind": "cosine", "min_lr": 0.2}, COSINE_MIN)])
def test_factors_by_hand(tiny_config, schedule, expected):
    t = section(tiny_config, lr_schedule=schedule)
    for step, factor in expected.items():
        assert lr_factor(t, step) == pytest.approx(factor, abs=1e-12), (schedule, step)


def edm2_learning_rate(cur_nimg: float, batch_size: int, ref_lr: float, ref_batches: float, rampup_mimg: float):
    """EDM2's learning-rate schedule (training_loop.learning_rate_schedule) written out by hand: ref_lr, divided by
    sqrt(max(images / (ref_batches x batch), 1)), times the ramp min(images / rampup, 1); images are those seen before
    the step."""
    lr = ref_lr / math.sqrt(max(cur_nimg / (ref_batches * batch_size), 1)) if ref_batches > 0 else ref_lr
    return lr * min(cur_nimg / (rampup_mimg * 1e6), 1) if rampup_mimg > 0 else lr


@pytest.mark.parametrize("batch, ref_batches", [(8, 10), (64, 7.5), (2048, 70_000)])
def test_inv_sqrt_is_edm2s_schedule(tiny_config, batch, ref_batches):
    # without a ramp-up, the step-k factor is EDM2's at cur_nimg = k x batch (the images before step k)
    t = section(tiny_config, batch_size=batch, lr_rampup=0, lr=0.01,
                lr_schedule={"kind": "inv_sqrt", "ref_batches": ref_batches})
    for step in [0, 1, int(ref_batches) - 1, int(ref_batches), int(ref_batches) + 1, 3 * int(ref_batches), 10 ** 6]:
        ours = t.lr * lr_factor(t, step)
        assert ours == pytest.approx(edm2_learning_rate(step * batch, batch, 0.01, ref_batches, 0), rel=1e-12), step


def test_the_factor_depends_on_the_step_only(tiny_config):
    t = section(tiny_config, lr_schedule={"kind": "cosine"})
    assert [lr_factor(t, k) for k in (7, 50, 7)] == [lr_factor(t, 7), lr_factor(t, 50), lr_factor(t, 7)]


def _logged_lrs(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, RunDir(run_dir).metrics.read_text().splitlines()) if "lr" in r}


def test_diffusion_trainer_follows_the_schedule(tiny_config, tmp_path):
    config = parse_config(tiny_config(training={"steps": 6, "log_every": 1, "lr_rampup": 16,
                                                "lr_schedule": {"kind": "inv_sqrt", "ref_batches": 2}}))
    Trainer(config, tmp_path / "run", progress=False, log=lambda *a: None).train()
    logged = _logged_lrs(tmp_path / "run")
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    for step, record in logged.items():  # the line after step k (1-based) reports the lr of step k - 1 (0-based)
        want = 1e-3 * min(step * 8 / 16, 1) / math.sqrt(max((step - 1) / 2, 1))
        assert record["lr"] == pytest.approx(want, rel=1e-12), step
    assert logged[6]["lr"] == pytest.approx(1e-3 / math.sqrt(2.5))


def test_vae_trainer_follows_the_schedule(tiny_vae_config, tmp_path):
    raw = tiny_vae_config(training={"steps": 6, "log_every": 1, "disc_lr": 4e-4, "lr_schedule": {"kind": "cosine",
                                                                                                "min_lr": 0.5}})
    config = parse_vae_config(raw)
    VAETrainer(config, tmp_path / "vae", progress=False, log=lambda *a: None).train()
    logged = _logged_lrs(tmp_path / "vae")
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    for step, record in logged.items():  # no ramp-up (train-vae's default): cosine from step 0 to 6, down to 0.5
        factor = 0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 6))
        assert record["lr"] == pytest.approx(1e-3 * factor, rel=1e-12), step
        assert record["disc_lr"] == pytest.approx(4e-4 * factor, rel=1e-12), step
    assert logged[6]["lr"] < logged[1]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("value, message", [
    ("{kind: foo}", "training.lr_schedule.kind = 'foo': expected inv_sqrt, cosine or constant"),
    ("{ref_batches: 10}", "training.lr_schedule.kind is missing: expected inv_sqrt, cosine or constant"),
    ("cosine", "training.lr_schedule = 'cosine': expected a mapping"),
    ("{kind: inv_sqrt}", "training.lr_schedule.ref_batches is missing: kind inv_sqrt needs it"),
    ("{kind: inv_sqrt, ref_batches: 0}", "training.lr_schedule.ref_batches = 0: expected a number > 0"),
    ("{kind: cosine, min_lr: 1.5}", "training.lr_schedule.min_lr = 1.5: expected a number >= 0 and <= 1"),
    ("{kind: cosine, ref_batches: 10}", "training.lr_schedule.ref_batches does not apply to kind cosine"),
    ("{kind: cosine, min_rl: 0.1}", "unknown key training.lr_schedule.min_rl (did you mean 'min_lr'?)"),
])
@pytest.mark.parametrize("verb", ["train", "train-vae"])
def test_bad_values_are_one_line_errors(verb, value, message, tiny_config, tiny_vae_config, write_config, cli_main,
                                        tmp_path):
    raw = tiny_config() if verb == "train" else tiny_vae_config()
    cfg = write_config(raw, tmp_path / "cfg.yaml")
    code, err = cli_main([verb, cfg, "--out", tmp_path / "run", "--no-progress", "--set",
                          f"training.lr_schedule={value}"])
    assert code != 0 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_changing_the_schedule_on_resume_is_refused(tiny_config, write_config, cli_main, tmp_path):
    # not resumable: the stored config says which lr trajectory made the weights
    cfg = write_config(tiny_config(training={"steps": 2}), tmp_path / "cfg.yaml")
    assert cli_main(["train", cfg, "--out", tmp_path / "run", "--no-progress"])[0] == 0
    code, err = cli_main(["train", cfg, "--out", tmp_path / "run", "--no-progress", "--set", "training.steps=4",
                          "--set", "training.lr_schedule.kind=cosine"])
    assert code != 0 and len(err) == 1 and "training.lr_schedule" in err[0], err
    # {kind: constant} is null: the same run, which resumes
    assert cli_main(["train", cfg, "--out", tmp_path / "run", "--no-progress", "--set", "training.steps=4",
                     "--set", "training.lr_schedule.kind=constant"])[0] == 0
