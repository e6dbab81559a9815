"""Tests of the EDM2 network: sizes, names, shapes, preconditioning contract, inference preparation."""

import copy
import math

import pytest
import torch

from autoguide_fast.models import (
    EDM2_PRESETS,
    Block,
    MPConv,
    Precond,
    edm2_preset,
    edm2_preset_kwargs,
    prepare_for_inference,
    randomize_gains_,
    unprepare,
)
from autoguide_fast.models.edm2 import normalize, resample

# Parameters (millions) of the conditional ImageNet-512 presets, from the release.
PAPER_PARAMS_M = {"xs": 125, "s": 280, "m": 498, "l": 778, "xl": 1119, "xxl": 1523}

# A tiny config that still has every kind of block: down/up, skip convs, attention (in0 + 8x8).
TINY = dict(img_resolution=16, img_channels=4, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[8], channels_per_head=16)



# Marks a test as needing CUDA (float16 body): registered `gpu` marker, skipped without CUDA.
def gpu_test(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(fn))


# Relative L2 distance ||a - b|| / ||b||.
def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# A tiny network with non-zero gains (at init out_gain = 0 makes F vanish and tests vacuous).
def tiny_net(label_dim: int = 10, seed: int = 0, **kwargs) -> Precond:
    torch.manual_seed(seed)
    net = Precond(label_dim=label_dim, **{**TINY, **kwargs})
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.copy_(0.5 + torch.rand([], generator=gen))
    return net.eval()


def inputs(batch: int = 3, label_dim: int = 10, seed: int = 2, res: int = 16, channels: int = 4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, res, res, generator=gen) * 2.0
    labels = torch.randint(0, max(label_dim, 1), [batch], generator=gen)
    return x, labels


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cond_net() -> Precond:
    return tiny_net()


# ----------------------------------------------------------------------------
# Sizes and names of the released presets (built on the meta device: no memory, no time).


# DESIGN §3 / the EDM2 paper: Gflops (multiply-adds) per evaluation at 512 (latents 4x64x64).
PAPER_GFLOPS = {"xs": 46, "s": 102, "m": 181, "l": 282, "xl": 406, "xxl": 552}


