"""Ahead-of-time compilation of a run for a TPU topology, on any host: does it fit, and what does it cost?

With libtpu installed (`pip install 't5lite[tpu]'`), jax describes TPU slices without having them
(`jax.experimental.topologies`) and XLA:TPU compiles for them here. `compile_run(train,
topology)` builds the run's real steps from its TrainConfig (t5lite.train.run.build_steps:
model, optimizer, mesh, partition rules, microbatches, remat, scan), compiles the train, eval and
decode programs with abstract sharded inputs, and reports per chip: memory against HBM (fits or
not), FLOPs against the analytic model count, an MFU upper bound, collectives, and what XLA warned.
"""

import contextlib
import dataclasses
import glob
import os
import re
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5lite.data import packing
from t5lite.errors import UserError
from t5lite.model import T5Config, lora, unscan_params
from t5lite.compile import budget, program_stats
from t5lite.train import partitioning
from t5lite.train.monitor import model_flops_per_step, peak_flops_per_device
from t5lite.train.config import TrainConfig
from t5lite.train.memory import largest_batch
from t5lite.train.run import build_steps

GIB = 2 ** 30

# ---------------------------------------------------------------------------------------------
# TPU topologies. Accelerator-type names count TensorCores: v4 and v5p chips have two (one jax
# device per chip, "megacore"), so v4-128 and v5p-256 are 64 and 128 chips; v5e and v6e have one.
# HBM per chip and bandwidth are Cloud TPU's published figures.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
    libtpu_name: str  # the topology prefix libtpu knows ('v5' is v5p)
    dims: int  # 2-D torus (v5e, v6e) or 3-D (v4, v5p)
    cores_per_chip: int
    hbm_gib: float
    hbm_gb_per_s: float


CHIPS = {"v4": Chip("v4", 3, 2, 32, 1228), "v5e": Chip("v5e", 2, 1, 16, 819),
         "v5p": Chip("v5", 3, 2, 95, 2765), "v6e": Chip("v6e", 2, 1, 32, 1640)}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A single TPU slice: e.g. 'v5e-64' is v5e chips in an 8x8 torus."""

    name: str
    chip: str
    shape: tuple

    @property
    def num_chips(self) -> int:
        return int(np.prod(self.shape))

    @property
    def hbm_bytes(self) -> int:
        return int(CHIPS[self.chip].hbm_gib * GIB)

    @property
    def libtpu_name(self) -> str:
        return f"{CHIPS[self.chip].libtpu_name}:{'x'.join(map(str, self.shape))}"


def _slice_shape(chip: Chip, num_chips: int) -> tuple:
    """Cloud TPU's default slice shape: from 2x2(x1), double the smallest dim (the last of equals)."""
    shape = [2, 2] + [1] * (chip.dims - 2)
    if num_chips == 1:
        return (1,) * chip.dims
    while int(np.prod(shape)) < num_chips:
        smallest = min(shape)
        shape[max(i for i, d in enumerate(shape) if d == smallest)] *= 2
    if int(np.prod(shape)) != num_chips:
        raise ValueError(num_chips)
    return tuple(shape)


