"""The LoRA weights file: written by diffusers' own writer, read back bit for bit.

The checkpoint's ``pytorch_lora_weights.safetensors`` is what a user loads with
``pipe.load_lora_weights``, and it is also what a resumed segment restores the adapter
from (the public Crynux implementation forgets that step and restarts the adapter each
segment). Writing it through ``save_lora_weights`` keeps the keys and the adapter
metadata (rank, alpha, targets) exactly as diffusers expects them.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors

from engine.errors import LoraflowError
from engine.store.safetensors_io import dump, read_metadata

LORA_FILE = "pytorch_lora_weights.safetensors"


class LoraFileError(LoraflowError):
    """A LoRA file does not fit the adapter it should restore."""


_CLIP_TOP = ("encoder.", "embeddings.", "final_layer_norm.")


def _param_key(name: str, prefix: str) -> str:
    """Parameter name in the adapted module -> key in the diffusers file.

    PEFT's state dict drops the adapter name: ``lora_A.default.weight`` -> ``lora_A.weight``,
    ``hada_w1_a.default`` -> ``hada_w1_a`` (LoHa, LoKr), and DoRA's
    ``lora_magnitude_vector.default.weight`` -> ``lora_magnitude_vector``.
    """
    name = name.replace(".default.", ".").removesuffix(".default")
    if name.endswith(".lora_magnitude_vector.weight"):
        name = name.removesuffix(".weight")
    return standard_key(f"{prefix}.{name}")


def standard_key(key: str) -> str:
    """Text-encoder keys in the form every diffusers version reads.

    transformers 5 names CLIP modules without the ``text_model.`` level, so diffusers
    writes ``text_encoder.encoder.layers...``; files in the wild (and diffusers with
    transformers 4) use ``text_encoder.text_model.encoder.layers...``. diffusers 0.42
    reads both, older versions only the second: so the file gets the second.
    """
    prefix, _, rest = key.partition(".")
    if prefix.startswith("text_encoder") and rest.startswith(_CLIP_TOP):
        return f"{prefix}.text_model.{rest}"
    return key


def lora_file_bytes(
    pipeline_class: Any, unet: Any, text_encoders: dict[str, Any] | None = None
) -> bytes:
    """The diffusers-format LoRA file of the adapted UNet (and text encoders), as bytes."""
    from peft.utils import get_peft_model_state_dict

    kwargs: dict[str, Any] = {
        "unet_lora_layers": get_peft_model_state_dict(unet),
        "unet_lora_adapter_metadata": _stable_config(unet),
    }
    for prefix, encoder in (text_encoders or {}).items():
        kwargs[f"{prefix}_lora_layers"] = get_peft_model_state_dict(encoder)
        kwargs[f"{prefix}_lora_adapter_metadata"] = _stable_config(encoder)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # peft looks for a tokenizer config to see if the vocabulary changed; we never change it
        warnings.filterwarnings("ignore", message="Could not find a config file")
        pipeline_class.save_lora_weights(tmp, safe_serialization=True, **kwargs)
        written = (Path(tmp) / LORA_FILE).read_bytes()
    tensors = {standard_key(k): v for k, v in load_tensors(written).items()}
    return dump(tensors, read_metadata(written))


def _stable_config(module: Any) -> dict[str, Any]:
    """The adapter config with sets as sorted lists and no local path.

    peft keeps target_modules as a set, whose order depends on the process's string hash
    seed; written as is, two processes would write different bytes for the same LoRA.
    peft also records the wrapped model's ``name_or_path``: for a text encoder loaded from
    a folder that is a local path (``$LORAFLOW_HOME/embedded/...``, a user's home), which
    would leak into every published file and make the same training on two machines give
    different bytes. diffusers does not need it to load the adapter, so it is dropped
    (set to null, as the UNet's config already has it).
    """
    config = module.peft_config["default"].to_dict()
    config["base_model_name_or_path"] = None
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


def restore_lora(data: bytes, modules: dict[str, Any]) -> None:
    """Copy the file's tensors into the adapters of ``modules`` ({"unet": unet, ...}).

    Every LoRA parameter must be in the file with the same shape, and the file must have
    nothing else: a rank or target change is refused instead of half-loaded.
    """
    from engine.model.loading import is_adapter_parameter

    tensors = load_tensors(data)
    expected: dict[str, torch.nn.Parameter] = {}
    for prefix, module in modules.items():
        for name, param in module.named_parameters():
            if is_adapter_parameter(name):
                expected[_param_key(name, prefix)] = param
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise LoraFileError(
            "LoRA weights do not fit this task's adapter "
            f"({len(missing)} missing, {len(extra)} unexpected; e.g. "
            f"{(missing or extra)[0]}): was rank or target_modules changed?"
        )
    with torch.no_grad():
        for key, param in expected.items():
            if tensors[key].shape != param.shape:
                raise LoraFileError(
                    f"LoRA weight {key} has shape {tuple(tensors[key].shape)}, the adapter "
                    f"expects {tuple(param.shape)}: was lora.rank changed?"
                )
            param.copy_(tensors[key].to(param.dtype))



def load_into_pipeline(pipe: Any, data: bytes) -> None:
    """Put a checkpoint's adapter file on a pipeline, as a user of the file would.

    LoRA and DoRA go through diffusers' ``load_lora_weights``, then the text encoders'
    DoRA magnitudes, which it drops (:mod:`engine.lora.diffusers_dora`). diffusers
    does not load LoHa or LoKr, so those are attached the PEFT way: the config from the
    file's ``lora_adapter_metadata`` header, then the tensors, on each component named.
    """
    from engine.lora.diffusers_dora import load_text_encoder_magnitudes
    from engine.lora.lycoris import adapter_kind

    tensors = load_tensors(data)
    if adapter_kind(tensors) not in ("loha", "lokr"):
        with tempfile.TemporaryDirectory() as tmp:  # from a file, so its metadata is read
            (Path(tmp) / LORA_FILE).write_bytes(data)
            pipe.load_lora_weights(tmp, weight_name=LORA_FILE, adapter_name="default_0")
        load_text_encoder_magnitudes(pipe, tensors, "default_0", "the checkpoint's LoRA file")
        return
    import json

    from peft import LoHaConfig, LoKrConfig
    from peft.utils import set_peft_model_state_dict

    config = json.loads(read_metadata(data).get("lora_adapter_metadata") or "{}")
    for component in ("unet", "text_encoder", "text_encoder_2"):
        state = {k.removeprefix(f"{component}."): v for k, v in tensors.items()
                 if k.startswith(f"{component}.")}
        if not state:
            continue
        fields = {k.removeprefix(f"{component}."): v for k, v in config.items()
                  if k.startswith(f"{component}.")}
        cls = LoHaConfig if fields.get("peft_type") == "LOHA" else LoKrConfig
        known = set(cls.__dataclass_fields__) - {"peft_type", "auto_mapping", "peft_version"}
        module = getattr(pipe, component)
        module.add_adapter(cls(**{k: v for k, v in fields.items() if k in known}))
        if component != "unet":  # the file spells CLIP modules with text_model.
            state = {_clip_key(module, k): v for k, v in state.items()}
        result = set_peft_model_state_dict(module, state, adapter_name="default")
        if result.unexpected_keys:
            raise LoraFileError(f"{component}: adapter keys not placed, e.g. "
                                f"{result.unexpected_keys[0]}")


def _clip_key(module: Any, key: str) -> str:
    """``text_model.encoder...`` as the loaded CLIP model names it (with or without)."""
    names = {n for n, _ in module.named_modules()}
    bare = key.removeprefix("text_model.")
    return key if key.rsplit(".", 1)[0] in names else bare
