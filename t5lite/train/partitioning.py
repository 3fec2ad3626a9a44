"""Device mesh, logical-axis rules and the shardings of train state and batches.

The only module that maps the model's logical axis names ('batch', 'embed', 'mlp', ...) to
mesh axes. The mesh has three axes:

    data    pure data parallelism: each group holds a full copy of the params
    fsdp    data parallelism whose groups also split params + optimizer state (ZeRO-3 style)
    tensor  model parallelism: splits the mlp / heads / vocab dims of each matmul

A batch is split over ('data', 'fsdp'). Rule sets follow T5X / MaxText: embed -> fsdp,
mlp / heads / kv_heads / vocab -> tensor, everything else (length, kv, layers, relpos buckets)
replicated. MoE experts go to fsdp (listed before embed, so an expert kernel [expert, embed,
mlp] is split by expert there); key/value heads that do not divide the tensor axis (e.g. one
multi-query head) are replicated by `_fit`.
A mesh axis is used at most once per array (flax resolves rules in order), so the activations
[batch, length, embed] keep batch on ('data', 'fsdp') and embed replicated.
"""

import logging
import os
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from t5lite.errors import UserError
from t5lite.model import T5Config, abstract_params, init_params
from t5lite.train.state import TrainState

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_MESH_AXES = ("data", "fsdp")

# Logical names that no rule set shards.
_REPLICATED = (("length", None), ("kv", None), ("relpos_buckets", None), ("layers", None))

DATA_PARALLEL = (("batch", BATCH_MESH_AXES), ("vocab", None), ("embed", None), ("mlp", None), ("heads", None),
                 ("kv_heads", None), ("expert", None)) + _REPLICATED
FSDP = (("batch", BATCH_MESH_AXES), ("expert", "fsdp"), ("embed", "fsdp"), ("vocab", None), ("mlp", None),
        ("heads", None), ("kv_heads", None)) + _REPLICATED
# ZeRO-3 over the whole batch grid of a 2-D (data x fsdp) mesh: params split data*fsdp ways, like FSDP over
# one axis of that size, but each gradient is reduce-scattered in two rings (over fsdp, then data;
# layers.sharded_grad): XLA:TPU lowers one reduce-scatter over more than 8 chips of a v5e slice as a
# full all-reduce plus a slice, twice the bytes.
FSDP_2D = (("batch", BATCH_MESH_AXES), ("expert", ("data", "fsdp")), ("embed", ("data", "fsdp")), ("vocab", None),
           ("mlp", None), ("heads", None), ("kv_heads", None)) + _REPLICATED
FSDP_TENSOR = (("batch", BATCH_MESH_AXES), ("vocab", "tensor"), ("mlp", "tensor"), ("heads", "tensor"),
               ("kv_heads", "tensor"), ("expert", "fsdp"), ("embed", "fsdp")) + _REPLICATED
RULE_SETS = {"data_parallel": DATA_PARALLEL, "fsdp": FSDP, "fsdp_2d": FSDP_2D, "fsdp_tensor": FSDP_TENSOR}

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Mesh and rules.
# ---------------------------------------------------------------------------------------------

def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1, "the rest".

    Axes are Auto (jax 0.10's jax.make_mesh defaults to Explicit, which rejects the sharded
    matmuls GSPMD handles); jax.make_mesh orders devices for the physical topology.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh sizes data={data}, fsdp={fsdp}, tensor={tensor} must be positive, "
                        "with at most one -1 (meaning: the remaining devices)")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise UserError(f"{len(devices)} devices are not divisible by the fixed mesh sizes (product {known}); "
                            "choose data/fsdp/tensor sizes whose product divides the device count")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise UserError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {int(np.prod(sizes))} "
                        f"devices but there are {len(devices)}; make the product equal the device count or use -1")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules_for(mesh: Mesh):
    """The default rule set: FSDP_TENSOR if tensor > 1, else FSDP if fsdp > 1, else DATA_PARALLEL."""
    if mesh.shape["tensor"] > 1:
        return FSDP_TENSOR
    if mesh.shape["fsdp"] > 1:
        return FSDP
    return DATA_PARALLEL


# ---------------------------------------------------------------------------------------------
# Shardings of params, optimizer state, train state and batches.
# ---------------------------------------------------------------------------------------------

