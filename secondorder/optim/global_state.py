"""Where an optimizer keeps what belongs to no single parameter: the damping λ and step counters.

One convention for every optimizer of this package:

- **λ is ``param_groups[0]["damping"]``**, the value the next step uses. It is a hyperparameter
  that the method adapts (Levenberg-Marquardt), just as a schedule adapts ``lr`` in place: it
  sits where torch keeps hyperparameters, round-trips through ``state_dict`` with the groups,
  and a user or the trainer reads or overrides it where they would ``lr``. Its type is the
  method's: a float where the step reads it on the host anyway (Newton-CG, K-FAC), a 0-d
  float64 tensor on the parameters' device where the step must not sync (CurveBall).
- **Counters are ``self.global_state``**, a dict with at least ``"step"`` (steps taken, an int)
  and whatever else the method counts (Neumann's reset schedule, ...). ``state_dict()`` saves it
  under ``"global_state"`` (tensors cloned) and ``load_state_dict`` restores it, so a resumed
  run continues bitwise. Per-parameter state stays in ``self.state`` as torch keeps it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim import Optimizer

__all__ = ["GLOBAL_STATE_KEY", "GlobalStateOptimizer"]

GLOBAL_STATE_KEY = "global_state"


class GlobalStateOptimizer(Optimizer):
    """``torch.optim.Optimizer`` plus :attr:`global_state`, saved and restored with the rest.

    Subclasses call :meth:`init_global_state` in ``__init__`` (after ``super().__init__``).
    """

    global_state: dict[str, Any]

    def init_global_state(self, **counters: Any) -> None:
        """Start ``global_state`` at step 0 with the method's other ``counters``."""
        self.global_state = {"step": 0, **counters}

    def state_dict(self) -> dict[str, Any]:
        """The torch state plus :attr:`global_state` under ``"global_state"``."""
        state = super().state_dict()
        state[GLOBAL_STATE_KEY] = {
            k: v.clone() if isinstance(v, Tensor) else v for k, v in self.global_state.items()
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (bitwise).

        Raises:
            ValueError: if ``state_dict`` has no ``"global_state"`` (not this optimizer's state).
        """
        state_dict = dict(state_dict)
        saved = state_dict.pop(GLOBAL_STATE_KEY, None)
        if saved is None:
            raise ValueError(
                f"not a {type(self).__name__} optimizer state: the {GLOBAL_STATE_KEY!r} entry "
                "is missing"
            )
        super().load_state_dict(state_dict)
        self.global_state = dict(saved)
