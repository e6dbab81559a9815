"""Network specs of ``autoguide-fast generate`` (``--net`` / ``--gnet``) and what a network tells us.

A spec is one of:

* ``module:callable`` — ``module`` is imported (the current directory is on the path) and
  ``callable`` (a dotted attribute path) is called with no arguments to build the network; a
  ``torch.nn.Module`` instance found there is used as is. Example: ``my_models.edm2:load_s_ema``.
* an official EDM2 snapshot ``*.pkl`` (its ``ema`` network, read without the official code and
  without running code from the file), or a file written by ``torch.save(module)`` (a whole
  pickled module). Loading the latter runs pickle: only load files you trust.
* ``edm2:SIZE`` or ``edm2:DATASET-SIZE`` — an EDM2 preset (``autoguide_fast.models.edm2``) with
  random weights (and random non-zero output / embedding gains, so that the weights matter), for
  smoke runs and timing: SIZE in xxs, xs, s, m, l, xl, xxl; DATASET img512
  (4x64x64 latents, the default) or img64 (3x64x64 pixels). Keyword overrides (e.g.
  ``{"model_channels": 16}``) shrink it.

Every process of a job must build the same network: random initialisation inside a spec runs
under a fixed torch seed (``seed``), on the CPU, before the network is moved to its device.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import zipfile
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["load_network", "parse_overrides", "network_shape", "network_label_dim", "PRESET_PREFIX"]

PRESET_PREFIX = "edm2:"
_PRESET = re.compile(r"^(?:(img512|img64)-)?(xxs|xs|s|m|l|xl|xxl)$", re.IGNORECASE)
_FILE_SUFFIXES = (".pt", ".pth", ".pkl", ".ckpt", ".bin")


def parse_overrides(text: str | None, *, arg: str) -> dict[str, Any]:
    """A JSON object of constructor keywords, e.g. '{"model_channels": 16, "channel_mult": [1, 2]}'."""
    if text is None or text == "":
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{arg}: expected a JSON object such as '{{\"model_channels\": 16}}', got {text!r} ({exc})"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"{arg}: expected a JSON object such as '{{\"model_channels\": 16}}', got {text!r}")
    return value


def _build_preset(spec: str, arg: str, overrides: dict[str, Any]) -> torch.nn.Module:
    match = _PRESET.match(spec[len(PRESET_PREFIX):])
    if match is None:
        raise ValueError(
            f"{arg}: unknown EDM2 preset {spec!r}; expected edm2:SIZE or edm2:DATASET-SIZE with SIZE in "
            f"xxs, xs, s, m, l, xl, xxl and DATASET in img512, img64 (e.g. edm2:s, edm2:img64-xs)"
        )
    dataset = (match.group(1) or "img512").lower()
    size = match.group(2).lower()
    from ..models.edm2 import edm2_preset, randomize_gains_  # Lazy: the generator works without the model zoo.

    try:
        net = edm2_preset(size, dataset=dataset, **overrides)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{arg}: cannot build {spec!r} with overrides {overrides}: {exc}") from exc
    # Non-zero output and embedding gains (0 in a freshly initialised release network, whose output
    # would then be c_skip x for main and guide alike: guidance would change nothing).
    return randomize_gains_(net, int(torch.randint(1 << 31, ())))


def _cwd_importable() -> None:
    """Modules next to the user import as with `python -m` (a console script's path lacks the
    current directory): a module:callable spec, or the classes a torch.save file refers to."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())


def _resolve_callable(spec: str, arg: str) -> Any:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"{arg}: expected module:callable, got {spec!r}")
    _cwd_importable()
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{arg}: cannot import module {module_name!r} of {spec!r} ({exc})") from exc
    except Exception as exc:  # The user's module failed while importing: report it as theirs.
        raise ValueError(f"{arg}: importing module {module_name!r} of {spec!r} failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{arg}: module {module_name!r} has no attribute {attr_path!r} (from {spec!r})")
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Module):
        return obj
    if not callable(obj):
        raise ValueError(f"{arg}: {spec!r} is a {type(obj).__name__}, expected a callable returning a network")
    try:
        return obj()
    except Exception as exc:
        raise ValueError(f"{arg}: calling {spec!r} to build the network failed: {type(exc).__name__}: {exc}") from exc


def _load_file(path: str, arg: str) -> Any:
    if path.lower().endswith(".pkl") and not zipfile.is_zipfile(path):
        # Not a torch.save file (those are zip archives): an official EDM2 snapshot, whose network
        # ('ema') is read without the official code and without running code from the file. Such
        # a file is never handed to torch.load, which would run the code it embeds.
        from ..models.edm2_snapshot import read_edm2_snapshot, snapshot_network

        try:
            return snapshot_network(read_edm2_snapshot(path))
        except Exception as exc:
            raise ValueError(f"{arg}: {path!r} is not a torch.save file and not a loadable EDM2 snapshot: "
                             f"{type(exc).__name__}: {exc}") from exc
    _cwd_importable()
    try:
        # A whole pickled module (not a state_dict): needs weights_only=False.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{arg}: cannot load {path!r} with torch.load: {type(exc).__name__}: {exc}") from exc


