"""Training telemetry: model FLOPs and MFU, JSONL + TensorBoard writers, a progress bar, loss plots.

`Monitor.log` turns the loop's host-side metrics into throughput numbers (step time, tokens/s,
MFU) and writes them to `model_dir/metrics.jsonl` (one JSON object per line, appended, flushed
every call so a killed run keeps its history) and TensorBoard event files under
`model_dir/tensorboard/{train,eval}`. Only the primary process writes or prints.
"""

import json
import logging
import math
import os
import sys
from typing import Dict, Optional

import jax

from t5lite.errors import UserError
from t5lite import registry
from t5lite.fileio import write_text_atomic
from t5lite.model.config import T5Config

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# FLOPs and peak throughput.
# ---------------------------------------------------------------------------------------------

def model_flops_per_step(config: T5Config, batch_size: int, input_length: int, target_length: int,
                         decoder_only: bool = False, training: bool = True, frozen_base: bool = False) -> float:
    """Analytic model FLOPs of one step on a [batch_size] batch: matmuls only, no remat recompute.

    With D = emb_dim, A = num_heads * head_dim, Akv = kv_heads * head_dim (A unless grouped-
    query), V = vocab_size, L = input_length, T = target_length, and M = the MLP's multiply-adds
    per token (dense: (n+1)*D*mlp_dim with n = len(mlp_activations), 2 when gated; MoE: the
    router D*E plus k experts' (n+1)*D*mlp_dim; the layer's registered class tells, via its
    `macs_per_token(config)`), multiply-adds per sequence are

        encoder layer:  L * (2*D*A + 2*D*Akv + M)      q, o; k, v; the MLP
                        + 2 * L*L*A                     scores Q K^T and weighted sum A V
        decoder layer:  T * (2*D*A + 2*D*Akv + M)      self-attention and MLP
                        + 2 * T*T*A                     self-attention scores and sum
                        + T * 2*D*A + L * 2*D*Akv       cross q, o (decoder) and k, v (encoder tokens)
                        + 2 * T*L*A                     cross-attention scores and sum
        logits:         T * D * V

    forward = 2 * batch_size * (sum over layers + logits); training = 3 * forward (the backward
    pass costs two matmuls per forward one). Attention counts the full score matrix, as the model
    computes it (no causal halving). Decoder-only: T <- L + T (prefix + targets) through the
    decoder stack, no cross-attention, no encoder. Embedding lookups, norms, softmax, rotary /
    ALiBi terms, MoE dispatch / combine and other elementwise ops are not counted.
    `frozen_base` (training an adapter card): no weight gradients, so the weight matmuls cost 2x their
    forward and only the attention scores and sums (activations x activations) 3x; the card's rank-r
    products are not counted.
    """
    d, a, v = config.emb_dim, config.num_heads * config.head_dim, config.vocab_size
    akv = config.kv_heads * config.head_dim

    def mlp_macs(layer: int) -> int:
        cls = registry.get("mlp", config.mlp_of_layer(layer))
        return getattr(cls, "macs_per_token", registry.get("mlp", "dense").macs_per_token)(config)

    def self_layer(length, layer):
        return length * (2 * d * a + 2 * d * akv + mlp_macs(layer)) + 2 * length * length * a

    if decoder_only:
        t = input_length + target_length
        macs = sum(self_layer(t, i) for i in range(config.num_decoder_layers)) + t * d * v
        attention = config.num_decoder_layers * 2 * t * t * a
    else:
        el, tl = input_length, target_length
        cross = tl * 2 * d * a + el * 2 * d * akv + 2 * tl * el * a
        macs = (sum(self_layer(el, i) for i in range(config.num_encoder_layers))
                + sum(self_layer(tl, i) + cross for i in range(config.num_decoder_layers)) + tl * d * v)
        attention = (config.num_encoder_layers * 2 * el * el * a
                     + config.num_decoder_layers * (2 * tl * tl * a + 2 * tl * el * a))
    forward = 2.0 * batch_size * macs
    if not training:
        return forward
    return 2.0 * forward + 2.0 * batch_size * attention if frozen_base else 3.0 * forward


# Dense bf16 peak FLOP/s per device, matched as case-insensitive substrings of jax's device_kind,
# first match wins (so 'TPU v5 lite' comes before 'TPU v5').
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports itself as 'TPU v5'
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
    # One jax CPU device spans all host cores. Theoretical f32 peak with AVX2: 2 FMA units x 8 lanes x
    # 2 FLOPs per cycle per core at ~3.5 GHz (a jitted matmul reaches ~150 GFLOP/s of the 224 on the
    # 2-core reference machine, and a t5_1_1_small train step ~166).
    "cpu": (os.cpu_count() or 1) * 32 * 3.5e9,
}
_warned_kinds = set()


