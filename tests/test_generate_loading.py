"""What ``autoguide-fast generate`` takes from the networks and the seed list before any sampling:
``--shape`` / ``--label-dim`` only for networks that lack the attributes (a flag that contradicts
an attribute is an error, one that agrees is accepted), and a bound on the number of seeds checked
before the list is built."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from autoguide_fast.distributed import seeds as seeds_module
from autoguide_fast.distributed.cli import main
from autoguide_fast.distributed.generation import image_path
from autoguide_fast.distributed.loading import load_network, network_label_dim, network_shape
from autoguide_fast.distributed.seeds import parse_seeds
from autoguide_fast.models import Precond
from tests.test_generate import ExactNet

HERE = "tests.test_generate"          # The networks of the generate tests (rgb_main: 3x8x8, 4 classes).
LOCAL = "tests.test_generate_loading"


class Bare(torch.nn.Module):
    """A network that tells nothing about its images or classes."""

    def forward(self, x, sigma, labels=None):
        return x * (0.25 / (0.25 + sigma.to(x.dtype) ** 2))


class ChannelsOnly(Bare):
    img_channels = 3


class NonSquare(Bare):
    img_channels, img_resolution = 2, (8, 6)


def bare():
    return Bare()


def in_training_mode():
    """A network that is in training mode as built (every fresh module is), with a dropout layer
    that changes its output there."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5))


def run(*argv) -> int:
    return main(["generate", *argv, "--steps", "2", "--no-progress", "--backend", "torch"])


# ----------------------------------------------------------------------------
# --shape


def test_shape_of_a_network_with_the_attributes_comes_from_them():
    assert network_shape(ExactNet(3, 8), None) == (3, 8, 8)
    assert network_shape(NonSquare(), None) == (2, 8, 6)


@pytest.mark.parametrize("net, given", [
    (ExactNet(3, 8), (3, 8, 8)),
    (NonSquare(), (2, 8, 6)),
    (ChannelsOnly(), (3, 16, 16)),    # No img_resolution: the flag gives H, W.
    (Bare(), (1, 5, 7)),
])
def test_a_shape_that_agrees_with_the_attributes_is_accepted(net, given):
    assert network_shape(net, given) == given


@pytest.mark.parametrize("net, given, told", [
    (ExactNet(3, 8), (3, 16, 16), "img_channels = 3, img_resolution = 8"),
    (ExactNet(3, 8), (4, 8, 8), "img_channels = 3, img_resolution = 8"),
    (ExactNet(3, 8), (3, 8), "img_channels = 3, img_resolution = 8"),
    (ExactNet(3, 8), (3, 8, 8, 1), "img_channels = 3, img_resolution = 8"),
    (NonSquare(), (2, 6, 8), "img_channels = 2, img_resolution = (8, 6)"),
    (ChannelsOnly(), (4, 16, 16), "img_channels = 3"),
])
def test_a_shape_that_contradicts_the_attributes_is_refused(net, given, told):
    with pytest.raises(ValueError) as info:
        network_shape(net, given, arg="--net")
    message = str(info.value)
    assert message.startswith("--shape: ")
    assert ",".join(map(str, given)) in message and told in message, message
    assert "leave --shape out" in message, message


def test_a_network_without_the_attributes_needs_shape():
    with pytest.raises(ValueError, match="--net: .*pass --shape C,H,W"):
        network_shape(Bare(), None, arg="--net")


# ----------------------------------------------------------------------------
# --label-dim


def test_label_dim_of_a_network_with_the_attribute_comes_from_it():
    assert network_label_dim(ExactNet(3, 8, label_dim=4), None) == 4
    assert network_label_dim(ExactNet(3, 8, label_dim=0), None) == 0
    assert network_label_dim(Bare(), None) == 0


@pytest.mark.parametrize("net, given", [(ExactNet(3, 8, label_dim=4), 4), (ExactNet(3, 8), 0), (Bare(), 3)])
def test_a_label_dim_that_agrees_with_the_attribute_is_accepted(net, given):
    assert network_label_dim(net, given) == given


@pytest.mark.parametrize("net, given", [(ExactNet(3, 8, label_dim=4), 3), (ExactNet(3, 8, label_dim=4), 0),
                                        (ExactNet(3, 8), 5)])
def test_a_label_dim_that_contradicts_the_attribute_is_refused(net, given):
    with pytest.raises(ValueError) as info:
        network_label_dim(net, given, arg="--net")
    message = str(info.value)
    assert message.startswith(f"--label-dim: {given} contradicts")
    assert f"label_dim = {net.label_dim}" in message and "leave --label-dim out" in message, message


# ----------------------------------------------------------------------------
# The same through the command line: exit code 2, the flag named, nothing written.


