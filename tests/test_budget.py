"""The collectives budget (t5lite/compile/budget.py) against closed forms, and how program_stats reads
XLA:TPU's collectives (group sizes, ring bytes, the reduce-scatter fusion). No libtpu needed."""

from types import SimpleNamespace

import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from t5lite.compile import budget, program_stats
from t5lite.model import get_config

CONFIG = get_config("tiny", emb_dim=64, num_encoder_layers=2, num_decoder_layers=3, dtype="bfloat16")


def _leaf(shape, spec, dtype=jnp.float32):
    return SimpleNamespace(shape=shape, dtype=jnp.dtype(dtype), sharding=SimpleNamespace(spec=spec))


# A scanned kernel [layers 2, embed 512, mlp 256] split over fsdp, a norm scale [embed], a replicated table.
PARAMS = {"encoder": {"layers": {"mlp": {"wi": {"kernel": _leaf((2, 512, 256), P(None, "fsdp", None))}}},
                      "encoder_norm": {"scale": _leaf((512,), P("fsdp"))},
                      "relpos_bias": {"rel_embedding": _leaf((2, 32), P())}}}
KERNEL = 2 * 512 * 256 * 2  # bytes in bfloat16, the compute dtype it is gathered and differentiated in
SCALE = 512 * 4  # float32: norms do not cast their scale
TABLE = 2 * 32 * 4


def test_fsdp_minimum_is_the_closed_form():
    """data 2 x fsdp 4, 2 microbatches: per microbatch two gathers and one reduce-scatter of each
    fsdp-split param, then one all-reduce of its quarter over the 2 data copies; the replicated table's
    gradient all-reduced over all 8 chips."""
    got = budget.collectives_minimum(PARAMS, {"data": 2, "fsdp": 4, "tensor": 1}, CONFIG, 16,
                                     {"inputs": 32, "targets": 16}, num_microbatches=2)
    split = KERNEL + SCALE
    assert got["all-gather"] == pytest.approx(2 * 2 * 3 / 4 * split)
    assert got["reduce-scatter"] == pytest.approx(2 * 3 / 4 * split)
    assert got["all-reduce"] == pytest.approx(2 * 1 / 2 * split / 4 + 2 * 7 / 8 * TABLE)
    assert got["total"] == pytest.approx(got["all-gather"] + got["reduce-scatter"] + got["all-reduce"])
    eval_step = budget.collectives_minimum(PARAMS, {"data": 2, "fsdp": 4, "tensor": 1}, CONFIG, 16,
                                           {"inputs": 32, "targets": 16}, num_microbatches=2, training=False)
    assert eval_step == {"all-gather": pytest.approx(3 / 4 * split), "reduce-scatter": 0.0, "all-reduce": 0.0,
                         "total": pytest.approx(3 / 4 * split)}


def test_data_parallel_minimum_is_one_all_reduce_of_every_gradient():
    dp = {name: _leaf(leaf.shape, P(), leaf.dtype) for name, leaf in
          [("k", PARAMS["encoder"]["layers"]["mlp"]["wi"]["kernel"]), ("t", PARAMS["encoder"]["relpos_bias"]["rel_embedding"])]}
    dp = {"layers": {"mlp": {"wi": {"kernel": dp["k"]}}}, "relpos_bias": {"rel_embedding": dp["t"]}}
    got = budget.collectives_minimum(dp, {"data": 8, "fsdp": 1, "tensor": 1}, CONFIG, 16,
                                     {"inputs": 32, "targets": 16}, num_microbatches=4)
    assert got["all-gather"] == got["reduce-scatter"] == 0
    assert got["all-reduce"] == pytest.approx(2 * 7 / 8 * (KERNEL + TABLE))  # once, whatever the microbatches


