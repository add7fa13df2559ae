"""Config validation: every shipped config parses; bad keys and values name themselves."""
from pathlib import Path

import pytest
import yaml

from elucidate import EDM, IDDPM, VE, VP
from elucidate.cli.demo import DEMO_CONFIG
from elucidate.config import apply_overrides, dump_config, load_config, parse_config
from elucidate.errors import ConfigError

ALL_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
VAE_CONFIGS = [p for p in ALL_CONFIGS if "vae" in p.stem]  # train-vae's own schema (tests/latent/test_latent.py)
CONFIGS = [p for p in ALL_CONFIGS if p not in VAE_CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    config = load_config(path)
    assert config.training.steps > 0 and config.formulation() is not None
    # the resolved config round-trips through YAML
    assert parse_config(yaml.safe_load(dump_config(config))).to_dict() == config.to_dict()


@pytest.mark.parametrize("path", VAE_CONFIGS, ids=lambda p: p.name)
def test_shipped_vae_configs_parse_and_are_refused_by_train(path):
    from elucidate.config.vae import load_vae_config

    assert load_vae_config(path).training.steps > 0
    with pytest.raises(ConfigError):
        load_config(path)


def test_demo_config_is_configs_digits_edm():
    shipped = load_config(Path(__file__).resolve().parents[2] / "configs" / "digits-edm.yaml")
    assert parse_config(DEMO_CONFIG).to_dict() == shipped.to_dict()


def test_original_config_example_and_per_type_defaults():
    # the configuration example the project started from: p_mean/p_std, s_min/s_max (S_tmin/S_tmax) spellings
    example = {"diffusion": {"type": "EDM", "sigma_data": 1.0, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0,
                             "p_mean": -1.2, "p_std": 1.2},
               "sampling": {"steps": 40, "sampler": "heun", "s_churn": 40.0, "s_min": 0.05, "s_max": 50.0,
                            "s_noise": 1.003}}
    config = parse_config(example)
    assert config.formulation() == EDM(sigma_data=1.0)
    assert config.sampling.sampler_kwargs() == {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}
    assert parse_config({"diffusion": {"type": "VP"}}).formulation() == VP()
    assert parse_config({"diffusion": {"type": "ve", "sigma_max": 50}}).formulation() == VE(sigma_max=50)
    assert isinstance(parse_config({"diffusion": {"type": "iDDPM", "M": 500}}).formulation(), IDDPM)
    assert parse_config({"diffusion": {"type": "EDM", "P_mean": -1.0}}).formulation().P_mean == -1.0


@pytest.mark.parametrize("raw,needle", [
    ({"trainig": {}}, "did you mean 'training'"),
    ({"training": {"stesp": 3}}, "training.stesp (did you mean 'steps'?)"),
    ({"training": {"steps": 0}}, "training.steps = 0"),
    ({"training": {"steps": "many"}}, "training.steps = 'many': expected an integer"),
    ({"training": {"lr": -1}}, "training.lr = -1"),
    ({"training": {"precision": "fp8"}}, "training.precision = 'fp8'"),
    ({"training": {"batch_size": 10, "grad_accumulation": 3}}, "not divisible"),
    ({"sampling": {"sampler": "hune"}}, "did you mean 'heun'"),
    ({"sampling": {"s_min": 10, "s_max": 1}}, "sampling.s_min"),
    ({"diffusion": {"type": "DDIM"}}, "diffusion.type = 'DDIM'"),
    ({"diffusion": {"type": "VE", "rhoo": 7}}, "unknown key diffusion.rhoo for type VE (did you mean 'rho'?)"),
    ({"diffusion": {"type": "EDM", "sigma_min": 0}}, "sigma_min"),
    ({"diffusion": {"type": "EDM", "sigma_data": "big"}}, "diffusion.sigma_data = 'big'"),
    ({"data": {"dataset": "digits", "pth": "x"}}, "unknown key data.pth (did you mean 'path'?)"),
    ({"data": {"path": "x"}}, "data.dataset is required"),
    ({"network": {"arch": "unte"}}, "did you mean 'unet'"),
])
def test_bad_configs_name_the_problem(raw, needle):
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_overrides_and_file_errors(tmp_path):
    raw = apply_overrides({"training": {"steps": 5}}, ["training.steps=200", "sampling.s_max=inf",
                                                        "network.channel_mult=[1, 2]"])
    assert raw["training"]["steps"] == 200 and raw["network"]["channel_mult"] == [1, 2]
    assert parse_config(raw).sampling.s_max == float("inf")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["training.steps"])
    with pytest.raises(ConfigError, match="did you mean 'training'"):
        apply_overrides({}, ["trainin.steps=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("training:\n  steps: -3\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: training.steps = -3"):
        load_config(wrong)
