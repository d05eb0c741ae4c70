"""A kohya / LyCORIS file read back: each module's algorithm, rank or factor, alpha, and
the weight change it makes, as ComfyUI computes it.

:mod:`engine.lora.lycoris` writes these files; this module is its reader, for
``loraflow inspect`` and ``loraflow generate``. The tensors of a module name its
algorithm (``hada_w*``: LoHa, ``lokr_w*``: LoKr, ``dora_scale``: DoRA, plain
``lora_down``/``lora_up``: LoRA, or LoCon when the down weight is a convolution's), and
:func:`module_delta` follows ComfyUI's weight adapters (the commits named in
:mod:`engine.lora.lycoris`), the loaders this layout is for:

* LoRA / LoCon: ``up @ down`` (flattened, reshaped to the weight) times alpha / rank;
* LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b)`` times alpha / rank (rank = rows of ``w1_b``);
* LoKr: ``kron(w1, w2)`` (each factor whole or ``_a @ _b``), times alpha / rank when a
  factor is decomposed (rank = its inner size), times 1 when both are whole;
* DoRA: ``(W0 + delta) * dora_scale / (||W0|| + eps)``, row norms of the base weight, when
  ``dora_scale`` has one entry per output row (the only orientation written here).

Tucker / CP cores (``hada_t1``, ``lokr_t2``, ``lora_mid``) are refused rather than applied
wrongly. ``bundle_emb.*`` keys are not modules: :func:`split_bundle` takes them apart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from engine.lora.formats import LoraFormatError, LoraModule, module_kind

BUNDLE_PREFIX = "bundle_emb."
_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
             "lora_te2_": "text_encoder_2"}
_KEY = re.compile(r"^(lora_unet_|lora_te[12]?_)([^.]+)\.(.+)$")
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LORA = ("lora_down.weight", "lora_up.weight")
_KNOWN = set(_LOHA) | set(_LORA) | {"alpha", "dora_scale", "lokr_w1", "lokr_w1_a", "lokr_w1_b",
                                    "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
_UNSUPPORTED = {"hada_t1", "hada_t2", "lokr_t2", "lora_mid.weight"}
#: Tensor names that make a file LyCORIS rather than plain kohya LoRA.
LYCORIS_MARKS = (".hada_w", ".lokr_w", ".dora_scale")


@dataclass(frozen=True)
class NetworkModule:
    """One module of a kohya / LyCORIS file and its tensors."""

    component: str  # unet | text_encoder | text_encoder_2
    name: str  # the kohya name, e.g. lora_unet_..._to_q
    algorithm: str  # lora | locon | dora | loha | lokr
    rank: int | None  # None: a LoKr whose two factors are whole matrices
    alpha: float | None  # the stored .alpha (None: not stored)
    factor: tuple[int, int] | None  # LoKr: the shape of w1 (the Kronecker factor)
    in_features: int
    tensors: Mapping[str, torch.Tensor]

    @property
    def scale(self) -> float:
        """The multiplier ComfyUI applies to the product of the factors."""
        if self.rank is None:
            return 1.0
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def as_lora_module(self) -> LoraModule:
        """The module as :mod:`engine.lora.formats` describes one (family guess, loaders)."""
        prefix = _KEY.match(f"{self.name}.x").group(1)
        rank = self.rank or 1
        return LoraModule(self.component, self.name, module_kind(self.name.removeprefix(prefix)),
                          rank, self.alpha if self.rank else float(rank), self.in_features)


def is_lycoris(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether a (bundle-free) state dict has LoHa, LoKr or DoRA tensors."""
    return any(mark in key for key in tensors for mark in LYCORIS_MARKS)


