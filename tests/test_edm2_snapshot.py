"""Official EDM2 snapshots into ``Precond``: files are written here in the release's format (every
module pickled as ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with the module's
state and constructor keywords, as the release's persistence code does) by a stand-in of the
release's modules that exists only while writing; the loader must read them back without those
modules and without running anything from the file."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from autoguide_fast.models import randomize_gains_
from autoguide_fast.models.edm2 import MPConv, Precond
from autoguide_fast.models.edm2_snapshot import PersistentObject, load_edm2_snapshot, read_edm2_snapshot

KWARGS = dict(img_resolution=16, img_channels=4, label_dim=10, model_channels=16, channel_mult=[1, 2],
              num_blocks=1, attn_resolutions=[8], channels_per_head=16)


class _Persistent:
    """Marks the stand-ins of the release's persistent classes that are not torch modules."""

    _init_args: tuple = ()
    _init_kwargs: dict = {}


def _release_modules() -> dict[str, types.ModuleType]:
    """Stand-ins of the release's modules the pickle refers to (only needed to write it)."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # Never called by the loader under test.
        raise AssertionError("the release's reconstruction must not run")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    encoders = types.ModuleType("training.encoders")

    class StabilityVAEEncoder(_Persistent):  # Persistent in the release, not a torch module.
        def __init__(self):
            self.vae_name = "stabilityai/sd-vae-ft-mse"
            self.scale = np.array([0.18, 0.2, 0.19, 0.21], dtype=np.float32)
            self.bias = np.zeros(4, dtype=np.float32)
            self.batch_size, self._vae = 8, None
            self._init_args, self._init_kwargs = (), {"vae_name": self.vae_name}

    class EDM2Loss(_Persistent):
        def __init__(self):
            self.P_mean, self.P_std, self.sigma_data = -0.4, 1.0, 0.5
            self._init_args, self._init_kwargs = (), {"P_mean": -0.4, "P_std": 1.0}

    class Sequence(list):  # Some other container subclass (items arrive via APPENDS).
        pass

    for cls in (StabilityVAEEncoder, EDM2Loss, Sequence):
        cls.__module__, cls.__qualname__ = "training.encoders", cls.__name__
        setattr(encoders, cls.__name__, cls)
    util = types.ModuleType("dnnlib.util")

    class EasyDict(dict):  # The release's snapshot is a dict subclass with attribute access.
        def __getattr__(self, name):
            return self[name]

        def __setattr__(self, name, value):
            self[name] = value

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict = EasyDict
    return {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
            "training": types.ModuleType("training"), "training.encoders": encoders,
            "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}


@contextlib.contextmanager
def release_modules_installed():
    """The stand-ins importable (pickle looks globals up by module) while a test writes a file."""
    modules = _release_modules()
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield modules
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _init_record(obj, net, init_kwargs) -> tuple[tuple, dict]:
    """The constructor arguments the release's persistence records for each object."""
    if obj is net:
        return (), dict(init_kwargs)
    if isinstance(obj, MPConv):  # MPConv(in_channels, out_channels, kernel=...)
        w = obj.weight
        return (int(w.shape[1]), int(w.shape[0])), {"kernel": list(w.shape[2:])}
    return (), {}


def write_release_snapshot(net: torch.nn.Module, init_kwargs: dict, protocol: int = pickle.DEFAULT_PROTOCOL) -> bytes:
    """A snapshot pickled like the release's training loop writes it: an EasyDict(encoder,
    dataset_kwargs, loss_fn) with .ema = the network, every persistent class through
    _reconstruct_persistent_obj(meta) with meta.state = the object's __dict__ plus its recorded
    constructor arguments, torch's own containers (ModuleDict) pickled the usual way."""
    with release_modules_installed() as modules:
        recon = modules["torch_utils.persistence"]._reconstruct_persistent_obj

        class ReleasePickler(pickle.Pickler):
            def reducer_override(self, obj):
                release_module = isinstance(obj, torch.nn.Module) and type(obj).__module__ == Precond.__module__
                if release_module or isinstance(obj, _Persistent):
                    state = dict(obj.__dict__)
                    if release_module:
                        state["_init_args"], state["_init_kwargs"] = _init_record(obj, net, init_kwargs)
                    meta = dict(type="class", version=6, module_src="# the module's source code\n",
                                class_name=type(obj).__name__, state=state)
                    return recon, (meta,)
                return NotImplemented

        buf = io.BytesIO()
        encoders, util = modules["training.encoders"], modules["dnnlib.util"]
        data = util.EasyDict(encoder=encoders.StabilityVAEEncoder(), loss_fn=encoders.EDM2Loss(),
                             dataset_kwargs=util.EasyDict(class_name="training.dataset.ImageFolderDataset",
                                                          path="img512.zip", use_labels=True),
                             steps=encoders.Sequence([1, 2, 3]))
        data.ema = net
        ReleasePickler(buf, protocol=protocol).dump(data)
        return buf.getvalue()


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