@pytest.mark.parametrize("flags, expected", [
    (["--shape", "3,16,16"], ["--shape: 3,16,16", "img_resolution = 8"]),
    (["--shape", "4,8,8"], ["--shape: 4,8,8", "img_channels = 3"]),
    (["--label-dim", "3"], ["--label-dim: 3", "label_dim = 4"]),
    (["--label-dim", "0"], ["--label-dim: 0", "label_dim = 4"]),
])
def test_cli_refuses_flags_that_contradict_the_network(tmp_path, capsys, flags, expected):
    out = tmp_path / "out"
    assert run("--net", f"{HERE}:rgb_main", "--seeds", "0-1", "--outdir", str(out), *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoguide-fast generate: error: ")
    for text in expected:
        assert text in err, err
    assert not out.exists()


def test_cli_accepts_flags_that_agree_with_the_network(tmp_path):
    out = tmp_path / "out"
    assert run("--net", f"{HERE}:latent_main", "--seeds", "0-1", "--outdir", str(out),
               "--shape", "4,6,6", "--label-dim", "0") == 0
    images = [np.load(image_path(str(out), seed, "npy", False)) for seed in (0, 1)]
    assert all(image.shape == (4, 6, 6) for image in images), [image.shape for image in images]


def test_cli_takes_shape_and_label_dim_for_a_bare_network(tmp_path):
    out = tmp_path / "out"
    assert run("--net", f"{LOCAL}:bare", "--seeds", "3", "--outdir", str(out), "--shape", "2,5,7") == 0
    assert np.load(image_path(str(out), 3, "npy", False)).shape == (2, 5, 7)


# ----------------------------------------------------------------------------
# --seeds: the count is bounded before the list is built.


def test_seed_count_bound_is_a_sane_constant():
    assert 50_000 <= seeds_module.MAX_SEEDS <= 1_000_000_000


def test_a_huge_seed_range_is_refused_before_it_is_built():
    with pytest.raises(ValueError) as info:
        parse_seeds("0-4999999999")  # 5 billion: tens of GB as a list.
    message = str(info.value)
    assert message.startswith("--seeds: ") and "5000000000 seeds" in message and str(seeds_module.MAX_SEEDS) in message


def test_the_bound_counts_every_range(monkeypatch):
    monkeypatch.setattr(seeds_module, "MAX_SEEDS", 10)
    assert parse_seeds("0-4,10-14") == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    with pytest.raises(ValueError, match="--seeds: .*11 seeds.* at most 10"):
        parse_seeds("0-4,10-14,99")
    with pytest.raises(ValueError, match="--seeds: .*cannot parse 'x'"):  # Syntax first, in any item.
        parse_seeds("0-99,x")


def test_cli_refuses_a_huge_seed_range(tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--net", f"{HERE}:rgb_main", "--seeds", "0-4999999999", "--outdir", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoguide-fast generate: error: --seeds: ") and "5000000000" in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------
# Network specs: what load_network makes of them.

# Constructor overrides that keep a preset tiny (8x8 images, 8 base channels, no attention).
TINY_PRESET = {"model_channels": 8, "img_resolution": 8, "channel_mult": [1, 2], "num_blocks": 1,
               "attn_resolutions": []}


@pytest.mark.parametrize("spec, channels", [
    ("edm2:xs", 4),           # No dataset: ImageNet-512 latents, the documented default.
    ("edm2:img512-xs", 4),
    ("edm2:img64-xs", 3),     # ImageNet-64 pixels.
])
def test_a_preset_spec_without_a_dataset_is_img512(spec, channels):
    """edm2:SIZE is the img512 preset (4-channel latents); edm2:img64-SIZE has 3 channels."""
    net = load_network(spec, overrides=TINY_PRESET)
    assert isinstance(net, Precond)
    assert (net.img_channels, net.label_dim) == (channels, 1000)
    assert network_shape(net, None) == (channels, 8, 8)


@pytest.mark.parametrize("spec, channels", [("EDM2:s", 4), ("Edm2:IMG64-XS", 3)])
def test_the_preset_prefix_and_name_are_case_insensitive(spec, channels):
    """The edm2: prefix is matched case-insensitively (as the DATASET-SIZE part is): EDM2:s is a
    preset, not a module named EDM2 to import."""
    net = load_network(spec, overrides=TINY_PRESET)
    assert isinstance(net, Precond) and net.img_channels == channels


def test_loaded_networks_are_in_eval_mode_without_gradients(tmp_path):
    """A network built by a module:callable spec or read from a torch.save file comes back in eval
    mode (dropout off) with gradients off, whatever mode it was saved or built in."""
    saved = tmp_path / "net.pt"
    torch.save(in_training_mode(), saved)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    for spec in (str(saved), f"{LOCAL}:in_training_mode"):
        net = load_network(spec)
        assert not any(m.training for m in net.modules()), spec
        assert not any(p.requires_grad for p in net.parameters()), spec
        with torch.no_grad():
            assert torch.equal(net(x), net[0](x)), spec  # The dropout layer is the identity.


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_a_path_to_no_file_is_file_not_found(tmp_path, relative):
    """A spec with a path separator (and no file suffix, no colon) names a file: a missing one is
    FileNotFoundError, not a spec the loader cannot interpret."""
    spec = os.path.join("no_such_dir_q7", "missing") if relative else str(tmp_path / "nets" / "missing")
    assert not os.path.exists(spec)
    with pytest.raises(FileNotFoundError, match="^--gnet: no such file"):
        load_network(spec, arg="--gnet")
    for name in ("missing_q7.PT", "missing_q7.PKL", "missing_q7.Pth"):  # A file suffix in any case.
        with pytest.raises(FileNotFoundError, match="^--gnet: no such file"):
            load_network(name, arg="--gnet")
