"""The Triton kernels compiled for the GPU, without a GPU: every kernel family compiles to PTX for
sm_90 (H100/H200) with the launch options the ops use, and the PTX keeps the reference's rounding.

The interpreter tests (tests/test_triton_*.py on a CPU) never run the compiled branch of the
kernels (libdevice's *_rn operations, tl.fma, float64 log/sin/cos, vector accesses), so this is the
only check of that code before a GPU runs it. Triton compiles ahead of time for an explicit
target with its bundled ptxas; the compilation runs in a subprocess because Triton fixes the
interpreter mode (TRITON_INTERPRET) when the kernels are defined, and the other Triton tests set it.

Checked in the PTX, per variant:
* it compiles (type errors, unsupported float64 math or casts surface here);
* no fused multiply-add besides the one of torch.lerp's rule (one per element when guided, none
  otherwise), only correctly rounded divisions (no div.approx / div.full), and no float32
  operation that flushes subnormals to zero (.ftz);
* the noise's float64 math is libdevice's (sqrt.rn.f64; no fast-math sin/cos/log/sqrt .approx);
* with 16-byte aligned pointers, the aligned layout gives vector (v2/v4) global accesses.
Skipped on a CUDA machine, where the Triton tests run the kernels themselves.
"""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton tests run the kernels on this GPU")

STEP_PTRS = {
    "euler": ["x_ptr", "dm_ptr", "dg_ptr", "seeds_ptr", "d_ptr", "xn_ptr", "xc_ptr"],
    "heun": ["x_ptr", "d_ptr", "xn_ptr", "dm_ptr", "dg_ptr", "seeds_ptr", "out_ptr", "xc_ptr"],
    "churn": ["x_ptr", "eps_ptr", "seeds_ptr", "out_ptr", "xc_ptr"],
}
# (name, kernel, state dtype, net dtype, cast dtype or None, constexprs): the layouts and flags the
# ops select (GROUPS_NOISE rows with per-image noise, GROUPS rows otherwise).
VARIANTS = [
    ("euler-f32-guided", "euler", "fp32", "fp32", None,
     dict(GUIDED=True, W_SMALL=False, WRITE_D=True, CHURN=False, ALIGNED=True, WIDE=False)),
    ("euler-f32-unguided-f16", "euler", "fp32", "fp16", None,
     dict(GUIDED=False, W_SMALL=True, WRITE_D=False, CHURN=False, ALIGNED=True, WIDE=False)),
    ("euler-f32-small-w-bf16-cast-ragged", "euler", "fp32", "bf16", "bf16",
     dict(GUIDED=True, W_SMALL=True, WRITE_D=True, CHURN=False, ALIGNED=False, WIDE=False)),
    ("euler-f32-churn", "euler", "fp32", "fp16", None,
     dict(GUIDED=True, W_SMALL=False, WRITE_D=True, CHURN=True, ALIGNED=True, WIDE=False)),
    ("euler-f64-churn-wide-ragged", "euler", "fp64", "fp32", None,
     dict(GUIDED=True, W_SMALL=False, WRITE_D=True, CHURN=True, ALIGNED=False, WIDE=True)),
    ("heun-f32-guided", "heun", "fp32", "fp32", None,
     dict(GUIDED=True, W_SMALL=False, CHURN=False, ALIGNED=True, WIDE=False)),
    ("heun-f64-guided-f16", "heun", "fp64", "fp16", None,
     dict(GUIDED=True, W_SMALL=False, CHURN=False, ALIGNED=True, WIDE=False)),
    ("heun-f32-churn-f16-cast", "heun", "fp32", "fp16", "fp16",
     dict(GUIDED=True, W_SMALL=False, CHURN=True, ALIGNED=True, WIDE=False)),
    # SCALARS (not a kernel constexpr): the step's scalars read from a float64 buffer (per-kind step graphs).
    ("euler-f32-churn-scalars", "euler", "fp32", "fp16", None,
     dict(GUIDED=True, W_SMALL=False, WRITE_D=True, CHURN=True, ALIGNED=True, WIDE=False, SCALARS=True)),
    ("heun-f32-guided-scalars", "heun", "fp32", "fp32", None,
     dict(GUIDED=True, W_SMALL=True, CHURN=False, ALIGNED=True, WIDE=False, SCALARS=True)),
    ("heun-f64-churn-scalars", "heun", "fp64", "fp16", None,
     dict(GUIDED=True, W_SMALL=False, CHURN=True, ALIGNED=True, WIDE=False, SCALARS=True)),
    ("churn-f32-seeds", "churn", "fp32", None, None, dict(FROM_SEEDS=True, ALIGNED=True, WIDE=False)),
    ("churn-f64-eps-ragged", "churn", "fp64", None, None, dict(FROM_SEEDS=False, ALIGNED=False, WIDE=False)),
    ("philox-normal-f32", "normal", "fp32", None, None, dict(ALIGNED=True, WIDE=False)),
    ("philox-normal-bf16-wide-ragged", "normal", "bf16", None, None, dict(ALIGNED=False, WIDE=True)),
    ("philox-words", "words", None, None, None, {}),
    # float64 state cast to the networks' 16-bit dtype: rounded through float32, like torch's .to().
    ("euler-f64-cast-f16", "euler", "fp64", "fp32", "fp16",
     dict(GUIDED=True, W_SMALL=False, WRITE_D=True, CHURN=False, ALIGNED=True, WIDE=False)),
    ("heun-f64-cast-bf16", "heun", "fp64", "fp32", "bf16",
     dict(GUIDED=True, W_SMALL=False, CHURN=False, ALIGNED=True, WIDE=False)),
    ("philox-normal-f16", "normal", "fp16", None, None, dict(ALIGNED=True, WIDE=False)),
    # Further specialisations the ops launch: an unguided Heun correction, float64 network outputs,
    # a float64 state cast to float32, Heun with churn on the 64-bit index path.
    ("heun-f32-unguided-f16", "heun", "fp32", "fp16", None,
     dict(GUIDED=False, W_SMALL=True, CHURN=False, ALIGNED=True, WIDE=False)),
    ("euler-f32-net-f64", "euler", "fp32", "fp64", None,
     dict(GUIDED=True, W_SMALL=True, WRITE_D=True, CHURN=False, ALIGNED=True, WIDE=False)),
    ("euler-f64-cast-f32", "euler", "fp64", "fp64", "fp32",
     dict(GUIDED=True, W_SMALL=False, WRITE_D=False, CHURN=False, ALIGNED=True, WIDE=False)),
    ("heun-f64-churn-wide-ragged", "heun", "fp64", "bf16", None,
     dict(GUIDED=True, W_SMALL=False, CHURN=True, ALIGNED=False, WIDE=True)),
]


