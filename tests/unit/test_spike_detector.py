"""The spike detector's limits: infinite until the window is full, mean + zscore * std after, skipped steps out."""

import math

from gptscale.train.guard import SpikeDetector


def test_limits_follow_the_window():
    detector = SpikeDetector(zscore=3.0, window=4)
    for loss in (2.0, 2.2, 1.8):
        detector.add(loss, 1.0 + loss)
    assert detector.limits() == (math.inf, math.inf)
    detector.add(2.0, 3.0)
    mean, std = 2.0, math.sqrt((0.04 + 0.04) / 3)
    assert math.isclose(detector.limits()[0], mean + 3.0 * std)
    assert detector.zscores(mean + 6 * std, None)[0] > 5.9


def test_disabled_and_state_round_trip():
    assert SpikeDetector(zscore=None, window=2).limits() == (math.inf, math.inf)
    detector = SpikeDetector(zscore=2.0, window=3)
    for value in (1.0, 2.0, 3.0, 4.0):
        detector.add(value, value)
    detector.skipped = 2
    copy = SpikeDetector(zscore=2.0, window=3)
    copy.load_state_dict(detector.state_dict())
    assert copy.losses == [2.0, 3.0, 4.0] and copy.skipped == 2 and copy.limits() == detector.limits()
