"""The Triton Philox generator against the spec: known answers and the torch reference of noise.py.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (slow: small sizes only).
"""

from __future__ import annotations

import pytest
import torch

from autoguide_fast import kernels, noise

if kernels.triton_error() is not None:
    pytest.skip(kernels.triton_error(), allow_module_level=True)
# Before anything imports triton: without CUDA, the kernels run in Triton's interpreter.
kernels.load(interpret_without_cuda=True)
from autoguide_fast.kernels import _triton_common, triton_philox  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = torch.ops.autoguide_fast_triton

# Random123's known-answer vectors for Philox4x32-10: (counter, key) -> output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
SEEDS = [0, 1, -1, 2**63 - 1, -(2**63), 123456789012345, 2**32 + 7]


def test_block_function_known_answers():
    counters = torch.tensor([c for c, _, _ in KNOWN_ANSWERS], device=DEVICE)
    keys = torch.tensor([k for _, k, _ in KNOWN_ANSWERS], device=DEVICE)
    got = triton_philox.philox4x32_words(counters, keys).cpu().tolist()
    assert got == [list(r) for _, _, r in KNOWN_ANSWERS]


def test_block_function_matches_torch_reference_on_random_words():
    g = torch.Generator().manual_seed(3)
    counters = torch.randint(0, 2**32, (37, 4), generator=g, dtype=torch.int64)
    keys = torch.randint(0, 2**32, (37, 2), generator=g, dtype=torch.int64)
    want = torch.stack(noise.philox4x32(tuple(counters.T), tuple(keys.T)), dim=1)
    got = triton_philox.philox4x32_words(counters.to(DEVICE), keys.to(DEVICE)).cpu()
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "numel,stream",
    [(1, 0), (2, 1), (3, 33), (5, 0xFFFFFFFF), (7, noise.churn_stream(31)), (3 * 37 * 53, 2)],
)
def test_normal_matches_torch_reference(numel, stream):
    seeds = noise.seeds_to_tensor(SEEDS, device=DEVICE)
    for dtype, atol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        got = OPS.philox_normal(seeds, numel, stream, dtype)
        want = noise.philox_normal(seeds.cpu(), numel, stream, dtype)
        assert got.shape == (len(SEEDS), numel) and got.dtype == dtype
        assert (got.cpu() - want).abs().max().item() <= atol


def test_normal_half_precision_outputs_round_like_torch():
    """16-bit noise is the float64 noise rounded as torch's .to() rounds it: through float32 (a
    direct float64 -> float16 rounding differs on ~6e-5 of the values)."""
    seeds = noise.seeds_to_tensor(list(range(-40, 40)), device=DEVICE)
    for dtype in (torch.float16, torch.bfloat16):
        got = OPS.philox_normal(seeds, 999, 3, dtype).cpu()
        want64 = noise.philox_normal(seeds.cpu(), 999, 3, torch.float64)
        # Bit for bit, except where the float64 values themselves differ in their last bits (libm:
        # about 1.5% of them in the interpreter): there by a few float64 ulps of max(|z|, 1) at most
        # (cos and sin near their zeros err in absolute terms), so a wrong value is never let off.
        got64 = OPS.philox_normal(seeds, 999, 3, torch.float64).cpu()
        gap = (got64 - want64).abs()
        ulp = torch.finfo(torch.float64).eps * want64.abs().clamp_min(1.0)
        assert (gap <= 8 * ulp).all(), float((gap / ulp).max())
        differ = got != want64.to(dtype)
        assert not (differ & (gap == 0)).any(), int(differ.sum())


def test_normal_is_per_image_and_statistically_normal():
    # Image b depends only on its seed: the same seed anywhere in any batch gives the same row.
    a = OPS.philox_normal(noise.seeds_to_tensor([4, 8, 15], device=DEVICE), 999, 1, torch.float32)
    b = OPS.philox_normal(noise.seeds_to_tensor([15, 4], device=DEVICE), 999, 1, torch.float32)
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(a[0], a[1])
    z = a.double()
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.05