def parse_topology(name: str) -> Topology:
    """'v5e-64', 'v4-128', 'v5p-256', 'v6e-16' (Cloud TPU accelerator types) or 'v5e:4x4', 'v4:2x2x4'."""
    usage = ("use an accelerator type like v5e-64, v4-128, v5p-256, v6e-16 or a shape like v5e:8x8, "
             f"v4:4x4x4 (chips: {', '.join(CHIPS)})")
    match = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
    chip_name = _ALIASES.get(match.group(1), match.group(1)) if match else None
    if chip_name not in CHIPS:
        raise UserError(f"unknown TPU topology {name!r}; {usage}")
    chip = CHIPS[chip_name]
    if match.group(3):
        shape = tuple(int(d) for d in match.group(3).split("x"))
        if len(shape) != chip.dims or min(shape) < 1:
            raise UserError(f"TPU topology {name!r}: {chip_name} slices are {chip.dims}-D; {usage}")
        return Topology(name, chip_name, shape)
    cores = int(match.group(2))
    try:
        if cores % chip.cores_per_chip:
            raise ValueError(cores)
        return Topology(name, chip_name, _slice_shape(chip, cores // chip.cores_per_chip))
    except ValueError:
        raise UserError(f"TPU topology {name!r}: {cores} is not a {chip_name} slice size (a power of two number of "
                        f"{'TensorCores' if chip.cores_per_chip > 1 else 'chips'}); give the shape instead, "
                        f"e.g. {chip_name}:4x4{'x12' if chip.dims == 3 else ''}") from None


def topology_devices(topology: Topology) -> List:
    """The slice's jax devices (compile-only: nothing runs on them)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling never uses a chip: no host-wide lock
    from jax.experimental import topologies
    chip = CHIPS[topology.chip]
    bounds = tuple(min(2, d) for d in topology.shape[:2]) + (1,)
    wrap = (tuple(min(topology.shape) >= 4 for _ in topology.shape) if chip.dims == 3  # full cubes are tori
            else tuple(d == 16 for d in topology.shape) + (False,))
    kwargs = dict(chip_config_name="megacore") if chip.cores_per_chip == 2 else {}
    try:
        with _captured_stderr():  # libtpu's start-up chatter about the (absent) local TPU
            return list(topologies.get_topology_desc(platform="tpu", topology_name=topology.libtpu_name,
                                                     chips_per_host_bounds=bounds, num_slices=1, wrap=wrap,
                                                     **kwargs).devices)
    except RuntimeError as e:
        if "not installed" in str(e):
            raise UserError("compiling for TPU needs libtpu: pip install 't5lite[tpu]' (or 'jax[tpu]')") from None
        raise UserError(f"TPU topology {topology.name!r} ({topology.libtpu_name}): {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------
# What XLA logs while compiling. libtpu writes its log (the SPMD partitioner's warnings among
# it) to TPU_LOG_DIR (default /tmp/tpu_logs), one file per process; other C++ code writes to fd 2.
# ---------------------------------------------------------------------------------------------

_WARNING_KINDS = {"involuntary_full_rematerialization": "Involuntary full rematerialization",
                  "memory_rematerialization": "by rematerialization"}
_LOG_LINE = re.compile(r"^[WE]\d{4} ")
# Warnings every TPU compile logs here, about libtpu itself rather than the program.
_ROUTINE = ("Collective matmul V1 is enabled", "Module contains sdy shardings", "slow barrier", "0-iteration loop",
            "log function has NOT been set", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "InitGoogle",
            "lowering_emitter.cc", "slow_operation_alarm.cc")


def _libtpu_logs() -> List[str]:
    directory = os.environ.get("TPU_LOG_DIR", "/tmp/tpu_logs")
    return glob.glob(os.path.join(directory, f"*.log.INFO.*.{os.getpid()}"))


@contextlib.contextmanager
def _captured_stderr():
    """Sends fd 2 (C++ logging) to a temporary file; yields a list that receives its text."""
    sys.stderr.flush()
    saved = os.dup(2)
    captured: List[str] = []
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode("utf-8", "replace"))


@contextlib.contextmanager
def compiler_log():
    """Yields a list that receives the warning and error lines XLA logged inside the block."""
    offsets = {path: os.path.getsize(path) for path in _libtpu_logs()}
    lines: List[str] = []
    with _captured_stderr() as stderr:
        try:
            yield lines
        finally:
            texts = list(stderr)
            for path in _libtpu_logs():
                with open(path, "rb") as f:
                    f.seek(offsets.get(path, 0))
                    texts.append(f.read().decode("utf-8", "replace"))
            lines += [line for text in texts for line in text.splitlines() if _LOG_LINE.match(line)]


def _warnings(lines: List[str]) -> dict:
    """Counts of the warnings that cost memory or bandwidth, and the distinct warning lines."""
    counts = {key: sum(pattern in line for line in lines) for key, pattern in _WARNING_KINDS.items()}
    distinct = list(dict.fromkeys(re.sub(r"^\S+ \S+\s+\d+ ", "", line)[:400] for line in lines
                                  if not any(routine in line for routine in _ROUTINE)))
    return {**counts, "lines": distinct[:20]}


# ---------------------------------------------------------------------------------------------
# Compiling one program.
# ---------------------------------------------------------------------------------------------

def _bytes(text: str) -> Optional[float]:
    number = re.fullmatch(r"([\d.]+)([KMGT]?)i?B?", text)
    return float(number.group(1)) * 1024 ** " KMGT".index(number.group(2) or " ") if number else None


def _out_of_memory(message: str, hbm_bytes: int) -> Optional[dict]:
    """XLA:TPU refuses a program that does not fit: its message names what it needed and had."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    sizes = [_bytes(s) for s in re.findall(r"\b([\d.]+[KMGT]i?B?)\b", message)]
    sizes = [s for s in sizes if s]
    return {"fits": False, "required": sizes[0] if sizes else None,
            "hbm_usable": sizes[1] if len(sizes) > 1 else None, "hbm": hbm_bytes,
            "message": message.strip().splitlines()[0][:500]}


def _memory(compiled, hbm_bytes: int) -> dict:
    """Bytes per chip. `total` is XLA's peak of live buffers (arguments, outputs and the temporaries
    live at the worst point; below arguments + temporaries, which are not all live at once) plus code."""
    stats = compiled.memory_analysis()
    memory = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
              "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
              "code": stats.generated_code_size_in_bytes, "peak": stats.peak_memory_in_bytes}
    memory["total"] = memory["peak"] + memory["code"]
    return {**memory, "hbm": hbm_bytes, "fits": memory["total"] <= hbm_bytes}


def compile_program(traced: Callable[[], "jax.stages.Traced"], context, hbm_bytes: int, num_chips: int,
                    analytic_flops: Optional[float], peak_flops: float, hlo_path: Optional[str] = None) -> dict:
    """Traces, lowers and compiles one program for the topology -> its report (see compile_run)."""
    start = time.perf_counter()
    with context():
        trace = traced()
        jaxpr_flops = program_stats.matmul_flops(trace.jaxpr) / num_chips
        lowered = trace.lower()
    with compiler_log() as log:
        try:
            compiled = lowered.compile()
        except Exception as e:  # XLA reports an over-budget program as a runtime error
            compiled, error = None, e
    report = {"compiled": compiled is not None, "compile_seconds": round(time.perf_counter() - start, 1),
              "warnings": _warnings(log)}
    if compiled is None:
        memory = _out_of_memory(str(error), hbm_bytes)
        if memory is None:
            raise error
        return {**report, "memory": memory}
    report["memory"] = _memory(compiled, hbm_bytes)
    hlo = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(hlo)
    xla_flops = float((compiled.cost_analysis() or {}).get("flops", 0.0))
    executed = max(jaxpr_flops, xla_flops)  # both are lower bounds on the FLOPs one chip executes
    report["flops"] = {"per_chip": executed, "xla_cost_analysis_per_chip": xla_flops,
                       "traced_matmuls_per_chip": jaxpr_flops, "analytic_per_chip": analytic_flops,
                       "compute_seconds_at_peak": executed / peak_flops,
                       "mfu_upper_bound": (min(1.0, analytic_flops / executed) if analytic_flops and executed
                                           else None)}
    report["collectives"] = program_stats.collectives(hlo)
    return report


# ---------------------------------------------------------------------------------------------
# The run's programs.
# ---------------------------------------------------------------------------------------------

def abstract_batch(batch_size: int, feature_lengths: Dict[str, int], mesh, rules, *, decoder_only: bool = False,
                   pack: bool = True, prefix_lm: bool = False) -> Dict[str, jax.ShapeDtypeStruct]:
    """The train batch the data pipeline would feed: the feature converter's features and lengths."""
    lengths = packing.row_lengths(feature_lengths, decoder_only)
    row = packing.pad_example({key: np.ones([1], np.int32) for key in lengths}, lengths)
    features = packing.to_model_features(row, decoder_only, pack, prefix_lm)
    sharding = partitioning.batch_sharding(mesh, rules)
    return {name: jax.ShapeDtypeStruct((batch_size,) + value.shape, jnp.int32, sharding=sharding)
            for name, value in features.items()}


def _decode_program(steps, params, decoder_only: bool, batch: int, input_length: int, max_decode_length: int,
                    method: str, num_beams: int):
    """`generate` on the abstract params; a card run's program serves its card (a one-card table, as
    `infer --card` builds it), a plain run's the model alone."""
    from t5lite.infer import decoding
    replicated = jax.sharding.NamedSharding(steps.mesh, jax.sharding.PartitionSpec())
    inputs = jax.ShapeDtypeStruct((batch, input_length), jnp.int32,
                                  sharding=partitioning.batch_sharding(steps.mesh, steps.rules))
    seed = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    cards, card_spec = (None, None, None), None
    if steps.card is not None:
        def one_card_table(card):  # lora.stack_cards' layout: cards stacked unscanned, then in the model's layout
            return lora.in_layout(jax.tree.map(lambda x: x[None], unscan_params(card)), steps.config)

        table = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                             jax.eval_shape(one_card_table, steps.card.abstract_state.params))
        cards = (table, jax.ShapeDtypeStruct((1,), jnp.float32, sharding=replicated),
                 jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=replicated))
        card_spec = steps.card.spec
    return lambda: decoding._generate.trace(
        steps.config, params, inputs, seed, *cards, max_decode_length=max_decode_length, method=method,
        num_beams=num_beams, length_penalty=1.0, length_penalty_style="hf", early_stopping=True, temperature=1.0,
        top_k=0, top_p=1.0, decoder_only=decoder_only, card_spec=card_spec)


