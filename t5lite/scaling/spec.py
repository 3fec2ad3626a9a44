"""What a sweep is: base gin files, fixed bindings, axes, seeds and extra points -> named points.

From the command line: `--gin_file F` (repeatable), `--grid 'T5Config.emb_dim=[64,128,256]'`
(repeatable: the cartesian product, the last axis varying fastest), `--seeds N` (RANDOM_SEED =
0..N-1), `--gin.NAME=VALUE` (fixed for every point). Or a sweep file, TOML:

    gin_files = ["tiny.gin"]               # next to this file, then the cwd, then the shipped recipes
    bindings = {"train.log_period" = 50}   # fixed for every point (optional)
    seeds = 3                               # RANDOM_SEED = 0, 1, 2; or a list like [0, 7]
    baseline = {size = "s"}                 # the variant ablation deltas compare with (default: first values)

    [grid]                                  # axis -> values; a dotted name is quoted in TOML
    "T5Config.position_scheme" = ["t5_relative_bias", "rope"]
    size = ["s", "m"]                       # a named axis: each value is a set of bindings below

    [named.size.s]
    "T5Config.emb_dim" = 64
    "T5Config.num_encoder_layers" = 2

    [[extra]]                               # a point outside the grid: a value for every axis
    size = "xl"                             # (named values need not be in the grid)
    "T5Config.position_scheme" = "rope"
    held_out = true                         # kept out of scaling-law fits, predicted by them

TOML values become gin literals (strings quoted, lists, tables as dicts); a string starting with
`@` or `%` is passed as a gin reference. Each point is named from its values and seed, e.g.
`emb_dim-128_TRAIN_STEPS-400_seed-0`, stable across re-runs.
"""

import dataclasses
import itertools
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from t5lite.errors import UserError

Bindings = Tuple[str, ...]  # 'NAME=VALUE' gin flags, as after --gin.


@dataclasses.dataclass(frozen=True)
class Axis:
    """One dimension of the grid: the labels it takes and the gin bindings each label stands for."""

    name: str
    labels: Tuple[str, ...]  # the grid's values, in order
    choices: Dict[str, Bindings]  # every known label (a named axis may define more than the grid uses)
    named: bool = False

    def bindings(self, label: str) -> Bindings:
        return self.choices[label]

    def resolve(self, value) -> str:
        """The label of `value` (a TOML value of an extra point), adding it to a plain axis if new."""
        if self.named:
            if value not in self.choices:
                raise UserError(f"sweep file: {value!r} is not a value of axis {self.name}; define [named.{self.name}."
                                f"{value}] or use one of {', '.join(self.choices)}")
            return value
        label, binding = _label(value), f"{self.name}={gin_literal(value)}"
        self.choices.setdefault(label, (binding,))
        return label


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the sweep: its axis values, seed, bindings and run-directory name."""

    name: str
    values: Tuple[Tuple[str, str], ...]  # (axis name, label), in axis order
    seed: int
    bindings: Bindings  # the axes' bindings, then RANDOM_SEED
    held_out: bool = False


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What to run: base gin files, fixed bindings, the grid's axes, seeds, extra points and the baseline."""

    gin_files: Tuple[str, ...]
    bindings: Bindings = ()
    axes: Tuple[Axis, ...] = ()
    seeds: Tuple[int, ...] = (0,)
    extra: Tuple[Tuple[Tuple[str, str], ...], ...] = ()  # extra points: (axis name, label) per axis
    held_out: Tuple[bool, ...] = ()  # per extra point
    baseline: Tuple[Tuple[str, str], ...] = ()  # (axis name, label) of the variant deltas compare with

    def points(self) -> List[Point]:
        """Every point: the grid (last axis fastest) x seeds, then the extra points x seeds."""
        variants = [(tuple(zip((a.name for a in self.axes), labels)), False)
                    for labels in itertools.product(*(a.labels for a in self.axes))]
        variants += list(zip(self.extra, self.held_out))
        shorts = _short_names([a.name for a in self.axes])
        axes = {a.name: a for a in self.axes}
        points, names = [], {}
        for values, held_out in variants:
            for seed in self.seeds:
                parts = [f"{shorts[axis]}-{_path_safe(label)}" for axis, label in values] + [f"seed-{seed}"]
                name = "_".join(parts)
                if name in names:
                    raise UserError(f"two points of the sweep are both named {name} ({names[name]} and {values}); "
                                    "make the axis values or extra points distinct")
                names[name] = values
                bindings = tuple(b for axis, label in values for b in axes[axis].bindings(label))
                points.append(Point(name, values, seed, bindings + (f"RANDOM_SEED={seed}",), held_out))
        return points

    def baseline_values(self) -> Tuple[Tuple[str, str], ...]:
        return self.baseline or tuple((a.name, a.labels[0]) for a in self.axes)


