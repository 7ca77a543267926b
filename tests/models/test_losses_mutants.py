"""IdentityLossConfig as a user meets it: the limits of every knob, the error each bad value gets, and the
typed fields a YAML / command-line config (LightningCLI's ``model.identity_loss``) is checked against."""

from __future__ import annotations

import re

import pytest
from idforge.models.losses import IdentityLossConfig
from jsonargparse import ArgumentError, ArgumentParser


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lambda_id": 0.0, "k": 0.0},
        {"num_train_timesteps": 1, "max_timestep": 1},
        {"max_timestep": 1000},
        {"batch_fraction": 1.0},
        {"face_window": "auto"},
        {"face_window": 1, "window_margin": 0},
        {"decode_scale": 0.5},
        {"latent_scale": 1, "align_size": 1},
    ],
)
def test_values_on_the_limits_are_accepted(kwargs):
    cfg = IdentityLossConfig(**kwargs)
    assert all(getattr(cfg, key) == value for key, value in kwargs.items())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lambda_id": -0.1}, "lambda_id and k must be >= 0, got -0.1, 5.0"),
        ({"k": -1.0}, "lambda_id and k must be >= 0, got 0.1, -1.0"),
        ({"num_train_timesteps": 0}, "num_train_timesteps must be >= 1, got 0"),
        ({"max_timestep": 0}, "max_timestep must be in (0, 1000], got 0"),
        ({"num_train_timesteps": 500, "max_timestep": 501}, "max_timestep must be in (0, 500], got 501"),
        ({"batch_fraction": 1.5}, "batch_fraction must be in (0, 1], got 1.5"),
        ({"face_window": "whole"}, "face_window must be 'auto', a side in latents or None, got 'whole'"),
        ({"face_window": 0}, "face_window must be >= 1 latent, got 0"),
        ({"window_margin": -1}, "window_margin must be >= 0, got -1"),
        ({"decode_scale": 0.0}, "decode_scale must be in (0, 1], got 0.0"),
        ({"decode_scale": 0.5, "latent_scale": None}, "decode_scale needs latent_scale (pixels per latent)"),
        ({"latent_scale": 0}, "latent_scale must be >= 1 pixel per latent, got 0"),
        ({"face_window": "auto", "latent_scale": None}, "face_window needs latent_scale (pixels per latent"),
        ({"align_size": 0}, "align_size must be >= 1, got 0"),
    ],
)
def test_each_bad_value_gets_an_error_naming_the_config_the_knob_and_the_value(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(f"IdentityLossConfig: {message}")):
        IdentityLossConfig(**kwargs)


def _parser():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--identity_loss", type=IdentityLossConfig)
    return parser


def test_a_config_file_or_command_line_sets_the_knobs_with_their_types():
    parser = _parser()
    cfg = parser.instantiate(parser.parse_args(["--identity_loss.max_timestep", "500"])).identity_loss
    assert cfg == IdentityLossConfig(max_timestep=500)
    cfg = parser.parse_args(["--identity_loss", '{"max_timestep": null, "face_window": 24}'])
    assert parser.instantiate(cfg).identity_loss == IdentityLossConfig(face_window=24)


@pytest.mark.parametrize("value", ["abc", "12.5"])
def test_a_max_timestep_that_is_not_an_integer_is_rejected_when_the_config_is_read(value):
    with pytest.raises(ArgumentError, match="max_timestep"):
        _parser().parse_args(["--identity_loss.max_timestep", value])