def kv_cache_bytes(config: T5Config, batch: int, input_length: int, max_decode_length: int,
                   decoder_only: bool = False) -> int:
    """Global bytes of the decode cache: self-attention keys + values over the decoded positions
    (and a decoder-only prompt), plus the encoder's cross-attention keys + values."""
    per_position = 2 * config.num_decoder_layers * config.num_heads * config.head_dim * jnp.dtype(config.dtype).itemsize
    self_positions = max_decode_length + 1 + (input_length if decoder_only else 0)
    cross_positions = 0 if decoder_only else input_length
    return int(batch * per_position * (self_positions + cross_positions))


def compile_run(train: TrainConfig, topology: Topology, *, programs=("train", "eval", "decode"),
                batch_size: Optional[int] = None, decode_batch: Optional[int] = None,
                decode_input_length: Optional[int] = None, max_decode_length: Optional[int] = None,
                decode_method: str = "greedy", num_beams: int = 4, hlo_dir: Optional[str] = None) -> dict:
    """Compiles the run that `train` (e.g. from gin) describes for `topology`; `batch_size` overrides its batch.

    Returns a JSON-able dict: the setting (topology, mesh, rules, batch, model) and for each
    program its `memory` (bytes per chip; `fits`), `flops` (per chip: executed, analytic, the
    MFU upper bound analytic / executed), `collectives` (by kind, bytes per chip per step) and
    `warnings` (counts of XLA's involuntary-rematerialization and memory-rematerialization
    warnings, and the distinct warning lines). A run with `train.adapter` (a LoRA card) compiles the
    card's programs: the base is an input of each, only the card has gradients and optimizer state.
    """
    unknown = sorted(set(programs) - {"train", "eval", "decode"})
    if unknown:
        raise UserError(f"unknown program(s) {unknown}; choose from train, eval, decode")
    train = train.replace(batch_size=int(batch_size or train.batch_size))
    config, decoder_only, batch_size = train.model_config(), train.decoder_only, train.batch_size
    lengths = dict(train.feature_lengths)
    devices = topology_devices(topology)
    steps = build_steps(train, config, train.make_loss(), devices=devices, teacher_arrays=False)
    mesh, rules = steps.mesh, steps.rules
    batch = abstract_batch(batch_size, lengths, mesh, rules, decoder_only=decoder_only, pack=train.pack,
                           prefix_lm=config.decoder_only_prefix_lm)
    state = partitioning.abstract_train_state(config, steps.optimizer, steps.shardings, decoder_only)
    card = steps.card  # an adapter-card run: programs of (card state, frozen base, batch)
    peak = peak_flops_per_device(devices[0].device_kind)
    inputs_length, targets_length = lengths.get("inputs", 0), lengths["targets"]

    def analytic(batch: int, training: bool) -> float:
        flops = model_flops_per_step(config, batch, inputs_length, targets_length, decoder_only=decoder_only,
                                     training=training, frozen_base=card is not None)
        if training and steps.teacher:  # a distillation step also runs the teacher forward (as train() counts it)
            flops += model_flops_per_step(steps.teacher.config, batch, inputs_length, targets_length,
                                          decoder_only=decoder_only, training=False)
        return flops / topology.num_chips

    def under_mesh():
        return _both(jax.set_mesh(mesh), nn.logical_axis_rules(rules))

    report = {"topology": topology.name, "slice": topology.libtpu_name, "chips": topology.num_chips,
              "device_kind": devices[0].device_kind, "hbm_per_chip": topology.hbm_bytes,
              "peak_flops_per_chip": peak, "mesh": dict(mesh.shape), "rules": _rules_name(rules),
              "batch_size": batch_size, "feature_lengths": lengths,
              "num_microbatches": train.num_microbatches, "optimizer": train.optimizer,
              "model": {"emb_dim": config.emb_dim, "layers": [config.num_encoder_layers, config.num_decoder_layers],
                        "vocab_size": config.vocab_size, "dtype": config.dtype, "scan_layers": config.scan_layers,
                        "remat_policy": config.remat_policy},
              "programs": {}}
    if card is not None:
        base_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
        report["adapter"] = {**card.spec.to_dict(), "params": card.num_params, "base_params": base_params}
    hlo = (lambda name: os.path.join(hlo_dir, f"{name}.hlo.txt")) if hlo_dir else (lambda name: None)
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
    common = dict(context=under_mesh, hbm_bytes=topology.hbm_bytes, num_chips=topology.num_chips, peak_flops=peak)
    if card is None:
        train_program = lambda: steps.train_step.trace(state, batch)  # noqa: E731
        eval_program = lambda: steps.eval_step.trace(state.params, batch)  # noqa: E731
    else:
        train_program = lambda: card.train_step.trace(card.abstract_state, state.params, batch)  # noqa: E731
        eval_program = lambda: card.eval_step.trace(card.abstract_state.params, state.params, batch)  # noqa: E731
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_per_chip = sum(np.prod(x.shape) * x.dtype.itemsize for x in batch.values()) / batch_ways

    def with_budget(program: dict, training: bool) -> dict:
        """The collectives and state memory the program needs at least (t5lite/compile/budget.py)."""
        if card is None and program["compiled"]:  # a card step's budget is not modelled
            program["budget"] = budget.plan(program, state, dict(mesh.shape), config, batch_size, lengths,
                                            batch_per_chip, num_microbatches=train.num_microbatches,
                                            training=training, decoder_only=decoder_only)
        return program

    if "train" in programs:
        report["programs"]["train"] = with_budget(compile_program(
            train_program, analytic_flops=analytic(batch_size, True), hlo_path=hlo("train"), **common), True)
    if "eval" in programs:
        report["programs"]["eval"] = with_budget(compile_program(
            eval_program, analytic_flops=analytic(batch_size, False), hlo_path=hlo("eval"), **common), False)
    if "decode" in programs:
        serve = int(decode_batch or batch_size)
        length = int(decode_input_length or inputs_length or targets_length)
        decode_length = int(max_decode_length or targets_length)
        data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if serve % data_shards:
            raise UserError(f"decode batch {serve} is not divisible by the {data_shards} data x fsdp shards; "
                            f"use a multiple of {data_shards}")
        program = _decode_program(steps, state.params, decoder_only, serve, length, decode_length, decode_method,
                                  num_beams)
        decode = compile_program(program, analytic_flops=None, hlo_path=hlo("decode"), **common)
        beams = num_beams if decode_method == "beam" else 1
        decode["setting"] = {"batch": serve, "input_length": length, "max_decode_length": decode_length,
                             "method": decode_method, "beams": beams}
        decode["kv_cache_per_chip"] = kv_cache_bytes(config, serve * beams, length, decode_length,
                                                     decoder_only) // data_shards
        report["programs"]["decode"] = decode
    return report


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