@pytest.mark.parametrize("name", list(PAPER_GFLOPS))
def test_preset_compute_per_evaluation(name):
    """The work of one evaluation, counted by torch's FlopCounterMode on the meta device (no memory,
    no time), within 3% of the paper's figure (the counter skips the element-wise ops)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = edm2_preset(name)
        x, sigma, labels = torch.randn(1, 4, 64, 64), torch.ones(1), torch.zeros(1, 1000)
        with FlopCounterMode(display=False) as counter:
            net(x, sigma, labels)
    gmacs = counter.get_total_flops() / 2e9
    assert abs(gmacs - PAPER_GFLOPS[name]) / PAPER_GFLOPS[name] < 0.03, gmacs


@pytest.mark.parametrize("name", list(PAPER_PARAMS_M))
def test_preset_parameter_count(name):
    with torch.device("meta"):
        net = edm2_preset(name)
    count = sum(p.numel() for p in net.parameters())
    assert abs(count / 1e6 - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.005


@pytest.mark.parametrize("name", list(EDM2_PRESETS))
def test_unconditional_preset_drops_only_the_label_embedding(name):
    with torch.device("meta"):
        cond = edm2_preset(name)
        uncond = edm2_preset(name, conditional=False)
    c = EDM2_PRESETS[name]["model_channels"]
    assert uncond.label_dim == 0 and uncond.unet.emb_label is None
    diff = sum(p.numel() for p in cond.parameters()) - sum(p.numel() for p in uncond.parameters())
    assert diff == 1000 * 4 * c


@pytest.mark.parametrize("name", list(EDM2_PRESETS))
def test_img64_preset_has_three_channels(name):
    with torch.device("meta"):
        net = edm2_preset(name, dataset="img64")
    c = EDM2_PRESETS[name]["model_channels"]
    assert (net.img_resolution, net.img_channels, net.label_dim) == (64, 3, 1000)
    assert net.unet.enc["64x64_conv"].weight.shape == (c, 3 + 1, 3, 3)
    assert net.unet.out_conv.weight.shape == (3, c, 3, 3)


def test_img64_preset_runs_on_cpu():
    torch.manual_seed(0)
    net = edm2_preset("xs", dataset="img64", model_channels=16, num_blocks=1).eval()
    x, labels = inputs(batch=2, channels=3, res=64)
    with torch.no_grad():
        out = net(x, torch.tensor(2.0), labels)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32 and out.isfinite().all()


def test_released_layout_names_and_shapes():
    with torch.device("meta"):
        net = edm2_preset("s")
    sd = net.state_dict()
    enc, dec = net.unet.enc, net.unet.dec
    assert list(enc) == ["64x64_conv"] + [
        f"{r}x{r}_{k}" for r in (64, 32, 16, 8) for k in (["down"] if r != 64 else []) + ["block0", "block1", "block2"]]
    assert list(dec) == ["8x8_in0", "8x8_in1"] + [
        f"{r}x{r}_{k}" for r in (8, 16, 32, 64) for k in (["up"] if r != 8 else []) + [f"block{i}" for i in range(4)]]
    assert len(enc) == 16  # one skip per encoder module
    shapes = {
        "unet.out_gain": (),
        "unet.emb_fourier.freqs": (192,),
        "unet.emb_fourier.phases": (192,),
        "unet.emb_noise.weight": (768, 192),
        "unet.emb_label.weight": (768, 1000),
        "unet.enc.64x64_conv.weight": (192, 5, 3, 3),
        "unet.enc.32x32_down.emb_gain": (),
        "unet.enc.32x32_block0.conv_skip.weight": (384, 192, 1, 1),
        "unet.enc.32x32_block0.conv_res0.weight": (384, 384, 3, 3),
        "unet.enc.16x16_block1.attn_qkv.weight": (3 * 576, 576, 1, 1),
        "unet.enc.16x16_block1.attn_proj.weight": (576, 576, 1, 1),
        "unet.dec.8x8_in0.attn_qkv.weight": (3 * 768, 768, 1, 1),
        "unet.dec.8x8_in1.emb_linear.weight": (768, 768),
        "unet.dec.16x16_up.conv_res1.weight": (768, 768, 3, 3),
        "unet.dec.64x64_block0.conv_res0.weight": (192, 384 + 192, 3, 3),
        "unet.dec.64x64_block0.conv_skip.weight": (192, 384 + 192, 1, 1),
        "unet.out_conv.weight": (4, 192, 3, 3),
        "logvar_fourier.freqs": (128,),
        "logvar_fourier.phases": (128,),
        "logvar_linear.weight": (1, 128),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert "unet.dec.8x8_in1.attn_qkv.weight" not in sd
    assert "unet.enc.64x64_block0.conv_skip.weight" not in sd
    assert "unet.enc.32x32_block0.attn_qkv.weight" not in sd
    assert not any("ready_weight" in k or "bias" in k for k in sd)


def test_preset_kwargs_and_overrides():
    kwargs = edm2_preset_kwargs("S", dataset="img64", conditional=False, model_channels=16, dropout=0.2)
    assert kwargs["model_channels"] == 16 and kwargs["dropout"] == 0.2
    assert (kwargs["img_channels"], kwargs["label_dim"], kwargs["use_fp16"]) == (3, 0, True)
    # The dataset's case does not matter either (as the size's and the CLI's edm2:IMG64-S).
    assert edm2_preset_kwargs("s", dataset="IMG64") == edm2_preset_kwargs("s", dataset="img64")


def test_bad_preset_arguments():
    with pytest.raises(ValueError, match="name"):
        edm2_preset("huge")
    with pytest.raises(ValueError, match="dataset"):
        edm2_preset("s", dataset="img256")
    with pytest.raises(ValueError, match="dataset"):
        edm2_preset("s", dataset=None)


# ----------------------------------------------------------------------------
# The denoiser contract on a tiny config.


@pytest.mark.parametrize("label_dim", [10, 0])
def test_shapes_and_dtype(label_dim):
    net = tiny_net(label_dim=label_dim)
    x, labels = inputs(label_dim=label_dim)
    with torch.no_grad():
        out = net(x, torch.tensor(1.5), labels if label_dim else None)
        out2, logvar = net(x, torch.tensor([0.1, 1.0, 10.0]), labels, return_logvar=True)
    assert out.shape == x.shape and out.dtype == torch.float32 and out.isfinite().all()
    assert out2.shape == x.shape and logvar.shape == (3, 1, 1, 1)
    assert (net.img_resolution, net.img_channels, net.label_dim) == (16, 4, label_dim)


def test_output_is_not_just_the_skip(cond_net):
    x, labels = inputs()
    sigma = torch.tensor(1.5)
    with torch.no_grad():
        out = cond_net(x, sigma, labels)
    c_skip = 0.25 / (sigma**2 + 0.25)
    assert rel_l2(out, c_skip * x) > 0.1


def test_sigma_scalar_zero_dim_and_per_sample(cond_net):
    x, labels = inputs()
    with torch.no_grad():
        shared = cond_net(x, torch.tensor(0.7), labels)
        per_sample = cond_net(x, torch.full([3], 0.7), labels)
        as_float = cond_net(x, 0.7, labels)
        mixed = cond_net(x, torch.tensor([0.05, 0.7, 20.0]), labels)
        alone = [cond_net(x[i:i + 1], torch.tensor(s), labels[i:i + 1]) for i, s in enumerate([0.05, 0.7, 20.0])]
    torch.testing.assert_close(per_sample, shared, rtol=1e-5, atol=1e-5)
    assert torch.equal(as_float, shared)
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_label_forms(cond_net):
    x, labels = inputs()
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    with torch.no_grad():
        by_index = cond_net(x, torch.tensor(1.0), labels)
        by_one_hot = cond_net(x, torch.tensor(1.0), one_hot)
        by_none = cond_net(x, torch.tensor(1.0), None)
        by_zeros = cond_net(x, torch.tensor(1.0), torch.zeros(3, 10))
        other = cond_net(x, torch.tensor(1.0), (labels + 1) % 10)
    assert torch.equal(by_index, by_one_hot)
    torch.testing.assert_close(by_none, by_zeros, rtol=1e-5, atol=1e-5)
    assert rel_l2(other, by_index) > 1e-3  # labels matter


def test_unconditional_ignores_labels():
    net = tiny_net(label_dim=0)
    x, labels = inputs()
    with torch.no_grad():
        assert torch.equal(net(x, 1.0, labels), net(x, 1.0, None))


def test_deterministic_function_in_eval(cond_net):
    x, labels = inputs()
    sigma = torch.tensor([0.3, 3.0, 30.0])
    with torch.no_grad():
        a = cond_net(x.clone(), sigma, labels)
        b = cond_net(x.clone(), sigma, labels)
        c = cond_net(x[[2, 0, 1]], sigma[[2, 0, 1]], labels[[2, 0, 1]])
    assert torch.equal(a, b)
    torch.testing.assert_close(c, a[[2, 0, 1]], rtol=1e-5, atol=1e-5)


def test_bad_call_arguments(cond_net):
    x, labels = inputs()
    with pytest.raises(ValueError, match="x must"):
        cond_net(x[:, :3], 1.0, labels)
    with pytest.raises(ValueError, match="sigma"):
        cond_net(x, torch.ones(2), labels)
    with pytest.raises(ValueError, match="class_labels"):
        cond_net(x, 1.0, torch.zeros(3, 7))
    with pytest.raises(ValueError, match="class_labels"):
        cond_net(x, 1.0, torch.zeros(2, 10))
    with pytest.raises(ValueError, match="net"):
        prepare_for_inference(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("dtype", ["float16", torch.int64, torch.float8_e4m3fn], ids=str)
def test_prepare_for_inference_checks_dtype_before_changing_the_network(dtype):
    net = tiny_net()
    net.train()
    with pytest.raises(TypeError, match="^dtype: expected None or one of"):
        prepare_for_inference(net, dtype)
    assert net.training  # Not switched to eval mode, no layer prepared.
    assert all(getattr(m, "ready_weight", None) is None for m in net.modules())


def test_dropout_only_in_training():
    net = tiny_net(dropout=0.5)
    x, labels = inputs()
    with torch.no_grad():
        assert torch.equal(net(x, 1.0, labels), net(x, 1.0, labels))
        net.train()
        torch.manual_seed(0)
        a = net(x, 1.0, labels)
        b = net(x, 1.0, labels)
    assert not torch.equal(a, b)


def test_training_forward_forces_weight_normalization():
    net = tiny_net()
    net.train()
    x, labels = inputs()
    net(x, torch.tensor(1.0), labels, return_logvar=True)
    for m in net.modules():
        if isinstance(m, MPConv):
            rms = m.weight.detach().flatten(1).square().mean(dim=1).sqrt()
            torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mode", ["down", "up"])
def test_box_resample_matches_general_filter(mode):
    x = torch.randn(2, 3, 8, 8)
    fast = resample(x, [1, 1], mode)  # box fast path
    general = resample(x, [2, 2], mode)  # same normalised taps, depthwise conv path
    assert fast.shape == general.shape == (2, 3, 4 if mode == "down" else 16, 4 if mode == "down" else 16)
    torch.testing.assert_close(fast, general, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# Weights by name; inference preparation.


def test_state_dict_round_trip():
    src, dst = tiny_net(seed=0), tiny_net(seed=5)
    x, labels = inputs()
    sigma = torch.tensor([0.2, 2.0, 20.0])
    with torch.no_grad():
        assert not torch.equal(src(x, sigma, labels), dst(x, sigma, labels))
        prepare_for_inference(dst)  # loading must drop weights prepared from the old parameters
        dst.load_state_dict(copy.deepcopy(src.state_dict()), strict=True)
        assert torch.equal(dst(x, sigma, labels), src(x, sigma, labels))
        a, la = dst(x, sigma, labels, return_logvar=True)
        b, lb = src(x, sigma, labels, return_logvar=True)
    assert torch.equal(la, lb)


@pytest.mark.parametrize("label_dim", [10, 0])
def test_prepare_for_inference_same_function(label_dim):
    net = tiny_net(label_dim=label_dim)
    x, labels = inputs(label_dim=label_dim)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    with torch.no_grad():
        ref, ref_logvar = net(x, sigma, labels, return_logvar=True)
        assert prepare_for_inference(net) is net  # in place
        out, logvar = net(x, sigma, labels, return_logvar=True)
    convs = [m for m in net.modules() if isinstance(m, MPConv)]
    assert all(m.ready_weight is not None and m.ready_weight.dtype == torch.float32 for m in convs)
    assert not any("ready_weight" in k for k in net.state_dict())
    # Same bits: the prepared weight is the per-call weight, computed once.
    assert torch.equal(out, ref) and torch.equal(logvar, ref_logvar)
    # Training mode (and unprepare) drop the prepared weights.
    net.train()
    assert all(m.ready_weight is None for m in convs)
    prepare_for_inference(net)
    unprepare(net)
    assert all(m.ready_weight is None for m in convs)


def test_prepare_for_inference_under_inference_mode():
    """Networks built (or loaded) under torch.inference_mode(), as servers do, have inference
    tensors, which have no version counter: preparing and calling them works, same function."""
    x, labels = inputs()
    sigma = torch.tensor([0.05, 1.0, 40.0])
    with torch.inference_mode():
        net = tiny_net()
        ref = net(x, sigma, labels)
        prepare_for_inference(net)
        assert net.unet.out_conv.ready_weight is not None
        assert torch.equal(net(x, sigma, labels), ref)
        # A replaced weight (new storage) is still detected: the prepared one is not used.
        net.unet.out_conv.weight = torch.nn.Parameter(net.unet.out_conv.weight * 2, requires_grad=False)
        assert not torch.equal(net(x, sigma, labels), ref)
    with torch.no_grad():  # Outside inference mode too.
        prepare_for_inference(net)
        net(x, sigma, labels)


def test_prepared_weights_are_not_renormalised_per_call(cond_net, monkeypatch):
    net = copy.deepcopy(cond_net)
    prepare_for_inference(net)
    x, labels = inputs()
    import autoguide_fast.models.edm2 as edm2

    def fail(*args, **kwargs):
        raise AssertionError("mp_weight called after prepare_for_inference")

    monkeypatch.setattr(edm2, "mp_weight", fail)
    with torch.no_grad():
        net(x, 1.0, labels)


def test_fp16_body_plumbing_on_cpu(monkeypatch):
    # The CUDA float16 path, forced on CPU: embedding stays float32, output float32, prepare exact.
    net = tiny_net()
    x, labels = inputs()
    sigma = torch.tensor([0.05, 1.0, 40.0])
    seen = []
    net.unet.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    with torch.no_grad():
        ref = net(x, sigma, labels)
        fp16_body = lambda device, force_fp32=False: torch.float32 if force_fp32 else torch.float16  # noqa: E731
        monkeypatch.setattr(net, "body_dtype", fp16_body)
        out16 = net(x, sigma, labels)
        prepare_for_inference(net)
        prep16 = net(x, sigma, labels)
        prep32 = net(x, sigma, labels, force_fp32=True)
    assert seen == [torch.float32, torch.float16, torch.float16, torch.float32]
    assert out16.dtype == torch.float32 and out16.isfinite().all()
    assert net.unet.out_conv.ready_weight.dtype == torch.float16
    assert net.unet.emb_noise.ready_weight.dtype == net.unet.enc["16x16_block0"].emb_linear.ready_weight.dtype
    assert net.unet.emb_noise.ready_weight.dtype == torch.float32
    assert rel_l2(prep16, out16) < 1e-5
    assert rel_l2(prep32, ref) < 1e-5
    assert rel_l2(out16, ref) < 1e-2


# ----------------------------------------------------------------------------
# CUDA: float16 body.


@gpu_test
@pytest.mark.parametrize("label_dim", [10, 0])
def test_fp16_cuda_path(label_dim):
    net = tiny_net(label_dim=label_dim).cuda()
    x, labels = inputs(label_dim=label_dim)
    x, labels = x.cuda(), labels.cuda()
    sigma = torch.tensor([0.05, 1.0, 40.0], device="cuda")
    seen = []
    net.unet.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    with torch.no_grad():
        out16 = net(x, sigma, labels)
        out32 = net(x, sigma, labels, force_fp32=True)
        prepare_for_inference(net)
        prep16 = net(x, sigma, labels)
        prep32 = net(x, sigma, labels, force_fp32=True)  # falls back to per-call normalisation
    assert seen == [torch.float16, torch.float32, torch.float16, torch.float32]
    assert out16.dtype == prep16.dtype == torch.float32 and out16.isfinite().all()
    assert net.unet.out_conv.ready_weight.dtype == torch.float16
    assert net.unet.emb_noise.ready_weight.dtype == torch.float32
    assert rel_l2(prep16, out16) < 1e-3
    assert torch.equal(prep32, out32)  # Both normalise per call, in float32.
    assert rel_l2(out16, out32) < 2e-2


@gpu_test
def test_fp16_cuda_s_preset():
    torch.manual_seed(0)
    with torch.device("cuda"):
        net = edm2_preset("s").eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(1.0)
        x = torch.randn(2, 4, 64, 64, device="cuda")
        labels = torch.tensor([1, 2], device="cuda")
        ref = net(x, torch.tensor(2.0, device="cuda"), labels)
        ref32 = net(x, torch.tensor(2.0, device="cuda"), labels, force_fp32=True)
        prepare_for_inference(net)
        out = net(x, torch.tensor(2.0, device="cuda"), labels)
    assert out.dtype == torch.float32 and out.isfinite().all()
    assert rel_l2(out, ref) < 1e-3
    assert rel_l2(out, ref32) < 5e-2


def test_normalize_rounds_like_the_release():
    # The release: torch.add(eps, norm, alpha=sqrt(norm.numel() / x.numel())), one op, then x / norm.
    x = torch.randn(7, 5, 3, 3, generator=torch.Generator().manual_seed(3))
    norm = torch.linalg.vector_norm(x, dim=[1, 2, 3], keepdim=True, dtype=torch.float32)
    expected = x / torch.add(1e-4, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    assert torch.equal(normalize(x), expected)


def test_prepared_weights_updated_in_place_are_not_used_stale(cond_net):
    net = copy.deepcopy(cond_net)
    prepare_for_inference(net)
    x, labels = inputs()
    with torch.no_grad():
        before = net(x, 1.0, labels)
        for m in net.modules():  # An in-place update, e.g. an EMA step.
            if isinstance(m, MPConv):
                m.weight.mul_(1.5).add_(0.05)
        net.unet.out_gain.add_(0.3)
        after = net(x, 1.0, labels)
        fresh = copy.deepcopy(net)
        unprepare(fresh)
        expected = fresh(x, 1.0, labels)
    assert torch.equal(after, expected) and not torch.equal(after, before)


def test_the_staleness_check_can_be_left_out_by_a_caller_that_never_changes_the_weights(cond_net, monkeypatch):
    """check_stale=False: no per-call check (a few µs per layer; the latency benchmark's networks, as
    normalised by hand), the same outputs; an in-place update then goes unnoticed, as promised."""
    net = prepare_for_inference(copy.deepcopy(cond_net), check_stale=False)
    checked = prepare_for_inference(copy.deepcopy(cond_net))
    x, labels = inputs()
    with torch.no_grad():
        expected = checked(x, 1.0, labels)
        monkeypatch.setattr(MPConv, "_source", lambda self, gain: pytest.fail("checked per call"))
        assert torch.equal(net(x, 1.0, labels), expected)
        monkeypatch.undo()
        net.unet.out_gain.add_(0.3)
        assert torch.equal(net(x, 1.0, labels), expected)  # Unnoticed (the caller's promise).
        unprepare(net)  # Back to the default: a later prepare_for_inference checks again.
        assert all(m.check_stale for m in net.modules() if isinstance(m, MPConv))
    with pytest.raises(TypeError, match="check_stale"):
        prepare_for_inference(copy.deepcopy(cond_net), check_stale=1)


def test_prepared_network_compiles_to_one_graph(cond_net):
    """The staleness check reads storage pointers, which torch.compile cannot trace: it is skipped
    while compiling, so a prepared network is one graph (a graph break per layer otherwise) with
    the eager network's outputs."""
    net = copy.deepcopy(cond_net)
    prepare_for_inference(net)
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(net, backend=count, dynamic=False)
    x, labels = inputs()
    with torch.no_grad():
        for sigma in (1.0, 2.5):
            assert torch.equal(compiled(x, torch.tensor(sigma), labels), net(x, torch.tensor(sigma), labels))
    torch._dynamo.reset()
    assert len(graphs) == 1


