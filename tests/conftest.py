"""Every test: no process it started (its fixtures' included) may still run after it."""

import pytest

from tests.processes import left_behind, mark_session, session_processes

mark_session()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture of the test is set up, module-scoped ones included."""
    item.processes_before = set(session_processes())


@pytest.fixture(autouse=True)
def no_process_left_behind(request):
    yield
    left = left_behind(request.node.processes_before)
    if left:
        pytest.fail(
            "processes still running after the test (now killed): "
            + "; ".join(f"{pid} {command[:200]}" for pid, command in sorted(left.items())),
            pytrace=False,
        )
