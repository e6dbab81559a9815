"""Independent re-computations of the EDM2 layers, written from DESIGN.md §3 (not from edm2.py).

Every expected value below is computed in float64 by plain torch code that follows the design's
formulas (loops over attention heads and over kernel taps, explicit channel bookkeeping) from the
parameters of the module under test; the module itself runs in float32 on CPU (its image path on
CPU; the design's norms are float32, so the module cannot run in float64). The float32 round-off
of the module is ~1e-7..1e-6 of the output's scale: the tolerances are 1e-6 for the element-wise
primitives and 1e-5 for the layers and the whole network.

Each test also shows that it is sensitive: the same re-computation with one plausible mistake
(`mut=...`: a permuted qkv layout, a swapped MP-cat order, a wrong balance, ...) is asserted to be
more than 100 tolerances away from the module's output.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from autoguide_fast.models.edm2 import (
    Block,
    MPConv,
    MPFourier,
    Precond,
    UNet,
    mp_cat,
    mp_silu,
    mp_sum,
    mp_weight,
    normalize,
    resample,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
TOL_ELEMENTWISE = 1e-6  # element-wise primitives (one or two float32 roundings)
TOL = 1e-5              # layers and networks (float32 convolutions, float32 norms)


# ----------------------------------------------------------------------------
# Comparison helpers: errors relative to the expected tensor's largest magnitude.


def max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.to(F64)
    return ((actual.to(F64) - expected).abs().max() / expected.abs().max()).item()


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    err = max_rel(actual, expected)
    assert err <= tol, f"max |actual - expected| / max |expected| = {err:.3g} > {tol:.1g}"


# The check is sensitive: a re-computation with a deliberate mistake is far outside the tolerance.
def assert_far(actual: torch.Tensor, wrong: torch.Tensor, tol: float = TOL) -> None:
    assert actual.shape == wrong.shape, (tuple(actual.shape), tuple(wrong.shape))
    err = max_rel(actual, wrong)
    assert err > 100 * tol, f"a deliberately wrong re-computation is only {err:.3g} away"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed)) * scale


# Random, non-trivial gains (emb_gain / out_gain initialise at 0, which would hide their paths).
@torch.no_grad()
def set_random_gains(module: torch.nn.Module, seed: int) -> None:
    g = gen(seed)
    for name, p in module.named_parameters():
        if name.endswith("gain"):
            p.fill_(0.5 + float(torch.rand((), generator=g)))


# Give every MP weight a different magnitude per output channel (normalisation must undo it per
# output channel) and a small overall scale where `small` (then the 1e-4 of normalize matters).
@torch.no_grad()
def scramble_weights(module: torch.nn.Module, seed: int, small: bool = False) -> None:
    g = gen(seed)
    for m in module.modules():
        if isinstance(m, MPConv):
            w = m.weight
            scale = torch.exp(torch.randn(w.shape[0], generator=g))
            w.copy_(torch.randn(w.shape, generator=g) * scale.reshape(-1, *[1] * (w.ndim - 1)))
            if small:
                w.mul_(1e-3)


# ----------------------------------------------------------------------------
# Reference primitives, from DESIGN §3, in float64.


def ref_normalize(v: torch.Tensor, dims: list[int], mut: str = "") -> torch.Tensor:
    """v / (1e-4 + RMS(v)) over `dims`."""
    mean_sq = (v * v).mean(dim=dims, keepdim=True)
    if mut == "l2_norm":  # plain L2 norm instead of RMS
        return v / (1e-4 + (v * v).sum(dim=dims, keepdim=True).sqrt())
    if mut == "eps_inside":  # eps inside the square root
        return v / (1e-4 + mean_sq).sqrt()
    return v / (1e-4 + mean_sq.sqrt())


def ref_silu(x: torch.Tensor) -> torch.Tensor:
    """MP-SiLU: silu(x) / 0.596, silu(x) = x · sigmoid(x)."""
    return x * torch.sigmoid(x) / 0.596


def ref_sum(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """MP-sum: lerp(a, b, t) / sqrt((1 - t)^2 + t^2)."""
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t ** 2)


def ref_cat(a: torch.Tensor, b: torch.Tensor, t: float, mut: str = "") -> torch.Tensor:
    """MP-cat over channels: cat(wa·a, wb·b), K = sqrt((Na+Nb)/((1-t)^2+t^2)),
    wa = K(1-t)/sqrt(Na), wb = K·t/sqrt(Nb)."""
    na, nb = a.shape[1], b.shape[1]
    k = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    wa = k * (1 - t) / math.sqrt(na)
    wb = k * t / math.sqrt(nb)
    if mut == "cat_counts_swapped":
        wa, wb = k * (1 - t) / math.sqrt(nb), k * t / math.sqrt(na)
    if mut == "cat_balance_swapped":
        wa, wb = k * t / math.sqrt(na), k * (1 - t) / math.sqrt(nb)
    if mut == "cat_plain":
        wa, wb = 1.0, 1.0
    return torch.cat([wa * a, wb * b], dim=1)


def ref_weight(weight: torch.Tensor, gain, mut: str = "") -> torch.Tensor:
    """MP weight: normalize(weight) per output channel, times gain / sqrt(fan_in)."""
    w = weight.detach().to(F64)
    gain = float(gain.detach()) if isinstance(gain, torch.Tensor) else float(gain)
    fan_in = w[0].numel()
    dims = list(range(1, w.ndim))
    if mut == "norm_whole_tensor":
        dims = list(range(w.ndim))
    if mut == "fan_in_channels_only":
        fan_in = w.shape[1]
    return ref_normalize(w, dims, mut=mut) * (gain / math.sqrt(fan_in))


def ref_mpconv(x: torch.Tensor, weight: torch.Tensor, gain=1.0, mut: str = "") -> torch.Tensor:
    """MP-conv (weight [out, in, k, k], zero padding k//2) or MP-linear (weight [out, in]),
    written as an explicit sum over the kernel taps (cross-correlation, as torch's conv)."""
    w = ref_weight(weight, gain, mut=mut)
    if w.ndim == 2:
        return torch.einsum("oi,bi->bo", w, x)
    k = w.shape[-1]
    p = k // 2
    b, _, h, wd = x.shape
    xp = F.pad(x, [p, p, p, p])
    out = x.new_zeros(b, w.shape[0], h, wd)
    for dy in range(k):
        for dx in range(k):
            tap = w[:, :, dy, dx]
            if mut == "kernel_flipped":
                tap = w[:, :, k - 1 - dy, k - 1 - dx]
            out += torch.einsum("oi,bihw->bohw", tap, xp[:, :, dy:dy + h, dx:dx + wd])
    return out


def ref_down(x: torch.Tensor) -> torch.Tensor:
    """2x2 box average, stride 2."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


def ref_up(x: torch.Tensor) -> torch.Tensor:
    """2x upsampling by a transposed conv with the 2x2 box filter (times 4): each pixel copied
    into a 2x2 patch."""
    b, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


def ref_fourier(c: torch.Tensor, freqs: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """cos(c·f + φ)·√2, one row per element of c."""
    c, f, phi = c.to(F64).flatten(), freqs.to(F64), phases.to(F64)
    return math.sqrt(2) * torch.cos(c[:, None] * f[None, :] + phi[None, :])


def ref_attention(x: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
                  head_channels: int = 64, mut: str = "") -> torch.Tensor:
    """Self-attention of DESIGN §3, one head at a time.

    The 1x1 qkv conv's 3C output channels are laid out [head][channel within head][q, k, v]:
    part p (0 = q, 1 = k, 2 = v) of channel j of head n is output channel (n·D + j)·3 + p
    (D = channels per head). q, k, v are each normalised over the D channels of their head;
    attention weights = softmax over keys of qᵀk / sqrt(D); output = weights applied to v, put
    back in [head][channel] order (channel n·D + j), then the 1x1 projection.
    """
    b, c, h, w = x.shape
    d = head_channels
    heads = c // d
    qkv = ref_mpconv(x, qkv_weight).reshape(b, 3 * c, h * w)

    def channel(n: int, j: int, p: int) -> int:
        if mut == "qkv_major":          # [q, k, v][head][channel]
            return p * c + n * d + j
        if mut == "head_part_channel":  # [head][q, k, v][channel]
            return n * 3 * d + p * d + j
        return (n * d + j) * 3 + p

    parts = [[qkv[:, [channel(n, j, p) for j in range(d)]] for p in range(3)] for n in range(heads)]
    if mut == "norm_all_heads":  # normalise q, k, v over all C channels instead of per head
        for p in range(3):
            full = ref_normalize(torch.cat([parts[n][p] for n in range(heads)], dim=1), [1])
            for n in range(heads):
                parts[n][p] = full[:, n * d:(n + 1) * d]
    else:
        parts = [[ref_normalize(t, [1]) for t in head] for head in parts]

    out = x.new_zeros(b, c, h * w)
    for n in range(heads):
        q, k, v = parts[n]                                      # each [b, D, positions]
        scale = math.sqrt(c if mut == "scale_all_channels" else d)
        logits = torch.einsum("bdi,bdj->bij", q, k) / scale     # i: query, j: key
        weights = torch.softmax(logits, dim=1 if mut == "softmax_over_queries" else 2)
        y = torch.einsum("bij,bdj->bdi", weights, v)            # [b, D, queries]
        for j in range(d):
            out_channel = j * heads + n if mut == "channel_major_out" else n * d + j
            out[:, out_channel] = y[:, j]
    return ref_mpconv(out.reshape(b, c, h, w), proj_weight)


def ref_block(block: Block, x: torch.Tensor, emb: torch.Tensor, flavor: str, mode: str,
              attention: bool, head_channels: int = 64, mut: str = "") -> torch.Tensor:
    """Block(x, emb) of DESIGN §3 in float64 from `block`'s parameters (eval: no dropout)."""
    cin, cout = x.shape[1], block.conv_res1.weight.shape[0]
    # The design's structure: conv_skip iff the channels change, attention where asked for.
    assert (block.conv_skip is not None) == (cin != cout)
    assert (block.attn_qkv is not None) == attention
    assert (block.attn_proj is not None) == attention
    x, emb = x.to(F64), emb.to(F64)
    if mode == "down":
        x = ref_down(x)
    elif mode == "up":
        x = ref_up(x)
    if flavor == "enc":
        if mut == "enc_norm_before_skip":
            x = ref_normalize(x, [1])
        if block.conv_skip is not None:
            x = ref_mpconv(x, block.conv_skip.weight)
        if mut not in ("no_pixel_norm", "enc_norm_before_skip"):
            x = ref_normalize(x, [1])  # pixel norm: over the channel dim
    y = ref_mpconv(ref_silu(x), block.conv_res0.weight)
    c = ref_mpconv(emb, block.emb_linear.weight, gain=block.emb_gain)
    if mut != "emb_no_plus_one":
        c = c + 1
    y = ref_silu(y * c[:, :, None, None])
    y = ref_mpconv(y, block.conv_res1.weight)
    if flavor == "dec" and block.conv_skip is not None:
        x = ref_mpconv(x, block.conv_skip.weight)
    x = ref_sum(x, y, 0.7 if mut == "res_t_swapped" else 0.3)
    if attention:
        a = ref_attention(x, block.attn_qkv.weight, block.attn_proj.weight, head_channels, mut=mut)
        x = ref_sum(x, a, 0.7 if mut == "attn_t_swapped" else 0.3)
    if mut == "no_clip":
        return x
    return x.clamp(-256, 256)


# ----------------------------------------------------------------------------
# Primitives.


def test_normalize_is_v_over_eps_plus_rms():
    # Small, per-row different magnitudes: the 1e-4 is a visible part of the denominator.
    v = randn(3, 5, 4, 6, seed=1) * torch.exp(randn(3, 1, 1, 1, seed=2)) * 1e-3
    expected_all = ref_normalize(v.to(F64), [1, 2, 3])   # default: all dims but the first
    expected_ch = ref_normalize(v.to(F64), [1])          # pixel norm: over channels
    assert_matches(normalize(v), expected_all, TOL_ELEMENTWISE)
    assert_matches(normalize(v, dim=1), expected_ch, TOL_ELEMENTWISE)
    assert_far(normalize(v), ref_normalize(v.to(F64), [1, 2, 3], mut="l2_norm"), TOL_ELEMENTWISE)
    assert_far(normalize(v), ref_normalize(v.to(F64), [1, 2, 3], mut="eps_inside"), TOL_ELEMENTWISE)
    assert_far(normalize(v, dim=1), expected_all, TOL_ELEMENTWISE)
    # Unit RMS where the eps is negligible.
    u = normalize(randn(2, 64, 3, 3, seed=3) * 1e3, dim=1)
    rms = u.to(F64).pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-5, atol=0)


def test_mp_silu():
    x = randn(4, 7, 5, seed=4, scale=3.0)
    assert_matches(mp_silu(x), ref_silu(x.to(F64)), TOL_ELEMENTWISE)
    assert_far(mp_silu(x), ref_silu(x.to(F64)) * 0.596, TOL_ELEMENTWISE)        # missing the 1/0.596
    assert_far(mp_silu(x), F.gelu(x.to(F64)) / 0.596, TOL_ELEMENTWISE)           # another activation


@pytest.mark.parametrize("t", [0.3, 0.5, 0.8])
def test_mp_sum(t):
    a, b = randn(2, 6, 3, 3, seed=5), randn(2, 6, 3, 3, seed=6, scale=2.0)
    assert_matches(mp_sum(a, b, t), ref_sum(a.to(F64), b.to(F64), t), TOL_ELEMENTWISE)
    if t != 0.5:
        assert_far(mp_sum(a, b, t), ref_sum(b.to(F64), a.to(F64), t), TOL_ELEMENTWISE)     # a, b swapped
    assert_far(mp_sum(a, b, t), (1 - t) * a.to(F64) + t * b.to(F64), TOL_ELEMENTWISE)      # no rescaling


@pytest.mark.parametrize("t", [0.3, 0.5])
def test_mp_cat(t):
    a, b = randn(2, 5, 3, 4, seed=7), randn(2, 11, 3, 4, seed=8)
    expected = ref_cat(a.to(F64), b.to(F64), t)
    out = mp_cat(a, b, t=t)
    assert_matches(out, expected, TOL_ELEMENTWISE)
    assert_far(out, ref_cat(a.to(F64), b.to(F64), t, mut="cat_counts_swapped"), TOL_ELEMENTWISE)
    assert_far(out, ref_cat(a.to(F64), b.to(F64), t, mut="cat_plain"), TOL_ELEMENTWISE)
    if t != 0.5:
        assert_far(out, ref_cat(a.to(F64), b.to(F64), t, mut="cat_balance_swapped"), TOL_ELEMENTWISE)
    # Order: a's channels first (b first, e.g. skip before main path, is another function).
    assert_far(out, ref_cat(b.to(F64), a.to(F64), t), TOL_ELEMENTWISE)


def test_resample_box_filter():
    x = randn(2, 3, 6, 8, seed=9)
    down, up = resample(x, mode="down"), resample(x, mode="up")
    assert_matches(down, ref_down(x.to(F64)), TOL_ELEMENTWISE)
    assert_matches(up, ref_up(x.to(F64)), TOL_ELEMENTWISE)
    assert_matches(resample(x, mode="keep"), x.to(F64), 0.0)
    # Sensitivity: subsampling or max pooling instead of the box average; bilinear instead of copies.
    assert_far(down, x.to(F64)[:, :, ::2, ::2], TOL_ELEMENTWISE)
    assert_far(down, F.max_pool2d(x.to(F64), 2), TOL_ELEMENTWISE)
    assert_far(up, F.interpolate(x.to(F64), scale_factor=2.0, mode="bilinear"), TOL_ELEMENTWISE)


def test_mp_fourier():
    torch.manual_seed(10)
    fourier = MPFourier(4096)
    # Fixed buffers f = 2π·randn, φ = 2π·rand.
    assert 0 <= fourier.phases.min() and fourier.phases.max() < 2 * math.pi
    assert abs(fourier.phases.mean().item() / (2 * math.pi) - 0.5) < 0.03
    assert abs(fourier.freqs.std().item() / (2 * math.pi) - 1.0) < 0.05
    c = torch.tensor([-1.2, 0.0, 0.37, 0.9])
    out = fourier(c)
    expected = ref_fourier(c, fourier.freqs, fourier.phases)
    assert_matches(out, expected, TOL)
    assert_far(out, expected / math.sqrt(2), TOL)                                       # no √2
    assert_far(out, ref_fourier(c, fourier.freqs, torch.zeros_like(fourier.phases)), TOL)  # no phase
    assert_far(out, math.sqrt(2) * torch.sin(c.to(F64)[:, None] * fourier.freqs.to(F64)
                                             + fourier.phases.to(F64)), TOL)            # sin


@pytest.mark.parametrize("kernel", [[3, 3], [1, 1], []], ids=["conv3x3", "conv1x1", "linear"])
@pytest.mark.parametrize("small", [False, True], ids=["unit", "small"])
def test_mpconv_and_mp_weight(kernel, small):
    conv = MPConv(6, 5, kernel=kernel).eval()
    scramble_weights(conv, seed=11, small=small)
    x = randn(2, 6, 5, 7, seed=12) if kernel else randn(3, 6, seed=12)
    gain = 0.7312
    # mp_weight: per output channel normalisation, times gain / sqrt(fan_in = in·k·k).
    assert_matches(mp_weight(conv.weight, gain), ref_weight(conv.weight, gain), TOL_ELEMENTWISE)
    gain_t = torch.tensor(1.37)
    for g in (1.0, gain, gain_t):  # a float gain and a (learned, 0-dim) tensor gain
        out = conv(x, gain=g) if g != 1.0 else conv(x)
        expected = ref_mpconv(x.to(F64), conv.weight, gain=float(g))
        assert_matches(out, expected)
    out = conv(x, gain=gain_t)
    assert_far(out, ref_mpconv(x.to(F64), conv.weight, gain=1.0))                      # gain ignored
    assert_far(out, ref_mpconv(x.to(F64), conv.weight, gain_t, mut="norm_whole_tensor"))
    if small:
        assert_far(out, ref_mpconv(x.to(F64), conv.weight, gain_t, mut="eps_inside"))
    if kernel == [3, 3]:
        assert_far(out, ref_mpconv(x.to(F64), conv.weight, gain_t, mut="fan_in_channels_only"))
        assert_far(out, ref_mpconv(x.to(F64), conv.weight, gain_t, mut="kernel_flipped"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_mpconv_training_normalises_as_the_official_layer(dtype):
    """Training mode (forced weight normalisation): the official layer normalises the float32 view
    of the weight into the stored weight, then normalises that view for use. For a float32 weight the
    view is the weight itself, so the use sees normalize(normalize(w0)); for any other dtype the view
    is a copy, normalised once. Both restated here from those rules (in float32, as the layer)."""
    conv = MPConv(6, 5, kernel=[3, 3])
    scramble_weights(conv, seed=13)
    conv = conv.to(dtype).train()
    w0 = conv.weight.detach().to(torch.float32).clone()
    x = randn(2, 6, 5, 7, seed=14).to(torch.float32 if dtype == torch.float16 else dtype)
    gain = 0.83

    def use(w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype), padding=1)

    once = normalize(w0)
    twice = normalize(once.to(dtype).to(torch.float32)) if dtype == torch.float32 else None
    with torch.no_grad():
        out = conv(x, gain=gain)
    assert torch.equal(conv.weight, once.to(dtype))  # The stored weight: normalised once.
    expected = use(twice if twice is not None else once)
    assert torch.equal(out, expected)
    if dtype != torch.float32:  # Normalising twice (re-reading the stored weight) is measurably different.
        assert not torch.equal(out, use(normalize(conv.weight.to(torch.float32))))


# ----------------------------------------------------------------------------
# Attention and blocks.

ATTN_MUTATIONS = ["qkv_major", "head_part_channel", "norm_all_heads", "scale_all_channels",
                  "softmax_over_queries", "channel_major_out"]


@pytest.mark.parametrize("channels", [128, 192], ids=["2heads", "3heads"])
def test_attention_layout_per_head(channels):
    # Default heads of 64 channels (DESIGN: "heads of 64 channels").
    block = Block(channels, channels, 16, attention=True).eval()
    assert block.num_heads == channels // 64
    scramble_weights(block, seed=13)
    x = randn(2, channels, 3, 5, seed=14)
    with torch.no_grad():
        out = block.attention(x)
    expected = ref_attention(x.to(F64), block.attn_qkv.weight, block.attn_proj.weight, 64)
    assert_matches(out, expected)
    for mut in ATTN_MUTATIONS:
        wrong = ref_attention(x.to(F64), block.attn_qkv.weight, block.attn_proj.weight, 64, mut=mut)
        assert_far(out, wrong)


@pytest.mark.parametrize("channels", [16, 32, 63])
def test_attention_narrower_than_a_head_has_no_heads(channels):
    """As in the release, heads = out_channels // channels_per_head: an attention block narrower than
    one head (64 channels by default) has 0 heads and no attn_qkv / attn_proj, and is the block
    without attention (same parameters, same output)."""
    torch.manual_seed(21)
    block = Block(channels, channels, 16, attention=True).eval()
    plain = Block(channels, channels, 16, attention=False).eval()
    assert block.num_heads == 0 and block.attn_qkv is None and block.attn_proj is None
    assert block.state_dict().keys() == plain.state_dict().keys()
    assert not any(key.startswith(("attn_qkv", "attn_proj")) for key in block.state_dict())
    set_random_gains(block, seed=22)
    plain.load_state_dict(block.state_dict())
    x, emb = randn(2, channels, 4, 4, seed=23), randn(2, 16, seed=24)
    with torch.no_grad():
        assert torch.equal(block(x, emb), plain(x, emb))
    # One head's width has one head.
    wide = Block(64, 64, 16, attention=True)
    assert wide.num_heads == 1 and {"attn_qkv.weight", "attn_proj.weight"} <= wide.state_dict().keys()


BLOCK_CASES = [
    # flavor, in, out, resample, attention, channels_per_head
    ("enc", 24, 40, "keep", False, 64),   # conv_skip + pixel norm
    ("enc", 32, 32, "down", False, 64),   # down-sampling block
    ("enc", 32, 48, "keep", True, 16),    # skip conv and 3 heads of 16
    ("dec", 48, 32, "keep", False, 64),   # conv_skip last, res0 on the input width
    ("dec", 32, 32, "up", False, 64),     # up-sampling block
    ("dec", 96, 64, "keep", True, 32),    # 2 heads of 32
    ("dec", 128, 128, "keep", True, 64),  # default heads of 64
]


@pytest.mark.parametrize("flavor,cin,cout,mode,attention,head_channels", BLOCK_CASES)
def test_block_matches_design(flavor, cin, cout, mode, attention, head_channels):
    emb_channels = 20
    kwargs = dict(channels_per_head=head_channels) if head_channels != 64 else {}
    torch.manual_seed(15)
    block = Block(cin, cout, emb_channels, flavor=flavor, resample_mode=mode, attention=attention,
                  dropout=0.5, **kwargs).eval()
    scramble_weights(block, seed=16)
    set_random_gains(block, seed=17)
    x = randn(2, cin, 4, 6, seed=18, scale=1.5)
    emb = randn(2, emb_channels, seed=19)
    with torch.no_grad():
        out = block(x, emb)
    expected = ref_block(block, x, emb, flavor, mode, attention, head_channels)
    assert_matches(out, expected)  # dropout (p=0.5) is off in eval

    # Sensitivity.
    muts = ["res_t_swapped", "emb_no_plus_one"]
    if flavor == "enc":
        muts += ["no_pixel_norm"] + (["enc_norm_before_skip"] if cin != cout else [])
    if attention:
        muts += ["attn_t_swapped"] + ATTN_MUTATIONS
    for mut in muts:
        assert_far(out, ref_block(block, x, emb, flavor, mode, attention, head_channels, mut=mut))
    if mode == "keep" and cin == cout:  # the design's other flavour (same parameter shapes)
        other = "dec" if flavor == "enc" else "enc"
        assert_far(out, ref_block(block, x, emb, other, mode, attention, head_channels))

    # Dropout is configured: in training mode the output changes (on a copy).
    train_block = copy.deepcopy(block).train()
    with torch.no_grad():
        assert max_rel(train_block(x, emb), expected) > 1e-2


def test_block_clips_to_256():
    torch.manual_seed(20)
    block = Block(16, 16, 8, flavor="dec").eval()
    set_random_gains(block, seed=21)
    x = randn(2, 16, 4, 4, seed=22, scale=1e3)  # the decoder does not normalise its input
    emb = randn(2, 8, seed=23)
    with torch.no_grad():
        out = block(x, emb)
    expected = ref_block(block, x, emb, "dec", "keep", False)
    assert out.abs().max().item() == 256
    assert_matches(out, expected)
    assert_far(out, ref_block(block, x, emb, "dec", "keep", False, mut="no_clip"))


# ----------------------------------------------------------------------------
# The whole U-Net and the preconditioning.

# Config G's topology (channel_mult 1..4, 3 encoder / 4 decoder blocks per level, attention at the
# two lowest resolutions) at a tiny size: C = 8, 16x16 input, heads of 8 channels.
TINY_G = dict(img_resolution=16, img_channels=3, model_channels=8, channel_mult=[1, 2, 3, 4], num_blocks=3,
              attn_resolutions=[4, 2], channels_per_head=8)
LABEL_DIM = 5


def ref_unet(unet: UNet, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None,
             img_resolution: int, model_channels: int, channel_mult: list[int], num_blocks: int,
             attn_resolutions: list[int], channels_per_head: int, mut: str = "") -> torch.Tensor:
    """F(x, c_noise, labels) of DESIGN §3 in float64 from `unet`'s parameters."""
    x = x.to(F64)
    # Embedding: Fourier(c_noise) → MP-linear to 4C; + labels (MP-sum, t = 0.5); MP-SiLU.
    emb = ref_mpconv(ref_fourier(c_noise, unet.emb_fourier.freqs, unet.emb_fourier.phases), unet.emb_noise.weight)
    assert emb.shape[1] == model_channels * max(channel_mult)
    if labels is not None:
        label_dim = labels.shape[1]
        scale = 1.0 if mut == "labels_unscaled" else math.sqrt(label_dim)
        emb = ref_sum(emb, ref_mpconv(labels.to(F64) * scale, unet.emb_label.weight), 0.5)
    if mut != "emb_no_silu":
        emb = ref_silu(emb)

    # Encoder: a constant-ones channel appended; every module's output is a skip.
    ones = torch.ones_like(x[:, :1])
    x = torch.cat([ones, x] if mut == "ones_first" else [x, ones], dim=1)
    skips = []
    for level in range(len(channel_mult)):
        r = img_resolution >> level
        if level == 0:
            x = ref_mpconv(x, unet.enc[f"{r}x{r}_conv"].weight)
        else:
            x = ref_block(unet.enc[f"{r}x{r}_down"], x, emb, "enc", "down", False, channels_per_head, mut)
        skips.append(x)
        for i in range(num_blocks):
            block = unet.enc[f"{r}x{r}_block{i}"]
            x = ref_block(block, x, emb, "enc", "keep", r in attn_resolutions, channels_per_head, mut)
            skips.append(x)
    assert len(skips) == len(channel_mult) * (num_blocks + 1)

    # Decoder: in0 (attention) + in1 at the lowest level, an up block elsewhere; each block{i}
    # first takes MP-cat(x, skip), the skips consumed last-first.
    for level in reversed(range(len(channel_mult))):
        r = img_resolution >> level
        if level == len(channel_mult) - 1:
            x = ref_block(unet.dec[f"{r}x{r}_in0"], x, emb, "dec", "keep", True, channels_per_head, mut)
            x = ref_block(unet.dec[f"{r}x{r}_in1"], x, emb, "dec", "keep", False, channels_per_head, mut)
        else:
            x = ref_block(unet.dec[f"{r}x{r}_up"], x, emb, "dec", "up", False, channels_per_head, mut)
        for i in range(num_blocks + 1):
            skip = skips.pop()
            if mut == "skip_cat_swapped":
                x = ref_cat(skip, x, 0.5)
            else:
                x = ref_cat(x, skip, 0.5, mut=mut)
            block = unet.dec[f"{r}x{r}_block{i}"]
            x = ref_block(block, x, emb, "dec", "keep", r in attn_resolutions, channels_per_head, mut)
    assert not skips
    return ref_mpconv(x, unet.out_conv.weight, gain=unet.out_gain)


def tiny_g_net(sigma_data: float = 0.5, label_dim: int = LABEL_DIM) -> Precond:
    torch.manual_seed(24)
    kwargs = {} if sigma_data == 0.5 else dict(sigma_data=sigma_data)
    net = Precond(label_dim=label_dim, use_fp16=False, logvar_channels=32, **kwargs, **TINY_G).eval()
    set_random_gains(net, seed=25)
    return net


def ref_precond_coeffs(sigma: torch.Tensor, sigma_data: float):
    s = sigma.to(F64).reshape(-1, 1, 1, 1)
    sd = sigma_data
    c_skip = sd ** 2 / (s ** 2 + sd ** 2)
    c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
    c_in = 1 / (sd ** 2 + s ** 2).sqrt()
    c_noise = s.flatten().log() / 4
    return c_skip, c_out, c_in, c_noise


UNET_MUTATIONS = ["skip_cat_swapped", "cat_plain", "ones_first", "labels_unscaled", "emb_no_silu",
                  "res_t_swapped", "qkv_major", "norm_all_heads"]


@pytest.mark.parametrize("conditional", [True, False], ids=["cond", "uncond"])
def test_unet_and_precond_end_to_end(conditional):
    label_dim = LABEL_DIM if conditional else 0
    net = tiny_g_net(label_dim=label_dim)
    unet = net.unet
    # The design's module layout: 16 encoder modules (= skips), in0/in1, up blocks, 4 decoder blocks.
    enc_names = ["16x16_conv"] + [f"{r}x{r}_{n}" for r in (16, 8, 4, 2)
                                  for n in (["down"] if r != 16 else []) + [f"block{i}" for i in range(3)]]
    dec_names = [f"{r}x{r}_{n}" for r in (2, 4, 8, 16)
                 for n in (["in0", "in1"] if r == 2 else ["up"]) + [f"block{i}" for i in range(4)]]
    assert list(unet.enc.keys()) == enc_names and len(enc_names) == 16
    assert list(unet.dec.keys()) == dec_names

    gx = gen(26)
    x = torch.randn(2, 3, 16, 16, generator=gx) * 2
    sigma = torch.tensor([0.3, 4.0])
    labels = torch.tensor([3, 1]) if conditional else None
    onehot = F.one_hot(labels, LABEL_DIM).to(F64) if conditional else None
    c_skip, c_out, c_in, c_noise = ref_precond_coeffs(sigma, 0.5)
    cfg = {k: TINY_G[k] for k in ("img_resolution", "model_channels", "channel_mult", "num_blocks",
                                  "attn_resolutions", "channels_per_head")}

    with torch.no_grad():
        f_out = unet((c_in * x.to(F64)).float(), c_noise.float(), None if onehot is None else onehot.float())
        d_out, logvar = net(x, sigma, labels, return_logvar=True)
    f_ref = ref_unet(unet, c_in * x.to(F64), c_noise, onehot, **cfg)
    assert_matches(f_out, f_ref)
    d_ref = c_skip * x.to(F64) + c_out * f_ref
    assert_matches(d_out, d_ref)
    assert d_out.dtype == torch.float32
    # The network part of D is checked on its own (c_skip·x dominates D at small σ).
    assert_matches((d_out.to(F64) - c_skip * x.to(F64)) / c_out, f_ref, 2 * TOL)

    # Training-only log-variance head: MP-linear(Fourier(c_noise)) → [B, 1, 1, 1].
    lv_ref = ref_mpconv(ref_fourier(c_noise, net.logvar_fourier.freqs, net.logvar_fourier.phases),
                        net.logvar_linear.weight).reshape(-1, 1, 1, 1)
    assert_matches(logvar, lv_ref)
    assert_far(logvar, ref_mpconv(ref_fourier(c_noise * 4, net.logvar_fourier.freqs, net.logvar_fourier.phases),
                                  net.logvar_linear.weight).reshape(-1, 1, 1, 1))

    for mut in UNET_MUTATIONS:
        if mut == "labels_unscaled" and not conditional:
            continue
        assert_far(f_out, ref_unet(unet, c_in * x.to(F64), c_noise, onehot, **cfg, mut=mut))


class SpyUNet(torch.nn.Module):
    """Stands in for the U-Net: records what Precond feeds it and returns a fixed tensor."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output
        self.calls: list[tuple] = []

    def forward(self, x, noise_labels, class_labels):
        self.calls.append((x.clone(), noise_labels.clone(), None if class_labels is None else class_labels.clone()))
        return self.output


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
@pytest.mark.parametrize("sigma", [[0.002, 0.5, 80.0], 1.7], ids=["per_sample", "shared"])
def test_precond_coefficients(sigma_data, sigma):
    net = tiny_g_net(sigma_data=sigma_data)
    assert net.sigma_data == sigma_data  # default 0.5 (DESIGN: σ_d = 0.5)
    x = randn(3, 3, 16, 16, seed=27, scale=3.0)
    f_fixed = randn(3, 3, 16, 16, seed=28)
    net.unet = SpyUNet(f_fixed)
    sigma_t = torch.tensor(sigma, dtype=torch.float32)
    labels = torch.tensor([4, 0, 2])
    with torch.no_grad():
        d_out = net(x, sigma_t if isinstance(sigma, list) else sigma, labels)
    (x_in, c_noise_in, labels_in), = net.unet.calls

    c_skip, c_out, c_in, c_noise = ref_precond_coeffs(sigma_t, sigma_data)
    assert_matches(x_in, c_in * x.to(F64))
    assert_matches(c_noise_in, c_noise)
    assert_matches(labels_in, F.one_hot(labels, LABEL_DIM).to(F64), 0.0)
    expected = c_skip * x.to(F64) + c_out * f_fixed.to(F64)
    assert_matches(d_out, expected)

    # Sensitivity: σ_d fixed at 0.5 where it is not, c_skip and c_out confused, c_noise = log σ.
    if sigma_data != 0.5:
        cs, co, ci, cn = ref_precond_coeffs(sigma_t, 0.5)
        assert_far(d_out, cs * x.to(F64) + co * f_fixed.to(F64))
        assert_far(x_in, ci * x.to(F64))
    assert_far(d_out, c_out * x.to(F64) + c_skip * f_fixed.to(F64))
    assert_far(c_noise_in, c_noise * 4)
    assert_far(x_in, c_in * c_in * x.to(F64))
