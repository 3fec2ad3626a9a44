"""gin for experiments: parse run files and --gin.NAME=VALUE bindings, report mistakes in one line.

What differs from plain gin, on purpose:
- A relative `--gin_file` is looked up in the working directory, then among the shipped recipes
  (experiments/, installed as t5lite/recipes), so `--gin_file=models/t5_1_1_base.gin` and
  `--gin_file=experiments/demo/pretrain.gin` work from any directory. `include 'x.gin'` is looked up
  next to the including file first (a recipe means the same from every directory), then in the
  working directory, then among the shipped recipes (a user's file can include a shipped size); a
  shipped recipe's includes look among the recipes before the working directory.
- `--gin.NAME=VALUE` takes unquoted strings where unambiguous (`--gin.MIXTURE_OR_TASK_NAME=wmt`).
- A typo in a binding fails with the closest valid names instead of a stack trace.
- `import my_module` (gin's import statement, e.g. a module that registers an attention class)
  finds modules next to the gin files and in the working directory as well as on sys.path.
Files and flags apply in order, so the last file and flag win.
"""

import difflib
import os
import re
import sys
import tokenize
import traceback
from typing import List, Optional, Sequence, Tuple

import gin

from t5lite import provenance
from t5lite.errors import UserError


def _recipes_dir() -> str:
    """The shipped gin files: experiments/ is packaged as t5lite.recipes (setup.py), so an installed
    wheel holds them in t5lite/recipes; a checkout (PYTHONPATH or `pip install -e`) reads experiments/ itself."""
    package = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(package, "recipes")
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package), "experiments")


RECIPES_DIR = _recipes_dir()
EXPERIMENTS_DIR = RECIPES_DIR  # the name older code uses
RECIPE_SUFFIXES = (".gin", ".toml")
_INCLUDE = re.compile(r"""^\s*include\s+(['"])(.+?)\1\s*(#.*)?$""")
_CONFIGURED = {}
_PARSED: List[Tuple[str, str, int]] = []  # (text, file, line) parse() gave gin, so later errors can name a file


def register_configurables() -> None:
    """Makes t5lite's entry points and model config bindable from gin (idempotent)."""
    if _CONFIGURED:
        return
    from t5lite.data import tasks
    from t5lite.model.config import T5Config
    from t5lite.model.lora import LoraConfig
    from t5lite.train.config import TrainConfig
    _CONFIGURED["T5Config"] = gin.external_configurable(T5Config, "T5Config")
    _CONFIGURED["LoraConfig"] = gin.external_configurable(LoraConfig, "LoraConfig")
    _CONFIGURED["train"] = gin.external_configurable(TrainConfig, "train")  # train.<field> bindings
    _CONFIGURED["text_to_text_task"] = gin.external_configurable(tasks.text_to_text_task, "text_to_text_task")
    _CONFIGURED["register_mixture"] = gin.external_configurable(tasks.register_mixture, "register_mixture")
    from t5lite.data import instructions  # objectives (issue 12): UL2 tasks, instruction tasks and mixtures
    for fn in (tasks.objective_task, tasks.ul2_task, tasks.examples_proportional_mixture, instructions.instruction_mixture,
               instructions.instruction_jsonl_task, tasks.train_subset_task):
        _CONFIGURED[fn.__name__] = gin.external_configurable(fn, fn.__name__)


def configured(name: str):
    """The gin-configured callable registered as `name` ('train', 'T5Config', ...)."""
    register_configurables()
    return _CONFIGURED[name]


def model_config():
    """The T5Config the bound T5Config.* parameters describe (a plain T5Config, not gin's subclass)."""
    from t5lite.model.config import T5Config
    return T5Config.from_dict(call_configured(configured("T5Config")).to_dict())


def shipped_recipes() -> List[str]:
    """Every shipped gin / sweep file, relative to RECIPES_DIR ('models/tiny.gin', ...), sorted."""
    found = []
    for directory, dirnames, filenames in os.walk(RECIPES_DIR):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        rel = os.path.relpath(directory, RECIPES_DIR)
        found += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in filenames
                  if f.endswith(RECIPE_SUFFIXES)]
    return sorted(found)


