"""The update sweep's setting syntax: ``flip:exp[:mode[:seed]]``, with ``a..b`` for an annealed flip threshold."""

import pytest

from benchmarks.update_thresholds import flip_label, parse_setting


def test_settings_parse_into_update_configs():
    u = parse_setting("16:127", 200)
    assert (u.flip_threshold, u.exp_threshold, u.flip_mode, u.seed, u.anneal_steps) == (16, 127, "counter", 0, 0)
    assert flip_label(u) == "16"
    u = parse_setting("8..2048:96:stochastic:5", 300)
    assert (u.flip_threshold, u.flip_threshold_final, u.anneal_steps, u.exp_threshold, u.seed) == (8, 2048, 300, 96, 5)
    assert flip_label(u) == "8→2048"


@pytest.mark.parametrize("bad", ["16", "1:2:counter:0:9", "8..64:127", "x:127"])
def test_bad_settings_raise(bad):
    with pytest.raises(ValueError):  # an annealed counter rule is refused by UpdateConfig
        parse_setting(bad, 100)
