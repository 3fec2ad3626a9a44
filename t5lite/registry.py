"""One registry: name -> building block, for every kind of thing a run selects by name.

A config names what it wants (`T5Config.attention = 'multi_head'`, `train.loss = 'cross_entropy'`,
`train.optimizer = 'adamw'`, a task's `objective` or `metrics`); the code that builds the run looks
the name up here. t5lite's own entries register themselves where they are defined; a user's file
adds a choice with the same decorator and is selected by one gin line, with no edit to t5lite:

    from t5lite.registry import register

    @register("optimizer", "lion")
    def lion(learning_rate, *, b1=0.9, b2=0.99, weight_decay=0.0): ...

What each kind's entries are called with is documented in docs/design.md ("How to add each kind").
"""

import difflib
from typing import Any, Callable, Dict, Tuple

from t5lite.errors import UserError

# kind -> where a user selects it (named in the errors, so a typo points at the binding to fix)
KINDS: Dict[str, str] = {
    "attention": "T5Config.attention",
    "mlp": "T5Config.mlp",
    "norm": "T5Config.norm",
    "positions": "T5Config.position_scheme",
    "loss": "train.loss",
    "optimizer": "train.optimizer",
    "schedule": "train.schedule",
    "objective": "the task's objective",
    "metric": "the task's metrics",
}
_ENTRIES: Dict[str, Dict[str, Any]] = {kind: {} for kind in KINDS}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown kind {kind!r} to register; choose from {', '.join(KINDS)}")


def register(kind: str, name: str) -> Callable[[Any], Any]:
    """Decorator: makes a class or function selectable as `name` for `kind`. Re-registering replaces it."""
    _check_kind(kind)
    if not isinstance(name, str) or not name:
        raise UserError(f"register({kind!r}, {name!r}): the name must be a non-empty string")

    def add(entry):
        _ENTRIES[kind][name] = entry
        return entry

    return add


def names(kind: str) -> Tuple[str, ...]:
    """The registered names of `kind`, in registration order."""
    _check_kind(kind)
    return tuple(_ENTRIES[kind])


def get(kind: str, name: str) -> Any:
    """The entry registered as `name` for `kind`; a one-line UserError with the closest and the valid names."""
    _check_kind(kind)
    entries = _ENTRIES[kind]
    if not isinstance(name, str) or name not in entries:
        close = difflib.get_close_matches(str(name), list(entries), n=2, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown {kind} {name!r}; choose from {', '.join(entries)}{hint} (set by {KINDS[kind]}; "
                        f"one of your own is imported first, e.g. `import my_module` in the gin file, and "
                        f"registered with t5lite.registry.register({kind!r}, name))")
    return entries[name]
