"""Official EDM2 snapshots into ``Precond``: files are written here in the release's format (every
module pickled as ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with the module's
state and constructor keywords, as the release's persistence code does) by a stand-in of the
release's modules that exists only while writing; the loader must read them back without those
modules and without running anything from the file."""

from __future__ import annotations

import io
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from autoguide_fast.models import randomize_gains_
from autoguide_fast.models.edm2 import Precond
from autoguide_fast.models.edm2_snapshot import PersistentObject, load_edm2_snapshot, read_edm2_snapshot

KWARGS = dict(img_resolution=16, img_channels=4, label_dim=10, model_channels=16, channel_mult=[1, 2],
              num_blocks=1, attn_resolutions=[8], channels_per_head=16)


def _release_modules() -> dict[str, types.ModuleType]:
    """Stand-ins of the release's modules the pickle refers to (only needed to write it)."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # Never called by the loader under test.
        raise AssertionError("the release's reconstruction must not run")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    encoders = types.ModuleType("training.encoders")

    class StabilityVAEEncoder:
        def __init__(self):
            self.vae_name = "stabilityai/sd-vae-ft-mse"
            self.scale = np.array([0.18, 0.2, 0.19, 0.21], dtype=np.float32)

    StabilityVAEEncoder.__module__ = "training.encoders"
    StabilityVAEEncoder.__qualname__ = "StabilityVAEEncoder"
    encoders.StabilityVAEEncoder = StabilityVAEEncoder
    util = types.ModuleType("dnnlib.util")

    class EasyDict(dict):  # The release's snapshot is a dict subclass with attribute access.
        def __getattr__(self, name):
            return self[name]

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict = EasyDict

    class Sequence(list):  # Some other container subclass of the release (items arrive via APPENDS).
        pass

    Sequence.__module__, Sequence.__qualname__ = "training.encoders", "Sequence"
    encoders.Sequence = Sequence
    return {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
            "training": types.ModuleType("training"), "training.encoders": encoders,
            "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}


def write_release_snapshot(net: torch.nn.Module, init_kwargs: dict, protocol: int = pickle.DEFAULT_PROTOCOL) -> bytes:
    """A snapshot dict {'ema': net, 'encoder': ..., 'dataset_kwargs': ...} pickled like the release."""
    modules = _release_modules()
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        recon = modules["torch_utils.persistence"]._reconstruct_persistent_obj

        class ReleasePickler(pickle.Pickler):
            def reducer_override(self, obj):
                # The release's own classes are persistent; torch's containers (ModuleDict) pickle as usual.
                if isinstance(obj, torch.nn.Module) and type(obj).__module__ == Precond.__module__:
                    state = dict(obj.__dict__)
                    state["_init_args"] = ()
                    state["_init_kwargs"] = dict(init_kwargs) if obj is net else {}
                    meta = dict(type="class", version=6, module_src="# the module's source code\n",
                                class_name=type(obj).__name__, state=state)
                    return recon, (meta,)
                return NotImplemented

        buf = io.BytesIO()
        encoders = modules["training.encoders"]
        ReleasePickler(buf, protocol=protocol).dump(modules["dnnlib.util"].EasyDict(
            ema=net, encoder=encoders.StabilityVAEEncoder(), steps=encoders.Sequence([1, 2, 3]),
            dataset_kwargs=modules["dnnlib.util"].EasyDict(class_name="training.dataset.ImageFolderDataset",
                                                           path="img512.zip"),
        ))
        return buf.getvalue()
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def release_net(dtype: torch.dtype = torch.float32) -> Precond:
    torch.manual_seed(0)
    return randomize_gains_(Precond(**KWARGS), seed=1).to(dtype).eval()


def inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 16, 16, generator=g) * 3, torch.tensor(1.7), torch.tensor([3, 8])


@pytest.mark.parametrize("dtype,protocol", [(torch.float32, 2), (torch.float16, pickle.DEFAULT_PROTOCOL),
                                            (torch.float16, pickle.HIGHEST_PROTOCOL)])
def test_snapshot_loads_into_precond_bit_for_bit(tmp_path, dtype, protocol):
    net = release_net(dtype)
    path = tmp_path / "edm2-img512-xs-test.pkl"
    path.write_bytes(write_release_snapshot(net, KWARGS, protocol))
    assert not {"torch_utils", "training.encoders", "dnnlib.util"} & set(sys.modules)
    loaded = load_edm2_snapshot(path)
    assert isinstance(loaded, Precond) and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    ours, theirs = loaded.state_dict(), net.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and torch.equal(ours[name], value), name
    with torch.no_grad():
        assert torch.equal(loaded(*inputs()), net(*inputs()))
    # Converted on request; an open file works too.
    with open(path, "rb") as f:
        as32 = load_edm2_snapshot(f, dtype=torch.float32)
    assert {p.dtype for p in as32.parameters()} == {torch.float32}


def test_other_entries_are_inert_records(tmp_path):
    data = read_edm2_snapshot(io.BytesIO(write_release_snapshot(release_net(), KWARGS)))
    assert isinstance(data["ema"], PersistentObject) and data["ema"].class_name == "Precond"
    assert "opaque training.encoders.StabilityVAEEncoder" in repr(data["encoder"])
    assert data["dataset_kwargs"]["path"] == "img512.zip"
    assert "opaque training.encoders.Sequence" in repr(data["steps"]) and data["steps"].values == [1, 2, 3]


class _RunsACommand:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_nothing_from_the_file_is_executed(tmp_path):
    marker = tmp_path / "executed"
    payload = pickle.dumps({"ema": _RunsACommand(str(marker))})
    with pytest.raises(ValueError, match="key: 'ema' holds"):
        load_edm2_snapshot(io.BytesIO(payload))
    assert not marker.exists()
    pickle.loads(payload)  # The same bytes with the standard unpickler do run it: the test can fail.
    assert marker.exists()


def test_bad_snapshots_are_refused_with_the_reason(tmp_path):
    good = write_release_snapshot(release_net(), KWARGS)
    with pytest.raises(KeyError, match="'gnet' is not in the snapshot"):
        load_edm2_snapshot(io.BytesIO(good), key="gnet")
    with pytest.raises(ValueError, match="expected an EDM2 snapshot"):
        load_edm2_snapshot(io.BytesIO(pickle.dumps([1, 2])))
    wrong = write_release_snapshot(release_net(), {**KWARGS, "model_channels": 32})
    with pytest.raises(ValueError, match="do not fit"):
        load_edm2_snapshot(io.BytesIO(wrong))
    with pytest.raises(TypeError, match="dtype"):
        load_edm2_snapshot(io.BytesIO(good), dtype=torch.int8)


def test_generate_reads_a_snapshot_path_as_a_network_spec(tmp_path):
    from autoguide_fast.distributed.loading import load_network

    net = release_net()
    path = tmp_path / "edm2-img512-xs-test.pkl"
    path.write_bytes(write_release_snapshot(net, KWARGS))
    loaded = load_network(str(path), arg="--net")
    assert isinstance(loaded, Precond)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs()), net(*inputs()))
    # A .pkl written by torch.save (not a snapshot) still loads as a whole module.
    other = tmp_path / "module.pkl"
    torch.save(torch.nn.Identity(), other)
    assert isinstance(load_network(str(other), arg="--net"), torch.nn.Identity)