def test_integer_one_hot_rows_are_one_hot(cond_net):
    x, labels = inputs()
    one_hot = torch.nn.functional.one_hot(labels, 10)
    with torch.no_grad():
        assert torch.equal(cond_net(x, 1.0, one_hot), cond_net(x, 1.0, one_hot.float()))
    with pytest.raises(ValueError, match="class_labels"):
        cond_net(x, 1.0, one_hot[None])


def _gain_for_quotient(q: torch.Tensor, scale: float) -> torch.Tensor | None:
    """A float32 gain g with float32(g / scale) == q exactly (q float32), if one exists next to q·scale."""
    g = torch.tensor(q.double().item() * scale, dtype=torch.float32)
    for _ in range(8):
        got = g / scale
        if got == q:
            return g
        g = torch.nextafter(g, torch.tensor(math.inf if got < q else -math.inf))
    return None


def _matching_gains(half_gain: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A float16 gain next to ``half_gain`` whose float16 scale gain / scale (computed as the
    official layer does) some float32 gain reproduces in float32; both gains."""
    g16 = half_gain.detach().clone()
    for _ in range(64):
        g32 = _gain_for_quotient((g16 / scale).float(), scale)
        if g32 is not None:
            return g16, g32
        g16 = torch.nextafter(g16, torch.tensor(math.inf, dtype=torch.float16))
    raise AssertionError(f"no float16 gain near {half_gain.item()} with a float32 twin")


def test_weights_held_in_float16_like_the_release_run_on_cpu(cond_net):
    """Released networks are stored in float16. Held that way (net.half()) every weight, gain and
    Fourier buffer is widened to float32 where it is used, except the scale gain / sqrt(fan_in) of a
    learned gain, which, as in the official layer, is computed in the gain's dtype (float16). The
    float32 network of the same fp16-rounded values, with each learned gain chosen so that its
    float32 scale equals that float16 scale, is the same function bit for bit."""
    x, labels = inputs()
    half = copy.deepcopy(cond_net).half()
    ref = copy.deepcopy(cond_net)
    with torch.no_grad():
        for t_ref, t_half in zip([*ref.parameters(), *ref.buffers()], [*half.parameters(), *half.buffers()]):
            t_ref.copy_(t_half.float())  # The same (fp16-rounded) values in float32.
        for name, module in half.named_modules():
            for gain_name, layer_name in (("emb_gain", "emb_linear"), ("out_gain", "out_conv")):
                if hasattr(module, gain_name):
                    scale = math.sqrt(getattr(module, layer_name).weight[0].numel())
                    g16, g32 = _matching_gains(getattr(module, gain_name), scale)
                    getattr(module, gain_name).copy_(g16)
                    ref.get_submodule(name).get_parameter(gain_name).copy_(g32)
        out, out_ref = half(x, 1.0, labels), ref(x, 1.0, labels)
        plain = copy.deepcopy(cond_net)
        for t_ref, t_half in zip([*plain.parameters(), *plain.buffers()], [*half.parameters(), *half.buffers()]):
            t_ref.copy_(t_half.float())
        out_plain = plain(x, 1.0, labels)
    assert out.dtype == torch.float32
    assert torch.equal(out, out_ref)
    assert not torch.equal(out, out_plain)  # The float16 scales do count (the check can fail).


# ----------------------------------------------------------------------------
# A resampling filter other than the box: its 2-D kernel is made once, not per call.


def test_a_general_resample_filter_is_made_once_not_per_call(monkeypatch):
    """Made per call, the kernel's taps were copied from the host at every resampling block: on a
    GPU a wait for the device each time, and a copy that breaks CUDA-graph capture. After a first
    call no tensor is made from host data, and the result is the per-call one."""
    net = tiny_net(resample_filter=[1, 3, 3, 1])
    x, labels = inputs()
    with torch.no_grad():
        first = net(x, 1.0, labels)
        monkeypatch.setattr(torch, "tensor", lambda *a, **k: pytest.fail("a tensor made from host data per call"))
        again = net(x, 1.0, labels)
        monkeypatch.undo()
        fresh = tiny_net(resample_filter=[1, 3, 3, 1])(x, 1.0, labels)
    assert torch.equal(again, first) and torch.equal(first, fresh)
    # The kernel is the per-call one: the blocks' own resampling equals the function's.
    down = next(b for b in net.unet.enc.values() if getattr(b, "resample_mode", "keep") == "down")
    y = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(resample(y, [1, 3, 3, 1], "down", kernel=down._filter_kernel(y)),
                       resample(y, [1, 3, 3, 1], "down"))
    assert "_resample_kernels" not in str(list(net.state_dict())) and all(
        "resample" not in k for k in net.state_dict())


def test_a_kernel_first_made_under_inference_mode_serves_training():
    """The first call under torch.inference_mode keeps its kernel for later calls: it must be a
    normal tensor, or a later training call could not save it for backward."""
    net = tiny_net(resample_filter=[1, 3, 3, 1])
    x, labels = inputs()
    with torch.inference_mode():
        net(x, 1.0, labels)
    net.train()
    out = net(x.clone().requires_grad_(), 1.0, labels)
    out.square().mean().backward()
    assert net.unet.enc["8x8_down"].conv_res0.weight.grad.abs().sum() > 0


def test_a_general_resample_filter_under_torch_compile():
    """Under torch.compile the network gives the eager outputs, and what the blocks keep are real
    tensors that the eager calls after it use (a kernel made while tracing must not be kept)."""
    net = tiny_net(resample_filter=[1, 3, 3, 1])
    x, labels = inputs()
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager", dynamic=False)
    with torch.no_grad():
        got = compiled(x, torch.tensor(1.0), labels)
        expected = tiny_net(resample_filter=[1, 3, 3, 1])(x, torch.tensor(1.0), labels)
        assert torch.equal(got, expected)
        assert torch.equal(net(x, torch.tensor(1.0), labels), expected)
    torch._dynamo.reset()
    kept = [k for b in net.modules() for k in getattr(b, "_resample_kernels", {}).values()]
    assert kept and all(type(k) is torch.Tensor for k in kept)


@gpu_test
def test_a_general_resample_filter_is_captured_in_a_cuda_graph():
    """With its kernel made per call (a host-to-device copy in every resampling block), capture
    failed and the engine fell back to eager: now the trajectory is one graph, equal to eager."""
    from autoguide_fast import GuidedSampler

    net = tiny_net(resample_filter=[1, 3, 3, 1]).cuda()
    gnet = tiny_net(seed=3, resample_filter=[1, 3, 3, 1]).cuda()
    x, labels = inputs()
    noise = x.cuda()
    onehot = torch.nn.functional.one_hot(labels, 10).float().cuda()
    kwargs = dict(noise_shape=tuple(noise.shape), label_shape=tuple(onehot.shape), device="cuda", num_steps=4,
                  guidance=2.0)
    graphed = GuidedSampler(net, gnet, graph="trajectory", **kwargs)
    report = graphed.prepare()
    assert report["graph"] == "trajectory" and report["capture_error"] is None, report
    expected = GuidedSampler(net, gnet, graph="none", streams=report["streams"], **kwargs)(noise, onehot)
    assert torch.equal(graphed(noise, onehot), expected)


# ----------------------------------------------------------------------------
# Preset dropout, class-label broadcasting, body dtype, random gains.


# Training dropout per size in the official release (NVlabs/edm2 train_edm2.py, config_presets: the
# same per size for edm2-img512-* and edm2-img64-*). DESIGN.md §3 gives no dropout values.
RELEASE_DROPOUT = {"xxs": 0.00, "xs": 0.00, "s": 0.00, "m": 0.10, "l": 0.10, "xl": 0.10, "xxl": 0.10}


@pytest.mark.parametrize("name", list(RELEASE_DROPOUT))
def test_preset_dropout_matches_the_release(name):
    """Each preset trains with the release's dropout, in every block (inference ignores it)."""
    assert set(EDM2_PRESETS) == set(RELEASE_DROPOUT)
    for dataset in ("img512", "img64"):
        assert edm2_preset_kwargs(name, dataset=dataset)["dropout"] == RELEASE_DROPOUT[name], dataset
    with torch.device("meta"):
        net = edm2_preset(name)
    assert {m.dropout for m in net.modules() if isinstance(m, Block)} == {RELEASE_DROPOUT[name]}


def test_a_single_label_row_is_shared_by_the_batch(cond_net):
    """Class labels of one row (one-hot [1, label_dim] or one index [1]) condition every image of the
    batch: the output is that of the row repeated B times."""
    x, _ = inputs()
    sigma = torch.tensor([0.3, 1.0, 5.0])
    row = torch.nn.functional.one_hot(torch.tensor([7]), 10).float()
    with torch.no_grad():
        shared = cond_net(x, sigma, row)
        repeated = cond_net(x, sigma, row.repeat(3, 1))
        by_index = cond_net(x, sigma, torch.tensor([7]))
        other = cond_net(x, sigma, torch.tensor([2]))
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-5)
    assert torch.equal(by_index, shared)
    assert rel_l2(other, shared) > 1e-3  # The label matters: the comparison above is not vacuous.


