"""A t5lite adapter card -> an HF PEFT LoRA adapter for the base exported by `t5lite convert to-hf`.

PEFT's LoRA computes y = x W^T + (lora_alpha / r) * lora_B(lora_A(dropout(x))) with lora_A.weight
[r, in] and lora_B.weight [out, r], the card's A [*in, r] and B [r, *out] transposed and
flattened in HF's (heads, head_dim) order (t5lite/convert/hf.py). `target_modules` lists the exact
HF module names the card adapts, so PEFT adapts exactly those.
"""

import json
import os

import numpy as np
from safetensors.numpy import save_file

from t5lite.convert.hf import check_hf_representable, parameter_map
from t5lite.errors import UserError
from t5lite.fileio import new_directory
from t5lite.model.lora import flat_paths

PEFT_PREFIX = "base_model.model."


def peft_tensors(card) -> tuple:
    """(HF module names, {PEFT tensor name: array}) of a card (t5lite.train.cards.Card)."""
    if card.decoder_only:
        raise UserError(f"card {card.path} adapts a decoder-only model; HF's T5 (and so PEFT's export) is an "
                        "encoder-decoder")
    check_hf_representable(card.model)
    hf_module = {ours[:-len("/kernel")]: theirs[:-len(".weight")]
                 for ours, theirs, _, _ in parameter_map(card.model.replace(scan_layers=False))
                 if ours.endswith("/kernel") and isinstance(theirs, str)}  # experts take no card
    flat = {path: np.asarray(value, np.float32) for path, value in flat_paths(card.params).items()}
    modules, tensors = [], {}
    for path in sorted(p for p in flat if p.endswith("/lora_a")):
        module = path[:-len("/lora_a")]
        if module not in hf_module:
            raise UserError(f"card {card.path} adapts {module}, which HF's T5 has no module for; PEFT cannot hold it")
        a, b = flat[path], flat[f"{module}/lora_b"]
        rank = a.shape[-1]
        name = hf_module[module]
        modules.append(name)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)  # [r, in]
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T)  # [out, r]
    return modules, tensors


def export_peft(card, path: str, base_model_name_or_path=None) -> None:
    """Writes `path/adapter_config.json` + `path/adapter_model.safetensors` (PeftModel.from_pretrained)."""
    if os.path.exists(path) and os.listdir(path):
        raise UserError(f"output directory {path} is not empty; choose a new --out or remove it")
    modules, tensors = peft_tensors(card)
    config = {"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "r": card.spec.rank, "lora_alpha": card.spec.alpha,
              "lora_dropout": card.spec.dropout, "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "base_model_name_or_path": base_model_name_or_path, "revision": None}
    with new_directory(path) as tmp:
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