def recipe_summary(recipe: str) -> str:
    """The first line of a shipped recipe's header comment ('' when it has none)."""
    with open(os.path.join(RECIPES_DIR, recipe), encoding="utf-8") as f:
        first = f.readline().strip()
    return first.lstrip("#").strip() if first.startswith("#") else ""


def _as_recipe(name: str) -> str:
    """'experiments/demo/pretrain.gin' -> 'demo/pretrain.gin': the repo's paths also name shipped recipes."""
    parts = os.path.normpath(name).split(os.sep)
    return os.path.join(*parts[1:]) if len(parts) > 1 and parts[0] == "experiments" else name


def find_gin_file(name: str, including_dir: Optional[str] = None) -> Optional[str]:
    """Where gin file `name` is, or None: next to the including file (an include), then as given (absolute or
    relative to the working directory), then among the shipped recipes. A shipped recipe's own includes look
    among the recipes before the working directory, so a recipe means the same from every directory."""
    if os.path.isabs(name):
        candidates = [name]
    else:
        shipped, here = os.path.join(RECIPES_DIR, _as_recipe(name)), os.path.abspath(name)
        in_recipes = including_dir and _is_under(including_dir, RECIPES_DIR)
        candidates = ([os.path.join(including_dir, name)] if including_dir else []) + (
            [shipped, here] if in_recipes else [here, shipped])
    for path in candidates:
        if os.path.isfile(path):
            return os.path.normpath(os.path.abspath(path))
    return None


