"""The optimizers of ``optim.name``: Lion computes the paper's update, a skipped step (``found_inf``) leaves
it untouched, every optimizer offered asks the engine's gate at each step, config.check refuses
optimizers the installed DeepSpeed would run wrongly, and the planner counts each optimizer's state."""

import math

import pytest
import torch

from gptscale.config import ConfigError, check, load_config
from gptscale.optim import OPTIMIZERS, GatedStep
from gptscale.optim.lion import Lion
from gptscale.plan.states import state_bytes

BETAS, LR = (0.9, 0.99), 0.01


def _params(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(4, 3, generator=generator)),
        torch.nn.Parameter(torch.randn(3, generator=generator)),
    ]


def _grads(seed: int, count: int):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(4, 3, generator=generator), torch.randn(3, generator=generator)] for _ in range(count)]


def test_lion_is_the_papers_update():
    """Two steps over two groups (with and without weight decay) against the paper's Algorithm 2, elementwise."""
    params, decays = _params(0), (0.5, 0.0)
    optimizer = Lion([{"params": [p], "weight_decay": d} for p, d in zip(params, decays)], lr=LR, betas=BETAS)
    expected = [p.detach().clone() for p in params]
    moments = [torch.zeros_like(p) for p in params]
    for grads in _grads(1, 2):
        for param, grad in zip(params, grads):
            param.grad = grad
        optimizer.step()
        for i, (grad, decay) in enumerate(zip(grads, decays)):
            update = torch.sign(BETAS[0] * moments[i] + (1 - BETAS[0]) * grad)
            expected[i] = expected[i] - LR * (update + decay * expected[i])
            moments[i] = BETAS[1] * moments[i] + (1 - BETAS[1]) * grad
    for param, want, moment in zip(params, expected, moments):
        torch.testing.assert_close(param.detach(), want)
        torch.testing.assert_close(optimizer.state[param]["exp_avg"], moment)
        assert optimizer.state[param]["step"] == 2


def test_lion_skips_on_found_inf_and_steps_without_it():
    """found_inf=1 with non-finite gradients changes nothing; found_inf=0 is an ordinary step."""
    gated, plain = _params(0), _params(0)
    optimizers = [Lion([{"params": ps, "weight_decay": 0.1}], lr=LR, betas=BETAS) for ps in (gated, plain)]
    grads = _grads(2, 2)
    for step, skip in enumerate((0.0, 1.0)):
        for param, grad in zip(plain, grads[step]):
            param.grad = grad.clone()
        for param, grad in zip(gated, grads[step]):
            param.grad = torch.full_like(grad, math.nan) if skip else grad.clone()
        optimizers[0].found_inf = torch.tensor(skip)
        optimizers[0].step()
        if not skip:
            optimizers[1].step()
    for g, p in zip(gated, plain):
        assert torch.equal(g, p)
        for key in ("exp_avg", "step"):
            assert torch.equal(optimizers[0].state[g][key], optimizers[1].state[p][key]), key
    assert optimizers[0].state[gated[0]]["step"] == 1


def test_every_optimizer_offered_asks_the_gate_at_each_step():
    """The engine's decision reaches each optimizer as found_inf: 1 leaves weights and state as they were, 0 updates."""
    for kind in OPTIMIZERS.values():
        params = _params(0)
        before = [p.detach().clone() for p in params]
        decisions = iter([1.0, 0.0])
        optimizer = kind.build(
            load_config([f"optim={kind.name}"]).optim,
            [{"params": params}],
            decide=lambda: torch.tensor(next(decisions)),
        )
        assert isinstance(optimizer, GatedStep) and optimizer._step_supports_amp_scaling, kind.name
        for param, grad in zip(params, _grads(1, 1)[0]):
            param.grad = grad
        optimizer.step()
        assert all(torch.equal(p, b) for p, b in zip(params, before)), f"{kind.name} updated a skipped step"
        assert all(optimizer.state[p]["step"] == 0 for p in params), kind.name
        optimizer.step()
        assert not any(torch.equal(p, b) for p, b in zip(params, before)), f"{kind.name} did not update"
        assert all(optimizer.state[p]["step"] == 1 for p in params), kind.name


@pytest.mark.parametrize(
    "name, reason",
    [
        ("muon", "plain SGD at ZeRO-0 \\(DeepSpeed issue 8441\\)"),
        ("adafactor", "flat 1-D"),
        ("sgd", "choose one of adamw, lion"),
    ],
)
def test_config_refuses_optimizers_deepspeed_would_mishandle(name, reason):
    with pytest.raises(ConfigError, match=f"optim.name={name} is not offered: .*{reason}"):
        check(load_config([f"optim.name={name}", "parallel.zero=1"]), 2)


def test_optimizers_are_chosen_by_name_at_every_zero_stage():
    for zero in range(4):
        for name in OPTIMIZERS:
            cfg = load_config([f"optim={name}", f"parallel.zero={zero}"])
            assert cfg.optim.name == name and check(cfg, 2).dp == 2
    assert load_config([]).optim.name == "adamw"


@pytest.mark.parametrize("zero", [0, 1, 3])
def test_planner_counts_the_optimizers_state(zero):
    """Lion keeps one fp32 moment per parameter, AdamW two: exactly 4 bytes less per parameter held."""
    groups = [[1000, 24], [8]]
    held = {
        name: state_bytes(groups, 2, zero, False, moment_bytes=kind.state_bytes_per_parameter).optimizer
        for name, kind in OPTIMIZERS.items()
    }
    shard = {0: 1032, 1: 1024 // 2 + 8 // 2, 3: 500 + 12 + 4}[zero]  # this rank's elements of the groups
    assert held["adamw"] - held["lion"] == 4 * shard
