"""Sharded training equals single-device training, and the params really are sharded.

pytest's process has one CPU device, so this file re-runs itself as a script in a subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax is imported). The
script trains the tiny model (with dropout) for 5 steps on 1 device and on the given meshes,
and prints JSON. XLA's CPU backend optimisations are turned off there: compiling is 3x faster
and every mesh, the 1-device reference included, runs under the same flags.
"""

import json
import os
import subprocess
import sys

import pytest

STEPS = 5
XLA_FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")


def _run_script(*meshes, overrides=None, step_kwargs=None) -> dict:
    """`overrides`: T5Config fields applied to the tiny model (an ablation variant); `step_kwargs`:
    make_train_step's (e.g. num_microbatches), the same on every mesh."""
    env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, JAX_PLATFORMS="cpu")
    arg = json.dumps([list(m) for m in meshes])
    proc = subprocess.run([sys.executable, __file__, arg, json.dumps(overrides or {}), json.dumps(step_kwargs or {})],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_losses_match(result, names):
    reference = result["1x1x1"]
    assert len(reference["losses"]) == STEPS and reference["losses"][-1] < reference["losses"][0]
    for name in names:
        for got, want in zip(result[name]["losses"], reference["losses"]):
            assert abs(got - want) <= 1e-5 * abs(want), (name, result[name]["losses"], reference["losses"])
        for got, want in zip(result[name]["grad_norms"], reference["grad_norms"]):
            assert abs(got - want) <= 1e-4 * abs(want), (name, result[name]["grad_norms"], reference["grad_norms"])
        got, want = result[name]["eval"], reference["eval"]
        assert abs(got["loss_sum"] - want["loss_sum"]) <= 1e-5 * want["loss_sum"], (name, got, want)
        assert got["weight_sum"] == want["weight_sum"] == 8 * 9 and abs(got["correct"] - want["correct"]) <= 1


def test_data_fsdp_tensor_mesh_matches_one_device():
    """(2, 2, 2) exercises all three axes at once: same losses, and params / moments sharded."""
    result = _run_script((2, 2, 2))
    _check_losses_match(result, ["2x2x2"])
    specs = result["2x2x2"]["specs"]
    assert specs["wi_0"] == ["fsdp", "tensor"]  # [embed, mlp]
    assert specs["wo"] == ["tensor", "fsdp"]  # [mlp, embed]
    assert specs["embedding"] == ["tensor", "fsdp"]  # [vocab, embed]
    assert specs["query"] == ["fsdp", "tensor"]  # [embed, heads x kv]: whole heads per tensor shard
    assert specs["logits_dense"] == ["fsdp", "tensor"]  # [embed, vocab]
    # Adafactor's factored moments of wi_0 [embed, mlp]: v_row [embed], v_col [mlp] keep their dim's axes.
    assert specs["v_row_wi_0"] == ["fsdp"] and specs["v_col_wi_0"] == ["tensor"]
    assert result["2x2x2"]["wi_0_shard_shape"] == [32, 64]  # each device holds 1/(fsdp * tensor) of [64, 128]


@pytest.mark.slow
def test_grouped_query_and_mixture_of_experts_model_matches_one_device():
    """RoPE + GQA (2 kv heads) + an MoE MLP (4 experts, every other layer, z-loss) trains alike on 1 and 8 devices."""
    result = _run_script((2, 2, 2), overrides=dict(position_scheme="rope", num_kv_heads=2, mlp="moe", num_experts=4,
                                                   moe_every=2, moe_router_z_loss_weight=1e-3))
    _check_losses_match(result, ["2x2x2"])  # the losses include the auxiliary losses, and fall
    for name in ("1x1x1", "2x2x2"):
        assert result[name]["aux_losses"][0] > 0
    specs = result["2x2x2"]["all_specs"]
    assert specs["decoder/layers_0/self_attention/key/kernel"] == ["fsdp", "tensor"]  # [embed, kv_heads x kv]
    assert specs["decoder/layers_1/mlp/expert/wi_0/kernel"] == ["fsdp", None, "tensor"]  # [expert, embed, mlp]
    assert specs["decoder/layers_1/mlp/router/kernel"] == [None, "fsdp"]  # [embed, expert]


@pytest.mark.slow
def test_fsdp_2d_microbatched_step_updates_params_like_one_device():
    """fsdp_2d rules on a 2 x 4 mesh (params split 8 ways, each gradient reduce-scattered over fsdp then
    data into sharded accumulators, t5lite/model/layers.sharded_grad), 2 microbatches: losses and every
    updated parameter equal one device's."""
    result = _run_script((2, 4, 1), step_kwargs={"num_microbatches": 2, "rules": "fsdp_2d"})
    _check_losses_match(result, ["2x4x1"])
    assert result["2x4x1"]["specs"]["wi_0"] == [["data", "fsdp"], None]
    want, got = result["1x1x1"]["param_norms"], result["2x4x1"]["param_norms"]
    assert want.keys() == got.keys() and len(want) > 20
    for name in want:  # [sum, L2 norm] of each parameter after 5 updates
        for a, b in zip(got[name], want[name]):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (name, got[name], want[name])


@pytest.mark.slow
def test_data_parallel_and_fsdp_meshes_match_one_device():
    result = _run_script((8, 1, 1), (2, 4, 1))
    _check_losses_match(result, ["8x1x1", "2x4x1"])
    dp, fsdp = result["8x1x1"]["specs"], result["2x4x1"]["specs"]
    assert dp["wi_0"] == [None, None] and dp["embedding"] == [None, None]
    assert fsdp["wi_0"] == ["fsdp", None] and fsdp["embedding"] == [None, "fsdp"]
    assert fsdp["query"] == ["fsdp", None]  # [embed, heads x kv]
    assert result["2x4x1"]["wi_0_shard_shape"] == [16, 128]


# ---------------------------------------------------------------------------------------------
# In-process checks of the partitioning helpers (one device).
# ---------------------------------------------------------------------------------------------

def test_make_mesh_sizes_and_errors():
    import jax

    from t5lite.errors import UserError
    from t5lite.train import partitioning

    mesh = partitioning.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert partitioning.rules_for(mesh) is partitioning.DATA_PARALLEL
    for bad in [dict(data=3), dict(data=-1, fsdp=-1), dict(data=0), dict(data=-1, fsdp=2)]:
        with pytest.raises(UserError, match="mesh|devices"):
            partitioning.make_mesh(**bad)


def test_non_dividing_mesh_axes_fall_back_to_replicated():
    """6 heads over tensor=4 cannot split evenly: that dim is replicated instead of failing."""
    from jax.sharding import PartitionSpec as P

    from t5lite.train import partitioning

    class FakeMesh:
        shape = {"data": 1, "fsdp": 2, "tensor": 4}

    fitted = partitioning._fit(P("fsdp", "tensor", None), (512, 6, 64), FakeMesh(), "query")
    assert fitted == P("fsdp", None, None)
    assert partitioning._fit(P(("data", "fsdp")), (8, 3), FakeMesh(), "batch") == P(("data", "fsdp"), None)


def test_adamw_moments_are_sharded_like_params():
    """Path-suffix mapping: AdamW's mu / nu leaves take their parameter's sharding, counts replicate."""
    import jax

    from t5lite.model import get_config
    from t5lite.train import optimizers, partitioning

    config = get_config("tiny")
    mesh = partitioning.make_mesh()
    shardings = partitioning.state_shardings(config, optimizers.make_optimizer("adamw", "constant", 1e-3, 0), mesh,
                                             partitioning.FSDP_TENSOR)
    kernel = shardings.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert tuple(kernel.spec) == ("fsdp", "tensor")
    adam_state = shardings.opt_state[0]
    assert adam_state.mu["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"] == kernel
    assert tuple(adam_state.nu["token_embedder"]["embedding"].spec) == ("tensor", "fsdp")
    assert tuple(adam_state.count.spec) == ()
    assert jax.tree.structure(shardings.params) == jax.tree.structure(adam_state.mu)


def test_single_process_does_not_initialize_distributed(monkeypatch):
    from t5lite.errors import UserError
    from t5lite.train import partitioning

    for name in ("JAX_COORDINATOR_ADDRESS", "T5LITE_DISTRIBUTED", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                 "PMI_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert partitioning.maybe_initialize_distributed() is False
    with pytest.raises(UserError, match="process_id"):
        partitioning.maybe_initialize_distributed(num_processes=2)


@pytest.mark.slow
def test_two_processes_match_one_device():
    """jax.distributed on loopback: 2 processes x 2 CPU devices, each feeding its own rows."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS=XLA_FLAGS.split(" ", 1)[1], JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, __file__, "process", str(i), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    result = _run_script()  # the 1-device reference
    for out, _ in outputs:
        result.update(json.loads(out.strip().splitlines()[-1]))
        _check_losses_match(result, ["2x2x1 on 2 processes"])


# ---------------------------------------------------------------------------------------------
# The subprocesses: 8 simulated CPU devices, or one of 2 processes with 2 devices each.
# ---------------------------------------------------------------------------------------------

def _spec(array) -> list:
    spec = tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))
    return [s if s is None or isinstance(s, str) else list(s) for s in spec]


def _setup(overrides=None):
    """The tiny model (with dropout), an Adafactor with factored moments, and STEPS batches of 8 rows."""
    import numpy as np

    from t5lite.model import get_config
    from t5lite.train import optimizers

    config = get_config("tiny", dropout_rate=0.1, **(overrides or {}))
    # min_dim_size_to_factor=32 so the tiny model's matrices get factored second moments.
    optimizer = optimizers.make_optimizer("adafactor", "constant", 0.01, warmup_steps=0, min_dim_size_to_factor=32)
    rng = np.random.RandomState(0)
    batches = []
    for _ in range(STEPS):
        targets = rng.randint(2, config.vocab_size, (8, 12)).astype(np.int32)
        targets[:, -3:] = 0  # padding
        inputs = rng.randint(2, config.vocab_size, (8, 16)).astype(np.int32)
        inputs[:4, -4:] = 0
        batches.append(dict(encoder_input_tokens=inputs, decoder_target_tokens=targets,
                            decoder_input_tokens=np.concatenate([np.zeros((8, 1), np.int32), targets[:, :-1]], 1)))
    return config, optimizer, batches


def _train(config, optimizer, batches, mesh, local_rows=slice(None), step_kwargs=None) -> dict:
    """STEPS sharded train steps on `mesh`; this process feeds rows `local_rows` of each batch."""
    import jax
    import numpy as np

    from t5lite.model import EncoderDecoder
    from t5lite.train import partitioning, step

    step_kwargs = dict(step_kwargs or {})
    rules = partitioning.RULE_SETS[step_kwargs.pop("rules")] if "rules" in step_kwargs else partitioning.rules_for(mesh)
    shardings = partitioning.state_shardings(config, optimizer, mesh, rules)
    state = partitioning.init_train_state(config, optimizer, mesh, rules, jax.random.key(0))
    train = step.make_train_step(EncoderDecoder(config), optimizer, mesh, rules, shardings, dropout_seed=1,
                                 **step_kwargs)
    params = state.params["decoder"]["layers_0"]
    factored = state.opt_state[0]
    record = dict(specs=dict(
        wi_0=_spec(params["mlp"]["wi_0"]["kernel"]), wo=_spec(params["mlp"]["wo"]["kernel"]),
        query=_spec(params["self_attention"]["query"]["kernel"]),
        embedding=_spec(state.params["token_embedder"]["embedding"]),
        logits_dense=_spec(state.params["decoder"]["logits_dense"]["kernel"]),
        v_row_wi_0=_spec(factored.v_row["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]),
        v_col_wi_0=_spec(factored.v_col["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"])),
        wi_0_shard_shape=list(params["mlp"]["wi_0"]["kernel"].addressable_shards[0].data.shape),
        all_specs={jax.tree_util.keystr(path, simple=True, separator="/"): _spec(x)
                   for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]},
        losses=[], grad_norms=[], aux_losses=[])
    for batch in batches:
        local = {k: v[local_rows] for k, v in batch.items()}
        state, metrics = train(state, partitioning.global_batch_from_local(local, mesh, rules))
        record["losses"].append(float(metrics["loss"]))
        record["grad_norms"].append(float(metrics["grad_norm"]))
        record["aux_losses"].append(float(metrics.get("aux_loss", 0.0)))
    evaluate = step.make_eval_step(EncoderDecoder(config), mesh, rules, shardings.params)
    local = {k: v[local_rows] for k, v in batches[0].items()}
    sums = evaluate(state.params, partitioning.global_batch_from_local(local, mesh, rules))
    record["eval"] = {k: float(v) for k, v in sums.items()}
    if jax.process_count() == 1:
        record["param_norms"] = {jax.tree_util.keystr(path, simple=True, separator="/"):
                                 [float(np.sum(x)), float(np.sqrt(np.sum(np.square(x, dtype=np.float64))))]
                                 for path, x in jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]}
    return record


def _main_meshes(meshes, overrides, step_kwargs):
    import jax
    import numpy as np

    from t5lite.train import partitioning

    config, optimizer, batches = _setup(overrides)
    out = {}
    for shape in [(1, 1, 1)] + [tuple(m) for m in meshes]:
        mesh = partitioning.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
        out["x".join(map(str, shape))] = _train(config, optimizer, batches, mesh, step_kwargs=step_kwargs)
    print(json.dumps(out))


def _main_process(process_id: int, port: int):
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    from t5lite.train import partitioning

    assert partitioning.maybe_initialize_distributed(f"127.0.0.1:{port}", 2, process_id, initialization_timeout=60)
    assert jax.process_count() == 2 and jax.device_count() == 4
    config, optimizer, batches = _setup()
    mesh = partitioning.make_mesh(data=2, fsdp=2)
    # The rows this process's devices hold in the global batch (dropout masks follow the global row).
    indices = partitioning.batch_sharding(mesh).addressable_devices_indices_map((8, 1)).values()
    first = min(i[0].start for i in indices)
    last = max(i[0].stop for i in indices)
    record = _train(config, optimizer, batches, mesh, slice(first, last))
    print(json.dumps({"2x2x1 on 2 processes": record}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "process":
        _main_process(int(sys.argv[2]), int(sys.argv[3]))
    else:
        _main_meshes(*[json.loads(arg) for arg in sys.argv[1:4]])
