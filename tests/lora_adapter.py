"""Small LoRA adapters built here for a base model: random but seeded, so they change its output.

Two formats of the same thing: GGUF for llama.cpp (what llama.cpp's convert_lora_to_gguf.py
writes) and a peft directory for vLLM. They test that an engine applies the adapter a request
names and no other; they say nothing about quality (the flywheel trains real ones).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TARGETS = ("attn_q", "attn_v")  # llama.cpp's tensor names; q_proj and v_proj in peft


def build_gguf_lora(base: Path, out: Path, rank: int = 8, seed: int = 0) -> Path:
    """A LoRA adapter on every block's attention q and v of the GGUF model `base`."""
    if out.is_file():
        return out
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(base)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out.with_suffix(".partial"), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
    rng = np.random.default_rng(seed)
    for tensor in reader.tensors:
        parts = tensor.name.split(".")  # blk.0.attn_q.weight
        if parts[-1] != "weight" or parts[-2] not in TARGETS:
            continue
        fan_in, fan_out = (int(n) for n in tensor.shape)  # ggml order: input size first
        a, b = _lora_pair(rng, fan_in, fan_out, rank)
        writer.add_tensor(f"{tensor.name}.lora_a", a)
        writer.add_tensor(f"{tensor.name}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out.with_suffix(".partial").rename(out)
    return out


def build_peft_lora(base: Path, out: Path, rank: int = 8, seed: int = 0) -> Path:
    """The same kind of adapter for the Hugging Face model directory `base`, as peft saves it."""
    if (out / "adapter_config.json").is_file():
        return out
    from safetensors.numpy import save_file

    config = json.loads((base / "config.json").read_text())
    hidden = config["hidden_size"]
    kv = (
        hidden
        // config["num_attention_heads"]
        * config.get("num_key_value_heads", config["num_attention_heads"])
    )
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, fan_out in (("q_proj", hidden), ("v_proj", kv)):
            a, b = _lora_pair(rng, hidden, fan_out, rank)
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config))
    return out


def _lora_pair(
    rng: np.random.Generator, fan_in: int, fan_out: int, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """A (rank x fan_in) and B (fan_out x rank), numpy order, scaled so B·A moves the output."""
    a = rng.normal(0.0, 1.0 / np.sqrt(fan_in), (rank, fan_in)).astype(np.float32)
    b = rng.normal(0.0, 0.5, (fan_out, rank)).astype(np.float32)
    return a, b