def test_release_constructor_keywords_and_default_architecture(tmp_path):
    """The release records exactly these six keywords (its presets vary model_channels and
    dropout; everything else is the default architecture), and stores the EMA network in float16."""
    kwargs = dict(img_resolution=8, img_channels=4, label_dim=10, model_channels=64, dropout=0.0, use_fp16=True)
    torch.manual_seed(0)
    net = randomize_gains_(Precond(**kwargs), seed=2).half().eval()
    loaded = load_edm2_snapshot(io.BytesIO(write_release_snapshot(net, kwargs)))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in net.parameters())
    assert {t.dtype for t in loaded.state_dict().values()} == {torch.float16}
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor(0.8), torch.tensor([1, 9])), net(x, torch.tensor(0.8),
                                                                                    torch.tensor([1, 9])))


def test_other_entries_are_inert_records(tmp_path):
    data = read_edm2_snapshot(io.BytesIO(write_release_snapshot(release_net(), KWARGS)))
    assert isinstance(data["ema"], PersistentObject) and data["ema"].class_name == "Precond"
    assert isinstance(data["encoder"], PersistentObject) and data["encoder"].class_name == "StabilityVAEEncoder"
    assert data["loss_fn"].state["_init_kwargs"] == {"P_mean": -0.4, "P_std": 1.0}
    assert data["dataset_kwargs"]["path"] == "img512.zip" and data["dataset_kwargs"]["use_labels"] is True
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


def _tamper(data: dict, what: str) -> None:
    """One malformation of a read snapshot's network record."""
    state = data["ema"].state
    if what == "class":
        data["ema"].class_name = "VAE"
    elif what == "positional args":
        state["_init_args"] = (16, 4)
    elif what == "no kwargs":
        state["_init_kwargs"] = None
    elif what == "unknown kwarg":
        state["_init_kwargs"] = {**state["_init_kwargs"], "no_such_keyword": 1}
    elif what == "malformed channel_mult":
        state["_init_kwargs"] = {**state["_init_kwargs"], "channel_mult": 12}
    elif what == "sub-module not stored":
        state["_modules"]["unet"] = 5
    elif what == "no modules":
        del state["_modules"]
    elif what == "a tensor missing":
        state["_modules"]["unet"].state["_parameters"].pop("out_gain")
    elif what in _BAD_VALUES:  # A recorded constructor argument out of its domain.
        state["_init_kwargs"] = {**state["_init_kwargs"], **_BAD_VALUES[what]}


# Each used to escape as a bare error of a layer (ZeroDivisionError, a meta-tensor RuntimeError), or
# to load and fail at the first call (sigma_data, resample_filter), or to load wrong (use_fp16).
_BAD_VALUES = {
    "channels_per_head 0": {"channels_per_head": 0},
    "negative logvar_channels": {"logvar_channels": -1},
    "negative model_channels": {"model_channels": -4},
    "sigma_data not a number": {"sigma_data": "x"},
    "odd resample_filter": {"resample_filter": [1, 1, 1]},
    "use_fp16 not a bool": {"use_fp16": "no"},
}


_TAMPERED = {
    "class": "holds a VAE, expected the release's Precond",
    "positional args": "constructor arguments were not recorded",
    "no kwargs": "constructor arguments were not recorded",
    "unknown kwarg": "cannot build Precond from the snapshot's arguments",
    "malformed channel_mult": "malformed channel_mult",
    "sub-module not stored": "sub-module unet is not a stored module",
    "no modules": "the network's record holds no modules",
    "a tensor missing": "do not fit",
    "channels_per_head 0": "cannot build Precond .* channels_per_head: expected an integer >= 1, got 0",
    "negative logvar_channels": "cannot build Precond .* logvar_channels: expected an integer >= 1, got -1",
    "negative model_channels": "cannot build Precond .* model_channels: expected an integer >= 1, got -4",
    "sigma_data not a number": "cannot build Precond .* sigma_data: expected a finite number > 0, got 'x'",
    "odd resample_filter": "cannot build Precond .* resample_filter: expected an even number",
    "use_fp16 not a bool": "cannot build Precond .* use_fp16: expected True or False, got 'no'",
}


