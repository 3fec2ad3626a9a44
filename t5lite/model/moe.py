"""Mixture-of-experts MLP (Switch Transformer / top-k token-choice routing), `T5Config.mlp = 'moe'`.

A float32 router picks each token's top-k experts; the experts are `num_experts` copies of the
dense MlpBlock stacked on an `expert` logical axis (`mlp/expert/wi_0/kernel` [E, D, F]), so the
partitioning rules can shard them.

Capacity (training, `expert_capacity_factor`): each expert takes at most
C = min(S, ceil(factor * k * S / E)) tokens of a row of S tokens (each row routes on its own, so
results do not depend on the batch, the microbatching or the mesh). Slots are given first
choice before second choice, and within a choice in token order; an assignment beyond C is
dropped. A token that loses all its assignments gets a zero MLP output: it passes through the
residual connection unchanged. Evaluation and decoding use `eval_expert_capacity_factor`,
by default no limit: every expert runs on every token and only the top-k outputs are kept,
which is exact and independent of what else is in the batch (so a KV-cache step equals the
full forward pass). `expert_capacity` instead fixes C = min(S, expert_capacity) in training and
evaluation alike, HF's Switch Transformers rule (a KV-cache step routes one token, so it never drops).
`router_jitter_noise` (training only) multiplies the router's input by U(1 - eps, 1 + eps).

Output: sum over the kept top-k experts of gate * expert(x), gate = the router probability
(k = 1, Switch) or the top-k probabilities renormalised to sum to 1 (k > 1). Auxiliary losses
are sown into the 'aux_loss' collection, already weighted, for the train step to add:
Switch's load balancing E * sum_e f_e P_e and ST-MoE's router z-loss mean(logsumexp^2).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5lite.model.config import T5Config
from t5lite.model.layers import DenseGeneral, MlpBlock
from t5lite.registry import register


def load_balancing_loss(router_probs: jax.Array, expert_index: jax.Array) -> jax.Array:
    """Switch Transformer: E * sum_e f_e * P_e per row, averaged over rows.

    router_probs [G, S, E]; expert_index [G, S, k]. f_e: fraction of the row's tokens routed to
    expert e (by any of their k choices); P_e: mean router probability of e. 1.0 when balanced.
    """
    num_experts = router_probs.shape[-1]
    routed = jnp.max(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=-2)  # [G, S, E]
    fraction, probability = jnp.mean(routed, axis=1), jnp.mean(router_probs.astype(jnp.float32), axis=1)  # [G, E]
    return jnp.mean(num_experts * jnp.sum(fraction * probability, axis=-1))


def router_z_loss(router_logits: jax.Array) -> jax.Array:
    """ST-MoE: mean over tokens of logsumexp(router logits)^2, which keeps the logits small."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)))


def expert_capacity(tokens: int, num_experts: int, k: int, factor: float) -> int:
    """Slots per expert for a row of `tokens` tokens: ceil(factor * k * tokens / E), within [1, tokens]."""
    return max(1, min(tokens, math.ceil(factor * k * tokens / num_experts)))


def dispatch_and_combine(expert_index: jax.Array, gates: jax.Array, num_experts: int, capacity: int):
    """Token -> (expert, slot) assignment under the capacity rule in the module docstring.

    expert_index, gates [B, S, k] -> dispatch [B, S, E, C] (1 where a token takes a slot) and
    combine [B, S, E, C] (the token's gate there).
    """
    b, s, k = expert_index.shape
    chosen = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [B, S, k, E]
    by_priority = chosen.transpose(0, 2, 1, 3).reshape(b, k * s, num_experts)  # all first choices first
    slot = (jnp.cumsum(by_priority, axis=1) - 1).reshape(b, k, s, num_experts).transpose(0, 2, 1, 3)
    kept = chosen * (slot < capacity)  # [B, S, k, E]
    slot_one_hot = jax.nn.one_hot(jnp.sum(slot * kept, axis=-1), capacity, dtype=jnp.float32)  # [B, S, k, C]
    kept = kept.astype(jnp.float32)
    dispatch = jnp.einsum("bske,bskc->bsec", kept, slot_one_hot)
    combine = jnp.einsum("bske,bskc->bsec", kept * gates[..., None], slot_one_hot)
    return dispatch, combine


@register("mlp", "moe")
class MoeMlp(nn.Module):
    """Routes each token to its top-k of `num_experts` MlpBlocks; x [B, S, D] -> [B, S, D]."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        num_experts, k = cfg.num_experts, cfg.experts_per_token
        router_input = jnp.asarray(x, jnp.float32)  # routing runs in float32 ("selective precision")
        if cfg.router_jitter_noise and not deterministic:
            eps = cfg.router_jitter_noise
            router_input = router_input * jax.random.uniform(self.make_rng("dropout"), router_input.shape,
                                                             jnp.float32, 1.0 - eps, 1.0 + eps)
        router_logits = DenseGeneral(num_experts, ("embed", "expert"), dtype=jnp.float32,
                                     kernel_init=nn.initializers.normal(stddev=2e-2),
                                     name="router")(router_input)  # [B, S, E]
        router_probs = jax.nn.softmax(router_logits, axis=-1)
        top_probs, expert_index = jax.lax.top_k(router_probs, k)  # [B, S, k]
        gates = top_probs if k == 1 else top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
        self.sow("aux_loss", "load_balancing_loss",
                 cfg.moe_load_balancing_weight * load_balancing_loss(router_probs, expert_index))
        if cfg.moe_router_z_loss_weight:
            self.sow("aux_loss", "router_z_loss", cfg.moe_router_z_loss_weight * router_z_loss(router_logits))

        experts = nn.vmap(MlpBlock, in_axes=(1, None), out_axes=1, axis_size=num_experts,
                          variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                          metadata_params={nn.PARTITION_NAME: "expert"})(cfg, name="expert")
        factor = cfg.eval_expert_capacity_factor if deterministic else cfg.expert_capacity_factor
        dtype = jnp.dtype(cfg.dtype)
        if factor is None and cfg.expert_capacity is None:  # no capacity limit: every expert on every token, keep the top-k outputs
            weights = jnp.sum(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32) * gates[..., None], axis=2)
            every = jnp.broadcast_to(x[:, None], (x.shape[0], num_experts, *x.shape[1:]))  # [B, E, S, D]
            out = experts(every, deterministic)  # [B, E, S, D]
            return jnp.einsum("besd,bse->bsd", out, weights.astype(dtype))
        if cfg.expert_capacity is not None:
            capacity = min(x.shape[1], cfg.expert_capacity)
        else:
            capacity = expert_capacity(x.shape[1], num_experts, k, factor)
        dispatch, combine = dispatch_and_combine(expert_index, gates, num_experts, capacity)  # [B, S, E, C]
        expert_inputs = jnp.einsum("bsec,bsd->becd", dispatch.astype(dtype), jnp.asarray(x, dtype))  # [B, E, C, D]
        expert_inputs = nn.with_logical_constraint(expert_inputs, ("batch", "expert", "length", "embed"))
        out = experts(expert_inputs, deterministic)  # [B, E, C, D]
        return jnp.einsum("becd,bsec->bsd", out, combine.astype(dtype))

    @staticmethod
    def macs_per_token(config: T5Config) -> int:
        """Multiply-adds per token: the router and the k chosen experts (not the dispatch / combine)."""
        return config.emb_dim * config.num_experts + config.experts_per_token * MlpBlock.macs_per_token(config)
