"""What a compiled program does, read from its optimized HLO text and its jaxpr.

Two counts XLA's own `cost_analysis()` gets wrong for t5lite's programs, because it counts the
body of every while loop once (a `scan_layers` stack, the microbatch loop, a decode loop):

- `collectives(hlo_text)`: the collectives of the optimized (per-chip) HLO by kind, with their
  bytes per step: each op's result size times the trip count of the loops around it, and the bytes
  a ring implementation sends per chip (what t5lite/compile/budget.py's minimum counts).

XLA:TPU writes a reduce-scatter as a custom fusion named `all-reduce-scatter*` around an
`all-reduce` of the whole array and a `dynamic-slice` of this chip's part; its emitter
(`AllReduceScatterFusion`) sends reduce-scatter traffic, so such an all-reduce is counted as the
reduce-scatter it is, with the fusion's (sliced) result as its size.
- `matmul_flops(jaxpr)`: the FLOPs of every dot_general the traced program executes (scan bodies
  times their length, rematerialised forward passes included), summed over all chips.
"""

import collections
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_ITEMSIZE = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
             "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b(" + "|".join(_ITEMSIZE) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")  # a computation starts at column 0
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_RETURNS = re.compile(r"->\s*(.*?)\s*\{\s*$")  # a computation header's result shape
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_CALLEES = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations|called_computations)="
                      r"\{?(%[\w.\-]+(?:, %[\w.\-]+)*)\}?")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string: one array `bf16[2,512]{...}` or a tuple of them."""
    return sum(_ITEMSIZE[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
               for dtype, dims in _ARRAY.findall(shape))


def _computations(hlo_text: str, returns: Optional[Dict[str, str]] = None) -> Tuple[Dict[str, List[str]], str]:
    """{computation name: its instruction lines}, and the name of the ENTRY computation. `returns`,
    when given, receives {computation name: its result shape}."""
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line) if line and not line[0].isspace() else None
        if header:
            current = header.group(1)
            computations[current] = []
            entry = current if line.startswith("ENTRY") else entry
            result = _RETURNS.search(line)
            if returns is not None and result:
                returns[current] = result.group(1)
        elif current is not None and line.strip() and line.strip() != "}":
            computations[current].append(line)
    return computations, entry


def _trip_count(condition: List[str]) -> int:
    """A counted loop's condition is `counter < N`: N; 1 when unknown. jax's scan and fori_loop count in
    s32; XLA:TPU's windowed einsums (an all-gather or reduce-scatter decomposed into a loop of
    collective-permutes overlapped with slices of the matmul) count in u32."""
    constants = [int(c) for line in condition for c in re.findall(r"\b[su](?:32|64)\[\][^=]*constant\((\d+)\)", line)]
    compares_lt = any(" compare(" in line and "direction=LT" in line for line in condition)
    return constants[0] if compares_lt and len(constants) == 1 else 1


def _multipliers(computations: Dict[str, List[str]], entry: str) -> Dict[str, int]:
    """How many times each computation runs per execution of the program (loop bodies x trip count)."""
    calls = collections.defaultdict(list)  # caller -> [(callee, times per call)]
    for name, lines in computations.items():
        for line in lines:
            trips = 1
            if " while(" in line:
                condition = re.search(r"condition=%([\w.\-]+)", line)
                trips = _trip_count(computations.get(condition.group(1), [])) if condition else 1
            for group in _CALLEES.findall(line):
                for callee in re.findall(r"%([\w.\-]+)", group):
                    body = f"body=%{callee}" in line
                    calls[name].append((callee, trips if body else 1))
    runs: Dict[str, int] = collections.defaultdict(int)

    def visit(name: str, times: int, depth: int = 0) -> None:
        runs[name] += times
        if depth < 64:
            for callee, trips in calls.get(name, ()):
                visit(callee, times * trips, depth + 1)

    visit(entry, 1)
    return runs


def group_size(line: str) -> Optional[int]:
    """How many chips one collective's replica group holds (None when the line does not say)."""
    mesh = _MESH_GROUPS.search(line)
    if mesh:
        sizes = {name.strip("'"): int(size) for name, size in re.findall(r"('[^']+')=(\d+)", mesh.group(1))}
        return int(np.prod([sizes[name.strip("' ")] for name in mesh.group(2).split(",") if name.strip()]))
    iota = _IOTA_GROUPS.search(line)
    if iota:
        return int(iota.group(2))
    explicit = _LIST_GROUPS.search(line)
    return len(explicit.group(1).split(",")) if explicit else None


def ring_bytes(kind: str, result_bytes: float, n: Optional[int]) -> float:
    """Bytes one chip sends for a collective with `result_bytes` of result over a group of n chips,
    as a ring (bidirectional or not: the same bytes) implements it ("How to scale your model",
    ch. 3; the NCCL / XLA ring algorithms): all-gather (n-1)/n x the gathered array; reduce-scatter
    (n-1)/n x the input, i.e. (n-1) x its 1/n result; all-reduce = reduce-scatter + all-gather,
    2 (n-1)/n x the array; all-to-all (n-1)/n x the array; a permute sends its whole operand."""
    if not n or n <= 1:
        return 0.0 if n == 1 else float(result_bytes)
    return float(result_bytes) * {"all-gather": (n - 1) / n, "reduce-scatter": n - 1, "all-reduce": 2 * (n - 1) / n,
                                  "all-to-all": (n - 1) / n}.get(kind, 1.0)


