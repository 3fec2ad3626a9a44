"""Name -> module class, per kind of building block: how a layer finds its sub-modules.

Layers never import a concrete attention / MLP / norm / positions class: they look up the name
the config gives (`T5Config.attention`, `.mlp`, `.norm`, `.position_scheme`). A user's own file
adds a choice with the decorator and is selected by one gin line, with no edit to t5lite:

    @register("attention", "my_attention")
    class MyAttention(MultiHeadAttention): ...

What each kind's classes are constructed and called with is documented in README "Add a module".
"""

from typing import Callable, Dict, Tuple, Type

from t5lite.errors import UserError

KINDS = ("attention", "mlp", "norm", "positions")
_REGISTRY: Dict[str, Dict[str, Type]] = {kind: {} for kind in KINDS}
_BUILTINS_LOADED = []


def register(kind: str, name: str) -> Callable[[Type], Type]:
    """Class decorator: makes `cls` selectable as `name` for `kind`. Re-registering a name replaces it."""
    if kind not in KINDS:
        raise UserError(f"unknown module kind {kind!r}; choose from {', '.join(KINDS)}")

    def add(cls: Type) -> Type:
        _REGISTRY[kind][name] = cls
        return cls

    return add


def _load_builtins() -> None:
    """Imports t5lite's own modules (they register themselves) on the first lookup."""
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED.append(True)
        from t5lite.model import attention, layers, moe, positions  # noqa: F401


def names(kind: str) -> Tuple[str, ...]:
    _load_builtins()
    return tuple(_REGISTRY[kind])


def get(kind: str, name: str) -> Type:
    """The class registered as `name` for `kind`; a one-line UserError listing the valid names if none."""
    _load_builtins()
    if kind not in KINDS:
        raise UserError(f"unknown module kind {kind!r}; choose from {', '.join(KINDS)}")
    if not isinstance(name, str) or name not in _REGISTRY[kind]:  # a list from gin is unhashable, no name
        raise UserError(f"unknown {kind} {name!r}; choose from {', '.join(_REGISTRY[kind])} (a module of your own "
                        f"must be imported first, e.g. `import my_module` in the gin file)")
    return _REGISTRY[kind][name]
