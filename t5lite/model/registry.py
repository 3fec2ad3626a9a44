"""Name -> module class, per kind of building block: how a layer finds its sub-modules.

Layers never import a concrete attention / MLP / norm / positions class: they look up the name
the config gives (`T5Config.attention`, `.mlp`, `.norm`, `.position_scheme`). A user's own file
adds a choice with the decorator and is selected by one gin line, with no edit to t5lite:

    @register("attention", "my_attention")
    class MyAttention(MultiHeadAttention): ...

What each kind's classes are constructed and called with is documented in README "Add a module".
t5lite's own modules register themselves when `t5lite.model` is imported (its __init__ imports
them), so this module imports nothing of the model and the model's files form no import circle.
"""

from typing import Callable, Dict, Tuple, Type

from t5lite.errors import UserError

KINDS = ("attention", "mlp", "norm", "positions")
_REGISTRY: Dict[str, Dict[str, Type]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str) -> Callable[[Type], Type]:
    """Class decorator: makes `cls` selectable as `name` for `kind`. Re-registering a name replaces it."""
    if kind not in KINDS:
        raise UserError(f"unknown module kind {kind!r}; choose from {', '.join(KINDS)}")

    def add(cls: Type) -> Type:
        _REGISTRY[kind][name] = cls
        return cls

    return add


def names(kind: str) -> Tuple[str, ...]:
    return tuple(_REGISTRY[kind])


def get(kind: str, name: str) -> Type:
    """The class registered as `name` for `kind`; a one-line UserError listing the valid names if none."""
    if kind not in KINDS:
        raise UserError(f"unknown module kind {kind!r}; choose from {', '.join(KINDS)}")
    if name not in _REGISTRY[kind]:
        raise UserError(f"unknown {kind} {name!r}; choose from {', '.join(_REGISTRY[kind])} (a module of your own "
                        f"must be imported first, e.g. `import my_module` in the gin file)")
    return _REGISTRY[kind][name]
