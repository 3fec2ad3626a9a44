"""The checks a run makes before anything is written into model_dir (Run.build calls them).

Each mistake is one UserError naming the fix: a model_dir that is a file or read-only, a
prefix-LM setting that disagrees with the features, a vocabulary larger than the model's, an
initial checkpoint of another model or vocabulary, a split that yields no batch. Also what the
data position depends on (data_settings): a checkpoint records it, and a resume compares it.
"""

import base64
import hashlib
import json
import logging
import os
from typing import Optional

from t5lite.data.vocab import Vocabulary
from t5lite.errors import UserError
from t5lite.fileio import nearest_existing
from t5lite.model import T5Config, abstract_params
from t5lite.train.checkpoint import check_fits, flat_shapes, read_meta, step_dirs, stored_model

log = logging.getLogger(__name__)

def check_model_dir(model_dir: str) -> None:
    """model_dir is a directory, or can be created as one, and is writable: found before any work."""
    path = os.path.abspath(model_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--model_dir {path} is a file, not a directory; choose another --model_dir")
    existing = nearest_existing(path)
    if not os.path.isdir(existing):
        raise UserError(f"--model_dir {path} cannot be created: {existing} is a file; choose another --model_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--model_dir {path} is not writable ({existing} is read-only for this user); fix its "
                        "permissions or choose another --model_dir")


def resumed_attention_layout(model_dir: str, config: T5Config) -> T5Config:
    """The config a run in `model_dir` trains with: a run that resumes keeps the attention layout its
    checkpoints were saved in (the same model either way, but an optimizer's factored second moments of a
    kernel cannot be reshaped into the other layout's, so resuming must not convert)."""
    for step_dir in step_dirs(model_dir) if os.path.isdir(model_dir) else []:
        try:
            stored = T5Config.from_dict(read_meta(step_dir)["model"]).attention_layout
        except Exception:  # noqa: BLE001 - an unreadable step: the resume itself reports or skips it
            continue
        if stored != config.attention_layout:
            log.info("resuming in the checkpoints' attention_layout %r (the configured one is %r)", stored,
                     config.attention_layout)
            return config.replace(attention_layout=stored)
        return config
    return config


def check_model_and_features(config: T5Config, vocab: Vocabulary, feature_lengths, decoder_only: bool) -> None:
    """The vocabulary fits the embedding, and a decoder-only model's prefix-LM setting agrees with
    the features (rows with an inputs prefix need bidirectional prefix attention, and back)."""
    if config.vocab_size < vocab.vocab_size:
        raise UserError(f"the model's vocab_size {config.vocab_size} is smaller than the vocabulary's "
                        f"{vocab.vocab_size}; set T5Config.vocab_size >= {vocab.vocab_size}")
    if not isinstance(feature_lengths, dict):
        raise UserError(f"TASK_FEATURE_LENGTHS must be a dict like {{'inputs': 512, 'targets': 114}}, "
                        f"got {feature_lengths!r}")
    has_inputs = "inputs" in feature_lengths
    if not decoder_only and config.decoder_only_prefix_lm:
        raise UserError("T5Config.decoder_only_prefix_lm=True applies to decoder-only models; set "
                        "train.decoder_only=True, or drop decoder_only_prefix_lm")
    if decoder_only and has_inputs and not config.decoder_only_prefix_lm:
        raise UserError("TASK_FEATURE_LENGTHS has an 'inputs' length, so each decoder-only row starts with an inputs "
                        "prefix, but T5Config.decoder_only_prefix_lm is False (a plain causal LM over the prefix); "
                        "set T5Config.decoder_only_prefix_lm = True, or drop 'inputs' for a causal LM")
    if decoder_only and not has_inputs and config.decoder_only_prefix_lm:
        raise UserError("T5Config.decoder_only_prefix_lm = True needs an 'inputs' length in TASK_FEATURE_LENGTHS "
                        "(the prefix); add one, or set decoder_only_prefix_lm = False for a causal LM")


def check_init_checkpoint(path: str, config: T5Config, decoder_only: bool, vocab: Vocabulary) -> None:
    """The initial checkpoint exists, holds this model's shapes and (if it stored one) this vocabulary."""
    stored, stored_decoder_only, meta = stored_model(path)
    # Layouts are converted on load (layers restacked, attention kernels reshaped): compare in one layout.
    canonical = lambda c: c.replace(scan_layers=False, attention_layout="joined")  # noqa: E731
    check_fits(f"initial checkpoint {path}", flat_shapes(abstract_params(canonical(stored), stored_decoder_only)),
               flat_shapes(abstract_params(canonical(config), decoder_only)), stored.to_dict(), config,
               "fine-tune with the model config the checkpoint was trained with (e.g. include its model gin file)")
    stored_vocab = (meta or {}).get("vocab")
    if stored_vocab and base64.b64decode(stored_vocab) != vocab.serialized_model:
        raise UserError(f"initial checkpoint {path} was trained with another vocabulary than the configured one; "
                        "set train.vocab_path to the checkpoint's vocabulary (its token ids would mean other pieces)")


def checkpoint_vocabulary(meta: dict) -> Optional[Vocabulary]:
    """The vocabulary stored in a training checkpoint's meta (None if it has none)."""
    return Vocabulary.from_bytes(base64.b64decode(meta["vocab"])) if meta.get("vocab") else None


def sources_fingerprint(task_obj, split: str = "train") -> str:
    """A short hash of the sources a task or mixture reads: per task its name, rate, record count and
    first and last records. Cheap (two records), and enough to tell another corpus or another version
    of one apart; identical on every process."""
    parts = task_obj.weighted_tasks() if hasattr(task_obj, "weighted_tasks") else [(task_obj, 1.0)]
    described = []
    for task, rate in parts:
        source = task.source(split)
        n = len(source)
        ends = [source[0], source[n - 1]] if n else []
        described.append([task.name, round(float(rate), 12), n, ends])
    text = json.dumps(described, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def data_settings(task_obj, *, seed: int, feature_lengths, batch_size: int, data_shards: int, pack: bool,
                  decoder_only: bool) -> dict:
    """What the saved data position depends on: a resume that changes any of them cannot continue the
    data where it stopped (t5lite/train/checkpoint.py compares them)."""
    return {"task": task_obj.name, "sources": sources_fingerprint(task_obj), "seed": int(seed),
            "feature_lengths": {k: int(v) for k, v in sorted(feature_lengths.items())},
            "batch_size": int(batch_size), "data_shards": int(data_shards), "pack": bool(pack),
            "decoder_only": bool(decoder_only)}


def first_batch(iterator, what: str) -> None:
    """Reads one batch of a throwaway iterator, so malformed data and bad preprocessing fail now."""
    try:
        next(iterator)
    except StopIteration:
        raise UserError(f"{what} yields no batch: it has too few examples for one batch; add data or lower "
                        "BATCH_SIZE") from None


