"""``autoguide-fast generate`` in one process: files, formats, resuming, network specs, errors.

The networks here are built only from exactly rounded element-wise ops (+, -, *, /, sqrt), so
an image's output cannot depend on the rest of its batch (no BLAS blocking, no vectorised
transcendental with a scalar tail): files can then be compared bit for bit across batchings.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import autoguide_fast.distributed.generation as G
from autoguide_fast import fast_guided_sample, seeded_labels, seeded_noise
from autoguide_fast.distributed.cli import main
from autoguide_fast.distributed.generation import SETTINGS_FILE, image_path
from autoguide_fast.reference import edm_time_steps

try:
    import PIL.Image as PIL
except ImportError:  # PNG output needs Pillow (the "cli" extra); the rest of the command does not.
    PIL = None
needs_pillow = pytest.mark.skipif(PIL is None, reason="PNG output needs Pillow")

HERE = "tests.test_generate"


class ExactNet(torch.nn.Module):
    """D = c_skip x + c_out softsign(mix(c_in x) + bias + class embedding), each output element a
    fixed sequence of exactly rounded ops on its own pixel: batch-independent bit for bit."""

    def __init__(self, channels: int = 3, resolution: int = 8, label_dim: int = 0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.img_channels, self.img_resolution, self.label_dim = channels, resolution, label_dim
        self.mix = torch.nn.Parameter(torch.randn(channels, channels, generator=g) * 0.5)
        self.bias = torch.nn.Parameter(torch.randn(channels, generator=g) * 0.2)
        self.emb = torch.nn.Parameter(torch.randn(max(label_dim, 1), channels, generator=g) * 0.5)
        self.calls = 0

    def forward(self, x, sigma, labels=None):
        self.calls += 1
        sd = 0.5
        sigma = sigma.to(torch.float32)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        h = x.to(torch.float32) * c_in
        rows = []
        for c in range(self.img_channels):
            acc = h[:, 0] * self.mix[c, 0] + self.bias[c]
            for k in range(1, self.img_channels):
                acc = acc + h[:, k] * self.mix[c, k]
            for j in range(self.label_dim):
                acc = acc + labels[:, j, None, None] * self.emb[j, c]
            rows.append(acc)
        y = torch.stack(rows, dim=1)
        return c_skip * x + c_out * (y / (1 + y * y).sqrt())


# Network factories for ``--net tests.test_generate:NAME``.
def rgb_main():
    return ExactNet(3, 8, label_dim=4, seed=0)


def rgb_guide():
    return ExactNet(3, 8, label_dim=4, seed=1)


def latent_main():
    return ExactNet(4, 6, seed=2)


def latent_guide():
    return ExactNet(4, 6, seed=3)


class Interrupted(KeyboardInterrupt):
    """Stands in for a kill: like Ctrl-C it is not an error of the networks, and propagates."""


class _Interrupting(ExactNet):
    """Raises after AGF_TEST_INTERRUPT_AFTER forward calls (simulates a killed job)."""

    def forward(self, x, sigma, labels=None):
        limit = int(os.environ.get("AGF_TEST_INTERRUPT_AFTER", "0"))
        if limit and self.calls >= limit:
            raise Interrupted()
        return super().forward(x, sigma, labels)


def interruptible_main():
    return _Interrupting(3, 8, label_dim=4, seed=0)


class _Slow(ExactNet):
    """Takes a while per call: a job that is still in its first batch when it gets a signal."""

    def forward(self, x, sigma, labels=None):
        import time

        time.sleep(0.05)
        return super().forward(x, sigma, labels)


def slow_main():
    return _Slow(3, 8, label_dim=4, seed=0)


class _FailingGuide(ExactNet):
    """A guide whose 2nd forward call raises ValueError: a network's failure mid-trajectory (not a bad
    argument, although its type is the one argument checks raise)."""

    def forward(self, x, sigma, labels=None):
        if self.calls >= 1:
            raise ValueError("the guide broke at its 2nd call")
        return super().forward(x, sigma, labels)


def failing_guide():
    return _FailingGuide(3, 8, label_dim=4, seed=1)


class _BatchCoupled(_Interrupting):
    """Each image's output also depends on the rest of its batch (a term in the batch mean), as a
    BLAS or cuDNN kernel chosen by batch size can make a real network's last bits depend on it."""

    def forward(self, x, sigma, labels=None):
        return super().forward(x, sigma, labels) + 0.01 * x.mean(0, keepdim=True)


def coupled_main():
    return _BatchCoupled(3, 8, label_dim=4, seed=0)


class _NanForClassZero(ExactNet):
    """NaN for the images of class 0 (a broken network, for some seeds only)."""

    def forward(self, x, sigma, labels=None):
        y = super().forward(x, sigma, labels)
        return torch.where(labels[:, :1, None, None] > 0.5, torch.nan, y)


def nan_main():
    return _NanForClassZero(3, 8, label_dim=4, seed=0)


def not_a_network():
    return 42


class _Constant(torch.nn.Module):
    """D = a constant just below a PNG rounding boundary: 1/127.5 maps to 129 exactly, this to 128."""

    img_channels, img_resolution, label_dim = 3, 2, 0

    def forward(self, x, sigma, labels=None):
        return torch.full_like(x, 1 / 127.5 - 1e-12)


def constant_main():
    return _Constant()


# The sampler options of most tests: the official schedule of 4 steps, and everything but the schedule.
SAMPLER_BUT_SCHEDULE = ["--guidance", "2.3", "--S-churn", "8", "--S-min", "0.05", "--S-max", "50",
                        "--guidance-interval", "0.2,20", "--no-progress", "--backend", "torch"]
SAMPLER = ["--steps", "4", *SAMPLER_BUT_SCHEDULE]
# A custom schedule (--sigmas) of 5 levels: churn on some steps (S_min, S_max), guidance on others (interval).
LEVELS = [60.0, 12.5, 3.0, 0.4, 0.01]
CUSTOM_SAMPLER = ["--sigmas", ",".join(map(str, LEVELS)), *SAMPLER_BUT_SCHEDULE]