@pytest.mark.parametrize("what", list(_TAMPERED))
def test_malformed_network_records_are_refused_with_the_reason(what):
    from autoguide_fast.models.edm2_snapshot import snapshot_network

    data = read_edm2_snapshot(io.BytesIO(write_release_snapshot(release_net(), KWARGS)))
    snapshot_network(data)  # The untouched record loads: each failure below is the tampering's.
    _tamper(data, what)
    with pytest.raises(ValueError, match=_TAMPERED[what]):
        snapshot_network(data)


def test_a_persistent_record_without_class_name_is_no_snapshot():
    with release_modules_installed() as modules:
        recon = modules["torch_utils.persistence"]._reconstruct_persistent_obj

        class Nameless:
            def __reduce__(self):
                return recon, ({"state": {}},)

        payload = pickle.dumps({"ema": Nameless()})
    with pytest.raises(ValueError, match="not a readable EDM2 snapshot .* without class_name/state"):
        read_edm2_snapshot(io.BytesIO(payload))


@pytest.mark.parametrize("content", [b"", b"garbage\x00\x01", b"PK\x03\x04 a zip archive, truncated"])
def test_bytes_that_are_no_pickle_are_named(content):
    with pytest.raises(ValueError, match="file: not a readable EDM2 snapshot"):
        read_edm2_snapshot(io.BytesIO(content))


def test_generate_reads_a_snapshot_path_as_a_network_spec(tmp_path):
    from autoguide_fast.distributed.loading import load_network

    net = release_net()
    path = tmp_path / "edm2-img512-xs-test.pkl"
    path.write_bytes(write_release_snapshot(net, KWARGS))
    loaded = load_network(str(path), arg="--net")
    assert isinstance(loaded, Precond)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs()), net(*inputs()))
    # A pickled dict that is not a loadable snapshot is refused, never handed to torch.load (which
    # would run what it embeds).
    marker = tmp_path / "executed"
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"ema": _RunsACommand(str(marker))}))
    with pytest.raises(ValueError, match="not a loadable EDM2 snapshot"):
        load_network(str(bad), arg="--net")
    assert not marker.exists()
    # A .pkl written by torch.save (not a snapshot) still loads as a whole module.
    other = tmp_path / "module.pkl"
    torch.save(torch.nn.Identity(), other)
    assert isinstance(load_network(str(other), arg="--net"), torch.nn.Identity)


def test_a_file_cannot_change_functions_of_torch_or_of_the_loader():
    # GLOBAL torch._utils._rebuild_tensor_v2, then BUILD with slot state {"__defaults__": ("boom",)}:
    # with the real function returned by find_class this would rewrite torch's own function.
    before = torch._utils._rebuild_tensor_v2.__defaults__
    payload = (b"\x80\x02" b"ctorch._utils\n_rebuild_tensor_v2\n" b"N" b"}" b"X\x0c\x00\x00\x00__defaults__"
               b"X\x04\x00\x00\x00boom" b"\x85" b"s" b"\x86" b"b" b"0" b"}.")
    try:
        assert read_edm2_snapshot(io.BytesIO(payload)) == {}
        assert torch._utils._rebuild_tensor_v2.__defaults__ == before
    finally:  # Should the loader fail, keep the other tests' torch intact.
        torch._utils._rebuild_tensor_v2.__defaults__ = before
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=True)["w"], torch.ones(3))


def test_constructor_arguments_bigger_than_the_stored_tensors_are_refused_before_building():
    """A few hundred bytes claiming thousands of blocks would take minutes and gigabytes to build."""
    with release_modules_installed() as modules:
        recon = modules["torch_utils.persistence"]._reconstruct_persistent_obj
        kwargs = dict(img_resolution=64, img_channels=4, label_dim=0, model_channels=8, num_blocks=3000)

        class Bomb:
            def __reduce__(self):
                return recon, ({"class_name": "Precond", "state": {"_init_kwargs": kwargs, "_modules": {}}},)

        payload = pickle.dumps({"ema": Bomb()})
    with pytest.raises(ValueError, match="describe 24012 U-Net blocks, but the file stores only 0 tensors"):
        load_edm2_snapshot(io.BytesIO(payload))


def test_a_pkl_that_is_no_snapshot_is_never_unpickled_in_full(tmp_path):
    from autoguide_fast.distributed.loading import load_network

    marker = tmp_path / "executed"
    for content in ([_RunsACommand(str(marker))], {"ema": _RunsACommand(str(marker))}):
        path = tmp_path / "bad.pkl"
        path.write_bytes(pickle.dumps(content))
        with pytest.raises(ValueError, match="not a torch.save file and not a loadable EDM2 snapshot"):
            load_network(str(path), arg="--net")
        assert not marker.exists()


