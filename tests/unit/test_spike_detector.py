"""The spike detector: robust (median / MAD, log space) limits, infinite until the window is full, a floor
for calm windows, skipped steps out of the window and counted in a row."""

import math
import statistics

from gptscale.train.guard import SpikeDetector


def test_limits_follow_the_window():
    detector = SpikeDetector(zscore=3.0, window=4, min_relative_std=1e-6)
    for loss in (2.0, 2.2, 1.8):
        detector.add(loss, 1.0 + loss)
    assert detector.limits() == (math.inf, math.inf)
    detector.add(2.0, 3.0)
    logs = [math.log(v) for v in (2.0, 2.2, 1.8, 2.0)]
    center = statistics.median(logs)
    scale = 1.4826 * statistics.median([abs(v - center) for v in logs])
    assert math.isclose(detector.limits()[0], math.exp(center + 3.0 * scale))
    assert math.isclose(detector.zscores(math.exp(center + 6 * scale), None)[0], 6.0)


def test_an_outlier_in_the_window_does_not_hide_the_next():
    """A mean and std would be dragged up by one huge value in the window; the median and MAD are not."""
    detector = SpikeDetector(zscore=6.0, window=10)
    for index in range(10):
        detector.add(2.0 + 0.01 * (index % 3), 1.0 + 0.02 * (index % 3))
    limit_before = detector.limits()
    detector.add(200.0, 100.0)
    assert detector.limits()[0] < 1.2 * limit_before[0]
    assert detector.zscores(3.0, 3.0)[0] > 6


def test_calm_window_floor():
    """A window of identical values would make any change a spike; the floor keeps a 1% change ordinary."""
    detector = SpikeDetector(zscore=6.0, window=5, min_relative_std=0.01, signal="either")
    for _ in range(5):
        detector.add(3.0, 0.5)
    loss_limit, norm_limit = detector.limits()
    assert 3.0 * 1.05 < loss_limit < 3.0 * 1.07 and 0.5 * 1.05 < norm_limit < 0.5 * 1.07
    assert detector.zscores(3.03, None)[0] < 1.01


def test_disabled_and_state_round_trip():
    assert SpikeDetector(zscore=None, window=2).limits() == (math.inf, math.inf)
    detector = SpikeDetector(zscore=2.0, window=3)
    for value in (1.0, 2.0, 3.0, 4.0):
        detector.add(value, value)
    detector.count_skip(7)
    detector.count_skip(8)
    copy = SpikeDetector(zscore=2.0, window=3)
    copy.load_state_dict(detector.state_dict())
    assert copy.losses == [2.0, 3.0, 4.0] and copy.skipped == 2 and copy.limits() == detector.limits()
    assert (copy.consecutive, copy.streak_start) == (2, 7)
    copy.add(3.0, 3.0)
    assert (copy.consecutive, copy.streak_start, copy.skipped) == (0, None, 2)


def test_signal_chooses_what_decides():
    scores = {}
    for signal in ("loss", "both", "either"):
        detector = SpikeDetector(zscore=6.0, window=3, signal=signal)
        for value in (1.0, 1.1, 0.9):
            detector.add(value, value)
        scores[signal] = detector.deciding(2.0, 7.0)
        assert (detector.limits()[1] == math.inf) == (signal == "loss")
        assert detector.require_both == (signal == "both")
    assert scores == {"loss": 2.0, "both": 2.0, "either": 7.0}


def gate_decision(loss, norm, loss_limit, norm_limit, require_both):
    import torch

    from gptscale.parallel.engine import UpdateLimits, skip_update

    limits = UpdateLimits(loss_limit, norm_limit, require_both)
    return bool(skip_update(torch.tensor(loss), torch.tensor(norm), limits, torch.device("cpu")).item())


def test_update_gate_skips_non_finite_steps_and_spikes_by_signal():
    inf = math.inf
    assert not gate_decision(2.0, 1.0, inf, inf, False)
    assert gate_decision(math.nan, 1.0, inf, inf, False) and gate_decision(2.0, math.inf, inf, inf, True)
    assert gate_decision(3.0, 1.0, 2.5, inf, False)  # signal=loss: the norm's limit is infinite
    assert not gate_decision(3.0, 1.0, 2.5, 2.0, True) and gate_decision(3.0, 2.5, 2.5, 2.0, True)  # both
    assert gate_decision(2.0, 2.5, 2.5, 2.0, False)  # either


def test_restart_takes_the_new_level_as_normal():
    """After a streak that cannot be rewound, the spikes' level is the model's: the window empties, detection
    waits for it to refill, and then judges against the new level; the run's count of skips stays."""
    detector = SpikeDetector(zscore=6.0, window=3)
    for loss in (0.35, 0.34, 0.36):
        detector.add(loss, 1.0)
    assert detector.zscores(1.1, None)[0] > 6
    detector.count_skip(65)
    detector.count_skip(66)
    detector.restart()
    assert (detector.consecutive, detector.streak_start, detector.skipped) == (0, None, 2)
    assert detector.limits() == (math.inf, math.inf) and detector.zscores(1.1, None) == (None, None)
    for loss in (1.2, 1.0, 1.1):
        detector.add(loss, 20.0)
    assert abs(detector.zscores(1.1, None)[0]) < 1 and detector.limits()[0] > 1.2
