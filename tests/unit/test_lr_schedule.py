import pytest

from gptscale.config.schema import LrSchedule, OptimConfig
from gptscale.train.lr_schedule import LearningRateSchedule


def schedule(kind, **kw):
    return LearningRateSchedule(OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule=kind, **kw), total_steps=110)


@pytest.mark.parametrize("kind", list(LrSchedule))
def test_linear_warmup(kind):
    s = schedule(kind)
    assert [s.lr_at(i) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_reaches_min_at_the_end_and_stays():
    s = schedule(LrSchedule.cosine)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.55)
    assert s.lr_at(110) == pytest.approx(0.1)
    assert s.lr_at(500) == pytest.approx(0.1)


def test_linear_decay():
    s = schedule(LrSchedule.linear)
    assert s.lr_at(60) == pytest.approx(0.55)


def test_warmup_stable_decay():
    s = schedule(LrSchedule.wsd, wsd_decay_fraction=0.2)  # 22 of 110 steps decay
    assert s.lr_at(50) == pytest.approx(1.0)
    assert s.lr_at(87) == pytest.approx(1.0)
    assert s.lr_at(110) == pytest.approx(0.1)
    assert 0.1 < s.lr_at(100) < 1.0


def test_state_round_trip():
    s = schedule(LrSchedule.cosine)
    for _ in range(7):
        s.advance()
    t = schedule(LrSchedule.cosine)
    t.load_state_dict(s.state_dict())
    assert t.lr_at(t.step) == s.lr_at(s.step)