def _fit(spec: P, shape: Sequence[int], mesh: Mesh, name: str) -> P:
    """Drops mesh axes from dims they do not divide (e.g. 6 heads over tensor=4), with a warning."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if dim % int(np.prod([mesh.shape[a] for a in names])):
            log.warning("%s: dim %d is not divisible by mesh axes %s; replicating that dim", name, dim, names)
            axes = None
        fitted.append(axes)
    return P(*fitted)


def param_shardings(boxed_params, mesh: Mesh, rules):
    """NamedShardings for a *boxed* params tree (e.g. t5lite.model.abstract_params(config))."""
    specs = nn.get_partition_spec(boxed_params)  # logical names per param
    shapes = nn.meta.unbox(boxed_params)
    flat_specs, tree = jax.tree.flatten(specs, is_leaf=lambda x: isinstance(x, P))
    flat_paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
    shardings = []
    for logical, (path, leaf) in zip(flat_specs, flat_paths):
        mesh_spec = nn.logical_to_mesh_axes(tuple(logical), rules)
        shardings.append(NamedSharding(mesh, _fit(mesh_spec, leaf.shape, mesh, jax.tree_util.keystr(path))))
    return jax.tree.unflatten(tree, shardings)


def _like_param(shape: tuple, param_shape: tuple, param_spec: P) -> P:
    """The spec of an optimizer leaf of `shape` that belongs to a param of `param_shape`."""
    spec = tuple(param_spec) + (None,) * (len(param_shape) - len(param_spec))
    if shape == param_shape:
        return P(*spec)
    if len(shape) == len(param_shape) - 1:  # a factored moment: the param minus one reduced dim
        for dropped in range(len(param_shape)):
            if param_shape[:dropped] + param_shape[dropped + 1:] == shape:
                return P(*(spec[:dropped] + spec[dropped + 1:]))
    return P()


def opt_state_shardings(abstract_opt_state, abstract_params, params_shardings, mesh: Mesh):
    """Shards each optimizer-state leaf like the parameter it belongs to.

    optax states hold trees shaped like the params (Adam's mu / nu, Adafactor's v, v_row,
    v_col), so a leaf whose key path *ends with* a parameter's (dict-key) path belongs to that
    param. Same shape: the param's sharding. One dim fewer (Adafactor's factored row / column
    second moments): the param's spec without the reduced dim. Anything else (step counts,
    unfactored placeholders of shape [1]) is replicated.
    """
    params_by_path = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                      jax.tree.leaves(params_shardings)):
        params_by_path[tuple(path)] = (tuple(leaf.shape), sharding.spec)

    def for_leaf(path, leaf):
        for start in range(len(path)):
            if tuple(path[start:]) in params_by_path:
                return NamedSharding(mesh, _like_param(tuple(leaf.shape), *params_by_path[tuple(path[start:])]))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(for_leaf, abstract_opt_state)


def _abstract_state(config: T5Config, optimizer, decoder_only: bool = False) -> TrainState:
    return jax.eval_shape(lambda: TrainState.create(init_params(config, jax.random.key(0), decoder_only), optimizer))


def abstract_train_state(config: T5Config, optimizer, shardings: TrainState,
                         decoder_only: bool = False) -> TrainState:
    """ShapeDtypeStructs of a TrainState carrying `shardings`: the restore target for orbax."""
    shapes = _abstract_state(config, optimizer, decoder_only)
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def state_shardings(config: T5Config, optimizer, mesh: Mesh, rules, decoder_only: bool = False) -> TrainState:
    """A TrainState of NamedShardings: params by logical axes, opt state like params, step replicated."""
    boxed = abstract_params(config, decoder_only)  # ShapeDtypeStructs boxed with logical names
    params = param_shardings(boxed, mesh, rules)
    abstract = _abstract_state(config, optimizer, decoder_only)
    opt_state = opt_state_shardings(abstract.opt_state, abstract.params, params, mesh)
    return TrainState(step=NamedSharding(mesh, P()), params=params, opt_state=opt_state)


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
    """Rows split over the mesh axes of the logical 'batch' axis (('data', 'fsdp') in every rule set)."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rules or rules_for(mesh)))


# ---------------------------------------------------------------------------------------------
# Sharded initialisation.
# ---------------------------------------------------------------------------------------------

def init_train_state(config: T5Config, optimizer, mesh: Mesh, rules, rng: jax.Array,
                     decoder_only: bool = False) -> TrainState:
    """A fresh TrainState created directly in its sharded layout.

    jit with out_shardings makes each device compute only its own shards, so a model that
    does not fit one device still initialises. Same rng -> same values on any mesh.
    """
    shardings = state_shardings(config, optimizer, mesh, rules, decoder_only)

    def init(key):
        return TrainState.create(init_params(config, key, decoder_only), optimizer)

    # No rules context: the dummy forward pass of init needs no activation constraints.
    return jax.jit(init, out_shardings=shardings)(rng)


