"""Runs a sweep: one ordinary `t5lite train` run directory per point under ROOT, one after another.

Each point trains in its own subprocess through the real CLI (`python -m t5lite.cli train
--gin_file=... --model_dir=ROOT/<point> --gin.X=Y ...`): fresh gin and jax state per point, and
a crash or one-line error of one point is recorded while the others go on. Every point's config
is parsed here first, so a bad binding fails in milliseconds and is never launched. Beside the
run's own files each point directory holds sweep_point.json (values, command, N, D, C),
sweep_status.json (done / failed / interrupted, the one-line error, wall time) and train.log.
A re-run skips points whose final checkpoint exists (also when launched elsewhere from
`--print_commands`) and resumes the others: `train` resumes by itself from its model_dir.
"""

import collections
import dataclasses
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import List, Optional, Tuple

from t5lite.errors import UserError
from t5lite.fileio import write_text_atomic
from t5lite.scaling.spec import Point, Sweep

EMBEDDING_AXES = {"vocab", "abs_positions"}  # logical axes of the parameters N leaves out
POINT_FILE, STATUS_FILE, LOG_FILE, TASK_METRICS_FILE, SCORE_FILE = (
    "sweep_point.json", "sweep_status.json", "train.log", "task_metrics.json", "score.json")


@dataclasses.dataclass(frozen=True)
class Plan:
    """A point made concrete: its run directory, `t5lite train` arguments and what it will cost."""

    point: Point
    model_dir: str
    args: Tuple[str, ...]  # after `t5lite train`
    facts: dict  # task, steps, batch, lengths, params (N), tokens (D), flops (C)
    config_text: str  # what the run writes to config.gin (compared on re-runs)
    error: Optional[str] = None  # why the point cannot run (a bad binding, an unknown task, ...)
    stage: Optional[str] = None  # a multi-stage point: this run's stage
    upstream: Tuple["Plan", ...] = ()  # ... and the runs of the stages before it (the final plan's only)


# ---------------------------------------------------------------------------------------------
# Planning: parse each point's gin config in this process, without training.
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def parameter_counts(config, decoder_only: bool = False) -> Tuple[int, int]:
    """(total, non-embedding) parameters. Non-embedding leaves out the token embedding, the untied
    logits layer and a learned absolute-position table (a `vocab` or `abs_positions` axis), as
    Kaplan et al. count N."""
    import flax.linen as nn
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec
    from t5lite.model import abstract_params, param_shapes
    try:  # the same parameters, traced once per stack instead of once per layer (xl: 1 s instead of 10)
        abstract = abstract_params(config.replace(scan_layers=True), decoder_only)
    except Exception:  # noqa: BLE001 - a config that cannot scan its layers is counted unscanned
        abstract = abstract_params(config, decoder_only)
    shapes = param_shapes(abstract)
    specs = jax.tree_util.tree_flatten_with_path(nn.get_partition_spec(abstract),
                                                 is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    embedding = {"/".join(k.key for k in path) for path, spec in specs if set(spec) & EMBEDDING_AXES}
    total = sum(int(np.prod(s)) for s in shapes.values())
    return total, total - sum(int(np.prod(shapes[name])) for name in embedding)


def _train_config(gin_files, bindings, model_dir):
    """The point's TrainConfig, parsed here (its settings checked as `train` checks them)."""
    from t5lite import gin_utils
    gin_utils.parse(gin_files, bindings, model_dir)
    return gin_utils.train_config()


def _facts(train) -> dict:
    """N, D, C of a run. D counts input + target token positions of every step (rows are packed). Checks on
    the way what `train` checks before reading data: the model config, the optimizer and its schedule (a
    cosine schedule shorter than its warmup, ...)."""
    from t5lite.train.monitor import model_flops_per_step
    config = train.model_config()
    train.make_optimizer()
    if "targets" not in train.feature_lengths:
        raise UserError("TASK_FEATURE_LENGTHS needs a 'targets' length, e.g. {'inputs': 128, 'targets': 29}")
    steps, batch = train.train_steps, train.batch_size
    inputs, targets = train.lengths
    total, non_embedding = parameter_counts(config, train.decoder_only)
    per_step = model_flops_per_step(config, batch, inputs, targets, decoder_only=train.decoder_only)
    task = train.task if isinstance(train.task, str) else getattr(train.task, "name", str(train.task))  # a Mixture
    return {"task": task, "train_steps": steps, "batch_size": batch, "input_length": inputs,
            "target_length": targets, "eval_split": train.eval_split, "params": total,
            "params_non_embedding": non_embedding, "tokens": steps * batch * (inputs + targets),
            "target_tokens": steps * batch * targets, "flops_per_step": per_step, "flops": per_step * steps,
            "params_trainable": _card_params(train.adapter, config, train.decoder_only) if train.adapter else total,
            "init_checkpoint": train.init_checkpoint, "adapter": train.adapter is not None}


def _card_params(spec, config, decoder_only: bool) -> int:
    """Parameters a LoRA card trains (the base is frozen)."""
    import jax
    import numpy as np
    from t5lite.model import lora
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(lora.abstract_card(config, spec, decoder_only))))