def _zero_padded(name: str, defs: Dict[str, Tuple[str, str]], roots: Dict[str, str], depth: int = 0) -> bool:
    """Whether instruction `name` is a shard written into zeros (a dynamic-update-slice of a broadcast, or
    XLA:TPU's fusion of one: named so, or calling a computation whose ROOT is a dynamic-update-slice),
    looking through copies and bitcasts. `roots`: {computation: the opcode of its ROOT}."""
    opcode, args = defs.get(name, ("", ""))
    callee = re.search(r"calls=%([\w.\-]+)", args) if opcode == "fusion" else None
    if opcode == "dynamic-update-slice" or (opcode == "fusion" and "dynamic-update-slice_fusion" in name) or (
            callee is not None and roots.get(callee.group(1)) == "dynamic-update-slice"):
        return args.startswith("%broadcast")
    inner = re.match(r"%([\w.\-]+)", args)
    return (opcode in ("copy", "copy-start", "copy-done", "bitcast") and depth < 4 and inner is not None
            and _zero_padded(inner.group(1), defs, roots, depth + 1))


def collectives(hlo_text: str, top: int = 5) -> dict:
    """{'by_kind': {kind: {'count', 'bytes', 'sent'}}, 'bytes': total, 'sent': total, 'largest': [the `top`
    biggest ops]}.

    `count` is the number of distinct collective ops (an async op split over several fusions is
    one op: the same channel_id); `bytes` is per chip and per step: the result size of each op
    (the gathered buffer of an all-gather, the reduced one of an all-reduce, this chip's part of a
    reduce-scatter) times its runs; `sent` is what a ring sends per chip for them (`ring_bytes`).
    The all-reduce's `gathers` are the bytes of all-reduces that are gathers: every operand this
    chip's shard written into zeros (a dynamic-update-slice of a broadcast), which XLA:TPU emits
    for some gathers (of shards whose minor dims do not fill their tiles, and of t5_1_1_xl's attention
    kernels under fsdp_2d even when they do).
    """
    returns: Dict[str, str] = {}
    computations, entry = _computations(hlo_text, returns)
    runs = _multipliers(computations, entry)
    ops = {}  # (kind, channel or unique name) -> (bytes per run, runs, shape, source op, group size)
    gathers = set()  # keys of the all-reduces that gather zero-padded shards
    roots = {name: root.group(3) for name, lines in computations.items() for line in lines
             if line.lstrip().startswith("ROOT ") and (root := _INSTRUCTION.match(line))}
    for name, lines in computations.items():
        defs = {}  # instruction -> (opcode, its arguments)
        for line in lines:
            match = _INSTRUCTION.match(line)
            if match:
                defs[match.group(1)] = (match.group(3), match.group(4))
            if not match or match.group(3).removesuffix("-start") not in COLLECTIVES:
                continue
            kind = match.group(3).removesuffix("-start")
            shape = match.group(2)
            fused_scatter = kind == "all-reduce" and name.startswith("all-reduce-scatter") and name in returns
            if fused_scatter:
                kind, shape = "reduce-scatter", returns[name]  # XLA:TPU's reduce-scatter (module docstring)
            size = shape_bytes(shape) // (2 if match.group(3).endswith("-start") else 1)
            channel = re.search(r"channel_id=(\d+)", line)
            source = re.search(r'op_name="([^"]*)"', line)
            key = (kind, channel.group(1) if channel else match.group(1))
            if fused_scatter:  # each reduce-scatter fusion is one op (its clones reuse channel ids)
                key = (kind, name)
            operands = re.findall(r"%([\w.\-]+)", match.group(4).split(")")[0])
            if kind == "all-reduce" and operands and all(_zero_padded(o, defs, roots) for o in operands):
                gathers.add(key)
            previous = ops.get(key, (0, 0, "", "", None))
            ops[key] = (max(size, previous[0]), max(runs.get(name, 1), previous[1]),
                        previous[2] or _ARRAY.search(shape).group(0),
                        previous[3] or (source.group(1) if source else ""), previous[4] or group_size(line))
    by_kind = {kind: {"count": 0, "bytes": 0, "sent": 0.0} for kind in COLLECTIVES}
    by_kind["all-reduce"]["gathers"] = 0
    for key, (size, times, _, _, group) in ops.items():
        kind = key[0]
        by_kind[kind]["count"] += 1
        by_kind[kind]["bytes"] += size * times
        by_kind[kind]["sent"] += ring_bytes(kind, size, group) * times
        if key in gathers:
            by_kind[kind]["gathers"] += size * times
    largest = sorted(ops.items(), key=lambda item: -item[1][0] * item[1][1])[:top]
    return {"by_kind": by_kind, "bytes": sum(k["bytes"] for k in by_kind.values()),
            "sent": sum(k["sent"] for k in by_kind.values()),
            "largest": [{"kind": kind, "shape": shape, "runs": times, "bytes": size * times, "group": group,
                         "source": source} for (kind, _), (size, times, shape, source, group) in largest]}


# ---------------------------------------------------------------------------------------------
# FLOPs of the traced program.
# ---------------------------------------------------------------------------------------------

def _sub_jaxprs(eqn):
    """(jaxpr, times it runs) for each jaxpr nested in an equation (scan bodies run `length` times)."""
    times = int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(item, "jaxpr", item)  # ClosedJaxpr -> Jaxpr
            if hasattr(inner, "eqns"):
                yield inner, times


def matmul_flops(jaxpr) -> float:
    """2 * output elements * contracted size, summed over every dot_general the program runs.

    Branches of a `cond` are all counted (an upper bound; t5lite's steps have none); a
    `while_loop` body is counted once (its trip count is only known at run time).
    """
    total = 0.0
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        if eqn.primitive.name == "dot_general":
            (contract_lhs, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs_shape[d] for d in contract_lhs])
        for inner, times in _sub_jaxprs(eqn):
            total += times * matmul_flops(inner)
    return total