# U-Net compute dtype by (use_fp16, force_fp32, device type): float16 only on CUDA, with use_fp16,
# unless forced to float32.
BODY_DTYPES = {
    (True, False, "cuda"): torch.float16,
    (True, True, "cuda"): torch.float32,
    (False, False, "cuda"): torch.float32,
    (False, True, "cuda"): torch.float32,
    (True, False, "cpu"): torch.float32,
    (True, True, "cpu"): torch.float32,
    (False, False, "cpu"): torch.float32,
    (False, True, "cpu"): torch.float32,
}


@pytest.mark.parametrize("use_fp16,force_fp32,kind", list(BODY_DTYPES))
def test_body_dtype_table(use_fp16, force_fp32, kind):
    """Precond.body_dtype for each use_fp16 x force_fp32 x device, the device given as a string or
    a torch.device, with or without an index (a pure function: no device is used)."""
    with torch.device("meta"):
        net = Precond(label_dim=0, use_fp16=use_fp16, **TINY)
    for device in (kind, f"{kind}:0", torch.device(kind), torch.device(kind, 1)):
        assert net.body_dtype(device, force_fp32) == BODY_DTYPES[use_fp16, force_fp32, kind], device
        if not force_fp32:
            assert net.body_dtype(device) == BODY_DTYPES[use_fp16, False, kind], device