def _has_split(task_name: str, split: str) -> bool:
    from t5lite.data import tasks
    return split.split("[")[0] in tasks.get(task_name).splits


def plan_point(sweep: Sweep, point: Point, root: str) -> Plan:
    """Parses the point's config; a point that cannot run gets `error` (one line) instead of failing the sweep.

    The held-out loss comes from the trainer's evaluation: a point whose config sets no
    eval_period gets `train.eval_period=<train_steps>` (one evaluation, at the end). A multi-stage
    point's plan is its last stage's run, with the runs before it as `upstream`.
    """
    if not point.runs:
        return _plan_run(point, sweep.gin_files, [*sweep.bindings, *point.bindings], os.path.join(root, point.name))
    plans = []
    for run in point.runs:
        # links first: a variant may still override them (train.teacher_checkpoint=None trains the student alone)
        links = [f"{key}={next(r for r in point.runs if r.stage == up).model_dir(root)!r}" for key, up in run.links]
        plans.append(_plan_run(point, run.gin_files, [*links, *run.bindings], run.model_dir(root), run.stage))
    *upstream, last = plans
    error = next((f"stage {p.stage}: {p.error}" for p in upstream if p.error), last.error)
    return dataclasses.replace(last, upstream=tuple(upstream), error=error)


def _plan_run(point: Point, gin_files, bindings: List[str], model_dir: str, stage: Optional[str] = None) -> Plan:
    from t5lite import gin_utils
    facts, config_text, error = {}, "", None
    try:
        train = _train_config(gin_files, bindings, model_dir)  # its settings checked (TRAIN_STEPS='x': one line)
        if train.eval_period is None and _has_split(train.task, train.eval_split):
            bindings.append(f"train.eval_period={train.train_steps}")
            gin_utils.parse(gin_files, bindings, model_dir)
        facts = _facts(train)
        config_text = gin_utils.config_text()
    except UserError as e:
        error = one_line(str(e))
    args = (*(f"--gin_file={f}" for f in gin_files), f"--model_dir={model_dir}", *(f"--gin.{b}" for b in bindings))
    return Plan(point, model_dir, args, facts, config_text, error, stage)


def plan_sweep(sweep: Sweep, root: str) -> List[Plan]:
    return [plan_point(sweep, point, root) for point in sweep.points()]


def command_line(plan: Plan) -> str:
    """One shell line that trains the point (what --print_commands prints)."""
    return shell_line(("t5lite", "train", *plan.args))


def shell_line(args) -> str:
    """Arguments as one shell line that reads well (gin's quoted values inside "...")."""
    return " ".join(_shell_quote(a) for a in args)


def _shell_quote(arg: str) -> str:
    """shlex.quote, but "..." around gin's single-quoted values when that is safe (it reads better)."""
    quoted = shlex.quote(arg)
    if quoted == arg or any(c in arg for c in '"$`\\!'):
        return quoted
    return f'"{arg}"'


