"""``idforge demo``'s flags pick the configuration BENCHMARKS.md measured."""

from __future__ import annotations

import pytest


@pytest.fixture
def captured(monkeypatch):
    import idforge.launch.demo as demo_mod

    seen = {}

    def fake_run(out, cfg, report):
        seen["cfg"] = cfg
        return {"steps": cfg.steps, "seconds": 0.0}

    monkeypatch.setattr(demo_mod, "run_demo", fake_run)
    monkeypatch.setattr(demo_mod, "format_table", lambda fig: "")
    return seen


def test_long_trains_3000_steps_with_ema_0995_and_samples_at_guidance_15(captured, tmp_path):
    from idforge.launch.demo import DemoConfig
    from idforge.launch.demo_cmd import demo

    assert demo(out=tmp_path, long=True) == 0
    cfg = captured["cfg"]
    assert (cfg.steps, cfg.ema_decay, cfg.guidance_scale) == (3000, 0.995, 1.5)
    default = DemoConfig()
    assert demo(out=tmp_path) == 0
    cfg = captured["cfg"]
    assert (cfg.steps, cfg.ema_decay, cfg.guidance_scale) == (
        default.steps,
        default.ema_decay,
        default.guidance_scale,
    )
    assert demo(out=tmp_path, long=True, steps=10) == 0 and captured["cfg"].steps == 10
    with pytest.raises(ValueError, match="choose one"):
        demo(out=tmp_path, quick=True, long=True)
