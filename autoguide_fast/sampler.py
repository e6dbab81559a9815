"""The public sampling API: ``fast_guided_sample`` and the drop-in ``edm_sampler``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

from . import validation as V
from .backends import StepBackend, resolve_backend
from .plan import SamplerConfig, StepPlan, build_plan, has_churn

__all__ = ["edm_sampler", "fast_guided_sample", "make_config", "run_eager", "run_eager_steps"]


def make_config(
    *,
    num_steps: int,                         # The sampler arguments of fast_guided_sample, as given
    sigma_min: float,                       # (validated here; numbers keep their type, e.g. a
    sigma_max: float,                       # NumPy float32, as the official formula uses it).
    rho: float,
    guidance: float | torch.Tensor,         # A number or a 0-dim floating tensor.
    gnet: Callable | None,                  # Only checked to be given when guidance != 1.
    S_churn: float,
    S_min: float,
    S_max: float,
    S_noise: float,
    dtype: torch.dtype,
    guidance_interval: tuple[float, float] | None,
    solver: str,
    sigmas: Any = None,                     # A custom schedule (replaces the four formula arguments).
) -> SamplerConfig:
    """Validate the scalar sampler arguments and bundle them (raises before any work)."""
    V.check_dtype(dtype)
    # guidance may be a 0-dim real tensor. The official lerp takes a tensor weight in the state
    # dtype: its value rounded to that dtype gives the same result (for float16 and bfloat16 that
    # differs from the same number passed as a Python float, which lerp keeps in float32).
    if (isinstance(guidance, torch.Tensor) and guidance.dim() == 0 and guidance.dtype.is_floating_point):
        if guidance.is_meta:
            raise ValueError("guidance: expected a number or a tensor with a value, got a meta tensor")
        if guidance.requires_grad and torch.is_grad_enabled():
            # The official sampler would differentiate through lerp's weight; here its value is read
            # once (a hashable config, fused kernels), and its gradient would be None, silently.
            raise TypeError("guidance: a tensor that requires grad is not supported (its gradient would be lost); "
                            "pass guidance.detach() or a number")
        guidance = guidance.detach().to("cpu", dtype).item()
    V.check_schedule(num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise)
    interval = V.check_guidance(guidance, gnet, guidance_interval, dtype)
    levels = None
    if sigmas is None:
        V.check_time_steps(num_steps, sigma_min, sigma_max, rho, dtype)
    else:
        levels = V.check_sigmas(sigmas, dtype, dict(num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max,
                                                    rho=rho))
        num_steps = len(levels)
    V.check_choice("solver", solver, V.SOLVERS)
    return SamplerConfig(
        num_steps=int(num_steps), sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
        guidance=cast(float, guidance),  # A number by now: check_guidance refuses any other tensor.
        S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, dtype=dtype,
        guidance_interval=interval, solver=solver, sigmas=levels,
    )


class _Evaluator:
    """Calls the networks for one evaluation and checks their outputs every time (type, shape, dtype
    and device: attribute reads, well under a microsecond; a network whose output moved to another
    device later in the trajectory would otherwise reach the fused ops, where a meta tensor
    dispatches to their shape-only fake kernels and the result is uninitialised memory).

    With ``streams`` (see ``autoguide_fast.engine.streams.GuideStream``) the guide is forked onto
    a side stream and runs concurrently with the main network; both are joined before returning.
    """

    def __init__(self, net, gnet, labels, streams=None):
        self.net, self.gnet, self.labels, self.streams = net, gnet, labels, streams

    def __call__(self, x: torch.Tensor, t: torch.Tensor, w: float | None):
        forked = w is not None and self.streams is not None
        if forked:
            D_guide = self.streams.fork(self.gnet, x, t, self.labels)
        D_main = self.net(x, t, self.labels)
        V.check_output("net (the main network)", D_main, x)
        if w is None:
            return D_main, None
        if forked:
            self.streams.join(D_guide)
        else:
            D_guide = self.gnet(x, t, self.labels)
        V.check_output("gnet (the guide network)", D_guide, x)
        return D_main, D_guide


def _denoised(D_main, D_guide, w, dtype):
    Dx = D_main.to(dtype)
    return Dx if w is None else D_guide.to(dtype).lerp(Dx, w)


def run_eager(
    net: Callable,                      # Main network.
    gnet: Callable | None,              # Guide network (only called where a step is guided).
    noise: torch.Tensor,                # Initial unit noise.
    labels: Any,                        # Passed on to the networks as given.
    config: SamplerConfig,
    backend: StepBackend,
    seeds: torch.Tensor | None = None,  # int64 [B] per-image seeds for the churn noise.
    randn_like: Callable | None = None, # Explicit churn noise source (wins over seeds).
    callback: Callable[[dict], Any] | None = None,
    plan: tuple[torch.Tensor, list[StepPlan]] | None = None,
    streams: Any = None,                # Fork/join of the guide onto a side stream; None = one stream.
    evaluate: Callable | None = None,   # Evaluation strategy (see run_eager_steps); None = call the networks here.
) -> torch.Tensor:
    """The sampling loop, eager, with the backend doing the element-wise work."""
    plan = plan if plan is not None else build_plan(config, noise.device)
    x = noise.to(config.dtype) * plan[0][0]
    return run_eager_steps(net, gnet, x, labels, config, backend, seeds, randn_like, callback, plan, streams,
                           evaluate=evaluate)


def run_eager_steps(
    net: Callable,
    gnet: Callable | None,
    x: torch.Tensor,                    # State at t_first (noise · t_0 when first == 0).
    labels: Any,
    config: SamplerConfig,
    backend: StepBackend,
    seeds: torch.Tensor | None = None,
    randn_like: Callable | None = None,
    callback: Callable[[dict], Any] | None = None,
    plan: tuple[torch.Tensor, list[StepPlan]] | None = None,
    streams: Any = None,
    first: int = 0,                     # First step to run.
    stop: int | None = None,            # One past the last step to run; None = to the end.
    evaluate: Callable | None = None,   # Evaluation strategy: evaluate(x, t, w) -> (D_main, D_guide or None
                                        # when w is None); None = _Evaluator(net, gnet, labels, streams).
) -> torch.Tensor:
    """Steps first..stop-1 of the loop (``run_eager`` runs them all; the engine also runs them
    one at a time to capture one CUDA graph per kind of step; guide-parallel sampling passes an
    ``evaluate`` that gets the guide's output from another rank)."""
    dtype = config.dtype
    t_steps, steps = plan if plan is not None else build_plan(config, x.device)
    stop = len(steps) if stop is None else stop
    if evaluate is None:
        evaluate = _Evaluator(net, gnet, labels, streams)
    if randn_like is None and seeds is None:
        randn_like = torch.randn_like
    # The next step's seeded churn can be fused into the op ending this one (not with a callback,
    # which must see x before the churn, nor with an explicit randn_like).
    fuse = getattr(backend, "fuses_churn", False) and randn_like is None and callback is None
    # Whether step `first`'s churn was already injected by the op ending the previous step.
    churned = fuse and first > 0 and steps[first].noise_scale is not None
    for k in range(first, stop):
        step = steps[k]
        # Churn: x_hat = x + sqrt(t_hat² - t_cur²) S_noise eps (EDM Algorithm 2, line 5).
        if step.noise_scale is not None and not churned:
            eps = randn_like(x) if randn_like is not None else None
            if randn_like is not None and not isinstance(eps, (torch.Tensor, float, int)):
                # (None would read as "no explicit noise: use the seeds" further down.)
                raise TypeError(f"randn_like: returned {type(eps).__name__}, expected a tensor like its input "
                                f"({x.dtype} {tuple(x.shape)})")
            x_hat = backend.churn(x, step, seeds, eps)
        else:
            x_hat = x
        nxt = steps[k + 1] if k + 1 < len(steps) else None
        churned = fuse and nxt is not None and nxt.noise_scale is not None
        # Fused churn has a next step, and seeds (randn_like is None).
        churn_next = cast("tuple[StepPlan, torch.Tensor]", (nxt, seeds)) if churned else None
        D_main, D_guide = evaluate(x_hat, step.tensors["t_hat"], step.w_first)
        if callback is not None:
            denoised = _denoised(D_main, D_guide, step.w_first, dtype)
        # Euler step; the op that ends the step (this one without a Heun correction) takes churn_next.
        heun = step.second_order
        d, x_next = backend.euler(x_hat, D_main, D_guide, step.w_first, step, None if heun else churn_next,
                                  need_d=heun)
        if heun:
            D_main, D_guide = evaluate(x_next, step.tensors["t_next"], step.w_second)
            d = cast(torch.Tensor, d)  # Written: need_d=True.
            x_next = backend.heun(x_hat, d, x_next, D_main, D_guide, step.w_second, step, churn_next)
        if callback is not None:
            callback({"x": x_next, "i": step.index, "sigma": step.t_cur, "sigma_hat": step.t_hat,
                      "denoised": denoised})
        x = x_next
    return x


def _engine_applies(noise: torch.Tensor, labels, randn_like, callback) -> bool:
    """CUDA tensors go through the cached engine unless a per-step callback or a custom churn
    noise source needs the plain loop, or the labels are not a contiguous batch of the noise's size
    on its device (the engine gives the networks a contiguous copy, as it does the noise; a network
    may round differently for another layout)."""
    return (noise.is_cuda and callback is None and (randn_like is None or randn_like is torch.randn_like)
            and (labels is None or (isinstance(labels, torch.Tensor) and labels.device == noise.device
                                    and labels.dim() >= 1 and labels.shape[0] == noise.shape[0]
                                    and labels.is_contiguous())))


def _wants_autograd(noise: torch.Tensor, labels) -> bool:
    """Gradients are wanted (and the plain torch loop records them, like the official sampler) when
    autograd is on and the noise or the labels require grad; otherwise sampling runs under
    ``torch.no_grad()``, as k-diffusion's samplers do, whatever the networks' parameters say."""
    return torch.is_grad_enabled() and (
        noise.requires_grad or (isinstance(labels, torch.Tensor) and labels.requires_grad))


def _randn_like_churn(noise: torch.Tensor, config: SamplerConfig, randn_like, seeds) -> str | None:
    """Why only the reference's own tensor ops reproduce the churn noise drawn by ``randn_like``
    (not from seeds), or None: "custom", a custom randn_like may return noise of another dtype,
    which the reference promotes; "layout", torch.randn_like fills in memory order, and the
    reference keeps non-contiguous noise's layout while the fused ops return contiguous states."""
    if config.S_churn <= 0 or (randn_like is None and seeds is not None):
        return None
    if randn_like is not None and randn_like is not torch.randn_like:
        reason = "custom"
    elif not noise.is_contiguous():
        reason = "layout"
    else:
        return None
    return reason if has_churn(config, noise.device) else None


def fast_guided_sample(
    net: Callable,                          # Main network D1: net(x, t, labels) -> tensor like x.
    noise: torch.Tensor,                    # Unit-variance initial noise [B, ...].
    labels: Any = None,                     # Labels for both networks, passed on as given: a tensor of batch B
                                            # (or 1, for networks that broadcast it), any other object, or None.
    gnet: Callable | None = None,           # Guide network D0; required when guidance != 1.
    *,
    num_steps: int = 32,                    # Number of time steps N (2N - 1 evaluations with heun).
    sigma_min: float = 0.002,               # Lowest noise level.
    sigma_max: float = 80,                  # Highest noise level.
    rho: float = 7,                         # Time step exponent.
    sigmas: Sequence[float] | torch.Tensor | None = None,  # Custom schedule t_0 > ... > t_{N-1} > 0 [, 0]
                                            # (k-diffusion style), in place of the four arguments above.
    guidance: float = 1,                    # Guidance weight w; 1 = unguided, guide never called.
    S_churn: float = 0,                     # Stochasticity strength; 0 = deterministic.
    S_min: float = 0,                       # Churn only for S_min <= t <= S_max.
    S_max: float = float("inf"),
    S_noise: float = 1,                     # Churn noise scale.
    dtype: torch.dtype = torch.float32,     # Sampler state dtype (output dtype).
    randn_like: Callable | None = None,     # Churn noise source; None = seeds if given, else torch.randn_like.
    seeds: Any = None,                      # One int per image: per-image counter-based churn noise.
    guidance_interval: tuple[float, float] | None = None,  # Guide only for lo < sigma <= hi; None = always.
    solver: str = "heun",                   # "heun" (official, 2nd order) or "euler" (1st order).
    backend: str = "auto",                  # "auto", "torch", "cpp", "triton" or "cuda".
    callback: Callable[[dict], Any] | None = None,  # Called after each step with x, i, sigma, sigma_hat, denoised.
    check_finite: bool = True,              # Raise FloatingPointError if the result has NaN/Inf (and ValueError
                                            # if CUDA noise has; CPU noise is always checked).
) -> torch.Tensor:
    """Sample with the guided denoiser D_w = D0 + w (D1 - D0) (autoguidance, Karras et al. 2024).

    Same semantics as the official EDM sampler (``autoguide_fast.reference.edm_sampler``), plus
    per-image seeds, a guidance interval, an Euler solver and a choice of backend. On CUDA tensors
    (no callback, default churn noise source) it runs through a cached, prepared ``GuidedSampler``
    (CUDA graphs, guide on a side stream; see ``autoguide_fast.engine``). Inference only (no
    autograd graph) unless autograd is on and ``noise`` or ``labels`` require grad: then the plain
    torch loop records the graph, as the official sampler would.
    """
    V.check_callable("net", net)
    V.check_callable("gnet", gnet, optional=True)
    V.check_callable("randn_like", randn_like, optional=True)
    V.check_callable("callback", callback, optional=True)
    V.check_backend_name(backend)
    V.check_flag("check_finite", check_finite)
    config = make_config(
        num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, guidance=guidance, gnet=gnet,
        S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, dtype=dtype,
        guidance_interval=guidance_interval, solver=solver, sigmas=sigmas,
    )
    # On a GPU, reading the noise's values makes the host wait for the GPU: only when check_finite.
    V.check_noise(noise, values=check_finite or noise.device.type != "cuda")
    V.check_labels(labels, noise, as_official=True)
    seeds_t = V.check_seeds(seeds, noise)
    differentiable = _wants_autograd(noise, labels)
    if differentiable and backend not in ("auto", "torch"):
        raise ValueError(
            f"backend: {backend!r} is not differentiable, and noise (or labels) requires grad with autograd "
            "enabled; use backend='auto' or 'torch' (the plain loop, like the official sampler), or sample "
            "under torch.no_grad()"
        )
    churn_reason = _randn_like_churn(noise, config, randn_like, seeds_t)
    if backend not in ("auto", "torch") and churn_reason == "layout":
        raise ValueError(
            f"noise: not contiguous (e.g. channels-last), with churn noise from torch.randn_like: randn_like fills "
            f"in memory order and the {backend!r} backend keeps the state contiguous, so it would draw other noise "
            "than the official sampler; pass noise.contiguous(), per-image seeds, or backend='auto' / 'torch'"
        )
    if backend == "auto" and (differentiable or churn_reason is not None):
        backend = "torch"
    elif not differentiable and churn_reason is None and _engine_applies(noise, labels, randn_like, callback):
        from .engine.cache import sample_cached  # Lazy: the engine imports this module.

        # randn_like=torch.randn_like wins over seeds, as in run_eager.
        return sample_cached(net, gnet, noise, labels, config, backend, seeds_t if randn_like is None else None,
                             check_finite)
    step_backend = resolve_backend(backend, noise.device, dtype)
    from .engine.cuda_graphs import engine_lock  # Lazy: the engine imports this module.

    # On CUDA, not while a GuidedSampler captures in another thread (its capture puts torch's CUDA
    # generator in capture mode process-wide, which randn_like here would trip over).
    with torch.set_grad_enabled(differentiable), engine_lock(noise.device):
        x = run_eager(net, gnet, noise, labels, config, step_backend, seeds_t, randn_like, callback)
    if check_finite and not bool(torch.isfinite(x).all()):
        raise FloatingPointError(
            "fast_guided_sample: the result contains NaN or Inf (check the networks and the schedule; "
            "pass check_finite=False to return it anyway)"
        )
    return x


def edm_sampler(
    net: Callable,                          # Main network D1: net(x, t, labels) -> tensor like x.
    noise: torch.Tensor,                    # Unit-variance initial noise [B, ...].
    labels: Any = None,                     # Labels for both networks, passed on as given, or None.
    gnet: Callable | None = None,           # Guide network D0; required when guidance != 1.
    num_steps: int = 32,                    # Number of time steps N.
    sigma_min: float = 0.002,               # Lowest noise level.
    sigma_max: float = 80,                  # Highest noise level.
    rho: float = 7,                         # Time step exponent.
    guidance: float = 1,                    # Guidance weight w; 1 = unguided.
    S_churn: float = 0,                     # Stochasticity strength; 0 = deterministic.
    S_min: float = 0,                       # Churn only for S_min <= t <= S_max.
    S_max: float = float("inf"),
    S_noise: float = 1,                     # Churn noise scale.
    dtype: torch.dtype = torch.float32,     # Sampler state dtype (output dtype).
    randn_like: Callable = torch.randn_like,  # Churn noise source.
) -> torch.Tensor:
    """Drop-in for the official ``edm_sampler`` (same signature, positional order included),
    running on the fast path. Like the official sampler it returns NaN/Inf results as they are
    (``check_finite=False``); invalid arguments still raise, naming the argument."""
    return fast_guided_sample(
        net, noise, labels, gnet, num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
        guidance=guidance, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, dtype=dtype,
        randn_like=randn_like, check_finite=False,
    )