def test_tensor_parallel_adds_megatron_activation_all_reduces():
    """tensor 2, no batch split of params: per block one all-reduce of [tokens, embed] forward and one
    backward; the decoder's cross-attention adds one of the encoder output per layer, backward."""
    mesh = {"data": 4, "fsdp": 1, "tensor": 2}
    params = {"layers": {"mlp": {"wi": {"kernel": _leaf((2, 512, 256), P(None, None, "tensor"))}}}}
    got = budget.collectives_minimum(params, mesh, CONFIG, 16, {"inputs": 32, "targets": 16})
    rows = 16 / 4
    per_token = 2 * 1 / 2 * 64 * 2  # ring all-reduce of one bf16 row of 64
    blocks = 2 * 2 * rows * 32 + 3 * 3 * rows * 16
    weights = 2 * 3 / 4 * KERNEL / 2  # the kernel's tensor half, all-reduced over the 4 data copies
    assert got["all-reduce"] == pytest.approx(weights + per_token * (2 * blocks + 3 * rows * 32))


def test_memory_ideal_share_is_the_totals_split_as_the_rules_split_params():
    params = {"w": _leaf((64, 32), P("fsdp", "tensor")), "scale": _leaf((64,), P("fsdp"))}
    opt = {"mu": _leaf((64, 32), P("fsdp", "tensor")), "count": _leaf((), P(), jnp.int32)}
    ideal = budget.memory_minimum(params, opt, {"data": 2, "fsdp": 4, "tensor": 2})
    p = (64 * 32 + 64) * 4
    assert ideal["params"] == ideal["grads"] == p / 8  # the data axis replicates
    assert ideal["state"] == (p + 64 * 32 * 4 + 4) / 8
    over_both = {"w": _leaf((64, 32), P(("data", "fsdp"), None))}  # fsdp_2d
    assert budget.memory_minimum(over_both, {}, {"data": 2, "fsdp": 4, "tensor": 1})["params"] == 64 * 32 * 4 / 8


def test_compare_flags_only_a_total_over_the_bound():
    minimum = {"all-gather": 100.0, "reduce-scatter": 50.0, "all-reduce": 0.0, "total": 150.0}

    def emitted(**sent):
        return {"by_kind": {k: {"sent": v} for k, v in sent.items()}, "sent": sum(sent.values())}

    # XLA swapped a reduce-scatter for an all-to-all of the same bytes: within budget.
    ok = budget.compare(emitted(**{"all-gather": 100.0, "all-to-all": 50.0}), minimum)
    assert not ok["total_over"] and ok["over"] == [] and ok["ratio"] == 1.0
    # A full-size all-reduce instead of the reduce-scatter: 2x its bytes, flagged, and named.
    bad = budget.compare(emitted(**{"all-gather": 100.0, "all-reduce": 100.0}), minimum)
    assert bad["total_over"] and bad["over"] == ["all-reduce"]


@pytest.mark.parametrize("line,n", [
    ("%a = bf16[8] all-reduce(%x), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add", 4),
    ("%a = bf16[8] all-gather(%x), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}", 4),
    ("%a = f32[8] all-reduce(%x), replica_groups=mesh['axis_0'=2,'axis_1'=4,'axis_2'=1] {'axis_0','axis_1'}", 8),
    ("%a = bf16[8] reduce-scatter(%x), replica_groups=[2,4]<=[8], dimensions={0}", 4),
])
def test_group_sizes_in_every_replica_group_syntax(line, n):
    assert program_stats.group_size(line) == n


def test_ring_bytes():
    assert program_stats.ring_bytes("all-gather", 400, 4) == 300
    assert program_stats.ring_bytes("reduce-scatter", 100, 4) == 300  # its result is the 1/4 part
    assert program_stats.ring_bytes("all-reduce", 400, 4) == 600
    assert program_stats.ring_bytes("all-reduce", 400, 1) == 0