def load_network(
    spec: str,                                  # module:callable, a torch.save file, or edm2:[DATASET-]SIZE.
    *,
    arg: str = "--net",                         # Argument name used in error messages.
    device: torch.device | str | None = None,   # Move the network there (None = leave it).
    overrides: dict[str, Any] | None = None,    # Constructor keywords for an edm2 preset.
    seed: int = 0,                              # Torch seed for any random initialisation.
) -> Callable:
    """Build or load one network in inference mode (eval, no gradients), on ``device``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{arg}: expected a network spec (module:callable, a file, or edm2:SIZE), got {spec!r}")
    overrides = dict(overrides or {})
    is_preset = spec.lower().startswith(PRESET_PREFIX)
    if overrides and not is_preset:
        raise ValueError(f"{arg}: preset overrides only apply to edm2:SIZE specs, got {spec!r}")
    # Random initialisation under a fixed seed, on the CPU: the same network in every process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if is_preset:
            net = _build_preset(spec, arg, overrides)
        elif os.path.isfile(spec):
            net = _load_file(spec, arg)
        elif os.path.exists(spec):
            raise ValueError(f"{arg}: {spec!r} is not a file")
        elif spec.lower().endswith(_FILE_SUFFIXES) or os.sep in spec or (os.altsep and os.altsep in spec):
            raise FileNotFoundError(f"{arg}: no such file {spec!r}")
        elif ":" in spec:
            net = _resolve_callable(spec, arg)
        else:
            raise ValueError(
                f"{arg}: cannot interpret {spec!r}: expected module:callable, a file saved with torch.save, "
                f"or an EDM2 preset such as edm2:s"
            )
    if isinstance(net, dict):
        raise ValueError(f"{arg}: {spec!r} holds a dict (a state_dict or a checkpoint?), expected a whole network; "
                         f"wrap its loading in a module:callable spec")
    if not callable(net):
        raise ValueError(f"{arg}: {spec!r} gave a {type(net).__name__}, expected a network (a callable module)")
    if isinstance(net, torch.nn.Module):
        net.eval().requires_grad_(False)
        if device is not None:
            net.to(device)
        _prepare_edm2(net)
    return net


# EDM2 networks normalise their weights on every call; normalising once gives the same function.
def _prepare_edm2(net: torch.nn.Module) -> None:
    try:
        from ..models.edm2 import Precond, prepare_for_inference
    except ImportError:  # No model zoo in this build: nothing of it can be in the network either.
        return
    if any(isinstance(m, Precond) for m in net.modules()):
        prepare_for_inference(net)


def network_shape(net: Callable, override: tuple[int, ...] | None, *, arg: str = "--net") -> tuple[int, ...]:
    """Per-image shape (C, H, W) from the network's img_channels / img_resolution; ``override``
    (``--shape``) gives what the network does not tell and must agree with what it does."""
    channels = getattr(net, "img_channels", None)
    resolution = getattr(net, "img_resolution", None)
    spatial: tuple[int, ...] | None = None
    if resolution is not None:
        spatial = (tuple(int(r) for r in resolution) if isinstance(resolution, (tuple, list))
                   else (int(resolution), int(resolution)))
    if override is not None:
        given = tuple(int(d) for d in override)
        agrees = ((channels is None or (len(given) >= 1 and given[0] == int(channels)))
                  and (spatial is None or given[1:] == spatial))
        if not agrees:
            told = [f"{name} = {value}" for name, value in
                    (("img_channels", channels), ("img_resolution", resolution)) if value is not None]
            raise ValueError(f"--shape: {','.join(map(str, given))} contradicts the {arg} network's "
                             f"{', '.join(told)}; --shape is for networks without these attributes: leave "
                             f"--shape out (or make it agree)")
        return given
    if channels is None or spatial is None:
        raise ValueError(f"{arg}: the network has no img_channels / img_resolution attributes; pass --shape C,H,W")
    return (int(channels), *spatial)


def network_label_dim(net: Callable, override: int | None, *, arg: str = "--net") -> int:
    """Number of classes the network is conditioned on (0 = unconditional): its label_dim;
    ``override`` (``--label-dim``) for a network without one must agree with one it has."""
    declared = getattr(net, "label_dim", None)
    if override is not None:
        if declared is not None and int(override) != int(declared):
            raise ValueError(f"--label-dim: {override} contradicts the {arg} network's label_dim = {declared}; "
                             f"--label-dim is for networks without this attribute: leave --label-dim out "
                             f"(or make it agree)")
        return int(override)
    return int(declared or 0)