def one_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else "unknown error"


# ---------------------------------------------------------------------------------------------
# State of a point on disk.
# ---------------------------------------------------------------------------------------------

def finished(plan: Plan) -> bool:
    """orbax renames a step directory into place only once it is complete."""
    steps = plan.facts.get("train_steps")
    return steps is not None and os.path.isdir(os.path.join(plan.model_dir, "checkpoints", str(steps)))


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: str, record: dict) -> None:
    write_text_atomic(path, json.dumps(record, indent=2))


def write_status(plan: Plan, status: str, error: Optional[str] = None, wall_s: Optional[float] = None,
                 **extra) -> dict:
    """Records the point's state; wall time adds up over the invocations that trained it (None: never
    trained by a sweep, e.g. launched elsewhere from --print_commands)."""
    os.makedirs(plan.model_dir, exist_ok=True)
    previous = read_json(os.path.join(plan.model_dir, STATUS_FILE)) or {}
    wall = previous.get("wall_s") if wall_s is None else (previous.get("wall_s") or 0.0) + wall_s
    record = {**previous, "status": status, "error": error, "wall_s": wall, **extra}
    _write_json(os.path.join(plan.model_dir, STATUS_FILE), record)
    return record


def _other_config(plan: Plan) -> bool:
    """True when model_dir already holds a run of another configuration (gin files or bindings changed)."""
    saved = os.path.join(plan.model_dir, "config.gin")
    if not os.path.isfile(saved):
        return False
    with open(saved) as f:
        text = f.read()
    strip = functools.partial(re.sub, r"(?m)^MODEL_DIR = .*$", "")  # the same root may be spelled differently
    return strip(text) != strip(plan.config_text)


# ---------------------------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------------------------

def error_line(output_lines) -> str:
    """The one line that says why a run failed: the CLI's `t5lite: error:` line, else a traceback's last line."""
    lines = [line.rstrip() for line in output_lines if line.strip()]
    for line in reversed(lines):
        if line.startswith("t5lite: error: "):
            return line[len("t5lite: error: "):]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line):
            return line
    return lines[-1] if lines else ""


class _Stop(Exception):
    """The sweep itself got SIGTERM: the running point has saved a checkpoint; stop here."""


def _run_logged(cmd: List[str], log_path: str, verbose: bool) -> Tuple[int, List[str]]:
    """Runs `cmd`, appending its output to log_path (and echoing it if verbose); returns (exit code, last lines).

    A SIGTERM to the sweep (a preempted VM, a scheduler) is passed on to the running point, which
    saves a checkpoint and exits; then _Stop is raised so no further point starts.
    """
    tail = collections.deque(maxlen=200)
    stopping, running = [], []

    def forward(signum, frame):
        stopping.append(signum)
        for proc in running:
            proc.send_signal(signum)

    try:
        previous = signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread: no forwarding
        previous = None
    try:
        with open(log_path, "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace")
            running.append(proc)
            if stopping:  # the signal came while starting it
                proc.send_signal(signal.SIGTERM)
            try:
                for line in proc.stdout:
                    log.write(line)
                    tail.append(line)
                    if verbose:
                        sys.stderr.write(line)
                returncode = proc.wait()
            except KeyboardInterrupt:  # the child got the terminal's SIGINT too: let it finish its exit
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if stopping:
        raise _Stop()
    return returncode, list(tail)


def _describe_exit(returncode: int, tail: List[str]) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return error_line(tail) or f"exit code {returncode}"


def _task_metrics(plan: Plan, python: str, max_examples: int, verbose: bool) -> Optional[str]:
    """Decodes the validation split with the final checkpoint (`t5lite eval`); returns an error line or None."""
    from t5lite.data import tasks
    path = os.path.join(plan.model_dir, TASK_METRICS_FILE)
    task = tasks.get(plan.facts["task"])
    if os.path.isfile(path) or not isinstance(task, tasks.Task) or not task.metrics:
        return None
    cmd = [python, "-m", "t5lite.cli", "eval", "--checkpoint", plan.model_dir, "--task", plan.facts["task"],
           "--split", plan.facts["eval_split"], "--max_examples", str(max_examples),
           "--input_length", str(plan.facts["input_length"]), "--max_decode_length", str(plan.facts["target_length"])]
    returncode, tail = _run_logged(cmd, os.path.join(plan.model_dir, LOG_FILE), verbose)
    results = _last_json_object(tail) if returncode == 0 else None
    if results is None:
        return _describe_exit(returncode, tail) or "t5lite eval printed no result"
    _write_json(path, results)
    return None