# ---------------------------------------------------------------------------------------------
# Values, labels and names.
# ---------------------------------------------------------------------------------------------

def gin_literal(value) -> str:
    """A TOML value as gin text: strings quoted (unless a @reference or %MACRO), lists, dicts, bools."""
    if isinstance(value, str):
        return value if value[:1] in ("@", "%") else repr(value)
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(gin_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {gin_literal(v)}" for k, v in value.items()) + "}"
    raise UserError(f"sweep file: cannot express {value!r} ({type(value).__name__}) as a gin value")


def _label(value) -> str:
    """How a value reads in tables and run names: strings bare, everything else as gin text."""
    return value if isinstance(value, str) else gin_literal(value)


def _path_safe(label: str) -> str:
    """A label as a file-name part: runs of other characters than [A-Za-z0-9.+-] become '_'."""
    safe = re.sub(r"[^A-Za-z0-9.+-]+", "_", label).strip("_")
    return safe or "empty"


def _short_names(axis_names: Sequence[str]) -> Dict[str, str]:
    """'T5Config.emb_dim' -> 'emb_dim' in run names, unless two axes would then share a name."""
    short = {name: name.rsplit(".", 1)[-1] for name in axis_names}
    if len(set(short.values())) < len(short):
        return {name: _path_safe(name) for name in axis_names}
    return short


def _split_top_level(text: str) -> List[str]:
    """'1, (2, 3), 'a,b'' -> ['1', '(2, 3)', "'a,b'"]: commas outside brackets and quotes."""
    parts, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def parse_grid_flag(flag: str) -> Axis:
    """--grid 'NAME=[v1, v2, ...]' -> an Axis; values stay gin text (bare words are quoted by gin_utils)."""
    match = re.fullmatch(r"\s*([A-Za-z_][\w.]*)\s*=\s*\[(.*)\]\s*", flag, re.DOTALL)
    if not match:
        raise UserError(f"--grid {flag!r}: write NAME=[value1, value2, ...], e.g. --grid 'T5Config.emb_dim=[64,128]'")
    name, values = match.group(1), _split_top_level(match.group(2))
    if not values:
        raise UserError(f"--grid {flag!r} has no values; give at least one between the brackets")
    labels = tuple(v[1:-1] if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"" else v for v in values)
    if len(set(labels)) < len(labels):
        raise UserError(f"--grid {flag!r} repeats a value; give each value once")
    return Axis(name, labels, {label: (f"{name}={value}",) for label, value in zip(labels, values)})


# ---------------------------------------------------------------------------------------------
# Building a Sweep from flags and/or a sweep file.
# ---------------------------------------------------------------------------------------------

def _load_toml(path: str) -> dict:
    import tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError:
        raise UserError(f"sweep file {path} not found; check the path") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"sweep file {path} is not valid TOML: {e}") from None


def _resolve_gin_file(name: str, sweep_dir: str) -> str:
    """Next to the sweep file, then in the working directory, then among the shipped recipes (like gin includes)."""
    from t5lite.gin_utils import find_gin_file
    path = find_gin_file(name, sweep_dir)
    if path is None:
        raise UserError(f"sweep file: gin file {name!r} not found next to the sweep file, in the working directory "
                        "or among the shipped recipes (`t5lite recipes` lists them); fix gin_files")
    return display_path(path)


