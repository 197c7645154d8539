"""gptscale's one door to DeepSpeed: the engine adapter (``Engine``) and what it is built from.

Everything DeepSpeed-specific lives in this room: its JSON (``config.py``), the process groups it asks for
(``mpu.py``), the update gate's decision (``gate.py``), the fp32 clipping DeepSpeed gets wrong
(``norm.py``) and where its optimizers keep master weights and state (``state.py``). Nothing outside
reaches into DeepSpeed's objects, and nothing here writes into them from outside either.
"""

from gptscale.parallel.engine.config import engine_config, parameter_groups
from gptscale.parallel.engine.engine import Engine, Update
from gptscale.parallel.engine.gate import UpdateLimits, skip_update
from gptscale.parallel.engine.state import OptimizerState

__all__ = ["Engine", "OptimizerState", "Update", "UpdateLimits", "engine_config", "parameter_groups", "skip_update"]