def metric_of(score: dict, task: str) -> str:
    """[score] metric: one name for every task, or a table task -> name."""
    metric = score["metric"]
    return metric[task] if isinstance(metric, dict) else metric


def _score(plan: Plan, score: dict, python: str, verbose: bool) -> Optional[str]:
    """Decodes each of the score's tasks with the final checkpoint (`t5lite eval`; a LoRA run: its base plus
    the card) into SCORE_FILE, once; returns an error line or None."""
    path = os.path.join(plan.model_dir, SCORE_FILE)
    results = read_json(path) or {}
    for task in score["tasks"]:
        if task in results:
            continue
        checkpoint = (["--checkpoint", plan.facts["init_checkpoint"], "--card", plan.model_dir]
                      if plan.facts.get("adapter") else ["--checkpoint", plan.model_dir])
        cmd = [python, "-m", "t5lite.cli", "eval", *checkpoint, "--task", task,
               "--split", score.get("split", "validation"), "--max_examples", str(score.get("max_examples", 200)),
               "--input_length", str(score.get("input_length", plan.facts["input_length"])),
               "--max_decode_length", str(score.get("max_decode_length", plan.facts["target_length"]))]
        returncode, tail = _run_logged(cmd, os.path.join(plan.model_dir, LOG_FILE), verbose)
        result = _last_json_object(tail) if returncode == 0 else None
        if result is None:
            return _describe_exit(returncode, tail) or "t5lite eval printed no result"
        if metric_of(score, task) not in result:
            return f"t5lite eval of {task} gave no {metric_of(score, task)!r} (it gave {', '.join(sorted(result))})"
        results[task] = result
        _write_json(path, results)
    return None


def _last_json_object(lines) -> Optional[dict]:
    """The result line of `t5lite eval` (a JSON object), even when log lines follow it."""
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _say(text: str) -> None:
    print(text, flush=True)  # progress of a long sweep, also when stdout is a file


def _train(plan: Plan, python: str, verbose: bool, say) -> str:
    """Trains (or resumes) the point in a `t5lite train` subprocess; returns done / failed / interrupted."""
    os.makedirs(plan.model_dir, exist_ok=True)
    _write_json(os.path.join(plan.model_dir, POINT_FILE), point_record(plan))
    log = os.path.join(plan.model_dir, LOG_FILE)
    say(f"  training ({plan.facts['train_steps']} steps; log {log})")
    start = time.perf_counter()
    try:
        returncode, tail = _run_logged([python, "-m", "t5lite.cli", "train", *plan.args], log, verbose)
    except (_Stop, KeyboardInterrupt):
        write_status(plan, "interrupted", "stopped before the last step; run the sweep again to resume",
                     time.perf_counter() - start)
        raise
    wall = time.perf_counter() - start
    if returncode == 0 and finished(plan):
        write_status(plan, "done", None, wall)
        say(f"  done in {wall:.0f} s")
        return "done"
    if returncode == 0:  # the trainer saved and returned early: SIGTERM from outside the sweep
        write_status(plan, "interrupted", "stopped before the last step (preempted?)", wall)
        say("  interrupted before the last step; run the sweep again to resume")
        return "interrupted"
    error = _describe_exit(returncode, tail)
    write_status(plan, "failed", error, wall, returncode=returncode)
    say(f"  FAILED: {error}")
    return "failed"