def reference_sample(main_fn, guide_fn, seed: int, class_idx: int | None = None, *, guidance=2.3, steps=4,
                     sigmas=None):
    """One seed alone, with the public API: what its file must hold."""
    net, gnet = main_fn(), guide_fn()
    shape = [1, net.img_channels, net.img_resolution, net.img_resolution]
    labels = None
    if net.label_dim:
        index = torch.tensor([class_idx]) if class_idx is not None else seeded_labels([seed], net.label_dim)
        labels = F.one_hot(index, net.label_dim).to(torch.float32)
    schedule = dict(num_steps=steps) if sigmas is None else dict(sigmas=sigmas)
    return fast_guided_sample(net, seeded_noise([seed], shape), labels, gnet, seeds=[seed], guidance=guidance,
                              S_churn=8, S_min=0.05, S_max=50, guidance_interval=(0.2, 20), backend="torch",
                              **schedule)[0]


def to_png_array(x: torch.Tensor) -> np.ndarray:
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def run(*argv) -> int:
    return main(["generate", *argv])


# ----------------------------------------------------------------------------


@needs_pillow
def test_png_per_seed_equals_sampling_that_seed_alone(tmp_path, capsys):
    out = tmp_path / "out"
    rc = run("--net", f"{HERE}:rgb_main", "--gnet", f"{HERE}:rgb_guide", "--seeds", "3-7,20", "--batch", "4",
             "--outdir", str(out), *SAMPLER)
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{s:06d}.png" for s in (3, 4, 5, 6, 7, 20)] + [SETTINGS_FILE])
    for seed in (3, 6, 20):
        got = np.asarray(PIL.open(out / f"{seed:06d}.png"))
        assert got.shape == (8, 8, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, to_png_array(reference_sample(rgb_main, rgb_guide, seed)))
    assert "6 file(s) written, 0 already present, of 6 seed(s)" in capsys.readouterr().out


def test_npy_for_latents_bit_exact_with_fixed_class_and_subdirs(tmp_path):
    out = tmp_path / "out"
    assert run("--net", f"{HERE}:latent_main", "--gnet", f"{HERE}:latent_guide", "--seeds", "998-1001",
               "--batch", "3", "--subdirs", "--outdir", str(out), *SAMPLER) == 0
    for seed in (998, 1001):
        path = image_path(str(out), seed, "npy", subdirs=True)
        assert path.endswith(os.path.join("000000" if seed < 1000 else "001000", f"{seed:06d}.npy"))
        got = torch.from_numpy(np.load(path))
        assert torch.equal(got, reference_sample(latent_main, latent_guide, seed))
    # A fixed class for every image instead of the per-seed class.
    out2 = tmp_path / "class"
    assert run("--net", f"{HERE}:rgb_main", "--gnet", f"{HERE}:rgb_guide", "--seeds", "5,9", "--class", "2",
               "--format", "npy", "--outdir", str(out2), *SAMPLER) == 0
    for seed in (5, 9):
        got = torch.from_numpy(np.load(out2 / f"{seed:06d}.npy"))
        assert torch.equal(got, reference_sample(rgb_main, rgb_guide, seed, class_idx=2))
        assert not torch.equal(got, reference_sample(rgb_main, rgb_guide, seed, class_idx=3))


def _interrupted_run(net: str, out: Path, monkeypatch) -> list[str]:
    """Seeds 0-9 in batches of 3, killed during the third batch (7 evaluations per batch with 4
    Heun steps); returns the command's arguments (without --outdir) for the rerun."""
    args = ["--net", f"{HERE}:{net}", "--gnet", f"{HERE}:rgb_guide", "--seeds", "0-9", "--batch", "3",
            "--format", "npy", *SAMPLER]
    monkeypatch.setenv("AGF_TEST_INTERRUPT_AFTER", str(2 * 7 + 3))
    with pytest.raises(Interrupted):
        run(*args, "--outdir", str(out))
    monkeypatch.delenv("AGF_TEST_INTERRUPT_AFTER")
    return args