def test_empty_sizes():
    assert OPS.philox_normal(noise.seeds_to_tensor([1], device=DEVICE), 0, 0, torch.float32).shape == (1, 0)
    assert OPS.philox_normal(torch.zeros(0, dtype=torch.int64, device=DEVICE), 5, 0, torch.float32).shape == (0, 5)


def test_opcheck_philox_normal():
    seeds = noise.seeds_to_tensor([3, -4], device=DEVICE)
    torch.library.opcheck(OPS.philox_normal.default, (seeds, 7, 5, torch.float32))


def test_bad_arguments_are_named():
    seeds = noise.seeds_to_tensor([1, 2], device=DEVICE)
    with pytest.raises(TypeError, match="seeds"):
        OPS.philox_normal(seeds.to(torch.int32), 4, 0, torch.float32)
    with pytest.raises(ValueError, match="stream"):
        OPS.philox_normal(seeds, 4, 2**32, torch.float32)
    with pytest.raises(ValueError, match="numel"):
        OPS.philox_normal(seeds, -1, 0, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        OPS.philox_normal(seeds, 4, 0, torch.int32)
    with pytest.raises(ValueError, match="counters"):
        triton_philox.philox4x32_words(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(_triton_common, "INTERPRETED", False)
    with pytest.raises(ValueError, match="seeds: triton kernels need a CUDA device, or TRITON_INTERPRET=1"):
        OPS.philox_normal(torch.tensor([1, 2]), 4, 0, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_normal_large_matches_reference():
    seeds = noise.seeds_to_tensor(list(range(-3, 61)), device="cuda")
    for numel in (4 * 64 * 64, 3 * 64 * 64 + 1):
        got = OPS.philox_normal(seeds, numel, 7, torch.float32)
        want = noise.philox_normal(seeds, numel, 7, torch.float32)
        assert (got - want).abs().max().item() <= 1e-6


def test_normal_tile_counter_holds_the_high_word_of_the_group():
    """normal_tile's counter for an int64 group g is (g mod 2^32, g >> 32, stream, 0), as noise.py
    specifies: groups past 2^32 (images over 2^34 elements, which no test can allocate) through a
    probe kernel, against the specification's words and Box-Muller restated here."""
    import math

    import triton
    import triton.language as tl

    @triton.jit
    def probe(out_ptr, seed, g_hi, g_lo, stream):
        g = (tl.full([4], 0, tl.int64) + g_hi.to(tl.int64)) * 4294967296 + g_lo + tl.arange(0, 4).to(tl.int64)
        z = triton_philox.normal_tile(tl.full([4], 0, tl.int64) + seed, g, stream)
        tl.store(out_ptr + tl.arange(0, 4)[:, None] * 4 + tl.arange(0, 4)[None, :], z)

    for seed, g_hi, g_lo in ((7, 1, 5), (-3, 3, 2**31 - 2), (2**40 + 1, 2**30, 0)):
        out = torch.empty(4, 4, dtype=torch.float64, device=DEVICE)
        probe[(1,)](out, seed, g_hi, g_lo, 9)
        g = torch.arange(4, dtype=torch.int64) + g_hi * 2**32 + g_lo
        key = seed % 2**64
        words = noise.philox4x32((g & 0xFFFFFFFF, g >> 32, torch.full_like(g, 9), torch.zeros_like(g)),
                                 (torch.tensor(key & 0xFFFFFFFF), torch.tensor(key >> 32)))
        u = [((w >> 8) + 1).double() * 2.0**-24 for w in words]
        want = []
        for ua, ub in ((u[0], u[1]), (u[2], u[3])):
            radius, theta = torch.sqrt(-2.0 * torch.log(ua)), (2.0 * math.pi) * ub
            want += [radius * torch.cos(theta), radius * torch.sin(theta)]
        torch.testing.assert_close(out.cpu(), torch.stack(want, dim=1), rtol=1e-13, atol=1e-13)
