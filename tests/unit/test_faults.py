"""The watchdog's learned step timeout, the defaults' promise, the no-progress rule and the config rule."""

import pytest

from gptscale.config import load_config
from gptscale.config.schema import FaultConfig
from gptscale.config.validate import DETECTION_HEARTBEATS, ConfigError, check
from gptscale.fault.restarts import restarts_without_progress
from gptscale.fault.watchdog import StepTimeout

TORCHRUN_GRACE_S = 30  # the most torchrun waits for a rank that ignores SIGTERM before it kills it


def timed(steps, seconds, fault=None):
    timeout = StepTimeout(fault or FaultConfig())
    for _ in range(steps):
        timeout.add(seconds)
    return timeout.seconds


def test_the_step_timeout_is_the_configured_one_until_warm_up_steps_are_timed():
    fault = FaultConfig()
    assert timed(fault.step_warmup, 0.5) == fault.step_timeout_s  # the first step is never timed


def test_the_learned_step_timeout_is_a_multiple_of_the_99th_percentile_within_floor_and_cap():
    fault = FaultConfig(step_warmup=10, step_timeout_factor=10.0, step_timeout_floor_s=120.0, step_timeout_s=1200.0)
    assert timed(11, 20.0, fault) == 200.0
    assert timed(11, 0.5, fault) == 120.0  # the floor
    assert timed(11, 500.0, fault) == 1200.0  # the cap
    timeout = StepTimeout(fault)
    for seconds in [99.0] + [1.0] * 98 + [30.0]:  # the first (untimed), 98 short steps, one slow
        timeout.add(seconds)
    assert timeout.seconds == 300.0  # the 99th percentile of 99 steps is their slowest


def test_with_default_settings_a_frozen_rank_of_a_sub_second_step_run_ends_the_job_within_5_minutes():
    """The learned step timeout of 0.9 s steps, the heartbeats the watchdog waits (at most: rank 0, the store's
    host, frozen) and torchrun's grace for the stopped rank (gptscale's agent kills it at once) stay under 300 s."""
    fault = FaultConfig()
    detected = timed(1 + fault.step_warmup, 0.9, fault) + DETECTION_HEARTBEATS * fault.heartbeat_s
    assert detected <= 140
    assert detected + TORCHRUN_GRACE_S < 300
    assert fault.collective_timeout_s > detected  # the collective timeout does not end it first


@pytest.mark.parametrize(
    "checkpoints, restarts, stalled",
    [
        (["a", "a", "a"], [0, 1, 2], 2),
        (["a", "a", "b"], [0, 1, 2], 0),  # the last restart found a new checkpoint
        ([None, None, "a", "a"], [0, 1, 2, 3], 1),
        (["a", "a", "a"], [0, 1, 0], 0),  # a new launch (a requeued job) starts over
        (["a"], [0], 0),
    ],
)
def test_restarts_without_progress_count_restarts_in_a_row_that_found_the_same_checkpoint(
    checkpoints, restarts, stalled
):
    starts = [{"checkpoint": c, "restart": r} for c, r in zip(checkpoints, restarts)]
    assert restarts_without_progress(starts) == stalled


def test_a_checkpoint_saved_with_the_retired_nan_hook_still_reads(tmp_path):
    """train.inject_nan_steps moved into tests/faults: configurations saved with it load without it."""
    from omegaconf import OmegaConf

    from gptscale.checkpoint.files import CONFIG, read_config
    from gptscale.config.schema import Config

    saved = OmegaConf.to_container(OmegaConf.structured(Config(run_dir="old")))
    saved["train"]["inject_nan_steps"] = [3]
    (tmp_path / CONFIG).write_text(OmegaConf.to_yaml(saved))
    assert read_config(tmp_path).run_dir == "old"


def test_the_collective_timeout_must_exceed_the_watchdogs_timeouts():
    with pytest.raises(ConfigError) as error:
        check(load_config(["fault.collective_timeout_s=600", "fault.eval_timeout_s=900"]), 1)
    assert (
        "fault.collective_timeout_s=600.0 must exceed fault.setup_timeout_s=1200.0 plus 11 fault.heartbeat_s=2.0"
    ) in str(error.value)
    check(load_config(["fault.collective_timeout_s=600", "fault.detect_hangs=false"]), 1)  # no watchdog, no rule