def test_interrupted_run_resumes_without_redoing_finished_seeds(tmp_path, monkeypatch, capsys):
    out, clean = tmp_path / "out", tmp_path / "clean"
    args = _interrupted_run("interruptible_main", out, monkeypatch)
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.npy")}
    assert sorted(done) == [f"{s:06d}.npy" for s in range(6)]
    (out / ".000007.npy.partial").write_bytes(b"half a file")  # As left by a killed writer.
    capsys.readouterr()
    assert run(*args, "--outdir", str(out)) == 0
    assert "4 file(s) written, 6 already present, of 10 seed(s)" in capsys.readouterr().out
    for name, stamp in done.items():  # Finished files were not rewritten.
        st = (out / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == stamp
    assert not list(out.glob(".*.partial"))
    # The result is that of an uninterrupted run, file for file.
    assert run(*args, "--outdir", str(clean)) == 0
    files = sorted(p.name for p in clean.glob("*.npy"))
    assert files == sorted(p.name for p in out.glob("*.npy")) and len(files) == 10
    for name in files:
        assert (out / name).read_bytes() == (clean / name).read_bytes()
    # A rerun with everything present does nothing.
    assert run(*args, "--outdir", str(out)) == 0
    assert "0 file(s) written, 10 already present" in capsys.readouterr().out


def test_resumed_files_equal_the_uninterrupted_run_with_a_batch_dependent_network(tmp_path, monkeypatch, capsys):
    """A resumed job samples the fresh run's batches (a partly written batch whole, writing only its
    missing files), so its files equal the uninterrupted run's even when a network's output depends
    on the rest of its batch."""
    out, clean = tmp_path / "out", tmp_path / "clean"
    args = _interrupted_run("coupled_main", out, monkeypatch)
    (out / "000004.npy").unlink()  # As if killed while writing the second batch's files.
    kept = (out / "000003.npy").stat().st_mtime_ns
    capsys.readouterr()
    assert run(*args, "--outdir", str(out)) == 0
    assert "5 file(s) written, 5 already present, of 10 seed(s)" in capsys.readouterr().out
    assert (out / "000003.npy").stat().st_mtime_ns == kept  # Its batch was sampled again, not rewritten.
    assert run(*args, "--outdir", str(clean)) == 0
    names = sorted(p.name for p in clean.glob("*.npy"))
    assert len(names) == 10 and names == sorted(p.name for p in out.glob("*.npy"))
    for name in names:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def test_nonfinite_images_are_named_and_the_other_files_written(tmp_path, capsys):
    out = tmp_path / "out"
    seeds = list(range(12))
    bad = [s for s in seeds if int(seeded_labels([s], 4)[0]) == 0]
    assert 0 < len(bad) < len(seeds)
    assert run("--net", f"{HERE}:nan_main", "--gnet", f"{HERE}:rgb_guide", "--seeds", "0-11", "--batch", "5",
               "--format", "npy", "--outdir", str(out), *SAMPLER) == 1
    err = capsys.readouterr().err
    assert f"NaN or Inf for {len(bad)} seed(s): [{', '.join(map(str, bad))}]" in err and "check_finite" not in err
    assert sorted(p.name for p in out.glob("*.npy")) == [f"{s:06d}.npy" for s in seeds if s not in bad]


def test_a_network_failing_while_sampling_is_not_a_bad_argument(tmp_path, capsys):
    """Exit 1 with the network's traceback and the batch's seeds (exit 2 is for bad arguments)."""
    assert run("--net", f"{HERE}:latent_main", "--gnet", f"{HERE}:rgb_guide", "--seeds", "0-3",
               "--outdir", str(tmp_path / "out"), *SAMPLER) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "failed: sampling the batch of seeds [0, 1, 2, 3] failed" in err


def test_files_failing_to_be_written_are_a_failure_not_a_bad_argument(tmp_path, capsys, monkeypatch):
    """A full disk mid-job: exit 1 with the cause and the batch's seeds; earlier batches' files stay."""
    write = G._write_batch

    def write_once(x, seeds, *args):
        if seeds[0] != 0:
            raise OSError(28, "No space left on device")
        write(x, seeds, *args)

    monkeypatch.setattr(G, "_write_batch", write_once)
    out = tmp_path / "out"
    assert run("--net", f"{HERE}:latent_main", "--seeds", "0-3", "--batch", "2", "--outdir", str(out),
               "--steps", "2") == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "writing the files of the batch of seeds [2, 3] failed: OSError" in err
    assert sorted(p.name for p in out.glob("*.npy")) == ["000000.npy", "000001.npy"]


def test_partial_files_of_other_seeds_are_left_alone(tmp_path):
    """Two jobs may share an output directory with other seeds: a job removes only the partial files
    of its own seeds (left by a killed run of it), never another job's files in progress."""
    out = tmp_path / "out"
    out.mkdir()
    mine, theirs = out / ".000002.npy.77-0a1b2c3d.partial", out / ".000100.npy.88-4e5f6a7b.partial"
    mine.write_bytes(b"half")
    theirs.write_bytes(b"in progress")
    assert run("--net", f"{HERE}:latent_main", "--gnet", f"{HERE}:latent_guide", "--seeds", "0-3",
               "--outdir", str(out), *SAMPLER) == 0
    assert not mine.exists() and theirs.read_bytes() == b"in progress"
    assert sorted(p.name for p in out.glob("*.npy")) == [f"{s:06d}.npy" for s in range(4)]


def test_whole_module_file_spec(tmp_path):
    path = tmp_path / "main.pt"
    torch.save(latent_main(), path)
    out = tmp_path / "file"
    assert run("--net", str(path), "--gnet", f"{HERE}:latent_guide", "--seeds", "4", "--outdir", str(out),
               *SAMPLER) == 0
    assert torch.equal(torch.from_numpy(np.load(out / "000004.npy")), reference_sample(latent_main, latent_guide, 4))


@pytest.mark.slow  # Seconds on a loaded 2-core machine: oneDNN sets up each conv shape on first use.
@needs_pillow
def test_edm2_preset_specs(tmp_path):
    # A tiny EDM2 preset pair with random weights (img64: 3-channel pixels -> PNG).
    out = tmp_path / "edm2"
    tiny = '{"model_channels": 8, "img_resolution": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []}'
    assert run("--net", "edm2:img64-xs", "--gnet", "edm2:img64-xs", "--preset-overrides", tiny, "--seeds", "0-1",
               "--outdir", str(out), "--steps", "2", "--guidance", "2", "--no-progress", "--backend", "torch") == 0
    images = [np.asarray(PIL.open(out / f"{s:06d}.png")) for s in (0, 1)]
    assert images[0].shape == (8, 8, 3) and not np.array_equal(images[0], images[1])
    # The presets' gains are drawn non-zero: the weights matter, so guidance changes the images
    # (with the release's zero gains both networks output c_skip x and every guidance gives the same).
    unguided = tmp_path / "unguided"
    assert run("--net", "edm2:img64-xxs", "--preset-overrides", tiny, "--seeds", "0-1", "--outdir", str(unguided),
               "--steps", "2", "--no-progress", "--backend", "torch") == 0
    guided = tmp_path / "guided"
    assert run("--net", "edm2:img64-xxs", "--gnet", "edm2:img64-xs", "--preset-overrides", tiny, "--seeds", "0-1",
               "--outdir", str(guided), "--steps", "2", "--guidance", "3", "--no-progress", "--backend", "torch") == 0
    pixels = [np.asarray(PIL.open(d / "000000.png")) for d in (unguided, guided)]
    assert not np.array_equal(*pixels)


def test_generate_is_a_subcommand_of_the_main_cli():
    from autoguide_fast.cli import build_parser

    args = build_parser().parse_args(["generate", "--net", "edm2:s", "--outdir", "x", "--seeds", "0-3"])
    assert args.command == "generate" and args.seeds == "0-3" and callable(args.func)


# ----------------------------------------------------------------------------
# Each bad argument gets a clear error naming it (exit code 2), before any sampling.


def _bad_cases(tmp_path):
    garbage, a_file = tmp_path / "garbage.pt", tmp_path / "a_file"
    ok = ["--net", f"{HERE}:rgb_main", "--gnet", f"{HERE}:rgb_guide", "--guidance", "2"]
    out = ["--outdir", str(tmp_path / "out")]
    return {
        "seed syntax": (ok + out + ["--seeds", "0-9,12-x"], ["--seeds", "'12-x'"]),
        "seed range downward": (ok + out + ["--seeds", "9-3"], ["--seeds", "downward"]),
        "missing module": (["--net", "no_such_module_q7:make"] + out, ["--net", "cannot import module"]),
        "missing callable": (["--net", f"{HERE}:no_such_factory"] + out, ["--net", "no attribute"]),
        "not a network": (["--net", f"{HERE}:not_a_network"] + out, ["--net", "expected a network"]),
        "missing file": (["--net", str(tmp_path / "missing.pt")] + out, ["--net", "no such file"]),
        "unloadable file": (["--net", str(garbage)] + out, ["--net", "cannot load"]),
        "missing guide file": (["--net", f"{HERE}:rgb_main", "--gnet", "gone/guide.pt", "--guidance", "2"] + out,
                               ["--gnet", "no such file"]),
        "unknown preset": (["--net", "edm2:huge"] + out, ["--net", "unknown EDM2 preset"]),
        "guidance without guide": (["--net", f"{HERE}:rgb_main", "--guidance", "2"] + out, ["--guidance", "--gnet"]),
        "guide-parallel in one process": (ok + out + ["--guide-parallel"], ["--guide-parallel", "exactly 2"]),
        "outdir under a file": (ok + ["--outdir", str(a_file / "sub")], ["--outdir", "cannot create"]),
        "outdir is a file": (ok + ["--outdir", str(a_file)], ["--outdir", "not a directory"]),
        "class out of range": (ok + out + ["--class", "4"], ["--class", "label_dim 4"]),
        "bad overrides": (["--net", "edm2:xs", "--preset-overrides", "{model_channels: 8"] + out,
                          ["--preset-overrides", "JSON"]),
        "batch": (ok + out + ["--batch", "0"], ["--batch"]),
        "negative label dim": (ok + out + ["--label-dim", "-2"], ["--label-dim", "-2"]),
        "shape of other channels": (ok + out + ["--shape", "4,8,8"], ["--shape", "img_channels = 3"]),
        "png of 4 channels": (["--net", f"{HERE}:latent_main"] + out + ["--format", "png"], ["--format png"]),
        # The sampler's checks, naming the flags (before, these failed while sampling, exit 1).
        "rho overflowing": (ok + out + ["--rho", "1e-5"], ["--rho: 1e-05 is too small"]),
        "sigma_max beyond the dtype": (ok + out + ["--dtype", "float16", "--sigma-max", "1e5"],
                                       ["--sigma-max: 100000.0 is not a usable noise level in dtype torch.float16"]),
        "guidance interval with NaN": (ok + out + ["--guidance-interval", "nan,1"],
                                       ["--guidance-interval[0]: expected a number, got NaN"]),
        "meta device": (ok + out + ["--device", "meta"], ["--device: expected auto, cpu, cuda or cuda:N, got 'meta'"]),
    }


@pytest.mark.parametrize("case", list(_bad_cases(Path("unused"))))
def test_bad_arguments_give_clear_errors(tmp_path, capsys, case):
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    (tmp_path / "a_file").write_text("x")
    argv, expected = _bad_cases(tmp_path)[case]
    assert run(*argv, "--steps", "2", "--no-progress", "--backend", "torch") == 2
    err = capsys.readouterr().err
    assert err.startswith("autoguide-fast generate: error: ")
    for text in expected:
        assert text in err, (case, err)
    assert not (tmp_path / "out").exists()  # Nothing is created for settings that cannot run.


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK: expected 0 <= RANK < WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE: expected an integer"),
])
def test_an_inconsistent_launch_environment_is_named(tmp_path, monkeypatch, capsys, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert run("--net", f"{HERE}:rgb_main", "--outdir", str(tmp_path / "out"), "--steps", "2", "--no-progress",
               "--backend", "torch") == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# The Python API checks the same options (the CLI's argparse types catch most of them first).
_API_BAD = {
    "no seeds": (dict(seeds=[]), ValueError, "--seeds"),
    "negative seed": (dict(seeds=[3, -1]), ValueError, "--seeds"),
    "repeated seed": (dict(seeds="0-3,2"), ValueError, "--seeds"),
    "batch zero": (dict(batch=0), ValueError, "--batch"),
    "batch bool": (dict(batch=True), TypeError, "--batch"),
    "no net": (dict(net=""), ValueError, "--net"),
    "guidance without guide": (dict(gnet=None), ValueError, "--gnet"),
    "guide-parallel without guide": (dict(gnet=None, guidance=1.0, guide_parallel=True), ValueError,
                                     "--guide-parallel"),
    "guide-parallel unguided": (dict(guidance=1.0, guide_parallel=True), ValueError, "--guide-parallel"),
    "negative class": (dict(class_idx=-1), ValueError, "--class"),
    "dtype": (dict(dtype="int8"), ValueError, "--dtype"),
    "format": (dict(format="jpg"), ValueError, "--format"),
    "label dim": (dict(label_dim=-1), ValueError, "--label-dim"),
    "shape": (dict(shape=(3, 0, 8)), ValueError, "--shape"),
    "overrides without preset": (dict(preset_overrides={"model_channels": 8}), ValueError, "--preset-overrides"),
    "guide overrides without preset": (dict(gnet_preset_overrides={"model_channels": 8}), ValueError,
                                       "--gnet-preset-overrides"),
    "threads": (dict(threads=0), ValueError, "--threads"),
    "steps": (dict(num_steps=0), ValueError, "--steps"),
    "sigma order": (dict(sigma_min=5.0, sigma_max=1.0), ValueError, "--sigma"),
    "solver": (dict(solver="rk4"), ValueError, "--solver"),
    "interval": (dict(guidance_interval=(2.0, 1.0)), ValueError, "--guidance-interval"),
    "seed past 2^64": (dict(seeds=[0, 2**64]), ValueError, "--seeds"),
    "negative seed in a tensor": (dict(seeds=torch.tensor([3, -1])), ValueError, "--seeds"),
    "float seed": (dict(seeds=[1.7]), ValueError, "--seeds"),
    "bool seed": (dict(seeds=[True]), ValueError, "--seeds"),
    "preset seed": (dict(preset_seed=2**63), ValueError, "--preset-seed"),
    "negative preset seed": (dict(preset_seed=-1), ValueError, "--preset-seed"),
    "sigmas increasing": (dict(sigmas=[1.0, 2.0], num_steps=32), ValueError, "--sigmas"),
    "sigmas as text": (dict(sigmas="80,1", num_steps=32), TypeError, "--sigmas"),
    "sigmas with steps": (dict(sigmas=[80.0, 1.0]), ValueError, "--steps"),  # base: num_steps=2.
    # Types the flags cannot give: once truncated or taken as true silently (class 1.9 drew class 1).
    "float class": (dict(class_idx=1.9), TypeError, "--class"),
    "bool class": (dict(class_idx=True), TypeError, "--class"),
    "text class": (dict(class_idx="2"), TypeError, "--class"),
    "text label dim": (dict(label_dim="5"), TypeError, "--label-dim"),
    "float shape": (dict(shape=(2.9, 2, 2)), TypeError, "--shape"),
    "text shape": (dict(shape="3,8,8"), ValueError, "--shape"),
    "text subdirs": (dict(subdirs="False"), TypeError, "--subdirs"),
    "int guide-parallel": (dict(guide_parallel=1), TypeError, "--guide-parallel"),
    "float batch": (dict(batch=2.0), TypeError, "--batch"),
    "float threads": (dict(threads=1.5), TypeError, "--threads"),
    "threads beyond the CPUs": (dict(threads=(os.cpu_count() or 1) + 1), ValueError, "--threads"),
    "bytes as outdir": (dict(outdir=b"out"), TypeError, "--outdir"),
    "dtype object": (dict(dtype=torch.float32), TypeError, "--dtype"),
}


@pytest.mark.parametrize("case", list(_API_BAD))
def test_python_api_checks_options_before_anything(tmp_path, case):
    from autoguide_fast.distributed import GenerateOptions, generate

    fields, error, flag = _API_BAD[case]
    base = dict(net=f"{HERE}:rgb_main", gnet=f"{HERE}:rgb_guide", guidance=2.0, seeds="0-3",
                outdir=str(tmp_path / "out"), num_steps=2, backend="torch", progress=False, verbose=False)
    with pytest.raises(error) as info:
        generate(GenerateOptions(**{**base, **fields}))
    assert str(info.value).startswith(flag) or f" {flag}" in str(info.value), (case, str(info.value))
    assert not (tmp_path / "out").exists()


def broken_factory():
    raise RuntimeError("weights missing")


NOT_CALLABLE = 42

_LOAD_BAD = {
    "empty spec": ("", {}, "expected a network spec"),
    "overrides on a non-preset": (f"{HERE}:rgb_main", {"model_channels": 8}, "only apply to edm2"),
    "preset overrides the constructor refuses": ("edm2:xs", {"no_such_keyword": 1}, "cannot build 'edm2:xs'"),
    "module without callable": (f"{HERE}:", {}, "expected module:callable"),
    "module whose import fails": ("tests.nets_that_do_not_import_q9:make", {}, "cannot import module"),
    "not callable": (f"{HERE}:NOT_CALLABLE", {}, "expected a callable returning a network"),
    "factory raises": (f"{HERE}:broken_factory", {}, "RuntimeError: weights missing"),
    "plain word": ("resnet", {}, "cannot interpret 'resnet'"),
}


@pytest.mark.parametrize("case", list(_LOAD_BAD))
def test_load_network_names_the_argument_and_the_reason(case):
    from autoguide_fast.distributed import load_network

    spec, overrides, reason = _LOAD_BAD[case]
    with pytest.raises(ValueError) as info:
        load_network(spec, arg="--gnet", overrides=overrides)
    assert str(info.value).startswith("--gnet: ") and reason in str(info.value), str(info.value)


def test_load_network_reports_a_user_module_failing_at_import(tmp_path, monkeypatch):
    from autoguide_fast.distributed import load_network

    (tmp_path / "agf_broken_nets_q5.py").write_text("raise KeyError('config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"^--net: importing module 'agf_broken_nets_q5' .* failed: KeyError"):
        load_network("agf_broken_nets_q5:make")
    with pytest.raises(ValueError, match=r"^--net: .* is not a file"):
        load_network(str(tmp_path))


@pytest.mark.parametrize("text", ["[1, 2]", "{model_channels: 8"])
def test_preset_overrides_must_be_a_json_object(text):
    from autoguide_fast.distributed.loading import parse_overrides

    with pytest.raises(ValueError, match=r"^--preset-overrides: expected a JSON object"):
        parse_overrides(text, arg="--preset-overrides")
    assert parse_overrides("", arg="--preset-overrides") == {}


def test_refuses_to_mix_files_of_other_settings(tmp_path, capsys):
    base = ["--net", f"{HERE}:rgb_main", "--gnet", f"{HERE}:rgb_guide", "--seeds", "0", "--outdir", str(tmp_path),
            "--steps", "2", "--no-progress", "--backend", "torch", "--format", "npy"]
    assert run(*base, "--guidance", "2") == 0
    assert run(*base, "--guidance", "2.5", "--seeds", "1") == 2
    err = capsys.readouterr().err
    assert "--outdir" in err and "guidance: 2.0 -> 2.5" in err
    assert not (tmp_path / "000001.npy").exists()


def test_a_run_that_wrote_no_image_leaves_no_settings_record(tmp_path, capsys):
    # A guide broken at its 2nd call: the run fails before any file is written. Its settings record
    # must not refuse the corrected command (another --gnet), as it would with images present.
    base = ["--net", f"{HERE}:rgb_main", "--guidance", "2", "--seeds", "0-1", "--outdir", str(tmp_path),
            "--steps", "2", "--no-progress", "--backend", "torch", "--format", "npy"]
    assert run(*base, "--gnet", f"{HERE}:failing_guide") == 1
    assert not list(tmp_path.iterdir())
    assert run(*base, "--gnet", f"{HERE}:rgb_guide") == 0
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == ["000000.npy", "000001.npy"]
    # Once images exist the record stays, even when a later run fails.
    assert run(*base, "--gnet", f"{HERE}:rgb_guide", "--seeds", "2") == 0
    capsys.readouterr()
    assert run(*base, "--gnet", f"{HERE}:failing_guide") == 2  # Other settings: refused.
    assert "gnet" in capsys.readouterr().err


def test_a_failed_run_keeps_a_settings_record_it_did_not_write(tmp_path, monkeypatch):
    """The record of an earlier run (killed before its first image) stays when a later run with the
    same settings fails before writing an image: only the record a run made itself is removed."""
    base = ["--net", f"{HERE}:interruptible_main", "--seeds", "0-1", "--outdir", str(tmp_path), "--steps", "2",
            "--no-progress", "--backend", "torch", "--format", "npy"]
    monkeypatch.setenv("AGF_TEST_INTERRUPT_AFTER", "1")  # Stops in the 1st batch: no image yet.
    with pytest.raises(KeyboardInterrupt):
        run(*base)
    assert not (tmp_path / SETTINGS_FILE).exists()  # Its own record: removed.
    record = {"written": "by an earlier run"}  # Stands for an earlier run's record (its content is not read).
    monkeypatch.setattr(G, "_check_settings", lambda outdir, settings: False)  # "There, with the same settings."
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(record))
    with pytest.raises(KeyboardInterrupt):
        run(*base)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == record


def test_a_failed_run_keeps_the_settings_record_once_images_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("AGF_TEST_INTERRUPT_AFTER", "5")  # Stops in the 2nd batch (2 steps: 3 calls each).
    args = ["--net", f"{HERE}:interruptible_main", "--seeds", "0-3", "--batch", "2", "--outdir", str(tmp_path),
            "--steps", "2", "--no-progress", "--backend", "torch", "--format", "npy"]
    with pytest.raises(KeyboardInterrupt):
        run(*args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.npy", "000001.npy", SETTINGS_FILE]
    monkeypatch.setenv("AGF_TEST_INTERRUPT_AFTER", "1")  # Stops in the 1st batch: no image yet.
    with pytest.raises(KeyboardInterrupt):
        run(*args, "--outdir", str(tmp_path / "fresh"))
    assert not (tmp_path / "fresh" / SETTINGS_FILE).exists()


def test_sigterm_before_the_first_image_cleans_up_like_ctrl_c(tmp_path):
    """SIGTERM (torchrun's, a scheduler's) unwinds like Ctrl-C: exit code 143, and the settings
    record of a run that wrote no image is removed (its default action left the record behind)."""
    import signal
    import subprocess
    import time

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "autoguide_fast", "generate", "--net", f"{HERE}:slow_main",
                             "--seeds", "0-1", "--steps", "32", "--outdir", str(out), "--no-progress",
                             "--backend", "torch"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / SETTINGS_FILE).exists():  # Written just before the first batch.
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not (out / SETTINGS_FILE).exists() and not list(out.glob("*.png"))


def test_python_api_takes_seeds_as_an_array_or_tensor(tmp_path):
    from autoguide_fast.distributed import GenerateOptions, generate

    for i, seeds in enumerate((np.arange(2), torch.tensor([0, 1]), [np.int64(0), 1])):
        out = tmp_path / str(i)
        generate(GenerateOptions(net=f"{HERE}:latent_main", seeds=seeds, outdir=str(out), num_steps=2,
                                 progress=False, verbose=False))
        assert sorted(p.name for p in out.glob("*.npy")) == ["000000.npy", "000001.npy"]


def test_python_api_takes_numpy_and_tensor_numbers_as_the_numbers_they_hold(tmp_path):
    """A NumPy scalar or a 0-dim tensor in a sampler option gives the files of the Python number
    (the settings record is plain JSON; it failed to serialise them once networks were loaded)."""
    from autoguide_fast.distributed import GenerateOptions, generate

    base = dict(net=f"{HERE}:rgb_main", gnet=f"{HERE}:rgb_guide", seeds="0-1", num_steps=3, format="npy",
                S_churn=1.5, progress=False, verbose=False)
    generate(GenerateOptions(**base, outdir=str(tmp_path / "plain"), guidance=2.5, sigma_max=60.0,
                             guidance_interval=(0.5, 30.0)))
    given = dict(guidance=torch.tensor(2.5), sigma_max=np.float32(60.0), num_steps=np.int64(3),
                 guidance_interval=(np.float64(0.5), np.float32(30.0)), S_churn=np.float32(1.5))
    generate(GenerateOptions(**{**base, **given}, outdir=tmp_path / "numpy"))  # A path object too.
    for seed in (0, 1):
        a = np.load(image_path(str(tmp_path / "plain"), seed, "npy"))
        b = np.load(image_path(str(tmp_path / "numpy"), seed, "npy"))
        assert np.array_equal(a, b)
    plain = json.loads((tmp_path / "plain" / SETTINGS_FILE).read_text())
    assert json.loads((tmp_path / "numpy" / SETTINGS_FILE).read_text()) == plain
    # The second directory resumes with the plain numbers (same settings).
    generate(GenerateOptions(**base, outdir=str(tmp_path / "numpy"), guidance=2.5, sigma_max=60.0,
                             guidance_interval=(0.5, 30.0)))


def test_python_api_threads_apply_to_the_job_only(tmp_path, monkeypatch):
    from autoguide_fast.distributed import GenerateOptions, generate

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    torch.set_num_threads(1)
    seen = []
    monkeypatch.setattr(G, "_run", lambda job, opts, seeds: seen.append(torch.get_num_threads()) or "done")
    opts = dict(net=f"{HERE}:latent_main", seeds="0", num_steps=2, progress=False, verbose=False, threads=3)
    assert generate(GenerateOptions(**opts, outdir=str(tmp_path / "a"))) == "done"
    assert seen == [3] and torch.get_num_threads() == 1
    monkeypatch.setattr(G, "_run", lambda job, opts, seeds: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        generate(GenerateOptions(**opts, outdir=str(tmp_path / "b")))
    assert torch.get_num_threads() == 1


def test_a_settings_record_that_is_not_an_object_is_named(tmp_path, capsys):
    (tmp_path / SETTINGS_FILE).write_text("[1, 2]")
    assert run("--net", f"{HERE}:rgb_main", "--seeds", "0", "--outdir", str(tmp_path), "--no-progress") == 2
    assert "--outdir: cannot read" in capsys.readouterr().err


@needs_pillow
def test_png_of_a_float64_state_follows_the_formula_in_float64(tmp_path):
    # floor(127.5 x + 128) of the float64 sample: float32 arithmetic would round up to 129.
    for fmt in ("png", "npy"):
        assert run("--net", f"{HERE}:constant_main", "--seeds", "0", "--outdir", str(tmp_path / fmt), "--format", fmt,
                   "--dtype", "float64", "--steps", "2", "--no-progress") == 0
    x = np.load(tmp_path / "npy" / "000000.npy")
    assert x.dtype == np.float64
    expected = np.clip(np.floor(127.5 * x + 128), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    png = np.asarray(PIL.open(tmp_path / "png" / "000000.png"))
    assert (expected == 128).all() and np.array_equal(png, expected)


def test_unusable_backend_is_reported_before_sampling(tmp_path, capsys):
    assert run("--net", f"{HERE}:rgb_main", "--outdir", str(tmp_path), "--backend", "nope", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "--backend" in err and "nope" in err
    assert not list(tmp_path.glob("*.png"))


def test_png_without_pillow_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "PIL", None)  # Makes `import PIL.Image` fail as if not installed.
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    assert run("--net", f"{HERE}:rgb_main", "--outdir", str(tmp_path), "--no-progress", "--backend", "torch") == 2
    err = capsys.readouterr().err
    assert "Pillow" in err and "--format npy" in err
    assert run("--net", f"{HERE}:rgb_main", "--outdir", str(tmp_path / "npy"), "--seeds", "1", "--format", "npy",
               "--steps", "2", "--no-progress", "--backend", "torch") == 0


def test_module_spec_resolves_from_the_current_directory(tmp_path, monkeypatch):
    # As under the console script, whose sys.path does not hold the working directory.
    (tmp_path / "agf_user_nets_q3.py").write_text(f"from {HERE} import latent_main as build\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "agf_user_nets_q3", raising=False)
    assert run("--net", "agf_user_nets_q3:build", "--seeds", "1", "--steps", "2", "--outdir", "out",
               "--no-progress", "--backend", "torch") == 0
    assert (tmp_path / "out" / "000001.npy").exists()


def test_whole_module_file_of_a_local_class_loads_from_the_current_directory(tmp_path, monkeypatch):
    """A torch.save file refers to its class by module name; under the console script the working
    directory (where the user's module sits) is not on sys.path unless the loader puts it there."""
    (tmp_path / "agf_user_modules_q8.py").write_text(
        "import torch\n\n\nclass Half(torch.nn.Module):\n    img_channels, img_resolution, label_dim = 3, 4, 0\n\n"
        "    def forward(self, x, sigma, labels=None):\n        return x * 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import agf_user_modules_q8

    torch.save(agf_user_modules_q8.Half(), tmp_path / "half.pt")
    monkeypatch.delitem(sys.modules, "agf_user_modules_q8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert run("--net", "half.pt", "--seeds", "1", "--steps", "2", "--outdir", "out", "--format", "npy",
               "--no-progress", "--backend", "torch") == 0
    assert (tmp_path / "out" / "000001.npy").exists()


def test_settings_file_is_standard_json_and_older_infinity_files_resume(tmp_path):

    base = ["--net", f"{HERE}:rgb_main", "--outdir", str(tmp_path), "--steps", "2", "--no-progress",
            "--backend", "torch", "--format", "npy"]
    assert run(*base, "--seeds", "0") == 0
    path = tmp_path / SETTINGS_FILE

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))

    settings = strict(path.read_text())
    assert settings["S_max"] == "inf"
    # A file written with Python's default (Infinity) still matches the same settings.
    path.write_text(json.dumps({**settings, "S_max": float("inf")}))
    assert run(*base, "--seeds", "1") == 0 and (tmp_path / "000001.npy").exists()


def test_preset_outputs_of_the_zero_gain_era_are_not_mixed(tmp_path, capsys):
    from autoguide_fast.distributed.generation import SETTINGS_FILE

    tiny = '{"model_channels": 8, "img_resolution": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}'
    base = ["--net", "edm2:xxs", "--preset-overrides", tiny, "--outdir", str(tmp_path), "--steps", "2",
            "--no-progress", "--backend", "torch", "--format", "npy"]
    assert run(*base, "--seeds", "0") == 0
    path = tmp_path / SETTINGS_FILE
    settings = json.loads(path.read_text())
    assert settings["edm2_preset_gains"] == "random"
    del settings["edm2_preset_gains"]  # A directory written before the gains were drawn.
    path.write_text(json.dumps(settings))
    assert run(*base, "--seeds", "1") == 2
    assert "edm2_preset_gains" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# A custom schedule: --sigmas.


def _npy_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npy"))}


def test_sigmas_of_the_official_schedule_give_the_files_of_steps(tmp_path):
    # The official schedule of 5 steps as the sampler computes it (float32), written out exactly.
    levels = ",".join(map(repr, edm_time_steps(5, 0.002, 80, 7, torch.float32)[:-1].tolist()))
    args = ["--net", f"{HERE}:rgb_main", "--gnet", f"{HERE}:rgb_guide", "--seeds", "0-4", "--batch", "3",
            "--format", "npy", *SAMPLER_BUT_SCHEDULE]
    assert run(*args, "--steps", "5", "--outdir", str(tmp_path / "steps")) == 0
    assert run(*args, "--sigmas", levels, "--outdir", str(tmp_path / "sigmas")) == 0
    steps = _npy_files(tmp_path / "steps")
    assert len(steps) == 5 and _npy_files(tmp_path / "sigmas") == steps


def test_a_custom_schedule_gives_the_apis_images(tmp_path):
    out = tmp_path / "out"
    assert run("--net", f"{HERE}:rgb_main", "--gnet", f"{HERE}:rgb_guide", "--seeds", "3-6", "--batch", "3",
               "--format", "npy", "--outdir", str(out), *CUSTOM_SAMPLER) == 0
    for seed in (3, 5, 6):
        got = torch.from_numpy(np.load(out / f"{seed:06d}.npy"))
        assert torch.equal(got, reference_sample(rgb_main, rgb_guide, seed, sigmas=LEVELS))
    # The levels themselves were used, not the official schedule of as many steps.
    assert not torch.equal(got, reference_sample(rgb_main, rgb_guide, 6, steps=len(LEVELS)))


@pytest.mark.parametrize("sigmas_first", [False, True])
@pytest.mark.parametrize("flag", [["--steps", "32"], ["--sigma-min", "0.002"], ["--sigma_max", "80"],
                                  ["--rho", "7"]])
def test_sigmas_with_an_option_of_the_formula_is_refused_while_parsing(tmp_path, capsys, monkeypatch, flag,
                                                                       sigmas_first):
    # Given at all, a default value too (the sampler's own check only sees values other than the default).
    import autoguide_fast.distributed.cli as cli

    monkeypatch.setattr(cli, "generate", lambda opts: pytest.fail("the job started"))
    sigmas = ["--sigmas", "80,1"]
    with pytest.raises(SystemExit) as info:
        run("--net", f"{HERE}:rgb_main", "--outdir", str(tmp_path / "out"),
            *([*sigmas, *flag] if sigmas_first else [*flag, *sigmas]))
    assert info.value.code == 2
    later, earlier = (flag[0], "--sigmas") if sigmas_first else ("--sigmas", flag[0])
    err = capsys.readouterr().err  # argparse names an option by all its spellings (--sigma-max/--sigma_max).
    assert re.search(rf"error: argument (\S+/)?{later}(/\S+)?: not allowed with argument {earlier} ", err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--sigmas", "80,40,40,1"], "sigmas[2] = 40.0 is not below sigmas[1] = 40.0 in dtype torch.float32"),
    (["--sigmas", "1,2"], "sigmas[1] = 2.0 is not below"),
    (["--sigmas", "80,-1"], "sigmas[1] = -1.0 is not a finite level > 0"),
    (["--sigmas", "80,0,0"], "sigmas[1] = 0.0 is not a finite level > 0"),
    (["--sigmas", "inf,1"], "sigmas[0] = inf is not a finite level > 0"),
    (["--sigmas", "80,nan,1"], "--sigmas[1]: expected a number, got NaN"),  # The element's index kept.
    (["--sigmas", ""], "got 0 level(s) above 0"),
    (["--sigmas", "80,0"], "got 1 level(s) above 0"),
    # Levels the state dtype cannot hold, or that it rounds to one value.
    (["--sigmas", "1e5,1", "--dtype", "float16"], "sigmas[0] = 100000.0 is not a finite level > 0 in dtype "
                                                  "torch.float16"),
    (["--sigmas", "80,40.01,40", "--dtype", "float16"], "sigmas[2] = 40.0 is not below sigmas[1] = 40.01 in "
                                                        "dtype torch.float16"),
])
def test_invalid_schedules_are_refused_before_any_network_is_built(tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.setattr(G, "load_network", lambda *args, **kwargs: pytest.fail("a network was built"))
    out = tmp_path / "out"
    assert run("--net", f"{HERE}:rgb_main", "--outdir", str(out), "--no-progress", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoguide-fast generate: error: --sigmas") and expected in err, err
    assert not out.exists()


@pytest.mark.parametrize("text, expected", [
    ("80,abc,1", "(or @FILE): could not convert string to float: 'abc'"),
    ("@{missing}", "cannot read '{missing}'"),
    ("@{words}", "expected noise levels in '{words}' (numbers separated by commas or whitespace, or a JSON "
                 "array): could not convert string to float: 'eighty'"),
])
def test_sigmas_that_are_not_numbers_are_refused_while_parsing(tmp_path, capsys, text, expected):
    names = dict(missing=tmp_path / "missing.txt", words=tmp_path / "words.txt")
    names["words"].write_text("eighty, 1")
    with pytest.raises(SystemExit) as info:
        run("--net", f"{HERE}:rgb_main", "--outdir", str(tmp_path / "out"), "--sigmas", text.format(**names))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --sigmas: " in err and expected.format(**names) in err, err
    assert not (tmp_path / "out").exists()


def test_the_settings_record_holds_the_custom_schedule(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--net", f"{HERE}:latent_main", "--outdir", str(out), "--no-progress", "--backend", "torch"]
    assert run(*base, "--seeds", "0", "--sigmas", "60,12.5,3,0.4,0.01") == 0
    record = json.loads((out / SETTINGS_FILE).read_text())
    assert record["sigmas"] == LEVELS  # In place of the formula's options, which it does not use.
    assert not {"num_steps", "sigma_min", "sigma_max", "rho"} & record.keys()
    # The same levels written otherwise resume the directory: a final 0, other spellings, from a file
    # (a JSON array, or numbers separated by whitespace).
    (tmp_path / "levels.json").write_text(json.dumps([*LEVELS, 0]))
    (tmp_path / "levels.txt").write_text("6e1 12.50\n3 0.4\n0.01\n")
    same = ["6e1,12.5,3.0,4e-1,0.01,0", f"@{tmp_path / 'levels.json'}", f"@{tmp_path / 'levels.txt'}"]
    for seed, sigmas in enumerate(same, start=1):
        assert run(*base, "--seeds", str(seed), "--sigmas", sigmas) == 0
    files = _npy_files(out)
    assert sorted(files) == [f"{s:06d}.npy" for s in range(4)]
    # Another schedule, or the official formula, is refused (nothing written).
    capsys.readouterr()
    assert run(*base, "--seeds", "9", "--sigmas", "60,12.5,3,0.4") == 2
    assert "sigmas: [60.0, 12.5, 3.0, 0.4, 0.01] -> [60.0, 12.5, 3.0, 0.4]" in capsys.readouterr().err
    assert run(*base, "--seeds", "9", "--steps", "5") == 2
    err = capsys.readouterr().err
    assert "num_steps: None -> 5" in err and "sigmas: [60.0, 12.5, 3.0, 0.4, 0.01] -> None" in err
    assert _npy_files(out) == files


# OUTDIR's record as written before custom schedules existed, for the command of the test below.
_RECORD_BEFORE_SIGMAS = {
    "S_churn": 0.0, "S_max": "inf", "S_min": 0.0, "S_noise": 1.0, "class_idx": None, "dtype": "float32",
    "format": "npy", "gnet": None, "gnet_preset_overrides": {}, "guidance": 1.0, "guidance_interval": None,
    "label_dim": 0, "net": f"{HERE}:latent_main", "num_steps": 3, "preset_overrides": {}, "preset_seed": 0,
    "rho": 7.0, "shape": [4, 6, 6], "sigma_max": 80.0, "sigma_min": 0.002, "solver": "heun", "subdirs": False,
}


def test_a_directory_written_before_custom_schedules_resumes_with_the_official_schedule(tmp_path, capsys):
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(_RECORD_BEFORE_SIGMAS, indent=2, sort_keys=True))
    base = ["--net", f"{HERE}:latent_main", "--outdir", str(tmp_path), "--no-progress", "--backend", "torch"]
    assert run(*base, "--seeds", "0", "--steps", "3") == 0
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == _RECORD_BEFORE_SIGMAS  # Left as it was.
    # A custom schedule is refused there, even one of the same levels (the record compares settings).
    levels = ",".join(map(repr, edm_time_steps(3, 0.002, 80, 7, torch.float32)[:-1].tolist()))
    capsys.readouterr()
    assert run(*base, "--seeds", "1", "--sigmas", levels) == 2
    assert "sigmas: None -> [" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == ["000000.npy"]