def test_generate_samples_from_a_snapshot_file(tmp_path):
    """End to end: `autoguide-fast generate --net snapshot.pkl` writes what sampling the loaded
    network gives (EDM2 prepared for inference, seeded noise and labels as documented)."""
    from autoguide_fast import fast_guided_sample, seeded_labels, seeded_noise
    from autoguide_fast.cli import main
    from autoguide_fast.models import prepare_for_inference

    net = release_net()
    path = tmp_path / "snap.pkl"
    path.write_bytes(write_release_snapshot(net, KWARGS))
    out = tmp_path / "out"
    assert main(["generate", "--net", str(path), "--seeds", "3", "--outdir", str(out), "--steps", "3",
                 "--no-progress", "--backend", "torch"]) == 0
    got = torch.from_numpy(np.load(out / "000003.npy"))
    labels = torch.nn.functional.one_hot(seeded_labels([3], 10), 10).float()
    with torch.no_grad():
        loaded = prepare_for_inference(load_edm2_snapshot(path))
        expected = fast_guided_sample(loaded, seeded_noise([3], (1, 4, 16, 16)), labels, num_steps=3, backend="torch")
    assert torch.equal(got, expected[0])


class _TouchesAFile:
    """Creates ``marker`` when a standard unpickler reads it (code run from the file, no shell)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path(self.marker).touch, ()


def test_an_upper_case_pkl_is_read_as_a_snapshot_never_unpickled_by_torch_load(tmp_path):
    """The .pkl suffix is matched case-insensitively: EVIL.PKL goes to the snapshot reader (refused,
    nothing run), never to torch.load(weights_only=False), which would run what it embeds; a
    release snapshot named in upper case loads as one."""
    from autoguide_fast.distributed.loading import load_network

    marker = tmp_path / "executed"
    evil = tmp_path / "EVIL.PKL"
    evil.write_bytes(pickle.dumps({"ema": _TouchesAFile(str(marker))}))
    with pytest.raises(ValueError) as info:
        load_network(str(evil), arg="--net")
    assert not marker.exists()  # Nothing from the file ran (checked first: the point of the test).
    assert "EVIL.PKL' is not a torch.save file and not a loadable EDM2 snapshot" in str(info.value), info.value

    net = release_net()
    path = tmp_path / "EDM2-IMG512-XS-TEST.PKL"
    path.write_bytes(write_release_snapshot(net, KWARGS))
    loaded = load_network(str(path), arg="--net")
    assert isinstance(loaded, Precond) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(*inputs()), net(*inputs()))

    pickle.loads(evil.read_bytes())  # The standard unpickler does run it: the test can fail.
    assert marker.exists()


def test_a_missing_file_is_file_not_found(tmp_path):
    """An unreadable path raises the OSError of opening it (FileNotFoundError, IsADirectoryError),
    not the ValueError of a file that is no snapshot."""
    missing = tmp_path / "no_such_dir" / "x.pkl"
    with pytest.raises(FileNotFoundError):
        load_edm2_snapshot(missing)
    with pytest.raises(FileNotFoundError):
        load_edm2_snapshot(str(missing))
    with pytest.raises(FileNotFoundError):
        read_edm2_snapshot(str(missing))
    with pytest.raises(IsADirectoryError):
        load_edm2_snapshot(tmp_path)


def _claiming(kwargs: dict, num_tensors: int) -> bytes:
    """A snapshot whose network record holds ``num_tensors`` small tensors and constructor keywords
    ``kwargs``."""
    tensors = {f"t{i}": torch.zeros(1) for i in range(num_tensors)}
    with release_modules_installed() as modules:
        recon = modules["torch_utils.persistence"]._reconstruct_persistent_obj

        class Claim:
            def __reduce__(self):
                state = {"_init_kwargs": kwargs, "_parameters": tensors, "_modules": {}}
                return recon, ({"class_name": "Precond", "state": state},)

        return pickle.dumps({"ema": Claim()})


def test_the_size_guard_refuses_one_block_more_than_the_stored_tensors():
    """The guard's bound is tight: constructor keywords describing one U-Net block more than the
    file stores tensors are refused before building; as many blocks as tensors pass the guard (this
    file is then refused for tensors that do not fit)."""
    # One level of one block: 1 x (2 x 1 + 3) = 5 blocks by the guard's count.
    kwargs = dict(img_resolution=8, img_channels=4, label_dim=0, model_channels=8, channel_mult=[1], num_blocks=1)
    with pytest.raises(ValueError, match="describe 5 U-Net blocks, but the file stores only 4 tensors"):
        load_edm2_snapshot(io.BytesIO(_claiming(kwargs, 4)))
    with pytest.raises(ValueError, match="do not fit"):
        load_edm2_snapshot(io.BytesIO(_claiming(kwargs, 5)))
