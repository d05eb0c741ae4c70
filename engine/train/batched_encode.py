"""One VAE / text-encoder call for a micro-batch that gives per-sample encoding's very bits.

Why: the live path encodes every image and caption on its own, so that a sample's latent
never depends on its batch mates and training from the cache equals training live (see
:mod:`engine.train.samples`). A plain batched VAE call moves bits (posterior means by up
to ~1.5e-6 on tiny-sd1), for two reasons measured on torch 2.13 CPU, fp32, one thread:

- **convolution backends**: torch picks a backend per call from the input's shape. For
  one image, a 3x3 convolution goes to oneDNN only above 20480 input elements and 1x1
  convolutions never do (one thread); for a batch of >= 2 nearly all go to oneDNN
  (tiny-sd1 at 64 px: 16 of 19 take ``Slow2d`` alone, 17 of 19 take oneDNN batched).
  ``Slow2d`` loops over the batch frame by frame (im2col + one GEMM per image), so a
  batch run with oneDNN switched off for exactly the layers that used ``Slow2d`` alone
  reproduces them; the layers that used oneDNN alone gave the same bits in a batch.
- **memory formats**: the mid-block attention hands back ``transpose().reshape()``
  strides. For one image its batch stride (16) makes torch read the tensor as
  contiguous; for a batch (1024) as channels-last, and GroupNorm's channels-last kernel
  sums in another order (4.8e-7). Giving each layer its input in the format it had for
  one image fixes it. GroupNorm, SiLU, padding, the attention's linears and SDPA, and the
  posterior's chunk/clamp/exp then agree batch vs single.

So :class:`VaeBatcher` first encodes one image alone and records, layer by layer, what
torch chose for it (input memory format, convolution backend): the *plan* for that image
shape. Later batches of that shape replay it through forward hooks (the format restored,
oneDNN switched off around the ``Slow2d`` layers) and check as they go that torch
chooses the same again; any difference, or a layer kind not checked here, and the batch
is encoded one image at a time as before. It only runs where it was proven, by
``tests/engine/train/test_batched_encode.py``: a diffusers ``AutoencoderKL`` without
tiling, slicing or offload hooks, on the CPU, in fp32, with one torch thread (the thread
count changes which kernels run). Anything else keeps per-sample encoding.

Captions (:class:`CaptionBatcher`): the same vector steps move CLIP's bits batched:
tiny-sd1's MLP is 37 wide, so a caption's 77 x 37 activations are not a whole number of
steps and QuickGELU (a sigmoid) rounds a batch's boundary elements otherwise (6e-8, the
last token of the last caption). That one layer is run caption by caption.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._prims_common import suggest_memory_format

from engine.model.family import encode_captions
from engine.train.live_encode import posterior

#: the layer kinds whose kernel choices a plan records and checks
_PLANNED = (nn.Conv2d, nn.GroupNorm, nn.Linear)
#: elements per image that every layer output must be a multiple of (a margin over the
#: 32 floats an AVX-512 elementwise loop step takes)
_VECTOR_STEP = 64
_SLOW = torch._C._ConvBackend.Slow2d
_ONEDNN = torch._C._ConvBackend.Mkldnn


class _Diverged(Exception):
    """A batch took another kernel or layout than one image did: encode one by one."""


def proven_here(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether batched encoding was proven bit-identical for this device and dtype."""
    return device.type == "cpu" and dtype == torch.float32 and torch.get_num_threads() == 1


def batchable_vae(vae: Any) -> bool:
    """An AutoencoderKL whose encode is encoder + quant_conv for any batch (no tiling, no
    slicing, no offload hook): the VAEs the plan was proven on."""
    return (type(vae).__name__ == "AutoencoderKL" and not hasattr(vae, "_hf_hook")
            and not getattr(vae, "use_tiling", True) and not getattr(vae, "use_slicing", True))


@dataclass(frozen=True)
class _Choice:
    """What torch chose for one layer call on one image."""

    module: nn.Module
    memory_format: torch.memory_format | None  # 4-D inputs only
    backend: Any = None  # convolutions only


