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

Multi-stage points (a study: pre-train, then fine-tune from it, score downstream). Each `[[stages]]`
entry is a run of the point; later stages start from earlier ones:

    [[stages]]
    name = "pretrain"
    gin_files = ["ablations/positions.gin"]
    seed = 0                                # optional: this stage always runs with this seed (shared by seeds)
    [[stages]]
    name = "finetune"
    gin_files = ["finetune/kjv_web.gin"]
    init_from = "pretrain"                  # INITIAL_CHECKPOINT_PATH = that stage's run directory
    teacher_from = "..."                    # (or) train.teacher_checkpoint = that stage's run directory
    bindings = {TRAIN_STEPS = 100}          # this stage only

    [score]                                 # decode the last stage's checkpoint (`t5lite eval`) and compare
    tasks = ["bible_modernize_kjv_web"]     # the mean of `metric` over `tasks` instead of the eval loss
    metric = "chrf"                         # or a table {task = "accuracy", ...}; optional: split,
                                            # max_examples, input_length, max_decode_length, higher_is_better

A binding applies to every stage unless its name starts with a stage: `"finetune:LoraConfig.rank" = 4` (in
`bindings`, an axis, a named value or --gin.finetune:NAME=VALUE). A stage's bindings apply in this order, later
ones winning: the stage's own, the file's `bindings`, the axes' values, RANDOM_SEED, then the --gin flags (a
single-stage sweep keeps its order: file, flags, axes). A stage's run directory is ROOT/<stage>/<values of the
axes that bind it or a stage it starts from>_seed-<seed>: points that agree on those share the run, trained once
(one pre-trained base for every LoRA rank). A named value may set `last_stage = "pretrain"`: its points stop
(and are scored) there, e.g. the base a tuned model is compared with. A --grid flag naming an axis of the file
runs only the values it lists (`--grid 'objective=[span_corruption,ul2]'`). `[study]` (name, question, paper)
titles the results page `t5lite sweep run --results` writes (a study file's default: docs/results/<name>.md).

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
    last_stage: Dict[str, str] = dataclasses.field(default_factory=dict)  # label -> the stage its points stop at

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
    runs: Tuple["StageRun", ...] = ()  # a multi-stage point: the stage runs it needs, in stage order


@dataclasses.dataclass(frozen=True)
class Stage:
    """One `[[stages]]` entry: a run every point makes, maybe starting from (or taught by) an earlier stage."""

    name: str
    gin_files: Tuple[str, ...]
    bindings: Bindings = ()  # this stage's own (unprefixed)
    init_from: Optional[str] = None  # -> INITIAL_CHECKPOINT_PATH
    teacher_from: Optional[str] = None  # -> train.teacher_checkpoint
    seed: Optional[int] = None  # fixed: the run is shared by every seed of the sweep


@dataclasses.dataclass(frozen=True)
class StageRun:
    """A stage of a point made concrete: its directory under ROOT/<stage>/ and its bindings; `links` are
    (gin name, stage) pairs bound to that stage's run directory once the root is known."""

    stage: str
    name: str
    gin_files: Tuple[str, ...]
    bindings: Bindings
    links: Tuple[Tuple[str, str], ...] = ()

    def model_dir(self, root: str) -> str:
        return os.path.join(root, self.stage, self.name)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What to run: base gin files, fixed bindings, the grid's axes, seeds, extra points and the baseline."""

    gin_files: Tuple[str, ...]
    bindings: Bindings = ()  # the sweep file's, then the --gin flags: for every point
    axes: Tuple[Axis, ...] = ()
    seeds: Tuple[int, ...] = (0,)
    extra: Tuple[Tuple[Tuple[str, str], ...], ...] = ()  # extra points: (axis name, label) per axis
    held_out: Tuple[bool, ...] = ()  # per extra point
    baseline: Tuple[Tuple[str, str], ...] = ()  # (axis name, label) of the variant deltas compare with
    stages: Tuple[Stage, ...] = ()
    score: Optional[dict] = None  # [score]: tasks, metric, ...
    study: Optional[dict] = None  # [study]: name, question, paper
    overrides: Bindings = ()  # the --gin flags (the tail of `bindings`): last in a multi-stage run

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
                runs = self._stage_runs(values, seed, shorts) if self.stages else ()
                points.append(Point(name, values, seed, bindings + (f"RANDOM_SEED={seed}",), held_out, runs))
        return points

    def _stage_runs(self, values, seed: int, shorts: Dict[str, str]) -> Tuple[StageRun, ...]:
        """The runs of a multi-stage point: the last stage (a named value's last_stage, else the last) and every
        stage it starts from, each named by the axes that bind it or its upstream stages."""
        axes = {a.name: a for a in self.axes}
        by_name = {s.name: s for s in self.stages}
        last = next((axes[a].last_stage[label] for a, label in values if label in axes[a].last_stage),
                    self.stages[-1].name)
        needed = deps(by_name, last)
        runs = []
        for stage in self.stages:
            if stage.name not in needed:
                continue
            upstream = deps(by_name, stage.name)
            touching = [(a, label) for a, label in values
                        if any(applies(b, s) for s in upstream for c in axes[a].choices.values() for b in c)]
            run_seed = seed if stage.seed is None else stage.seed
            name = "_".join([f"{shorts[a]}-{_path_safe(label)}" for a, label in touching] + [f"seed-{run_seed}"])
            file_bindings = self.bindings[:len(self.bindings) - len(self.overrides)]
            bindings = (*stage.bindings, *for_stage(file_bindings, stage.name),
                        *(b for a, label in values for b in for_stage(axes[a].bindings(label), stage.name)),
                        f"RANDOM_SEED={run_seed}", *for_stage(self.overrides, stage.name))
            links = tuple((key, up) for key, up in (("INITIAL_CHECKPOINT_PATH", stage.init_from),
                                                    ("train.teacher_checkpoint", stage.teacher_from)) if up)
            runs.append(StageRun(stage.name, name, stage.gin_files, bindings, links))
        return tuple(runs)

    def baseline_values(self) -> Tuple[Tuple[str, str], ...]:
        return self.baseline or tuple((a.name, a.labels[0]) for a in self.axes)


def deps(stages: Dict[str, Stage], name: str) -> set:
    """The stage and every stage it starts from or is taught by, transitively."""
    out, todo = set(), [name]
    while todo:
        stage = stages[todo.pop()]
        if stage.name not in out:
            out.add(stage.name)
            todo += [up for up in (stage.init_from, stage.teacher_from) if up]
    return out


def _split_stage(binding: str) -> Tuple[Optional[str], str]:
    """'finetune:NAME=VALUE' -> ('finetune', 'NAME=VALUE'); gin names hold no ':' (values may)."""
    name = binding.split("=", 1)[0]
    if ":" in name:
        stage, rest = binding.split(":", 1)
        return stage.strip(), rest
    return None, binding


def applies(binding: str, stage: str) -> bool:
    return _split_stage(binding)[0] in (None, stage)


def for_stage(bindings: Sequence[str], stage: str) -> Bindings:
    """The bindings that apply to `stage`, its prefix removed."""
    return tuple(_split_stage(b)[1] for b in bindings if applies(b, stage))


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


_FILE_KEYS = {"gin_files", "bindings", "seeds", "baseline", "grid", "named", "extra", "stages", "score", "study"}
_STAGE_KEYS = {"name", "gin_files", "bindings", "init_from", "teacher_from", "seed"}
_SCORE_KEYS = {"tasks", "metric", "split", "max_examples", "input_length", "max_decode_length", "higher_is_better"}


def _file_stages(spec: dict, path: str) -> Tuple[Stage, ...]:
    stages, here = [], os.path.dirname(os.path.abspath(path))
    for i, entry in enumerate(spec.get("stages", [])):
        unknown = sorted(set(entry) - _STAGE_KEYS)
        if unknown or not entry.get("name") or not entry.get("gin_files"):
            raise UserError(f"sweep file {path}: stage {i + 1} needs a name and gin_files (keys: "
                            f"{', '.join(sorted(_STAGE_KEYS))})" + (f"; unknown {unknown}" if unknown else ""))
        for key in ("init_from", "teacher_from"):
            if entry.get(key) is not None and entry[key] not in {s.name for s in stages}:
                raise UserError(f"sweep file {path}: stage {entry['name']}: {key} = {entry[key]!r} is not an earlier "
                                "stage; name one listed above it")
        if entry["name"] in {s.name for s in stages}:
            raise UserError(f"sweep file {path}: two stages are named {entry['name']}; name each stage once")
        stages.append(Stage(entry["name"], tuple(_resolve_gin_file(f, here) for f in entry["gin_files"]),
                            tuple(f"{k}={gin_literal(v)}" for k, v in entry.get("bindings", {}).items()),
                            entry.get("init_from"), entry.get("teacher_from"), entry.get("seed")))
    score = spec.get("score")
    if score is not None and (set(score) - _SCORE_KEYS or not isinstance(score.get("tasks"), list)
                              or not score["tasks"] or not score.get("metric")
                              or isinstance(score["metric"], dict) and set(score["metric"]) != set(score["tasks"])):
        raise UserError(f"sweep file {path}: [score] needs tasks (a list) and metric (a name, or a table giving each "
                        f"task's; keys: {', '.join(sorted(_SCORE_KEYS))})")
    return tuple(stages)


def _check_stage_prefixes(bindings: Sequence[str], stages: Sequence[Stage], axes: Sequence[Axis]) -> None:
    """A 'stage:NAME=VALUE' binding must name a stage of the sweep; a named value's last_stage too."""
    names = {s.name for s in stages}
    every = list(bindings) + [b for a in axes for c in a.choices.values() for b in c]
    for b in every:
        stage = _split_stage(b)[0]
        if stage is not None and stage not in names:
            raise UserError(f"binding {b!r} names stage {stage!r}, but the sweep has " +
                            (f"stages {', '.join(sorted(names))}" if names else "no [[stages]]") + "; fix the prefix")
    for a in axes:
        for label, last in a.last_stage.items():
            if last not in names:
                raise UserError(f"{a.name} = {label}: last_stage {last!r} is not a stage; use one of "
                                f"{', '.join(sorted(names)) or '(no stages)'}")


def _file_axes(spec: dict, path: str) -> List[Axis]:
    named = spec.get("named", {})
    axes = []
    for name, values in spec.get("grid", {}).items():
        if not isinstance(values, list) or not values:
            raise UserError(f"sweep file {path}: grid.{name} must be a non-empty list of values")
        if name in named:
            choices = {label: tuple(f"{k}={gin_literal(v)}" for k, v in table.items() if k != "last_stage")
                       for label, table in named[name].items()}
            last = {label: table["last_stage"] for label, table in named[name].items() if "last_stage" in table}
            axis = Axis(name, tuple(str(v) for v in values), choices, named=True, last_stage=last)
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


def _narrowed(axis: Axis, flag_axes: Sequence[Axis]) -> Axis:
    """A sweep file's axis with the values a --grid flag of the same name gives instead (e.g. two of a study's
    variants for a quick check); a named axis takes only values it defines."""
    flag = next((f for f in flag_axes if f.name == axis.name), None)
    if flag is None:
        return axis
    if axis.named:
        unknown = [label for label in flag.labels if label not in axis.choices]
        if unknown:
            raise UserError(f"--grid {axis.name}: {unknown[0]!r} is not a value of the sweep file's axis; use "
                            f"{', '.join(axis.choices)}")
        return dataclasses.replace(axis, labels=flag.labels)
    return dataclasses.replace(axis, labels=flag.labels, choices={**axis.choices, **flag.choices})


def build_sweep(sweep_file: Optional[str] = None, gin_files: Sequence[str] = (), grid: Sequence[str] = (),
                seeds: Optional[int] = None, bindings: Sequence[str] = ()) -> Sweep:
    """A Sweep from a sweep file and/or flags; flags add gin files, axes and bindings, --seeds replaces."""
    spec, file_axes, extra, held_out, files, stages = {}, [], (), (), [], ()
    if sweep_file:
        from t5lite.gin_utils import find_gin_file
        sweep_file = find_gin_file(sweep_file) or sweep_file  # e.g. scaling/tiny.toml, a shipped sweep
        spec = _load_toml(sweep_file)
        unknown = sorted(set(spec) - _FILE_KEYS)
        if unknown:
            raise UserError(f"sweep file {sweep_file}: unknown key(s) {unknown}; valid: {', '.join(sorted(_FILE_KEYS))}")
        here = os.path.dirname(os.path.abspath(sweep_file))
        files = [_resolve_gin_file(f, here) for f in spec.get("gin_files", [])]
        stages = _file_stages(spec, sweep_file)
        file_axes = _file_axes(spec, sweep_file)
        extra, held_out = _file_extra(spec, file_axes, sweep_file)
    from t5lite.gin_utils import resolve_gin_file
    for f in gin_files:
        files.append(display_path(resolve_gin_file(f)))
    if not files and not stages:
        raise UserError("give a sweep file or at least one --gin_file (e.g. experiments/demo/pretrain.gin)")
    flag_axes = [parse_grid_flag(g) for g in grid]
    file_axes = [_narrowed(a, flag_axes) for a in file_axes]
    new_axes = [a for a in flag_axes if a.name not in {f.name for f in file_axes}]
    axes = file_axes + new_axes
    names = [a.name for a in flag_axes]
    if len(set(names)) < len(names):
        raise UserError(f"axis {min(n for n in names if names.count(n) > 1)} is given twice; merge its values")
    if extra and new_axes:
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
    if stages and files:
        raise UserError(f"sweep file {sweep_file}: with [[stages]], give gin_files per stage (not at the top or "
                        "with --gin_file)")
    _check_stage_prefixes(fixed, stages, axes)
    order = {a.name: i for i, a in enumerate(axes)}
    study = dict(spec.get("study", {}))
    if sweep_file and spec.get("study") is not None:
        study.setdefault("name", os.path.splitext(os.path.basename(sweep_file))[0])
    return Sweep(gin_files=tuple(files), bindings=fixed, overrides=tuple(bindings), axes=tuple(axes),
                 seeds=_seeds(seeds if seeds is not None else spec.get("seeds", 1)), extra=extra, held_out=held_out,
                 baseline=tuple(sorted(((n, str(v)) for n, v in baseline), key=lambda nv: order[nv[0]])),
                 stages=stages, score=spec.get("score"), study=study or None)
