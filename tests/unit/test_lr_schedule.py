import pytest

from gptscale.config.schema import LrSchedule, OptimConfig, ScheduleOnResume
from gptscale.config.validate import ConfigError
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


def resumed(saved_steps, new_steps, at, choice, kind=LrSchedule.cosine):
    """A schedule of ``saved_steps`` saved at step ``at``, loaded by a run of ``new_steps``."""
    optim = dict(lr=1.0, min_lr=0.1, warmup_steps=10, schedule=kind)
    old = LearningRateSchedule(OptimConfig(**optim), total_steps=saved_steps)
    old.step = at
    new = LearningRateSchedule(OptimConfig(**optim, on_new_steps=choice), total_steps=new_steps)
    new.load_state_dict(old.state_dict())
    return old, new


def test_another_length_on_resume_is_refused_until_the_user_chooses():
    with pytest.raises(
        ConfigError,
        match=r"train.steps is 210, but the checkpoint's schedule was made for 110 steps: "
        r"set optim.on_new_steps to keep",
    ):
        resumed(110, 210, 60, None)


def test_keep_follows_the_saved_schedule_then_stays_at_min_lr():
    old, new = resumed(110, 210, 60, ScheduleOnResume.keep)
    assert [new.lr_at(s) for s in (60, 90, 110, 200)] == pytest.approx([old.lr_at(s) for s in (60, 90, 110, 200)])
    assert new.lr_at(200) == pytest.approx(0.1)


def test_stretch_takes_the_new_lengths_schedule():
    old, new = resumed(110, 210, 60, ScheduleOnResume.stretch)
    assert new.lr_at(60) > old.lr_at(60) + 0.2  # the jump the user chose
    assert new.lr_at(210) == pytest.approx(0.1)


def test_restart_warms_up_again_and_decays_to_the_new_end():
    _, new = resumed(110, 210, 60, ScheduleOnResume.restart)
    assert new.lr_at(60) == pytest.approx(0.1)  # first warm-up step
    assert new.lr_at(69) == pytest.approx(1.0)
    assert new.lr_at(210) == pytest.approx(0.1)
    assert 0.1 < new.lr_at(150) < 1.0


def test_extend_holds_the_resume_lr_then_decays_over_the_last_fraction():
    old, new = resumed(110, 210, 60, ScheduleOnResume.extend)
    assert new.lr_at(60) == pytest.approx(old.lr_at(60))  # no jump
    assert new.lr_at(180) == pytest.approx(old.lr_at(60))  # 30 of the 150 remaining steps decay: 180..210
    assert new.lr_at(195) < old.lr_at(60)
    assert new.lr_at(210) == pytest.approx(0.1)


def test_a_chosen_shape_survives_the_next_resume_at_the_same_length():
    _, new = resumed(110, 210, 60, ScheduleOnResume.restart)
    new.step = 100
    again = LearningRateSchedule(OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10), total_steps=210)
    again.load_state_dict(new.state_dict())
    assert [again.lr_at(s) for s in (100, 150, 210)] == pytest.approx([new.lr_at(s) for s in (100, 150, 210)])
