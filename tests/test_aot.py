"""`t5lite compile`: TPU slices by name, ahead-of-time compiles whose memory we check by hand, the
XLA warnings of the shipped recipes, and one-line errors. Needs libtpu (the [tpu] extra)."""

import itertools
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5lite import cli
from t5lite.compile import aot, program_stats
from t5lite.errors import UserError
from t5lite.model import abstract_params, logical_axes, param_shapes
from t5lite.train.config import TrainConfig

libtpu = pytest.importorskip("libtpu", reason="compiling for TPU needs the [tpu] extra")
TPU_TILE_BYTES = 512  # XLA:TPU gives every buffer at least one tile: a scalar takes 128 x 4 bytes



def _train(settings: dict) -> TrainConfig:
    """A TrainConfig for a compile: the data-side settings are never read (t5lite compile uses no data)."""
    return TrainConfig(model_dir="(t5lite compile)", task="bible_span_corruption_en_es", train_steps=1, **settings)

def tpu_tiled_bytes(shape, itemsize: int = 4) -> int:
    """Bytes of a 32-bit array in TPU memory: its two minor dims are padded to (8, 128) tiles, in the
    dim order (layout) that pads least; vectors to 128 lanes; at least one 512-byte tile."""
    if len(shape) < 2:
        return max(TPU_TILE_BYTES, -(-int(np.prod(shape)) // 128) * 128 * itemsize)
    best = None
    for minor, second in itertools.permutations(range(len(shape)), 2):
        rest = int(np.prod([d for i, d in enumerate(shape) if i not in (minor, second)]))
        size = rest * -(-shape[minor] // 128) * 128 * -(-shape[second] // 8) * 8 * itemsize
        best = size if best is None else min(best, size)
    return best


@pytest.mark.parametrize("name,chip,shape", [
    # Cloud TPU's tables: v5e-N and v6e-N count chips; v4-N and v5p-N count TensorCores (2 per chip).
    ("v5e-4", "v5e", (2, 2)), ("v5e-8", "v5e", (2, 4)), ("v5e-64", "v5e", (8, 8)), ("v5e-256", "v5e", (16, 16)),
    ("v5litepod-16", "v5e", (4, 4)), ("v6e-256", "v6e", (16, 16)), ("v4-8", "v4", (2, 2, 1)),
    ("v4-32", "v4", (2, 2, 4)), ("v4-128", "v4", (4, 4, 4)), ("v5p-64", "v5p", (2, 4, 4)),
    ("v5p-256", "v5p", (4, 4, 8)), ("v5p-1024", "v5p", (8, 8, 8)), ("v5e:4x8", "v5e", (4, 8)),
    ("v5p:4x4x12", "v5p", (4, 4, 12)),
])
def test_topology_names_follow_cloud_tpu(name, chip, shape):
    topology = aot.parse_topology(name)
    assert (topology.chip, topology.shape) == (chip, shape)
    assert topology.hbm_bytes == {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}[chip] * 2**30


@pytest.mark.parametrize("name", ["v9-8", "v5e-48", "v4-7", "v5e:4x4x4", "tpu", "v5e-"])
def test_unknown_topologies_are_user_errors(name):
    with pytest.raises(UserError):
        aot.parse_topology(name)


def test_largest_batch_search_finds_the_boundary():
    calls = []

    def fits(batch):
        calls.append(batch)
        return batch <= 40

    result = aot.largest_batch(fits, unit=8, start=8)
    assert result["largest"] == 40 and result["exact"]
    assert calls[:3] == [8, 16, 32] and len(calls) <= 8


def test_collective_bytes_multiply_by_loop_trip_counts():
    hlo = """HloModule m

%cond (p: (s32[])) -> pred[] {
  %p = (s32[]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %constant.1 = s32[]{:T(128)} constant(24)
  ROOT %lt = pred[] compare(%i, %constant.1), direction=LT
}

%body (p: (s32[])) -> (s32[]) {
  %p = (s32[]) parameter(0)
  %all-gather.1 = bf16[64,128]{1,0} all-gather(%x), channel_id=7, dimensions={0}
  %all-gather.2 = bf16[64,128]{1,0} all-gather(%x), channel_id=7, dimensions={0}
  ROOT %t = (s32[]) tuple(%p)
}

ENTRY %main (a: f32[16]) -> f32[16] {
  %w = (s32[]) while(%init), condition=%cond, body=%body
  ROOT %all-reduce.3 = (f32[16]{0}, f32[8]{0}) all-reduce(%a, %b), channel_id=9, to_apply=%add
}
"""
    stats = program_stats.collectives(hlo)
    # channel 7 is one op (split in two by async fusion) run 24 times; the tuple all-reduce once.
    assert stats["by_kind"]["all-gather"]["count"] == 1 and stats["by_kind"]["all-gather"]["bytes"] == 24 * 64 * 128 * 2
    assert stats["by_kind"]["all-reduce"]["count"] == 1 and stats["by_kind"]["all-reduce"]["bytes"] == (16 + 8) * 4


def test_windowed_einsum_loops_count_their_permutes_per_trip():
    """XLA:TPU decomposes a gather feeding a matmul into a u32-counted loop of collective-permutes (the
    'windowed_dot_general' loops of t5_1_1_large on a v5e-32); before the fix each permute counted once."""
    hlo = """HloModule m

%wide.windowed_dot_general_cond_ag (p: (u32[])) -> pred[] {
  %constant.6 = u32[]{:T(128)} constant(16)
  %p = (u32[]) parameter(0)
  %i = u32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %compare.1 = pred[]{:T(512)} compare(%i, %constant.6), direction=LT
}

%wide.windowed_dot_general_body_ag (p: (u32[])) -> (u32[]) {
  %p = (u32[]) parameter(0)
  %collective-permute.1 = bf16[1,32,1024]{2,1,0} collective-permute(%x), channel_id=3, source_target_pairs={{0,1},{1,0}}
  ROOT %t = (u32[]) tuple(%p)
}

ENTRY %main (a: f32[16]) -> f32[16] {
  ROOT %w = (u32[]) while(%init), condition=%wide.windowed_dot_general_cond_ag, body=%wide.windowed_dot_general_body_ag
}
"""
    permutes = program_stats.collectives(hlo)["by_kind"]["collective-permute"]
    assert permutes["count"] == 1 and permutes["bytes"] == 16 * 32 * 1024 * 2


def _tile_aligned_tiny_run(mesh_shape):
    """A 2+2-layer model whose every parameter shard is a whole number of TPU tiles (no padding)."""
    from t5lite.model import get_config
    config = get_config("tiny", emb_dim=512, num_heads=2, head_dim=128, mlp_dim=512, vocab_size=512,
                        relative_attention_num_buckets=128, dtype="bfloat16", scan_layers=True)
    return dict(model=config, batch_size=8, feature_lengths={"inputs": 128, "targets": 128}, pack=True,
                optimizer="adamw", schedule="constant", learning_rate=1e-3, warmup_steps=0,
                mesh_shape=mesh_shape)


@pytest.mark.slow
def test_tiny_fsdp_argument_memory_is_the_sum_of_the_shards():
    """v5e 2x2, FSDP over 4 chips: XLA's argument bytes per chip equal, computed by hand from the
    parameter shapes, AdamW's state and the mesh: params, mu and nu with `embed` split 4 ways."""
    args = _tile_aligned_tiny_run((1, 4, 1))
    report = aot.compile_run(_train(args), aot.parse_topology("v5e:2x2"), programs=("train",))
    train = report["programs"]["train"]
    assert train["compiled"] and train["memory"]["fits"] and report["rules"] == "fsdp"

    config = args["model"]
    shapes, axes = param_shapes(abstract_params(config)), logical_axes(config)
    flat_axes = {"/".join(k.key for k in path): tuple(spec) for path, spec in
                 jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]}
    param_bytes = 0
    for name, shape in shapes.items():
        shard = [d // 4 if axis == "embed" else d for d, axis in zip(shape, flat_axes[name])]
        param_bytes += 4 * int(np.prod(shard))  # float32
    scalars = 3  # TrainState.step, Adam's count, the schedule's count (int32)
    # Packed: tokens x3, loss weights, segment ids x2; the positions are not read by T5's relative
    # attention, and jit drops unused arguments from the executable.
    batch_features = 6
    batch_bytes = batch_features * (8 // 4) * 128 * 4  # [B/4, 128] int32 on each chip
    expected = 3 * param_bytes + scalars * TPU_TILE_BYTES + batch_bytes  # params, mu, nu
    assert train["memory"]["arguments"] == expected
    # The donated state comes back in place: outputs alias all of it but the replicated metrics.
    assert train["memory"]["aliased"] == expected - batch_bytes
    assert train["warnings"]["involuntary_full_rematerialization"] == 0
    assert train["collectives"]["by_kind"]["all-gather"]["count"] > 0  # FSDP gathers weights


def _plain_all_reduce_sizes(hlo: str) -> set:
    """Element counts of the arrays the HLO all-reduces outside XLA:TPU's reduce-scatter fusions."""
    computations, _ = program_stats._computations(hlo)
    sizes = set()
    for name, lines in computations.items():
        for line in lines:
            op = program_stats._INSTRUCTION.match(line)
            if op and op.group(3).removesuffix("-start") == "all-reduce" and not name.startswith("all-reduce-scatter"):
                sizes |= {int(np.prod([int(d) for d in dims.split(",") if d]))
                          for _, dims in program_stats._ARRAY.findall(op.group(2))}
    return sizes


def _layer_weight_sizes(config) -> set:
    """Element counts of one layer's gradient of each embed-split matrix (norm scales are vectors)."""
    axes = {"/".join(k.key for k in path): tuple(spec) for path, spec in jax.tree_util.tree_flatten_with_path(
        logical_axes(config), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]}
    weights = set()
    for name, shape in param_shapes(abstract_params(config)).items():
        one_layer = shape[1:] if axes[name][0] == "layers" else shape
        if "embed" in axes[name] and len(one_layer) >= 2:
            weights.add(int(np.prod(one_layer)))
    return weights


@pytest.mark.slow
def test_fsdp_gradients_are_reduce_scattered_within_the_collectives_budget(tmp_path):
    """v5e 2x2, FSDP over 4 chips, 2 microbatches: every embed-split weight's gradient leaves the
    backward pass reduce-scattered (per layer and microbatch: the accumulators stay sharded), none is
    all-reduced at full size (before: `wo`, the attention outputs and the token table were), and the
    collectives and state memory the report prints are within 1.1x of their analytic minimum."""
    args = {**_tile_aligned_tiny_run((1, 4, 1)), "num_microbatches": 2}
    report = aot.compile_run(_train(args), aot.parse_topology("v5e:2x2"), programs=("train",), hlo_dir=str(tmp_path))
    train = report["programs"]["train"]
    scatters = train["collectives"]["by_kind"]["reduce-scatter"]
    assert scatters["count"] > 0
    assert {op["runs"] for op in train["collectives"]["largest"] if op["kind"] == "reduce-scatter"} == {2 * 2}

    weights = _layer_weight_sizes(args["model"])
    plain = _plain_all_reduce_sizes((tmp_path / "train.hlo.txt").read_text())
    assert weights and not weights & plain, sorted(weights & plain)

    budget = train["budget"]
    assert not budget["collectives"]["total_over"] and budget["collectives"]["ratio"] <= 1.1, budget
    rows = budget["collectives"]["by_kind"]
    assert rows["reduce-scatter"]["sent"] >= 0.9 * rows["reduce-scatter"]["minimum"] > 0
    assert 0.99 <= budget["state_memory_ratio"] <= 1.1
    assert "sent/chip/step vs analytic minimum" in aot.format_report(report)


@pytest.mark.slow
def test_fsdp_2d_reduce_scatters_in_rings_of_four_on_a_16_chip_slice(tmp_path):
    """v5e 4x4: XLA:TPU lowers a reduce-scatter over all 16 chips as a full all-reduce + slice (the
    `fsdp` rules over 16 chips send 1.3x the minimum); `fsdp_2d` on a 4 x 4 mesh reduce-scatters each
    gradient over fsdp, then over data, rings of 4, and stays within 1.1x of the minimum. Heads of 64
    (t5_1_1_xl's): stored split, an attention kernel's [heads, kv] would fill no tile, and its gradient was
    reduce-scattered only once flattened to 2-D (before that: all-reduced whole)."""
    args = {**_tile_aligned_tiny_run((4, 4, 1)), "batch_size": 16, "partition_rules": "fsdp_2d"}
    args["model"] = args["model"].replace(num_heads=8, head_dim=64)
    report = aot.compile_run(_train(args), aot.parse_topology("v5e:4x4"), programs=("train",), hlo_dir=str(tmp_path))
    train = report["programs"]["train"]
    assert report["rules"] == "fsdp_2d" and train["warnings"]["involuntary_full_rematerialization"] == 0
    hlo = (tmp_path / "train.hlo.txt").read_text()
    every = program_stats.collectives(hlo, top=10 ** 6)["largest"]
    assert {op["group"] for op in every if op["kind"] == "reduce-scatter"} == {4}
    weights = _layer_weight_sizes(args["model"])
    assert weights and not weights & _plain_all_reduce_sizes(hlo), sorted(weights & _plain_all_reduce_sizes(hlo))
    budget = train["budget"]
    assert budget["collectives"]["ratio"] <= 1.1 and not budget["collectives"]["total_over"], budget


def _shard_bytes(boxed, fsdp: int) -> int:
    """float32 bytes per chip of a boxed (logically named) tree whose 'embed' axes are split `fsdp` ways."""
    total = 0
    for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        shape = [d // fsdp if axis == "embed" else d for d, axis in zip(leaf.value.shape, leaf.names)]
        total += 4 * int(np.prod(shape))
    return total


@pytest.mark.slow
def test_a_card_run_compiles_the_card_step_with_the_base_frozen(capsys):
    """train.adapter: the compiled train step takes the base once (an input, not donated, no optimizer
    state) and the card with AdamW's mu and nu; XLA's argument bytes equal that sum computed by hand, far
    below the full fine-tuning step's three copies of the base. Eval and decode serve the card too."""
    from t5lite.model import lora
    from t5lite.train.monitor import model_flops_per_step
    args = _tile_aligned_tiny_run((1, 4, 1))
    spec = lora.LoraConfig(rank=8, alpha=16.0, targets=("q", "v"))
    topology = aot.parse_topology("v5e:2x2")
    full = aot.compile_run(_train(args), topology, programs=("train",))["programs"]["train"]["memory"]
    report = aot.compile_run(_train({**args, "adapter": spec}), topology)
    train = report["programs"]["train"]
    assert train["compiled"] and train["memory"]["fits"]

    config = args["model"]
    base_bytes, card_bytes = _shard_bytes(abstract_params(config), 4), _shard_bytes(lora.abstract_card(config, spec), 4)
    assert report["adapter"]["params"] == lora.num_card_params(lora.abstract_card(config, spec))
    scalars, batch_bytes = 3, 6 * (8 // 4) * 128 * 4  # as in the FSDP test above
    donated = 3 * card_bytes + scalars * TPU_TILE_BYTES  # card, mu, nu and the counters
    assert train["memory"]["arguments"] == base_bytes + donated + batch_bytes
    assert train["memory"]["aliased"] == donated  # the base is not donated: it is read, never updated
    assert full["arguments"] == 3 * base_bytes + scalars * TPU_TILE_BYTES + batch_bytes
    # No weight gradients for the base: the model FLOPs of a frozen-base step.
    assert train["flops"]["analytic_per_chip"] == pytest.approx(
        model_flops_per_step(config, 8, 128, 128, frozen_base=True) / 4)
    assert model_flops_per_step(config, 8, 128, 128, frozen_base=True) < model_flops_per_step(config, 8, 128, 128)
    # Eval: the base and the card as sharded in training; decode: a one-card table, replicated (it is small).
    for program, card_copy in (("eval", card_bytes), ("decode", _shard_bytes(lora.abstract_card(config, spec), 1))):
        arguments = report["programs"][program]["memory"]["arguments"]
        assert base_bytes + card_copy <= arguments < base_bytes + card_copy + 16 * 1024, program
    assert "adapter card: rank 8, alpha 16, targets q, v" in aot.format_report(report)


@pytest.mark.slow
def test_train_eval_and_decode_compile_and_print(capsys):
    """The whole command on the demo run shrunk to tiny: three programs, a readable report, and a
    decode program that holds the same parameter shards as eval plus its KV cache."""
    assert cli.main(["compile", "--topology", "v5e:2x2", "--gin_file", "experiments/demo/pretrain.gin",
                     "--gin_file", "experiments/models/tiny.gin", "--gin.train.mesh_shape=(1,4,1)",
                     "--gin.T5Config.scan_layers=True", "--decode_batch", "16", "--max_decode_length", "32"]) == 0
    text = capsys.readouterr().out
    for program in ("train", "eval", "decode"):
        assert f"{program}: FITS in 16.00 GiB HBM per chip" in text, text
    assert "mesh data=1 fsdp=4 tensor=1, rules fsdp" in text and "KV cache" in text
    report = _cli_json(capsys, "--topology", "v5e:2x2", "--gin_file", "experiments/demo/pretrain.gin",
                       "--gin_file", "experiments/models/tiny.gin", "--gin.train.mesh_shape=(1,4,1)",
                       "--gin.T5Config.scan_layers=True", "--programs", "eval,decode", "--decode_batch", "16",
                       "--decode_input_length", "64", "--max_decode_length", "32")
    evaluate, decode = report["programs"]["eval"], report["programs"]["decode"]
    # tiny: 2 decoder layers x (keys + values) x 4 heads x 16 dims, float32, 16 rows over 4 chips,
    # 33 self-attention slots (start token + 32) and 64 encoder positions.
    assert decode["kv_cache_per_chip"] == 2 * 2 * 4 * 16 * 4 * (16 // 4) * (33 + 64)
    # Both take the parameter shards (~0.6 MiB per chip) plus a few KiB: eval's batch, decode's prompts and seed.
    assert evaluate["memory"]["arguments"] > 512 * 1024
    assert abs(decode["memory"]["arguments"] - evaluate["memory"]["arguments"]) < 64 * 1024


def _cli_json(capsys, *argv):
    assert cli.main(["compile", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["t5_1_1_small_c4",  # base and large: the same code at ~2-4x the compile time
                                    pytest.param("t5_1_1_base_c4", marks=pytest.mark.extended),
                                    pytest.param("t5_1_1_large_c4", marks=pytest.mark.extended)])
def test_shipped_recipes_compile_without_involuntary_rematerialization(capsys, recipe):
    """Each C4 recipe's train step under data + FSDP + tensor parallelism (2, 2, 2) on a v5e-8, where
    the embedding gather used to be replicated (the recipes' own DP / FSDP meshes are checked by the
    xl test below and by `t5lite compile` in the README table)."""
    report = _cli_json(capsys, "--topology", "v5e-8", "--gin_file", f"experiments/pretrain/{recipe}.gin",
                       "--programs", "train", "--batch_size", "16", "--gin.T5Config.scan_layers=True",
                       "--gin.train.mesh_shape=(2,2,2)")
    warnings = report["programs"]["train"]["warnings"]
    assert warnings["involuntary_full_rematerialization"] == 0, (recipe, warnings["lines"])


@pytest.mark.slow
def test_xl_fits_a_v5e_64_under_fsdp_not_under_data_parallelism():
    """t5_1_1_xl on 64 v5e chips: FSDP holds 1/64 of the params + Adafactor state per chip and fits;
    pure data parallelism replicates 11 GiB of float32 params and cannot.

    On the chip each shard is stored in whole (8, 128) tiles, so XLA's argument bytes are the *tiled* size of
    the 1/64 shards. Joined, the attention kernels' shards [layers, embed/64 = 32, heads x kv = 2048] fill
    their tiles (stored split, [layers, 32, heads 32, kv 64] took twice their size: 1.6x in all)."""
    from t5lite.model import get_config
    from t5lite.train import partitioning
    from t5lite.train.optimizers import make_optimizer
    topology = aot.parse_topology("v5e-64")
    config = get_config("t5_1_1_xl", dtype="bfloat16", scan_layers=True)
    args = dict(model=config, batch_size=64, feature_lengths={"inputs": 128, "targets": 32}, mesh_shape=(1, -1, 1))
    report = aot.compile_run(_train(args), topology, programs=("train",))
    train = report["programs"]["train"]
    assert train["compiled"] and train["memory"]["fits"] and report["rules"] == "fsdp"
    assert train["warnings"]["involuntary_full_rematerialization"] == 0

    params = nn.meta.unbox(abstract_params(config))
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((params, jax.eval_shape(make_optimizer().init,
                                                                                              params))))
    mesh = partitioning.make_mesh(1, -1, 1, devices=aot.topology_devices(topology))
    state = partitioning.abstract_train_state(config, make_optimizer(), partitioning.state_shardings(
        config, make_optimizer(), mesh, partitioning.FSDP))
    shards = [(x.sharding.shard_shape(x.shape), x.dtype.itemsize) for x in jax.tree.leaves(state)]
    plain = sum(int(np.prod(shape)) * size for shape, size in shards)
    assert abs(plain - total / 64) <= 0.1 * total / 64  # params and optimizer state are split 64 ways
    tiled = sum(tpu_tiled_bytes(shape, size) for shape, size in shards)
    # ... and stored as exactly those shards (the batch, one row per chip, is a few KiB of it), whole tiles.
    assert abs(train["memory"]["arguments"] - tiled) <= 0.01 * tiled
    assert tiled <= 1.05 * plain

    data_parallel = aot.compile_run(_train({**args, "mesh_shape": (-1, 1, 1)}), topology, programs=("train",))
    assert not data_parallel["programs"]["train"]["memory"]["fits"]


def test_unknown_topology_exits_2_with_one_line(capsys):
    assert cli.main(["compile", "--topology", "v9-64", "--gin_file", "experiments/pretrain/t5_1_1_small_c4.gin"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown TPU topology 'v9-64'" in err[0]


def test_mesh_that_does_not_divide_the_chips_exits_2_with_one_line(capsys):
    code = cli.main(["compile", "--topology", "v5e-8", "--gin_file", "experiments/pretrain/t5_1_1_small_c4.gin",
                     "--gin.train.mesh_shape=(3,1,1)"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs 3 devices but there are 8" in err[0]


def test_cpu_host_with_libtpu_uses_cpu_quietly():
    """libtpu installed, no TPU chip: importing t5lite keeps jax on its CPU backend, without libtpu's
    start-up warnings or its host-wide lock file."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = "import t5lite, jax; print(jax.devices()[0].platform)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "cpu", proc.stderr
    assert "TPU" not in proc.stderr and "libtpu" not in proc.stderr, proc.stderr
