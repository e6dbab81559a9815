"""The README's promise that the public API is annotated, enforced: every function, class
constructor and public method exported by the package's public modules has a type hint on each
named parameter and on its return value."""

from __future__ import annotations

import importlib
import inspect

import pytest

PUBLIC_MODULES = ["autoguide_fast", "autoguide_fast.distributed", "autoguide_fast.models.edm2",
                  "autoguide_fast.models.edm2_snapshot", "autoguide_fast.toy"]


def _callables(module_name: str):
    module = importlib.import_module(module_name)
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isfunction(obj):
            yield f"{module_name}.{name}", obj
        elif inspect.isclass(obj) and obj.__module__.startswith("autoguide_fast"):
            for attr, member in vars(obj).items():
                if inspect.isfunction(member) and (attr in ("__init__", "__call__") or not attr.startswith("_")):
                    yield f"{module_name}.{name}.{attr}", member


def _missing(fn) -> list[str]:
    sig = inspect.signature(fn)
    missing = [p.name for p in sig.parameters.values()
               if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
    if sig.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_public_api_is_annotated(module_name):
    unannotated = {name: m for name, fn in _callables(module_name) if (m := _missing(fn))}
    assert not unannotated, f"public callables without type hints: {unannotated}"


def test_the_check_can_fail():
    def bare(x, y: int):
        return x

    assert _missing(bare) == ["x", "return"]