def _rules_name(rules) -> str:
    return next((name for name, value in partitioning.RULE_SETS.items() if value == rules), "custom")


def search_batch(train: TrainConfig, topology: Topology, start: int, max_compiles: int = 8) -> dict:
    """The largest global batch whose train step fits the topology (a multiple of data x fsdp x microbatches)."""
    def fits(batch: int) -> bool:
        return compile_run(train, topology, programs=("train",), batch_size=batch)["programs"]["train"][
            "memory"]["fits"]

    mesh = partitioning.make_mesh(*train.mesh_shape, devices=topology_devices(topology))
    unit = mesh.shape["data"] * mesh.shape["fsdp"] * train.num_microbatches
    return largest_batch(fits, unit, start, max_compiles)


# ---------------------------------------------------------------------------------------------
# The report as text.
# ---------------------------------------------------------------------------------------------

def _gib(n) -> str:
    return "?" if n is None else f"{n / GIB:.2f} GiB"


def _program_lines(name: str, program: dict) -> List[str]:
    memory = program["memory"]
    verdict = "FITS" if memory["fits"] else "DOES NOT FIT"
    lines = [f"{name}: {verdict} in {_gib(memory['hbm'])} HBM per chip (compiled in {program['compile_seconds']} s)"]
    if not program["compiled"]:
        return lines + [f"  XLA: {memory['message']}"]
    lines.append(f"  memory/chip: total {_gib(memory['total'])} = peak of live buffers {_gib(memory['peak'])} + code "
                 f"{_gib(memory['code'])}; arguments {_gib(memory['arguments'])}, outputs {_gib(memory['outputs'])} "
                 f"(aliased to donated arguments {_gib(memory['aliased'])}), temporaries {_gib(memory['temporaries'])}")
    if "kv_cache_per_chip" in program:
        s = program["setting"]
        lines.append(f"  decode: {s['method']} x{s['beams']}, batch {s['batch']}, {s['input_length']} -> "
                     f"{s['max_decode_length']} tokens; KV cache {_gib(program['kv_cache_per_chip'])}/chip")
    flops = program["flops"]
    if flops["analytic_per_chip"]:
        lines.append(f"  FLOPs/chip/step: executed >= {flops['per_chip']:.3g} (traced matmuls "
                     f"{flops['traced_matmuls_per_chip']:.3g}, XLA {flops['xla_cost_analysis_per_chip']:.3g}); "
                     f"model {flops['analytic_per_chip']:.3g} -> MFU <= {100 * flops['mfu_upper_bound']:.1f}% "
                     f"(step >= {1e3 * flops['compute_seconds_at_peak']:.1f} ms at peak)")
    collectives = program["collectives"]
    kinds = ", ".join(f"{kind} {c['count']} ({_gib(c['bytes'])}"
                      + (f"; gathers of zero-padded shards {_gib(c['gathers'])})" if c.get("gathers") else ")")
                      for kind, c in collectives["by_kind"].items() if c["count"])
    lines.append(f"  collectives/chip/step: {kinds or 'none'}; total {_gib(collectives['bytes'])}")
    for op in collectives["largest"][:3]:
        lines.append(f"    {op['kind']} {op['shape']} x{op['runs']} = {_gib(op['bytes'])}  {op['source'][-90:]}")
    if "budget" in program:
        lines += budget.report_lines(program["budget"])
    warnings = program["warnings"]
    lines.append(f"  XLA warnings: involuntary full rematerialization {warnings['involuntary_full_rematerialization']}, "
                 f"memory rematerialization {warnings['memory_rematerialization']}, other {len(warnings['lines'])}")
    return lines + [f"    {line[:200]}" for line in warnings["lines"][:5]]


