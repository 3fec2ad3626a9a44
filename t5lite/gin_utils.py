"""gin for experiments: parse run files and --gin.NAME=VALUE bindings, report mistakes in one line.

What differs from plain gin, on purpose:
- `include 'x.gin'` is resolved relative to the including file first, then to experiments/,
  then to the working directory, so run files include each other by relative path.
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

EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
_INCLUDE = re.compile(r"""^\s*include\s+(['"])(.+?)\1\s*(#.*)?$""")
_CONFIGURED = {}


def register_configurables() -> None:
    """Makes t5lite's entry points and model config bindable from gin (idempotent)."""
    if _CONFIGURED:
        return
    from t5lite.data import tasks
    from t5lite.model.config import T5Config
    from t5lite.model.lora import LoraConfig
    from t5lite.train import trainer
    _CONFIGURED["T5Config"] = gin.external_configurable(T5Config, "T5Config")
    _CONFIGURED["LoraConfig"] = gin.external_configurable(LoraConfig, "LoraConfig")
    _CONFIGURED["train"] = gin.external_configurable(trainer.train, "train")
    _CONFIGURED["text_to_text_task"] = gin.external_configurable(tasks.text_to_text_task, "text_to_text_task")
    _CONFIGURED["register_mixture"] = gin.external_configurable(tasks.register_mixture, "register_mixture")
    from t5lite.data import instructions  # objectives (issue 12): UL2 tasks, instruction tasks and mixtures
    for fn in (tasks.ul2_task, tasks.examples_proportional_mixture, instructions.instruction_mixture,
               instructions.instruction_jsonl_task, tasks.train_subset_task):
        _CONFIGURED[fn.__name__] = gin.external_configurable(fn, fn.__name__)


def configured(name: str):
    """The gin-configured callable registered as `name` ('train', 'T5Config', ...)."""
    register_configurables()
    return _CONFIGURED[name]


def model_config():
    """The T5Config the bound T5Config.* parameters describe (a plain T5Config, not gin's subclass)."""
    from t5lite.model.config import T5Config
    return T5Config.from_dict(configured("T5Config")().to_dict())


def _resolve_include(name: str, including_dir: str) -> str:
    for base in (including_dir, EXPERIMENTS_DIR, os.getcwd()):
        path = os.path.normpath(os.path.join(base, name))
        if os.path.isfile(path):
            return path
    raise UserError(f"include {name!r} not found next to the including file, in {EXPERIMENTS_DIR} or in the "
                    "working directory; fix the path")


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
            out += _included_lines(_resolve_include(match.group(2), os.path.dirname(path)), seen + [path])
        else:
            out.append((line, path, number))
    return out


def expand_includes(path: str) -> str:
    """The text of gin file `path` with every `include` replaced by the included file's text."""
    return "\n".join(text for text, _, _ in _included_lines(path))


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
    """gin silently accepts a macro nobody reads, so a typo'd --gin.MACRO=... must fail here."""
    defined = set(_MACRO.findall(files_text)) | {"MODEL_DIR"}
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
    lines = [line for path in gin_files for line in _included_lines(path)]
    _check_macro_flags(bindings, "\n".join(text for text, _, _ in lines))
    if model_dir is not None:
        lines.append((f"MODEL_DIR = {model_dir!r}", "--model_dir", 0))
    lines += [(_as_gin_binding(b), f"--gin.{b}", 0) for b in bindings]
    _add_import_paths([os.path.dirname(os.path.abspath(p)) for p in gin_files] + [os.getcwd()])
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


def train_into(model_dir: str, config_text: str):
    """Runs the gin-configured `train`. Once the run holds model_dir (everything validated, the lock
    taken), config.gin (the bindings) and operative_config.gin (every value used) are written there."""
    def write_configs(directory: str) -> None:  # process 0 only
        code_line = provenance.write(directory, process_index=0)  # provenance.json: the code and the hosts
        _write_text(os.path.join(directory, "config.gin"), config_text)
        _write_text(os.path.join(directory, "operative_config.gin"), code_line + gin.operative_config_str())

    train = configured("train")
    return call_configured(lambda: train(operative_gin=config_text, write_configs=write_configs))


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def config_text() -> str:
    """Everything bound so far (before running, the operative config is still empty)."""
    return gin.config_str()