def peak_flops_per_device(device_kind: Optional[str] = None, override: Optional[float] = None) -> float:
    """Peak FLOP/s of one device: `override` if given, else looked up from PEAK_FLOPS by device kind."""
    if override is not None:
        return float(override)
    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    for kind, flops in PEAK_FLOPS.items():
        if kind.lower() in device_kind.lower():
            return flops
    if device_kind not in _warned_kinds:
        _warned_kinds.add(device_kind)
        log.warning("unknown device kind %r: MFU assumes the CPU peak of %.3g FLOP/s; set the `peak_flops` "
                    "config value to this device's dense bf16 FLOP/s for a meaningful MFU",
                    device_kind, PEAK_FLOPS["cpu"])
    return PEAK_FLOPS["cpu"]


# ---------------------------------------------------------------------------------------------
# The monitor.
# ---------------------------------------------------------------------------------------------

def _host_value(x):
    """Python scalars for JSON/TensorBoard: numpy / jax scalars become float or int."""
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    if hasattr(x, "item"):
        return x.item()
    return float(x)


def _json_safe(x):
    """NaN and +-inf are not JSON: they are written as null (a missing point to every reader)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


class Monitor:
    """Writes training and eval metrics to JSONL, TensorBoard and a progress bar (primary only).

    `flops_per_step` and `tokens_per_step` are for the global batch (all devices); MFU divides
    by `peak_flops * num_devices`. `progress`: 'tqdm', 'lines' (one line per log on stderr),
    'off', or None: tqdm when stderr is a terminal, else lines.
    """

    def __init__(self, model_dir: str, *, total_steps: int, start_step: int = 0, flops_per_step: float = 0.0,
                 tokens_per_step: int = 0, num_devices: int = 1, peak_flops: float = PEAK_FLOPS["cpu"],
                 is_primary: bool = True, progress: Optional[str] = None):
        if progress is None:
            progress = "tqdm" if sys.stderr.isatty() else "lines"
        if progress not in ("tqdm", "lines", "off"):
            raise UserError(f"unknown progress mode {progress!r}; choose tqdm, lines or off")
        self.model_dir, self.total_steps, self.progress = model_dir, total_steps, progress
        self.flops_per_step, self.tokens_per_step = float(flops_per_step), int(tokens_per_step)
        self.peak_total = float(peak_flops) * num_devices
        self.is_primary = is_primary
        self._start_step = start_step
        self._writers: Dict[str, object] = {}
        self._jsonl = self._bar = None
        if not is_primary:
            return
        os.makedirs(model_dir, exist_ok=True)
        path = os.path.join(model_dir, "metrics.jsonl")
        _drop_lines_after(path, start_step)  # steps a dead run logged past the checkpoint are trained again
        self._jsonl = open(path, "a")  # append: a resumed run keeps its lines up to the resumed step
        if progress == "tqdm":
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, file=sys.stderr, dynamic_ncols=True)

    def _writer(self, name: str):
        """The TensorBoard writer of run `name` (train / eval), created on first use."""
        if name not in self._writers:
            from tensorboardX import SummaryWriter
            # purge_step hides events a crashed run wrote past the checkpoint we resumed from.
            purge = self._start_step if self._start_step > 0 else None
            self._writers[name] = SummaryWriter(os.path.join(self.model_dir, "tensorboard", name), purge_step=purge)
        return self._writers[name]

    def _write(self, run: str, step: int, record: dict, tb_scalars: dict) -> None:
        self._jsonl.write(json.dumps({k: _json_safe(v) for k, v in record.items()}, allow_nan=False) + "\n")
        self._jsonl.flush()
        writer = self._writer(run)
        for key, value in tb_scalars.items():  # TensorBoard charts cannot show NaN / inf: skipped
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                writer.add_scalar(key, value, step)
        writer.flush()

    def log(self, step: int, metrics: dict, steps_since_last: int, seconds_since_last: float) -> dict:
        """Adds step_time, tokens_per_sec and mfu to `metrics`, writes and shows them; returns the dict."""
        record = {"step": int(step), **{k: _host_value(v) for k, v in metrics.items()}}
        ok = steps_since_last > 0 and seconds_since_last > 0
        record["step_time"] = seconds_since_last / steps_since_last if ok else math.nan
        record["tokens_per_sec"] = self.tokens_per_step * steps_since_last / seconds_since_last if ok else math.nan
        achieved = self.flops_per_step * steps_since_last / seconds_since_last if ok else math.nan
        record["mfu"] = achieved / self.peak_total if self.peak_total > 0 else math.nan
        if not self.is_primary:
            return record
        self._write("train", step, record, {k: v for k, v in record.items() if k != "step"})
        self._show(step, steps_since_last, record)
        return record

    def log_eval(self, step: int, metrics: dict, prefix: str = "eval") -> None:
        """One JSONL line with keys '<prefix>/<name>'; TensorBoard run `<prefix>` with the bare names.

        The bare names let TensorBoard overlay eval/loss on train/loss in one chart.
        """
        if not self.is_primary:
            return
        bare = {k[len(prefix) + 1:] if k.startswith(prefix + "/") else k: _host_value(v) for k, v in metrics.items()}
        record = {"step": int(step), **{f"{prefix}/{k}": v for k, v in bare.items()}}
        self._write(prefix, step, record, bare)
        text = " ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k != "step")
        if self._bar is not None:
            self._bar.write(f"step {step}: {text}", file=sys.stderr)
        elif self.progress == "lines":
            print(f"step {step}: {text}", file=sys.stderr, flush=True)

    def _show(self, step: int, steps: int, r: dict) -> None:
        if self._bar is not None:
            self._bar.update(max(0, min(step, self.total_steps) - self._bar.n))
            rates = (f" tok/s {_fmt(r['tokens_per_sec'])} mfu {_fmt(100 * r['mfu'])}%"
                     if math.isfinite(r["tokens_per_sec"]) and math.isfinite(r["mfu"]) else "")
            self._bar.set_postfix_str(f"loss {_fmt(r.get('loss'))}{rates}", refresh=False)
        elif self.progress == "lines":
            # Only what is known: right after compilation no steps were timed yet (no step time, rates, MFU).
            known = lambda k: isinstance(r.get(k), (int, float)) and math.isfinite(r[k])  # noqa: E731
            parts = [f"step {step}/{self.total_steps}", f"loss {_fmt(r.get('loss'))}"]
            parts += [f"{short} {_fmt(r[k])}" for k, short in (("learning_rate", "lr"), ("grad_norm", "gnorm"))
                      if k in r]
            if known("step_time"):
                parts.append(f"step_time {_fmt(r['step_time'])}s")
            if known("tokens_per_sec"):
                parts.append(f"tok/s {_fmt(r['tokens_per_sec'])}")
            if known("mfu"):
                parts.append(f"mfu {_fmt(100 * r['mfu'])}%")
            print(" ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        """Flushes and closes files, writers and the bar; safe to call twice."""
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        for writer in self._writers.values():
            writer.close()
        self._bar = self._jsonl = None
        self._writers = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _drop_lines_after(path: str, step: int) -> None:
    """Rewrites metrics.jsonl (atomically) without the lines of steps > `step`: a run resumed from
    checkpoint `step` trains those steps again, and each step keeps one line. Lines that are not JSON
    (a killed writer's last half line) go too."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def _fmt(x) -> str:
    """Short human numbers: 4 significant digits; k and M suffixes between 1e4 and 1e9, scientific
    notation beyond (1e10 is '1e+10', never '1e+04M')."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 1e9:
        return f"{x:.4g}"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.4g}M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:.4g}k"
    return f"{x:.4g}"


# ---------------------------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------------------------

def read_metrics(jsonl_path: str, key: str = "loss"):
    """(steps, values) of `key` from a metrics.jsonl; a step logged twice (resumed run) keeps its last value."""
    if not os.path.exists(jsonl_path):
        raise UserError(f"no metrics file at {jsonl_path}; pass the metrics.jsonl of a training run's model_dir")
    by_step = {}
    with open(jsonl_path) as f:
        for line in f:
            line = line.strip()
            if line:
                row = json.loads(line)
                if row.get(key) is not None:
                    by_step[row["step"]] = row[key]
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_metrics(jsonl_paths: Dict[str, str], out_png: str, key: str = "loss") -> None:
    """Draws `key` against step for each run {label: metrics.jsonl path} into one PNG."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg
    except ImportError as e:
        raise ImportError("plot_metrics needs matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for label, path in jsonl_paths.items():
        steps, values = read_metrics(path, key)
        ax.plot(steps, values, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=120, bbox_inches="tight")