def format_report(report: dict) -> str:
    """compile_run's report for a terminal."""
    model = report["model"]
    mesh = " ".join(f"{axis}={size}" for axis, size in report["mesh"].items())
    lines = [f"{report['topology']} ({report['slice']}: {report['chips']} x {report['device_kind']}, "
             f"{_gib(report['hbm_per_chip'])} HBM, {report['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16 each)",
             f"mesh {mesh}, rules {report['rules']}; batch {report['batch_size']}, lengths {report['feature_lengths']}, "
             f"microbatches {report['num_microbatches']}, {report['optimizer']}; model d={model['emb_dim']} "
             f"layers={model['layers']} vocab={model['vocab_size']} {model['dtype']} scan={model['scan_layers']} "
             f"remat={model['remat_policy']}"]
    if "adapter" in report:
        card = report["adapter"]
        lines.append(f"adapter card: rank {card['rank']}, alpha {card['alpha']:g}, targets {', '.join(card['targets'])}: "
                     f"{card['params']:,} trainable params ({100 * card['params'] / card['base_params']:.3f} % of the "
                     f"base's {card['base_params']:,}, a frozen input of every program)")
    for name, program in report["programs"].items():
        lines += _program_lines(name, program)
    if "largest_batch" in report:
        search = report["largest_batch"]
        tried = ", ".join(f"{b}:{'fits' if ok else 'no'}" for b, ok in search["tried"].items())
        lines.append(f"largest global batch that fits: {search['largest']} ({'exact' if search['exact'] else 'bound'}; "
                     f"tried {tried})")
    return "\n".join(lines)
