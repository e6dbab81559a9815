"""The EDM2 network ("config G") with magnitude-preserving layers.

Architecture of Karras et al., "Analyzing and Improving the Training Dynamics of
Diffusion Models" (CVPR 2024), as used by autoguidance (Karras et al., NeurIPS 2024).
Module and parameter names follow the public release, so a released state_dict loads
by name with ``load_state_dict(strict=True)``.

Numerics: the preconditioning and the embedding path run in float32; the image path
runs in float16 on CUDA when ``use_fp16`` (float32 otherwise); the output is float32.
Weights are normalised on every call, as in the release; ``prepare_for_inference``
normalises them once ahead of time and gives the same function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "normalize",
    "resample",
    "mp_silu",
    "mp_sum",
    "mp_cat",
    "MPFourier",
    "MPConv",
    "Block",
    "UNet",
    "Precond",
    "prepare_for_inference",
    "unprepare",
    "EDM2_PRESETS",
    "EDM2_DATASETS",
    "EDM2_NUM_CLASSES",
    "edm2_preset_kwargs",
    "edm2_preset",
    "randomize_gains_",
]

# ----------------------------------------------------------------------------
# Magnitude-preserving primitives.


# Normalisation to unit RMS over `dim` (default: all but the first); the norm is float32.
def normalize(x: Tensor, dim: int | Sequence[int] | None = None, eps: float = 1e-4) -> Tensor:
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    # eps + norm·sqrt(n_norm / n_x) with one rounding (torch.add's alpha), as the release computes it.
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


# Constructor argument checks: a bad value (from a caller, or recorded in a snapshot file) is named
# at construction, not met as a ZeroDivisionError or an odd tensor error in a layer, or at the first call.
def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")


def _check_filter(f: object) -> None:
    if (isinstance(f, (str, bytes)) or not isinstance(f, Sequence) or len(f) == 0 or len(f) % 2 != 0
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in f)):
        raise ValueError(f"resample_filter: expected an even number of filter taps (numbers), got {f!r}")


# Resampling by a separable filter: 'down' = strided depthwise conv, 'up' = transposed conv.
# kernel: resample_kernel(f, x.device, x.dtype) made beforehand (None: made here).
def resample(x: Tensor, f: Sequence[float] = (1, 1), mode: str = "keep", kernel: Tensor | None = None) -> Tensor:
    if mode == "keep":
        return x
    if mode not in ("down", "up"):
        raise ValueError(f"mode must be 'keep', 'down' or 'up', got {mode!r}")
    f = [float(v) for v in f]
    if len(f) % 2 != 0:
        raise ValueError(f"f must have an even number of taps, got {len(f)}")
    if is_box_filter(f):
        # Box filter: a 2x2 average / nearest-neighbour copy (same values, cheaper kernels).
        if mode == "down":
            return F.avg_pool2d(x, 2)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if kernel is None:
        kernel = resample_kernel(f, x.device, x.dtype)
    kernel = kernel[None, None].expand(x.shape[1], 1, -1, -1)
    pad = (len(f) - 1) // 2
    if mode == "down":
        return F.conv2d(x, kernel, groups=x.shape[1], stride=2, padding=pad)
    return F.conv_transpose2d(x, kernel * 4, groups=x.shape[1], stride=2, padding=pad)


def is_box_filter(f: Sequence[float]) -> bool:
    return [float(v) for v in f] == [1.0, 1.0]


# The normalised 2-D filter outer(f, f) / sum(f)^2 in float32, then in dtype (the taps come from
# the host: a copy to the device).
def resample_kernel(f: Sequence[float], device: torch.device, dtype: torch.dtype) -> Tensor:
    taps = torch.tensor([float(v) for v in f], dtype=torch.float32, device=device)
    taps = taps / taps.sum()
    return torch.outer(taps, taps).to(dtype)


# MP-SiLU (paper Eq. 81): silu(x) / 0.596 keeps unit magnitude for unit-normal input.
def mp_silu(x: Tensor) -> Tensor:
    return F.silu(x) / 0.596


# MP-sum (paper Eq. 88): lerp(a, b, t) / sqrt((1 - t)^2 + t^2).
def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


# MP-cat (paper Eq. 103): cat(wa a, wb b), wa = K (1 - t) / sqrt(Na), wb = K t / sqrt(Nb).
def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    na, nb = a.shape[dim], b.shape[dim]
    k = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (k * (1 - t) / math.sqrt(na)), b * (k * t / math.sqrt(nb))], dim=dim)


# MP weight (paper Eq. 47): normalize(w) per output channel, times gain / sqrt(fan_in); float32.
def mp_weight(weight: Tensor, gain: Tensor | float = 1.0) -> Tensor:
    w = normalize(weight.to(torch.float32))
    return w * (gain / math.sqrt(w[0].numel()))


# ----------------------------------------------------------------------------
# Layers.


class MPFourier(torch.nn.Module):
    """Magnitude-preserving Fourier features (paper Eq. 75): sqrt(2) cos(x f + phi)."""

    freqs: Tensor
    phases: Tensor

    def __init__(self, num_channels: int, bandwidth: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32))
        y = (y + self.phases.to(torch.float32)).cos() * math.sqrt(2)
        return y.to(x.dtype)


def _version(t: Tensor) -> int | None:
    """A tensor's version counter (bumped by every in-place update), or None for an inference
    tensor, which has none."""
    return None if t.is_inference() else t._version


class MPConv(torch.nn.Module):
    """Magnitude-preserving conv (weight [out, in, k, k]) or linear (weight [out, in]).

    In training mode the stored weight is also replaced by its normalised version
    before use (forced weight normalisation, paper Eq. 66). After ``prepare`` the
    ready weight (gain folded in, so the call's ``gain`` is not used) serves every
    eval-mode call whose input dtype matches; switching to training mode or loading
    a state_dict discards it.
    """

    ready_weight: Tensor | None

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self.register_buffer("ready_weight", None, persistent=False)
        self._ready_source: tuple | None = None
        self.check_stale = True  # See forward and prepare_for_inference.

    # What a prepared weight was computed from: the weight's and the gain's storage and version
    # counters (an in-place update such as an EMA step bumps the version). Inference tensors (made
    # under torch.inference_mode()) have no version counter: only their storage is compared.
    def _source(self, gain: Tensor | float) -> tuple:
        w = self.weight
        g = (gain.data_ptr(), _version(gain)) if isinstance(gain, Tensor) else gain
        return w.data_ptr(), _version(w), g

    # Normalise once: store mp_weight(weight, gain) in `dtype` (same bits as a per-call cast).
    @torch.no_grad()
    def prepare(self, dtype: torch.dtype, gain: Tensor | float = 1.0) -> None:
        self.ready_weight = mp_weight(self.weight, gain).to(dtype)
        self._ready_source = self._source(gain)

    # Drop the prepared weight (it would go stale as soon as the parameters change).
    def unprepare(self) -> None:
        self.ready_weight = None
        self._ready_source = None

    def train(self, mode: bool = True) -> MPConv:
        if mode:
            self.unprepare()
        return super().train(mode)

    # Loading new weights makes a prepared weight stale: drop it.
    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.unprepare()
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: Tensor, gain: Tensor | float = 1.0) -> Tensor:
        w = self.ready_weight
        # A prepared weight whose sources changed since (in place or replaced) is not used: the
        # call normalises per call, as an unprepared network does (prepare again to cache anew).
        # Writes through `.data` bump no version counter and go unnoticed (documented).
        # Not checked while torch.compile traces: storage pointers cannot be traced (a graph break
        # in every layer); the compiled code uses the prepared weight as it is.
        if (w is not None and self.check_stale and not torch.compiler.is_compiling()
                and self._ready_source != self._source(gain)):
            w = None
        if self.training:
            # As the official layer: the float32 view of the weight is normalised into the stored
            # weight, then normalised for use. A float32 weight is that view itself (the use sees the
            # stored, normalised weight); a weight of another dtype is copied (normalised once).
            w = self.weight.to(torch.float32)
            with torch.no_grad():
                self.weight.copy_(normalize(w))
            w = mp_weight(w, gain).to(x.dtype)
        elif w is None or w.dtype != x.dtype:
            w = mp_weight(self.weight, gain).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(torch.nn.Module):
    """U-Net encoder/decoder block with optional self-attention (paper Fig. 21)."""

    def __init__(self,
        in_channels: int,                       # Input channels.
        out_channels: int,                      # Output channels.
        emb_channels: int,                      # Embedding channels.
        flavor: str = "enc",                    # 'enc' (skip conv + pixel norm first) or 'dec' (skip conv last).
        resample_mode: str = "keep",            # 'keep', 'up' or 'down'.
        resample_filter: Sequence[float] = (1, 1),  # Separable resampling filter taps.
        attention: bool = False,                # Self-attention after the residual branch?
        channels_per_head: int = 64,            # Channels per attention head (heads = out_channels // this).
        dropout: float = 0.0,                   # Dropout probability in the residual branch (training only).
        res_balance: float = 0.3,               # MP-sum balance: main branch (0) vs residual branch (1).
        attn_balance: float = 0.3,              # MP-sum balance: main branch (0) vs attention (1).
        clip_act: float | None = 256,           # Clip output activations to +-clip_act. None = no clipping.
    ) -> None:
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor must be 'enc' or 'dec', got {flavor!r}")
        if resample_mode not in ("keep", "up", "down"):
            raise ValueError(f"resample_mode must be 'keep', 'up' or 'down', got {resample_mode!r}")
        _check_filter(resample_filter)
        _check_int("channels_per_head", channels_per_head, 1)
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self._resample_kernels: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # See _filter_kernel.
        self._general_filter = resample_mode != "keep" and not is_box_filter(resample_filter)  # Needs a kernel.
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        res0_in = out_channels if flavor == "enc" else in_channels
        self.conv_res0 = MPConv(res0_in, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    # Normalise every weight once; emb_linear (fed by the float32 embedding) stays float32.
    def prepare(self, dtype: torch.dtype) -> None:
        self.emb_linear.prepare(torch.float32, gain=self.emb_gain)
        for conv in (self.conv_res0, self.conv_res1, self.conv_skip, self.attn_qkv, self.attn_proj):
            if conv is not None:
                conv.prepare(dtype)

    # Self-attention: qkv laid out [head][channel][q, k, v]; q, k, v normalised per head.
    def attention(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        attn_qkv, attn_proj = cast(MPConv, self.attn_qkv), cast(MPConv, self.attn_proj)  # Set when num_heads.
        qkv = attn_qkv(x).reshape(b, self.num_heads, -1, 3, h * w)
        q, k, v = normalize(qkv, dim=2).unbind(3)
        logits = q.transpose(2, 3) @ (k / math.sqrt(q.shape[2]))
        y = v @ logits.softmax(dim=3).transpose(2, 3)
        return attn_proj(y.reshape(b, c, h, w))

    # The resampling filter's 2-D kernel for x's device and dtype, kept once made (not a buffer: it
    # stays out of the state_dict and of meta-device construction). Made per call, its host-to-device
    # copy would wait for the GPU in every block and break CUDA-graph capture; the first call (a
    # warm-up, outside any capture) makes it. Made in normal mode, so a first call under inference
    # mode does not keep an inference tensor that a later training call could not save; not kept
    # while torch.compile traces (its tensors are not real ones).
    def _filter_kernel(self, x: Tensor) -> Tensor | None:
        if not self._general_filter or torch.compiler.is_compiling():
            return None
        key = (x.device, x.dtype)
        kernel = self._resample_kernels.get(key)
        if kernel is None:
            with torch.inference_mode(False), torch.no_grad():
                kernel = resample_kernel(self.resample_filter, x.device, x.dtype)
            if type(kernel) is Tensor:  # Not a fake or other subclass tensor of a tracing mode.
                self._resample_kernels[key] = kernel
        return kernel

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # Main branch.
        x = resample(x, f=self.resample_filter, mode=self.resample_mode, kernel=self._filter_kernel(x))
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)

        # Residual branch, modulated by the embedding.
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        # Join the branches.
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self.attention(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp_(-self.clip_act, self.clip_act)
        return x


class UNet(torch.nn.Module):
    """EDM2 U-Net (paper Fig. 21); F in D = c_skip x + c_out F(c_in x, c_noise, labels)."""

    def __init__(self,
        img_resolution: int,                            # Input resolution (64 for both released datasets).
        img_channels: int,                              # Input/output channels (4 latents, 3 pixels).
        label_dim: int,                                 # Number of classes. 0 = unconditional.
        model_channels: int = 192,                      # Base channel count C.
        channel_mult: Sequence[int] = (1, 2, 3, 4),     # Per-level channel multipliers of C.
        channel_mult_noise: int | None = None,          # Fourier channels / C. None = channel_mult[0].
        channel_mult_emb: int | None = None,            # Embedding channels / C. None = max(channel_mult).
        num_blocks: int = 3,                            # Encoder blocks per level (decoder: num_blocks + 1).
        attn_resolutions: Sequence[int] = (16, 8),      # Resolutions whose blocks have self-attention.
        label_balance: float = 0.5,                     # MP-sum balance: noise (0) vs class (1) embedding.
        concat_balance: float = 0.5,                    # MP-cat balance: main path (0) vs skip connection (1).
        **block_kwargs: Any,                            # Passed to every Block (dropout, channels_per_head, ...).
    ) -> None:
        super().__init__()
        _check_int("model_channels", model_channels, 1)
        if isinstance(channel_mult, (str, bytes)) or not isinstance(channel_mult, Sequence) or not channel_mult:
            raise ValueError(f"channel_mult: expected a non-empty sequence of integers >= 1, got {channel_mult!r}")
        for m in channel_mult:
            _check_int("channel_mult", m, 1)
        _check_int("num_blocks", num_blocks, 0)
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None

        # Encoder: input conv, then per level a down block (all but the first) and its blocks.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(
                    cout, cout, cemb, flavor="enc", resample_mode="down", **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="enc", attention=res in attn_resolutions, **block_kwargs)

        # Decoder: in0/in1 at the lowest level, an up block elsewhere; each block eats one skip.
        self.dec = torch.nn.ModuleDict()
        skips = [cast(int, m.out_channels) for m in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(
                    cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="dec", attention=res in attn_resolutions, **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    # Normalise every weight once: image path in `dtype`, embedding path in float32.
    def prepare(self, dtype: torch.dtype) -> None:
        self.emb_noise.prepare(torch.float32)
        if self.emb_label is not None:
            self.emb_label.prepare(torch.float32)
        for module in self.enc.values():
            cast("MPConv | Block", module).prepare(dtype)
        for module in self.dec.values():
            cast(Block, module).prepare(dtype)
        self.out_conv.prepare(dtype, gain=self.out_gain)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None) -> Tensor:
        # Embedding: MP-linear(Fourier(c_noise)), MP-summed with the class embedding, MP-SiLU.
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            labels = cast(Tensor, class_labels)  # Conditional networks are given labels (Precond: always).
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        # Encoder (a constant-ones channel is appended to the input); every output is a skip.
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, module in self.enc.items():
            x = module(x) if name.endswith("_conv") else module(x, emb)
            skips.append(x)

        # Decoder: each 'block{i}' first MP-concatenates the latest unused skip.
        for name, module in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = module(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class Precond(torch.nn.Module):
    """EDM preconditioning around the U-Net, plus the training-only log-variance head.

    ``net(x, sigma, class_labels)`` returns the float32 denoised image D(x; sigma).
    ``sigma`` is a float, a 0-dim tensor shared by the batch, or a per-sample [B] tensor.
    ``class_labels`` is one-hot [B, label_dim] (float), integer class indices [B], or
    None (all-zero labels); it is ignored by unconditional networks (label_dim = 0).
    """

    def __init__(self,
        img_resolution: int,            # Image resolution.
        img_channels: int,              # Image channels.
        label_dim: int,                 # Number of classes. 0 = unconditional.
        use_fp16: bool = True,          # Run the U-Net in float16 on CUDA? (Always float32 on CPU.)
        sigma_data: float = 0.5,        # Expected standard deviation of the training data.
        logvar_channels: int = 128,     # Fourier channels of the uncertainty (log-variance) head.
        **unet_kwargs: Any,             # Passed to UNet (model_channels, channel_mult, num_blocks, ...).
    ) -> None:
        super().__init__()
        _check_int("img_resolution", img_resolution, 1)
        _check_int("img_channels", img_channels, 1)
        _check_int("label_dim", label_dim, 0)
        if not isinstance(use_fp16, bool):
            raise ValueError(f"use_fp16: expected True or False, got {use_fp16!r}")
        _check_positive("sigma_data", sigma_data)
        _check_int("logvar_channels", logvar_channels, 1)
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    # U-Net compute dtype: float16 on CUDA when use_fp16, else float32.
    def body_dtype(self, device: torch.device | str, force_fp32: bool = False) -> torch.dtype:
        fp16 = self.use_fp16 and not force_fp32 and torch.device(device).type == "cuda"
        return torch.float16 if fp16 else torch.float32

    # Labels as float32 one-hot rows [B or 1, label_dim]; None for unconditional networks.
    def _labels(self, class_labels: Tensor | None, x: Tensor) -> Tensor | None:
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=x.device)
        if not class_labels.is_floating_point():
            if class_labels.ndim == 1:
                class_labels = F.one_hot(class_labels.long(), self.label_dim)  # Class indices [B].
            elif class_labels.ndim != 2:
                raise ValueError("class_labels: integer labels must be indices [B] or one-hot rows "
                                 f"[B, {self.label_dim}], got shape {tuple(class_labels.shape)}")
        if class_labels.ndim != 2 or class_labels.shape[1] != self.label_dim:
            raise ValueError(
                f"class_labels must be one-hot [B, {self.label_dim}] or indices [B], got {tuple(class_labels.shape)}")
        if class_labels.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"class_labels has {class_labels.shape[0]} rows for a batch of {x.shape[0]}")
        return class_labels.to(device=x.device, dtype=torch.float32)

    def forward(self,
        x: Tensor,                              # Noisy images [B, img_channels, H, W].
        sigma: Tensor | float,                  # Noise level: scalar / 0-dim (shared) or [B].
        class_labels: Tensor | None = None,     # One-hot [B, label_dim], indices [B], or None.
        force_fp32: bool = False,               # Run the U-Net in float32 even on CUDA.
        return_logvar: bool = False,            # Also return the (training-only) log-variance u(sigma).
    ) -> Tensor | tuple[Tensor, Tensor]:
        if x.ndim != 4 or x.shape[1] != self.img_channels:
            raise ValueError(f"x must have shape [B, {self.img_channels}, H, W], got {tuple(x.shape)}")
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.numel() not in (1, x.shape[0]):
            raise ValueError(f"sigma must be 0-dim or of shape [B={x.shape[0]}], got {tuple(sigma.shape)}")
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        labels = self._labels(class_labels, x)
        dtype = self.body_dtype(x.device, force_fp32)

        # Preconditioning (EDM): c_skip, c_out, c_in, c_noise.
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4

        # D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, labels), F's output in float32.
        f_x = self.unet((c_in * x).to(dtype), c_noise, labels)
        d_x = c_skip * x + c_out * f_x.to(torch.float32)
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return d_x, logvar
        return d_x


# ----------------------------------------------------------------------------
# Inference preparation.


# The U-Net compute dtypes a prepared weight may be stored in.
_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def prepare_for_inference(
    net: torch.nn.Module,           # A Precond, or any module containing Precond submodules.
    dtype: torch.dtype | None = None,  # U-Net compute dtype. None = net.body_dtype(device of its weights).
    *,
    check_stale: bool = True,       # Check in every eager call that the weights did not change since
                                    # (a few µs per layer); False: the caller promises they do not.
) -> torch.nn.Module:
    """Normalise every MP weight once, in place, and return the same ``net`` in eval mode.

    Each MPConv then holds ``normalize(w) * gain / sqrt(fan_in)`` (the learned
    ``emb_gain`` / ``out_gain`` folded in) in the dtype it is used with: the U-Net
    compute dtype for the image path, float32 for the embedding path. Outputs are
    the same as with per-call normalisation (the same float32 ops, cast once). Call
    it after loading weights and moving ``net`` to its device; ``net.train()`` or
    ``unprepare(net)`` discards the prepared weights. Calls with another compute
    dtype (e.g. ``force_fp32=True`` on CUDA) fall back to per-call normalisation.
    """
    preconds = [m for m in net.modules() if isinstance(m, Precond)]
    if not preconds:
        raise ValueError(f"net must be or contain an EDM2 Precond, got {type(net).__name__}")
    if dtype is not None and dtype not in _COMPUTE_DTYPES:
        raise TypeError(f"dtype: expected None or one of {', '.join(map(str, _COMPUTE_DTYPES))}, got {dtype!r}")
    if not isinstance(check_stale, bool):
        raise TypeError(f"check_stale: expected a bool, got {type(check_stale).__name__}")
    net.eval()
    for p in preconds:
        body = dtype if dtype is not None else p.body_dtype(p.unet.out_gain.device)
        p.unet.prepare(body)
        p.logvar_linear.prepare(torch.float32)
    for m in net.modules():
        if isinstance(m, MPConv):
            m.check_stale = check_stale
    return net


# Undo prepare_for_inference (per-call normalisation again); returns the same net.
def unprepare(net: torch.nn.Module) -> torch.nn.Module:
    for m in net.modules():
        if isinstance(m, MPConv):
            m.unprepare()
            m.check_stale = True
    return net


# ----------------------------------------------------------------------------
# Presets ("config G" of the release): sizes XS..XXL for ImageNet-512 latents and ImageNet-64.

# Per size: base channels C and the training dropout of the release (inference ignores dropout).
EDM2_PRESETS: dict[str, dict] = {
    "xxs": dict(model_channels=64, dropout=0.00),
    "xs":  dict(model_channels=128, dropout=0.00),
    "s":   dict(model_channels=192, dropout=0.00),
    "m":   dict(model_channels=256, dropout=0.10),
    "l":   dict(model_channels=320, dropout=0.10),
    "xl":  dict(model_channels=384, dropout=0.10),
    "xxl": dict(model_channels=448, dropout=0.10),
}

# Per dataset: what the network sees (img512 = 4x64x64 VAE latents, img64 = 3x64x64 pixels).
EDM2_DATASETS: dict[str, dict] = {
    "img512": dict(img_resolution=64, img_channels=4),
    "img64":  dict(img_resolution=64, img_channels=3),
}

# Number of ImageNet classes of the conditional presets.
EDM2_NUM_CLASSES = 1000


# Constructor kwargs of a preset (no weights are created), with `overrides` applied last.
def edm2_preset_kwargs(name: str, dataset: str = "img512", conditional: bool = True, **overrides: Any) -> dict:
    if not isinstance(name, str) or name.lower() not in EDM2_PRESETS:
        raise ValueError(f"name must be one of {sorted(EDM2_PRESETS)}, got {name!r}")
    if not isinstance(dataset, str) or dataset.lower() not in EDM2_DATASETS:
        raise ValueError(f"dataset must be one of {sorted(EDM2_DATASETS)}, got {dataset!r}")
    kwargs = dict(
        **EDM2_DATASETS[dataset.lower()],
        label_dim=EDM2_NUM_CLASSES if conditional else 0,
        use_fp16=True,
        **EDM2_PRESETS[name.lower()],
    )
    kwargs.update(overrides)
    return kwargs


def edm2_preset(
    name: str,                  # Size: 'xxs', 'xs', 's', 'm', 'l', 'xl' or 'xxl' (case-insensitive).
    dataset: str = "img512",    # 'img512' (4x64x64 latents) or 'img64' (3x64x64 pixels).
    conditional: bool = True,   # 1000 ImageNet classes (True) or unconditional (False).
    **overrides: Any,           # Any Precond / UNet / Block keyword, applied over the preset.
) -> Precond:
    """Build a randomly initialised EDM2 network of a released size.

    Weights are created on the current default device: build under
    ``with torch.device("meta"):`` to inspect a large preset without allocating it.
    """
    return Precond(**edm2_preset_kwargs(name, dataset, conditional, **overrides))


@torch.no_grad()
def randomize_gains_(
    net: torch.nn.Module,       # A Precond (or any module containing EDM2 layers).
    seed: int = 0,              # Seed of the gains drawn, uniform in [0.5, 1).
) -> torch.nn.Module:
    """Give a randomly initialised network non-zero ``out_gain`` / ``emb_gain`` (in place).

    The release initialises them at 0, so a fresh network outputs exactly c_skip x whatever its
    weights (and ignores its noise-level and class embedding): two fresh networks, main and guide,
    give the same output and guidance changes nothing. For timing, smoke runs and tests that must
    see the weights, draw the gains instead.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in net.named_parameters():
        if name.endswith(("out_gain", "emb_gain")):
            p.fill_(0.5 + 0.5 * float(torch.rand((), generator=g)))
    return net