def test_xla_tpu_reduce_scatter_fusion_counts_as_a_reduce_scatter():
    """XLA:TPU writes a reduce-scatter as an all-reduce + dynamic-slice inside an `all-reduce-scatter`
    fusion; its size is the fusion's (sliced) result. A plain all-reduce stays one."""
    hlo = """HloModule m

%all-reduce-scatter.3 (input: bf16[512,256]) -> bf16[128,256] {
  %input = bf16[512,256]{1,0} parameter(0)
  %all-reduce.1 = bf16[512,256]{1,0} all-reduce(%input), channel_id=4, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %dynamic-slice.1 = bf16[128,256]{1,0} dynamic-slice(%all-reduce.1, %i, %j), dynamic_slice_sizes={128,256}
}

ENTRY %main (a: bf16[512,256]) -> bf16[128,256] {
  %a = bf16[512,256]{1,0} parameter(0)
  %fusion = bf16[128,256]{1,0} fusion(%a), kind=kCustom, calls=%all-reduce-scatter.3
  ROOT %all-reduce.2 = f32[64]{0} all-reduce(%b), channel_id=5, replica_groups={{0,1,2,3}}, to_apply=%add
}
"""
    stats = program_stats.collectives(hlo)
    assert stats["by_kind"]["reduce-scatter"] == {"count": 1, "bytes": 128 * 256 * 2, "sent": 3 * 128 * 256 * 2}
    assert stats["by_kind"]["all-reduce"] == {"count": 1, "bytes": 64 * 4, "sent": 2 * 3 / 4 * 64 * 4, "gathers": 0}


def test_an_all_reduce_of_zero_padded_shards_is_reported_as_a_gather():
    """XLA:TPU gathers a shard that fills no tile by writing it into zeros and all-reducing: counted
    under all-reduce (those are the bytes sent), with its size also under `gathers`."""
    hlo = """HloModule m

%dus (p0: bf16[32,64,2048], p1: bf16[32,64,32], p2: s32[]) -> bf16[32,64,2048] {
  %p0 = bf16[32,64,2048]{2,1,0} parameter(0)
  %p1 = bf16[32,64,32]{2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  ROOT %dynamic-update-slice.9 = bf16[32,64,2048]{2,1,0} dynamic-update-slice(%p0, %p1, %p2, %p2, %p2)
}

%scale (p0: bf16[32,64,2048], p1: bf16[32,64,32], p2: s32[]) -> bf16[32,64,2048] {
  %p0 = bf16[32,64,2048]{2,1,0} parameter(0)
  ROOT %multiply.9 = bf16[32,64,2048]{2,1,0} multiply(%p0, %p0)
}

ENTRY %main (a: bf16[32,64,32], b: f32[64]) -> bf16[32,64,2048] {
  %a = bf16[32,64,32]{2,1,0} parameter(0)
  %broadcast.1 = bf16[32,64,2048]{2,1,0} broadcast(%zero), dimensions={}
  %dynamic-update-slice.1 = bf16[32,64,2048]{2,1,0} dynamic-update-slice(%broadcast.1, %a, %i, %i, %j)
  %copy-start.1 = (bf16[32,64,2048]{2,1,0}, bf16[32,64,2048]{2,1,0}, u32[]) copy-start(%dynamic-update-slice.1)
  %copy-done.1 = bf16[32,64,2048]{2,1,0} copy-done(%copy-start.1)
  %constant_dynamic-update-slice_fusion.2 = bf16[32,64,2048]{2,1,0} fusion(%broadcast.1, %a, %i), kind=kLoop, calls=%f
  %fusion.3 = bf16[32,64,2048]{2,1,0} fusion(%broadcast.1, %a, %i), kind=kLoop, calls=%dus
  %fusion.4 = bf16[32,64,2048]{2,1,0} fusion(%broadcast.1, %a, %i), kind=kLoop, calls=%scale
  %all-reduce.1 = (bf16[32,64,2048]{2,1,0}, bf16[32,64,2048]{2,1,0}, bf16[32,64,2048]{2,1,0}) all-reduce(%copy-done.1, %constant_dynamic-update-slice_fusion.2, %fusion.3), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %all-reduce.3 = bf16[32,64,2048]{2,1,0} all-reduce(%fusion.4), channel_id=3, replica_groups={{0,1}}, to_apply=%add
  ROOT %all-reduce.2 = f32[64]{0} all-reduce(%b), channel_id=2, replica_groups={{0,1}}, to_apply=%add
}
"""
    reduce = program_stats.collectives(hlo)["by_kind"]["all-reduce"]
    assert reduce["count"] == 3 and reduce["bytes"] == 4 * 32 * 64 * 2048 * 2 + 64 * 4
    assert reduce["gathers"] == 3 * 32 * 64 * 2048 * 2  # not the all-reduce of a fusion that is no shard write