def split_bundle(tensors: Mapping[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(the network's tensors, {token: {vector name: tensor}}) of a kohya file.

    A key ``bundle_emb.<token>.<rest>`` is split at its first two dots, as A1111 / Forge
    do; ``rest`` is ``string_to_param.*`` (SD 1.x / 2.x) or ``clip_l`` / ``clip_g`` (SDXL).
    """
    network: dict[str, torch.Tensor] = {}
    bundles: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(BUNDLE_PREFIX):
            network[key] = tensor
            continue
        parts = key.split(".", 2)
        if len(parts) != 3 or not parts[1]:
            raise LoraFormatError(f"bundled embedding key {key!r} is not "
                                  "bundle_emb.<token>.<string_to_param.*|clip_l|clip_g>")
        bundles.setdefault(parts[1], {})[parts[2]] = tensor
    return network, bundles


def network_modules(tensors: Mapping[str, torch.Tensor]) -> list[NetworkModule]:
    """The modules of a kohya / LyCORIS state dict (no ``bundle_emb``), sorted by name."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise LoraFormatError(f"not a kohya / LyCORIS key: {key!r}")
        grouped.setdefault(match.group(1) + match.group(2), {})[match.group(3)] = tensor
    return [_module(name, parts) for name, parts in sorted(grouped.items())]


def _module(name: str, parts: dict[str, torch.Tensor]) -> NetworkModule:
    unsupported = sorted(set(parts) & _UNSUPPORTED)
    if unsupported:
        raise LoraFormatError(f"{name}: LyCORIS Tucker / CP tensors ({', '.join(unsupported)}) "
                              "are not supported")
    unknown = sorted(set(parts) - _KNOWN)
    if unknown:
        raise LoraFormatError(f"{name}: unknown LyCORIS tensor {unknown[0]!r}")
    prefix = _KEY.match(f"{name}.x").group(1)
    alpha = float(parts["alpha"].item()) if "alpha" in parts else None
    algorithm, rank, factor, in_features = _shape_of(name, parts)
    return NetworkModule(_PREFIXES[prefix], name, algorithm, rank, alpha, factor, in_features,
                         parts)


def _shape_of(name: str, parts: dict[str, torch.Tensor]
              ) -> tuple[str, int | None, tuple[int, int] | None, int]:
    """(algorithm, rank, LoKr factor, input width) of one module; half modules refused."""
    if any(k.startswith("hada_") for k in parts):
        _require(name, parts, _LOHA, "LoHa")
        return "loha", int(parts["hada_w1_b"].shape[0]), None, int(parts["hada_w1_b"].shape[1])
    if any(k.startswith("lokr_") for k in parts):
        w1 = _factor(name, parts, "lokr_w1")
        w2 = _factor(name, parts, "lokr_w2")
        rank = next((int(parts[f"{w}_b"].shape[0]) for w in ("lokr_w2", "lokr_w1")
                     if f"{w}_b" in parts), None)
        return "lokr", rank, (int(w1[0]), int(w1[1])), int(w1[1]) * int(w2[1])
    _require(name, parts, _LORA, "LoRA")
    down = parts["lora_down.weight"]
    if "dora_scale" in parts:
        algorithm = "dora"
    else:
        algorithm = "locon" if down.dim() == 4 and down.shape[2:] != (1, 1) else "lora"
    return algorithm, int(down.shape[0]), None, int(down.shape[1])


def _factor(name: str, parts: dict[str, torch.Tensor], stem: str) -> tuple[int, int]:
    """The (rows, columns) of a LoKr factor, whole or ``_a @ _b``."""
    if stem in parts:
        return int(parts[stem].shape[0]), int(parts[stem].shape[1])
    _require(name, parts, (f"{stem}_a", f"{stem}_b"), "LoKr")
    return int(parts[f"{stem}_a"].shape[0]), int(parts[f"{stem}_b"].shape[1])


def _require(name: str, parts: Mapping[str, torch.Tensor], needed: tuple[str, ...],
             what: str) -> None:
    missing = [k for k in needed if k not in parts]
    if missing:
        raise LoraFormatError(f"{name}: a {what} module without {', '.join(missing)}")


# -- the weight change ----------------------------------------------------------------


def module_delta(module: NetworkModule, weight: torch.Tensor) -> torch.Tensor:
    """The module's full weight change for a layer of ``weight`` (fp32), as ComfyUI builds it.

    For DoRA this is ``W_dora - W0``, so every algorithm is applied as ``W0 + s * delta``.
    """
    t = {k: v.float() for k, v in module.tensors.items()}
    base = weight.float()
    if module.algorithm == "loha":
        product = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    elif module.algorithm == "lokr":
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        product = torch.kron(w1, w2)
    else:
        product = t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)
    if product.numel() != base.numel():
        raise LoraFormatError(f"{module.name}: its factors make {tuple(product.shape)}, the "
                              f"model's weight is {tuple(base.shape)}")
    delta = product.reshape(base.shape) * module.scale
    if module.algorithm != "dora":
        return delta
    return _dora_weight(module, base, delta) - base


def _dora_weight(module: NetworkModule, base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    scale = module.tensors["dora_scale"].float()
    if scale.shape[0] != base.shape[0] or scale.numel() != base.shape[0]:
        raise LoraFormatError(f"{module.name}: dora_scale of shape {tuple(scale.shape)} is not "
                              "one per output row (the input-axis orientation is not supported)")
    norm = base.flatten(1).norm(dim=1) + torch.finfo(torch.float32).eps
    shape = (-1, *[1] * (base.dim() - 1))
    return (base + delta) * (scale.flatten() / norm).reshape(shape)