def _compile_all() -> dict:
    """Runs in a fresh interpreter (compiled mode): PTX statistics of every variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from autoguide_fast import kernels

    kernels.load()
    from autoguide_fast.kernels import _triton_common as C
    from autoguide_fast.kernels import triton_philox as P
    from autoguide_fast.kernels import triton_step as S

    assert not C.INTERPRETED
    target = GPUTarget("cuda", 90, 32)
    options = dict(C.LAUNCH)  # num_warps, no fp fusion, libdevice without flush-to-zero.
    results = {}
    for name, kind, state, net, cast, flags in VARIANTS:
        flags = dict(flags)
        scalars = flags.pop("SCALARS", False)
        if kind == "normal":
            fn = P._philox_normal_kernel
            sig = {"seeds_ptr": "*i64", "out_ptr": f"*{state}", "numel": "i32", "groups_per_image": "i32",
                   "total_groups": "i32", "philox_stream": "i32"}
            consts = dict(flags, GROUPS=C.GROUPS_NOISE)
            ptrs = ["seeds_ptr", "out_ptr"]
        elif kind == "words":
            fn = P._philox_words_kernel
            sig = {"counter_ptr": "*i32", "key_ptr": "*i32", "out_ptr": "*i32", "n": "i32"}
            consts = {"BLOCK": 64}
            ptrs = list(sig)[:3]
        else:
            fn = {"euler": S._euler_step_kernel, "heun": S._heun_step_kernel, "churn": S._churn_kernel}[kind]
            ptrs = STEP_PTRS[kind]
            types = {"dm_ptr": net, "dg_ptr": net, "seeds_ptr": "i64", "xc_ptr": cast or state}
            sig = {p: f"*{types.get(p, state)}" for p in ptrs}
            if scalars:
                sig["scalars_ptr"] = "*fp64"
            sig.update({a: "i32" for a in fn.arg_names if a not in sig and not a.isupper()})  # Scalars, sizes.
            noisy = flags.get("CHURN", flags.get("FROM_SEEDS", False))
            consts = dict(flags, CAST=cast is not None, COMPILED=True, GROUPS=C.GROUPS_NOISE if noisy else C.GROUPS)
        for k in consts:
            sig[k] = "constexpr"
        sig = {a: sig[a] for a in fn.arg_names}  # Declaration order.
        attrs = {(fn.arg_names.index(p),): [["tt.divisibility", 16]] for p in ptrs}
        kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=options)
        ptx = kernel.asm["ptx"]
        per_thread = consts.get("GROUPS", 0) * 4 // (C.NUM_WARPS * 32)
        results[name] = {
            "per_thread": per_thread,
            "fma_f32": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
            "fma_f64": len(re.findall(r"\bfma\.rn\.f64\b", ptx)),
            "mad": len(re.findall(r"\bmad\.(?:rn\.)?f(?:32|64)\b", ptx)),
            "approx_div": len(re.findall(r"\bdiv\.(?:approx|full)\.", ptx)),
            "ftz_f32": len(re.findall(r"\.ftz\.f32\b", ptx)),
            "vector": len(re.findall(r"\b(?:ld|st)\.global(?:\.[a-z]+)*\.v[24]\.", ptx)),
            "scalar_f64_loads": len(re.findall(r"\bld\.global(?:\.[a-z]+)*\.(?:f64|b64)\b", ptx)),
            "cvt_16_from_f64": len(re.findall(r"\bcvt\.rn\.(?:f16|bf16)(?:x2)?\.f64\b", ptx)),
            "cvt_16_from_f32": len(re.findall(r"\bcvt\.rn\.(?:f16|bf16)(?:x2)?\.f32\b", ptx)),
            "approx_math": sorted(set(re.findall(r"\b(?:sin|cos|lg2|ex2|sqrt|rsqrt|rcp|tanh)\.approx[.a-z0-9]*", ptx))),
            "sqrt_rn_f64": len(re.findall(r"\bsqrt\.rn\.f64\b", ptx)),
        }
    return results


def _check(name: str, r: dict, kind: str, state, flags: dict) -> None:
    noisy = kind == "normal" or flags.get("CHURN", flags.get("FROM_SEEDS", False))
    guided = flags.get("GUIDED", False)
    assert r["mad"] == 0 and r["approx_div"] == 0 and r["ftz_f32"] == 0, (name, r)
    # The noise's float64 math is libdevice's, not fast math: a correctly rounded sqrt, and its log
    # seeds a reciprocal with rcp.approx.ftz.f64 that Newton steps (fma) refine, the one approximate
    # instruction allowed, and only with noise (no sin/cos/lg2/ex2/sqrt .approx anywhere).
    assert set(r["approx_math"]) <= ({"rcp.approx.ftz.f64"} if noisy else set()), (name, r)
    assert (r["sqrt_rn_f64"] > 0) == bool(noisy), (name, r)
    # Only the noise uses float64 library math (with its own fmas): count fmas where it is absent.
    if state == "fp32":
        assert r["fma_f32"] == (r["per_thread"] if guided else 0), (name, r)
    elif state == "fp64" and not noisy:
        assert r["fma_f64"] == (r["per_thread"] if guided else 0), (name, r)
    if flags.get("ALIGNED"):
        assert r["vector"] > 0, (name, r)
    # 16-bit outputs are never rounded from float64 in one step (torch rounds through float32).
    assert r["cvt_16_from_f64"] == 0, (name, r)


@pytest.fixture(scope="module")
def ptx_stats():
    from tests.triton_offline import run_compiled

    return run_compiled(__file__, timeout=600)


@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_kernel_compiles_for_sm90_with_the_reference_rounding(ptx_stats, variant):
    name, kind, state, _, _, flags = variant
    _check(name, ptx_stats[name], kind, state, flags)


def test_16_bit_outputs_of_float64_values_round_through_float32(ptx_stats):
    for name in ("euler-f64-cast-f16", "heun-f64-cast-bf16", "philox-normal-f16", "philox-normal-bf16-wide-ragged"):
        assert ptx_stats[name]["cvt_16_from_f64"] == 0 and ptx_stats[name]["cvt_16_from_f32"] > 0, name


def test_scalars_variants_load_their_values_from_memory(ptx_stats):
    """With a scalars buffer the kernels load w, t_hat, t_next (and, with churn, the scale and the
    stream) as float64 from global memory: 3 (5) more 64-bit loads than the same kernel without."""
    assert ptx_stats["heun-f32-guided"]["scalar_f64_loads"] == 0
    assert ptx_stats["heun-f32-guided-scalars"]["scalar_f64_loads"] == 3
    assert ptx_stats["euler-f32-churn-scalars"]["scalar_f64_loads"] == ptx_stats["euler-f32-churn"][
        "scalar_f64_loads"] + 5


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(_compile_all()))