def display_path(path: str) -> str:
    """Relative to the working directory when under it, so printed commands run from a checkout elsewhere."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


_FILE_KEYS = {"gin_files", "bindings", "seeds", "baseline", "grid", "named", "extra"}


def _file_axes(spec: dict, path: str) -> List[Axis]:
    named = spec.get("named", {})
    axes = []
    for name, values in spec.get("grid", {}).items():
        if not isinstance(values, list) or not values:
            raise UserError(f"sweep file {path}: grid.{name} must be a non-empty list of values")
        if name in named:
            choices = {label: tuple(f"{k}={gin_literal(v)}" for k, v in table.items())
                       for label, table in named[name].items()}
            axis = Axis(name, tuple(str(v) for v in values), choices, named=True)
            for label in axis.labels:
                axis.resolve(label)
        else:
            axis = Axis(name, (), {})
            axis = dataclasses.replace(axis, labels=tuple(axis.resolve(v) for v in values))
        if len(set(axis.labels)) < len(axis.labels):
            raise UserError(f"sweep file {path}: grid.{name} repeats a value")
        axes.append(axis)
    unused = sorted(set(named) - {a.name for a in axes})
    if unused:
        raise UserError(f"sweep file {path}: [named.{unused[0]}] belongs to no axis in [grid]; add {unused[0]} there")
    return axes


def _file_extra(spec: dict, axes: List[Axis], path: str):
    extra, held_out = [], []
    by_name = {a.name: a for a in axes}
    for i, entry in enumerate(spec.get("extra", [])):
        entry = dict(entry)
        held_out.append(bool(entry.pop("held_out", False)))
        missing = [a.name for a in axes if a.name not in entry]
        unknown = sorted(set(entry) - set(by_name))
        if missing or unknown:
            raise UserError(f"sweep file {path}: extra point {i + 1} must give a value for each axis "
                            f"({', '.join(by_name)}) and nothing else" + (f"; missing {missing}" if missing else "")
                            + (f"; unknown {unknown}" if unknown else ""))
        extra.append(tuple((a.name, a.resolve(entry[a.name])) for a in axes))
    return tuple(extra), tuple(held_out)


def _seeds(value) -> Tuple[int, ...]:
    """seeds = N -> 0..N-1; a list of integers as given."""
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)
    if is_int(value) and value >= 1:
        return tuple(range(value))
    if isinstance(value, list) and value and all(is_int(s) for s in value) and len(set(value)) == len(value):
        return tuple(value)
    raise UserError(f"seeds must be a count >= 1 or a list of distinct integers, got {value!r}")


def build_sweep(sweep_file: Optional[str] = None, gin_files: Sequence[str] = (), grid: Sequence[str] = (),
                seeds: Optional[int] = None, bindings: Sequence[str] = ()) -> Sweep:
    """A Sweep from a sweep file and/or flags; flags add gin files, axes and bindings, --seeds replaces."""
    spec, file_axes, extra, held_out, files = {}, [], (), (), []
    if sweep_file:
        from t5lite.gin_utils import find_gin_file
        sweep_file = find_gin_file(sweep_file) or sweep_file  # e.g. scaling/tiny.toml, a shipped sweep
        spec = _load_toml(sweep_file)
        unknown = sorted(set(spec) - _FILE_KEYS)
        if unknown:
            raise UserError(f"sweep file {sweep_file}: unknown key(s) {unknown}; valid: {', '.join(sorted(_FILE_KEYS))}")
        here = os.path.dirname(os.path.abspath(sweep_file))
        files = [_resolve_gin_file(f, here) for f in spec.get("gin_files", [])]
        file_axes = _file_axes(spec, sweep_file)
        extra, held_out = _file_extra(spec, file_axes, sweep_file)
    from t5lite.gin_utils import resolve_gin_file
    for f in gin_files:
        files.append(display_path(resolve_gin_file(f)))
    if not files:
        raise UserError("give a sweep file or at least one --gin_file (e.g. experiments/demo/pretrain.gin)")
    axes = file_axes + [parse_grid_flag(g) for g in grid]
    names = [a.name for a in axes]
    if len(set(names)) < len(names):
        raise UserError(f"axis {min(n for n in names if names.count(n) > 1)} is given twice; merge its values")
    if extra and grid:
        raise UserError("a sweep file with [[extra]] points cannot take more --grid axes (the extra points would lack "
                        "their values); add the axis to the file")
    fixed = tuple(f"{k}={gin_literal(v)}" for k, v in spec.get("bindings", {}).items()) + tuple(bindings)
    baseline = tuple((name, by_label) for name, by_label in spec.get("baseline", {}).items())
    axis_names = {a.name: a for a in axes}
    for name, label in baseline:
        if name not in axis_names or str(label) not in axis_names[name].choices:
            raise UserError(f"sweep file {sweep_file}: baseline {name} = {label!r} is not a value of the grid")
    if baseline and len(baseline) != len(axes):
        raise UserError(f"sweep file {sweep_file}: baseline must give a value for every axis ({', '.join(axis_names)})")
    order = {a.name: i for i, a in enumerate(axes)}
    return Sweep(gin_files=tuple(files), bindings=fixed, axes=tuple(axes),
                 seeds=_seeds(seeds if seeds is not None else spec.get("seeds", 1)), extra=extra, held_out=held_out,
                 baseline=tuple(sorted(((n, str(v)) for n, v in baseline), key=lambda nv: order[nv[0]])))