def test_randomize_gains_draws_every_gain_in_half_to_one_reproducibly():
    """randomize_gains_ sets every out_gain / emb_gain (in place) to a draw in [0.5, 1), the same
    draws for the same seed and other draws for another seed; no other parameter changes."""
    def gains(net):
        return {name: p.item() for name, p in net.named_parameters() if name.endswith("gain")}

    torch.manual_seed(0)
    net = Precond(label_dim=10, **TINY)
    assert set(gains(net).values()) == {0.0}  # The release's initial gains.
    a = copy.deepcopy(net)
    assert randomize_gains_(a, seed=5) is a
    b, c, d, e = (randomize_gains_(copy.deepcopy(net), seed=s) for s in (5, 6, 0, 0))
    drawn = gains(a)
    assert len(drawn) == 1 + sum(isinstance(m, Block) for m in net.modules())  # out_gain + one per block.
    assert all(0.5 <= g < 1.0 for g in drawn.values()), drawn
    assert len(set(drawn.values())) == len(drawn)  # Drawn one by one, not one value for all.
    assert gains(b) == drawn and gains(c) != drawn
    assert gains(randomize_gains_(copy.deepcopy(net))) == gains(d) == gains(e)  # seed=0 by default.
    others = {name: p for name, p in net.named_parameters() if not name.endswith("gain")}
    assert all(torch.equal(p, others[name]) for name, p in a.named_parameters() if name in others)