def run_point(plan: Plan, *, python: str = sys.executable, skip_failed: bool = False, task_metrics: bool = False,
              max_examples: int = 200, verbose: bool = False, say=_say, score: Optional[dict] = None) -> str:
    """Brings one point to `done` if it can; returns what happened: done / skipped / failed / interrupted.

    A finished point (its final checkpoint exists) is skipped; any other is trained, resuming
    from its last checkpoint. `python` is the interpreter of the subprocesses.
    """
    refusal = plan.error
    if refusal is None and _other_config(plan):
        refusal = (f"{plan.model_dir} holds a run of another configuration (the gin files or bindings changed); "
                   "use a new --root or delete that directory")
    if refusal:
        write_status(plan, "failed", refusal)
        say(f"  cannot run: {refusal}")
        return "failed"
    status = (read_json(os.path.join(plan.model_dir, STATUS_FILE)) or {}).get("status")
    if finished(plan):
        outcome = "skipped"
        if status != "done":  # e.g. trained from a --print_commands line elsewhere
            write_status(plan, "done")
        say("  already trained")
    elif status == "failed" and skip_failed:
        say("  skipped: it failed before (--skip_failed)")
        return "failed"
    else:
        outcome = _train(plan, python, verbose, say)
        if outcome != "done":
            return outcome
    if task_metrics:
        error = _task_metrics(plan, python, max_examples, verbose)
        if error:
            write_status(plan, "done", None, task_metrics_error=error)
            say(f"  task metrics failed: {error}")
    if score:
        error = _score(plan, score, python, verbose)
        write_status(plan, "done", None, score_error=error)
        if error:
            say(f"  scoring failed: {error}")
    return outcome


def point_record(plan: Plan) -> dict:
    p = plan.point
    return {"name": p.name, "values": dict(p.values), "seed": p.seed, "held_out": p.held_out,
            "command": command_line(plan), "facts": plan.facts}


def _run_upstream(plan: Plan, stages_done: dict, say, options: dict) -> Optional[str]:
    """Brings the stages a multi-stage point starts from to `done`, each shared run once per sweep; returns why
    one did not finish, or None."""
    upstream_options = {k: v for k, v in options.items() if k not in ("task_metrics", "score")}
    for up in plan.upstream:
        if up.model_dir not in stages_done:
            say(f"  stage {up.stage}: {up.model_dir}")
            stages_done[up.model_dir] = run_point(up, say=lambda text: say("  " + text), **upstream_options)
        if stages_done[up.model_dir] not in ("done", "skipped"):
            why = up.error or f"{stages_done[up.model_dir]}; see {os.path.join(up.model_dir, LOG_FILE)}"
            return f"stage {up.stage} did not finish ({why})"
    if plan.stage:
        say(f"  stage {plan.stage}: {plan.model_dir}")
    return None


def all_runs(plans: List[Plan]) -> List[Plan]:
    """Every run of the sweep once, in the order it trains (a shared stage before the first point needing it)."""
    seen, out = set(), []
    for plan in plans:
        for run in (*plan.upstream, plan):
            if run.model_dir not in seen:
                seen.add(run.model_dir)
                out.append(run)
    return out


def run_sweep(plans: List[Plan], root: str, say=_say, **options) -> collections.Counter:
    """Runs every point in order (see run_point); returns how many were done / skipped / failed / interrupted."""
    os.makedirs(root, exist_ok=True)
    _write_json(os.path.join(root, "sweep.json"), {"points": [point_record(p) for p in plans]})
    counts, stages_done = collections.Counter(), {}
    for i, plan in enumerate(plans, 1):
        say(f"[{i}/{len(plans)}] {plan.point.name}")
        try:
            failed = _run_upstream(plan, stages_done, say, options)
            if failed:
                write_status(plan, "failed", failed)
                say(f"  cannot run: {failed}")
            outcome = "failed" if failed else run_point(plan, say=say, **options)
            stages_done[plan.model_dir] = outcome  # a point's last stage may start another's (a base and its tuning)
            counts[outcome] += 1
        except _Stop:
            say("SIGTERM: the running point saved a checkpoint; run the same sweep command again to resume")
            counts["interrupted"] += 1
            break
    return counts