# ---------------------------------------------------------------------------------------------
# Multi-host.
# ---------------------------------------------------------------------------------------------

def _multi_process_env() -> bool:
    """True when the environment says this run spans processes (explicit JAX, SLURM, MPI, TPU pod).

    Cloud TPU VMs expose their workers through metadata, not the environment: launch scripts
    set T5LITE_DISTRIBUTED=1 there and jax detects the rest.
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("T5LITE_DISTRIBUTED") == "1":
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if int(env.get(name, "1") or 1) > 1:
            return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")  # multi-host Cloud TPU slice


def maybe_initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None, **kwargs) -> bool:
    """Calls jax.distributed.initialize when the run spans processes; returns whether it did.

    Explicit arguments win, then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID;
    otherwise the environment decides (SLURM, Open MPI, GKE TPU, T5LITE_DISTRIBUTED=1 on TPU
    VMs) and jax auto-detects the rest. Call it before any
    other jax call.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ  # launch/gpu_multihost.sh sets these three
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if not explicit and not _multi_process_env():
        return False
    if explicit and (coordinator_address is None or num_processes is None or process_id is None):
        raise UserError("a multi-process run needs coordinator_address, num_processes and process_id together "
                        "(or none of them, to detect them from the cluster environment)")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, **kwargs)
    except ValueError as e:
        if "coordinator_address" not in str(e):
            raise
        # e.g. T5LITE_DISTRIBUTED=1 on a host that is not part of a cluster jax can detect
        raise UserError(f"this run is marked multi-process ({_multi_process_reason()}) but jax found no coordinator "
                        "address; on one host unset that variable, on a cluster set JAX_COORDINATOR_ADDRESS, "
                        "JAX_NUM_PROCESSES and JAX_PROCESS_ID") from None
    return True


def wants_distributed() -> bool:
    """Whether maybe_initialize_distributed would call jax.distributed.initialize."""
    env = os.environ
    return not jax.distributed.is_initialized() and (
        bool(env.get("JAX_COORDINATOR_ADDRESS")) or int(env.get("JAX_NUM_PROCESSES") or 1) > 1
        or _multi_process_env())


def _multi_process_reason() -> str:
    env = os.environ
    for name in ("T5LITE_DISTRIBUTED", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "TPU_WORKER_HOSTNAMES"):
        if env.get(name):
            return f"{name}={env[name]}"
    return "by the environment"


def process_batch_rows(mesh: Mesh, rules, batch_size: int) -> range:
    """The rows of a [batch_size] global batch that this process's devices hold: one contiguous range
    (the input pipeline materialises exactly these rows)."""
    indices = batch_sharding(mesh, rules).addressable_devices_indices_map((batch_size,)).values()
    rows = sorted({r for index in indices for r in range(*index[0].indices(batch_size))})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise UserError(f"this process's devices hold batch rows {rows}, not one contiguous block; order the "
                        "mesh devices by process (jax.make_mesh does) or use a mesh whose batch axes follow hosts")
    return range(rows[0], rows[-1] + 1)


def data_shards_of_rows(rows: range, batch_size: int, num_shards: int) -> range:
    """The virtual data shards whose blocks of batch_size / num_shards rows make up `rows`."""
    per_shard = batch_size // num_shards
    if rows.start % per_shard or len(rows) % per_shard:
        raise UserError(f"this process holds batch rows {rows.start}..{rows.stop - 1}, which do not align with "
                        f"{num_shards} data shards of {per_shard} rows; set train.data_shards to a multiple of the "
                        "process count that divides BATCH_SIZE")
    return range(rows.start // per_shard, rows.stop // per_shard)


def global_batch_from_local(local_batch, mesh: Mesh, rules=None, global_batch_size: Optional[int] = None):
    """This process's rows [B_local, ...] -> global jax.Arrays [B_global, ...] split over the batch axes.

    Each process passes the rows of its own devices (what a per-host data pipeline yields);
    the global batch size defaults to B_local x (number of processes holding distinct rows).
    """
    sharding = batch_sharding(mesh, rules)
    out = {}
    for name, local in local_batch.items():
        local = np.asarray(local)
        shape = None if global_batch_size is None else (global_batch_size,) + local.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, local, shape)
    return out