def _memory_format(x: torch.Tensor) -> torch.memory_format | None:
    """The format torch's kernels read ``x`` in (ATen's ``suggest_memory_format``)."""
    return suggest_memory_format(x) if x.dim() == 4 else None


def _conv_backend(conv: nn.Conv2d, x: torch.Tensor) -> Any:
    return torch._C._select_conv_backend(
        x, conv.weight, conv.bias, list(conv.stride), list(conv.padding),
        list(conv.dilation), False, [0, 0], conv.groups,
    )


def _plain_conv(conv: nn.Conv2d) -> bool:
    """Zero padding given as numbers: the backend query sees what the forward runs."""
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


class VaeBatcher:
    """Encodes a micro-batch of same-sized images as one VAE call, bit for bit as one at
    a time, by replaying the kernel choices recorded on one image of that size."""

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        #: image shape and settings -> the recorded choices; None: not batchable
        self._plans: dict[tuple[Any, ...], list[_Choice] | None] = {}
        parts = [vae.encoder, vae.quant_conv] if batchable_vae(vae) else []
        self._layers = [m for part in parts if part is not None for m in part.modules()
                        if isinstance(m, _PLANNED)]
        self._checked = bool(self._layers) and all(
            _plain_conv(m) for m in self._layers if isinstance(m, nn.Conv2d))

    def encode(self, pixels: list[torch.Tensor], where: tuple[torch.device, torch.dtype],
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mean, std) of each image [3, H, W] of ``pixels``, on CPU, each exactly as
        :func:`engine.train.samples.encode_image` gives it; ``where`` is the VAE's
        (device, dtype)."""
        device, dtype = where
        if not self._usable(pixels, device, dtype):
            return [self._one(p, where) for p in pixels]
        key = (tuple(pixels[0].shape), pixels[0].stride(), dtype, torch.get_num_threads(),
               torch._C._get_mkldnn_enabled())
        done: list[tuple[torch.Tensor, torch.Tensor]] = []
        if key not in self._plans:  # the first image, alone, records the plan
            recorded: list[_Choice] = []
            sizes: list[int] = []
            with self._hooks(*self._recorder(recorded, sizes)):
                done.append(self._one(pixels[0], where))
            self._plans[key] = recorded if self._plan_checked(recorded, sizes) else None
            pixels = pixels[1:]
        plan = self._plans[key]
        if plan is None or len(pixels) < 2:
            return done + [self._one(p, where) for p in pixels]
        try:
            with self._hooks(*self._replayer(plan)):
                mean, std = posterior(self.vae, torch.stack(pixels).to(device, dtype))
        except _Diverged:
            self._plans[key] = None
            return done + [self._one(p, where) for p in pixels]
        return done + list(zip(mean.cpu().unbind(0), std.cpu().unbind(0), strict=True))

    def _usable(self, pixels: list[torch.Tensor], device: torch.device,
                dtype: torch.dtype) -> bool:
        """Two or more images of one shape and layout, where the plan was proven."""
        if len(pixels) < 2 or not self._checked or torch.is_grad_enabled():
            return False
        first = pixels[0]
        same = all(p.shape == first.shape and p.stride() == first.stride() for p in pixels)
        return same and batchable_vae(self.vae) and proven_here(device, dtype)

    def _one(self, pixels: torch.Tensor, where: tuple[torch.device, torch.dtype],
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image, as encode_image encodes it (the same call, the same input layout)."""
        mean, std = posterior(self.vae, pixels[None].to(*where))
        return mean[0].cpu(), std[0].cpu()

    @staticmethod
    def _plan_checked(plan: list[_Choice], sizes: list[int]) -> bool:
        """Only backends this module's tests proved batch-invariant are replayed, and only
        where each layer's output (what SiLU and the residual adds read) is a whole number
        of vector steps per image: torch's elementwise loops run 2 x 16 floats at a time
        (AVX-512) and the rest one by one, with other rounding for sigmoid and exp, so a
        batch whose images do not start on a step boundary moves bits."""
        return (all(c.backend in (None, _SLOW, _ONEDNN) for c in plan)
                and all(n % _VECTOR_STEP == 0 for n in sizes))

    # -- hooks --------------------------------------------------------------------------

    @contextmanager
    def _hooks(self, pre: Callable[..., Any], post: Callable[..., Any] | None = None,
               ) -> Iterator[None]:
        handles = [m.register_forward_pre_hook(pre) for m in self._layers]
        if post is not None:
            handles += [m.register_forward_hook(post) for m in self._layers]
        onednn = torch._C._get_mkldnn_enabled()
        try:
            yield
        finally:
            torch._C._set_mkldnn_enabled(onednn)
            for h in handles:
                h.remove()

    @staticmethod
    def _recorder(into: list[_Choice], sizes: list[int],
                  ) -> tuple[Callable[..., None], Callable[..., None]]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            backend = _conv_backend(module, x) if isinstance(module, nn.Conv2d) else None
            into.append(_Choice(module, _memory_format(x), backend))

        def size(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            sizes.append(output.numel())  # one image: its whole size

        return record, size

    @staticmethod
    def _replayer(plan: list[_Choice]) -> tuple[Callable[..., Any], Callable[..., None]]:
        steps = iter(plan)
        onednn = torch._C._get_mkldnn_enabled()

        def before(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            choice = next(steps, None)
            if choice is None or choice.module is not module:
                raise _Diverged  # another sequence of layers than for one image
            x = args[0]
            if choice.memory_format is not None and _memory_format(x) != choice.memory_format:
                x = x.contiguous(memory_format=choice.memory_format)
                if _memory_format(x) != choice.memory_format:
                    raise _Diverged
            if choice.backend is not None:
                torch._C._set_mkldnn_enabled(onednn and choice.backend != _SLOW)
                if _conv_backend(module, x) != choice.backend:
                    raise _Diverged
            return (x, *args[1:]) if x is not args[0] else None

        def after(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            torch._C._set_mkldnn_enabled(onednn)

        return before, after


class CaptionBatcher:
    """A micro-batch's new captions in one text-encoder call, each with the bits it gets
    alone: SD 1.x / 2.x's ``CLIPTextModel`` on the CPU in fp32 with one thread.

    Its MLP activation (QuickGELU, a sigmoid) is the one layer that moved bits batched
    (tiny-sd1: 77 x 37 values a caption, not a whole number of vector steps): a forward
    hook recomputes it caption by caption, on each caption's own slice. The linears,
    layer norms and attention gave the same bits batched (40 random batches of 2-8
    captions, tests/engine/train/test_batched_encode.py). SDXL stays one by one (its
    pooled projection is a matrix-vector product alone, 4.8e-7 off batched).
    """

    def __init__(self, base: Any) -> None:
        self.base = base
        encoders = base.text_encoders
        self._activations: list[nn.Module] = []
        if (not base.family.is_sdxl and len(encoders) == 1
                and type(encoders[0]).__name__ == "CLIPTextModel"
                and proven_here(torch.device(base.device), encoders[0].dtype)):
            self._activations = [m for name, m in encoders[0].named_modules()
                                 if name.endswith("mlp.activation_fn")]

    @property
    def usable(self) -> bool:
        return bool(self._activations) and torch.get_num_threads() == 1

    def encode(self, captions: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Each caption's conditioning, as ``engine.train.samples.encode_caption`` gives it."""
        handles = [m.register_forward_hook(_caption_by_caption) for m in self._activations]
        try:
            out = encode_captions(self.base.family, self.base.tokenizers,
                                  self.base.text_encoders, captions, self.base.device)
        finally:
            for h in handles:
                h.remove()
        return {c: {k: v[i].cpu() for k, v in out.items()} for i, c in enumerate(captions)}


def _caption_by_caption(module: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor:
    """The activation of each caption on its own slice (its vector steps start with it)."""
    x = args[0]
    return torch.cat([module.forward(x[i:i + 1]) for i in range(x.shape[0])])
