"""Property-based tests (hypothesis): no input crashes the config parser or the seed parser with
anything but their documented one-line errors."""
from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elucidate.cli.options import parse_seeds
from elucidate.config import apply_overrides, parse_config
from elucidate.errors import ConfigError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SECTIONS = ["data", "network", "diffusion", "training", "sampling"]
KEYS = ["dataset", "arch", "type", "steps", "batch_size", "lr", "sampler", "sigma_min", "sigma_max", "rho",
        "label_dim", "ema", "schedule", "guidance", "options", "precision", "seed", "beta_schedule", "sigmas",
        "model_channels", "channel_mult", "s_churn", "xflip", "resolution", "zz_unknown"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["EDM", "VP", "DDPM", "heun", "digits", "unet", "auto"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                      max_leaves=8)
configs = st.one_of(
    st.dictionaries(st.sampled_from(SECTIONS + ["bogus"]), st.dictionaries(st.sampled_from(KEYS), values, max_size=5),
                    max_size=5),
    values)


@SETTINGS
@given(configs)
def test_parse_config_only_raises_config_errors(raw):
    try:
        config = parse_config(raw)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert parse_config(config.to_dict()).to_dict() == config.to_dict()  # what parses, round-trips


@SETTINGS
@given(st.lists(st.text(max_size=30), max_size=3))
def test_overrides_only_raise_config_errors(items):
    try:
        raw = apply_overrides({"data": {"dataset": "digits"}}, items)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    yaml.safe_dump(raw)  # the result is plain data


@SETTINGS
@given(st.text(alphabet="0123456789-, x", max_size=24) | st.text(max_size=12))
def test_parse_seeds_only_raises_value_errors(text):
    try:
        seeds = parse_seeds(text)
    except ValueError as e:
        assert str(e).startswith("seeds ") and "\n" not in str(e)
        return
    assert seeds and all(isinstance(s, int) and s >= 0 for s in seeds)


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 50)), min_size=1, max_size=4))
def test_parse_seeds_round_trips_ranges(gaps):
    ranges, end = [], 0  # disjoint ranges in any order (a seed named twice is an error)
    for gap, n in gaps:
        ranges.append((end + gap, n))
        end += gap + n + 1
    ranges = ranges[::2] + ranges[1::2]
    text = ",".join(f"{lo}-{lo + n}" if n else str(lo) for lo, n in ranges)
    assert parse_seeds(text) == [s for lo, n in ranges for s in range(lo, lo + n + 1)]


@pytest.mark.parametrize("text", ["0-99999999999", "-3", "5-2", "", " , ", "0-3,2", "7,7"])
def test_parse_seeds_rejects(text):
    with pytest.raises(ValueError, match="^seeds "):
        parse_seeds(text)


def _demo_keys() -> list[tuple[str, str]]:
    from elucidate.cli.demo import DEMO_CONFIG

    return [(section, key) for section, body in DEMO_CONFIG.items() if isinstance(body, dict) for key in body]


@SETTINGS
@given(st.sampled_from(_demo_keys()), values)
def test_one_bad_value_in_a_valid_config_is_a_config_error(where, value):
    import copy

    from elucidate.cli.demo import DEMO_CONFIG

    raw = copy.deepcopy(DEMO_CONFIG)
    raw[where[0]][where[1]] = value
    try:
        config = parse_config(raw)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert parse_config(config.to_dict()).to_dict() == config.to_dict()