def _is_under(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def resolve_gin_file(name: str) -> str:
    """A --gin_file's path (working directory first, then the shipped recipes), or a one-line UserError."""
    path = find_gin_file(name)
    if path is None:
        raise UserError(f"gin file {name} not found in the working directory or among the shipped recipes "
                        "(`t5lite recipes` lists them); check --gin_file")
    return path


def _resolve_include(name: str, including_file: str) -> str:
    path = find_gin_file(name, os.path.dirname(including_file))
    if path is None:
        raise UserError(f"{including_file}: include {name!r} not found next to it, in the working directory or "
                        "among the shipped recipes (`t5lite recipes` lists them); fix the path")
    return path


def _included_lines(path: str, _seen: Optional[List[str]] = None) -> List[Tuple[str, str, int]]:
    """(text, file, line number) of every line of gin file `path`, each `include` replaced by the lines
    of the included file, so an error in the expanded text can name the user's file and line."""
    path = os.path.abspath(path)
    seen = _seen or []
    if path in seen:
        raise UserError(f"gin include cycle: {' -> '.join(seen + [path])}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        raise UserError(f"gin file {path} not found or not readable text; check --gin_file") from None
    out = [(f"# --- {path}", path, 0)]
    for number, line in enumerate(lines, 1):
        match = _INCLUDE.match(line)
        if match:
            out += _included_lines(_resolve_include(match.group(2), path), seen + [path])
        else:
            out.append((line, path, number))
    return out


def _as_gin_binding(flag: str) -> str:
    """'NAME=VALUE' -> a gin binding, quoting VALUE when it is a bare word gin would reject."""
    if "=" not in flag:
        raise UserError(f"--gin.{flag} needs a value: --gin.NAME=VALUE")
    name, value = flag.split("=", 1)
    value = value.strip()
    bare_word = re.fullmatch(r"[A-Za-z_][\w./:-]*", value) and value not in ("True", "False", "None")
    needs_quotes = bare_word or re.fullmatch(r"[\w./:-]*[/.:-][\w./:-]*", value) and not _is_number(value)
    return f"{name.strip()} = {value!r}" if needs_quotes else f"{name.strip()} = {value}"


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


_MACRO = re.compile(r"^\s*([A-Z_][A-Z0-9_]*)\s*=", re.MULTILINE)


def _check_macro_flags(bindings: Sequence[str], files_text: str) -> None:
    """gin silently accepts a macro nobody reads, so a typo'd --gin.MACRO=... must fail here (a macro the
    files define or use is read)."""
    used = _MACRO_USE.findall("\n".join(_STRING.sub("''", line).split("#", 1)[0] for line in files_text.splitlines()))
    defined = set(_MACRO.findall(files_text)) | set(used) | {"MODEL_DIR"}
    for flag in bindings:
        name = flag.split("=", 1)[0].strip()
        if re.fullmatch(r"[A-Z_][A-Z0-9_]*", name) and name not in defined:
            close = difflib.get_close_matches(name, sorted(defined), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else f"the gin files define {', '.join(sorted(defined))}"
            raise UserError(f"--gin.{name}: no gin file defines the macro {name}; {hint}")


def _parameters(configurable_name: str) -> List[str]:
    import inspect
    register_configurables()
    fn = _CONFIGURED.get(configurable_name)
    if fn is None:
        return []
    target = fn.__init__ if inspect.isclass(fn) else fn
    return [p for p in inspect.signature(target).parameters if p not in ("self", "args", "kwargs")]


def _friendly(error: Exception, where: str = "") -> UserError:
    """gin's error -> one line (prefixed with the user's file:line when known), with the closest
    valid names for a typo."""
    text = str(error).strip()
    message = text.splitlines()[0].rstrip(".") if text else type(error).__name__
    location = error.args[1] if isinstance(error, SyntaxError) and len(error.args) > 1 else None
    if getattr(location, "line_content", None) is not None:
        message = (f"gin syntax error in {location.line_content.strip()!r} (check this line and an unclosed "
                   "bracket or quote just before it)")
    if re.search(r"\bmacro\(\) missing 1 required positional argument", text):
        undefined = _undefined_macros(_PARSED)
        if undefined:
            uses = " and ".join(f"%{name} ({where_used})" for name, where_used in undefined.items())
            name = next(iter(undefined))
            return UserError(f"gin: {uses} {'is' if len(undefined) == 1 else 'are'} used but no gin file or flag "
                             f"defines {'it' if len(undefined) == 1 else 'them'}; define it in a gin file "
                             f"({name} = VALUE) or pass --gin.{name}=VALUE")
    hint = ""
    param = re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", text)
    unknown = re.search(r"No configurable matching '([\w.]+)'", text)
    if param:
        close = difflib.get_close_matches(param.group(2), _parameters(param.group(1)), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(param.group(1) + '.' + c for c in close)}?" if close else ""
    elif unknown:
        close = difflib.get_close_matches(unknown.group(1), sorted(_CONFIGURED), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; configurables: {', '.join(sorted(_CONFIGURED))}"
    return UserError(f"{where or 'gin: '}{message}{hint}")


_MACRO_USE = re.compile(r"%([A-Za-z_][\w./]*)")
_STRING = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')


def _undefined_macros(lines: List[Tuple[str, str, int]]) -> dict:
    """{macro: 'file:line' of its first use} for every %MACRO the parsed text uses that nothing defines."""
    undefined = {}
    for text, path, number in lines:
        code = _STRING.sub("''", text).split("#", 1)[0]  # a '%' inside a string or a comment is no macro
        for name in _MACRO_USE.findall(code):
            if name in undefined or name.startswith("gin."):  # %gin.REQUIRED is gin's own
                continue
            try:
                gin.query_parameter(f"%{name}")
            except ValueError:
                undefined[name] = f"{path}:{number}" if number else path
    return undefined


def _where(lines: List[Tuple[str, str, int]], error: Exception) -> str:
    """'file.gin:12: ' for a gin error that carries a line of the combined text, else ''."""
    line = getattr(error, "lineno", None)
    location = getattr(error, "location", None) or (error.args[1] if isinstance(error, SyntaxError)
                                                     and len(error.args) > 1 else None)
    line = getattr(location, "line_num", None) or line
    if line is None:
        match = re.search(r"In bindings string line (\d+)", str(error))
        line = int(match.group(1)) if match else None
    if line is None or not 1 <= line <= len(lines):
        return ""
    _, path, number = lines[line - 1]
    return f"{path}:{number}: " if number else f"{path}: "


def parse(gin_files: Sequence[str], bindings: Sequence[str] = (), model_dir: Optional[str] = None) -> None:
    """Clears gin, then applies the files and bindings in order (MODEL_DIR from --model_dir first)."""
    register_configurables()
    gin.clear_config()
    lines = [line for path in gin_files for line in _included_lines(resolve_gin_file(path))]
    _check_macro_flags(bindings, "\n".join(text for text, _, _ in lines))
    if model_dir is not None:
        lines.append((f"MODEL_DIR = {model_dir!r}", "--model_dir", 0))
    lines += [(_as_gin_binding(b), f"--gin.{b}", 0) for b in bindings]
    _PARSED[:] = lines
    _add_import_paths([os.path.dirname(resolve_gin_file(p)) for p in gin_files] + [os.getcwd()])
    try:
        gin.parse_config("\n".join(text for text, _, _ in lines))
    except ImportError as e:
        raise UserError(f"gin: {e}; put the module next to the gin file, in the working directory or on "
                        "PYTHONPATH") from None
    except (ValueError, KeyError, SyntaxError, TypeError, NameError) as e:
        raise _friendly(e, _where(lines, e)) from None
    except tokenize.TokenError as e:  # e.g. --gin.X=( : the text ends inside a bracket or string
        raise UserError(f"gin syntax error: {e.args[0]}; an unclosed bracket or quote in a gin file or "
                        "--gin.NAME=VALUE") from None


def _raised_by_gin(error: BaseException) -> bool:
    """True when the innermost frame is gin's own (a binding that does not fit the signature, an
    unknown reference), False when the configured function itself raised."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and os.path.dirname(frames[-1].filename) == os.path.dirname(gin.config.__file__)


def _add_import_paths(directories: Sequence[str]) -> None:
    """Lets gin's `import my_module` find user modules beside the run files (after installed packages)."""
    for directory in directories:
        if directory not in sys.path:
            sys.path.append(directory)


def call_configured(fn):
    """Calls a gin-configured entry point, turning gin's binding errors into one-line UserErrors
    (errors raised by the entry point itself pass through unchanged)."""
    try:
        return fn()
    except (ValueError, TypeError) as e:
        if _raised_by_gin(e):
            raise _friendly(e) from None
        raise


def train_config(**overrides):
    """The TrainConfig the parsed gin files and bindings describe (`train.*`), with `overrides` applied:
    a plain TrainConfig, its settings checked; a missing or mistyped binding is one line."""
    import dataclasses

    from t5lite.train.config import TrainConfig
    register_configurables()
    given = {**call_configured(lambda: gin.get_bindings("train")), **overrides}
    for name, macro in _REQUIRED_MACROS.items():
        if name not in given:
            raise UserError(f"the gin files bind no train.{name}: set {macro} (e.g. include 'base.gin')")
    bound = call_configured(lambda: configured("train")(**overrides))
    return TrainConfig(**{f.name: getattr(bound, f.name) for f in dataclasses.fields(TrainConfig)})


# train.<field> -> the macro base.gin binds it from (the TrainConfig fields without a default)
_REQUIRED_MACROS = {"model_dir": "MODEL_DIR (--model_dir)", "task": "MIXTURE_OR_TASK_NAME",
                    "train_steps": "TRAIN_STEPS", "batch_size": "BATCH_SIZE", "feature_lengths": "TASK_FEATURE_LENGTHS"}


def config_writer(config_text: str):
    """What the trainer calls once the run holds model_dir (everything validated, the lock taken):
    writes config.gin (the bindings), operative_config.gin (every value used) and provenance.json there."""
    from t5lite.fileio import write_text_atomic

    def write_configs(directory: str) -> None:  # process 0 only
        code_line = provenance.write(directory, process_index=0)  # provenance.json: the code and the hosts
        write_text_atomic(os.path.join(directory, "config.gin"), config_text)
        write_text_atomic(os.path.join(directory, "operative_config.gin"), code_line + gin.operative_config_str())

    return write_configs


def config_text() -> str:
    """Everything bound so far (before running, the operative config is still empty)."""
    return gin.config_str()
