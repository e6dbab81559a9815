"""The toy experiment: shipped models, metrics, the paper's direction, and the CLI end to end."""

import json
import math
import sys

import numpy as np
import pytest
import torch

from autoguide_fast.toy.cli import build_parser, main
from autoguide_fast.toy.experiment import (
    OUTLINE_DROP,
    SIGMA_MAX,
    WEIGHTS_DIR,
    coverage,
    evaluate_samples,
    load_shipped_models,
    outline_threshold,
    sample_four_ways,
    sliced_wasserstein,
    start_noise,
)
from autoguide_fast.toy.ground_truth import ground_truth

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    return load_shipped_models()


@pytest.fixture(scope="module")
def direction_run(models):
    """The experiment at a reduced sample count (the figure's samplers, metrics only)."""
    gt = ground_truth("A")
    n = 4096
    noise = start_noise(gt, n, seed=1)
    reference = gt.sample(n, 0.0, generator=torch.Generator().manual_seed(2))
    threshold = outline_threshold(gt)
    runs = sample_four_ways(models, noise, gt=gt)
    return {name: evaluate_samples(name, x, gt, reference, threshold, w, sec)
            for name, w, x, sec in runs}


def test_shipped_models_load(models):
    expected = {"main": ("A", 4, 64, 4096), "autoguide": ("A", 4, 32, 512),
                "cfg": ("AB", 4, 32, 512)}
    for name, (classes, layers, hidden, iterations) in expected.items():
        path = WEIGHTS_DIR / f"{name}.pt"
        assert path.stat().st_size < 300_000
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["meta"]["classes"] == classes
        assert ckpt["meta"]["iterations"] == iterations
        assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())
        net = models[name]
        assert (net.num_layers, net.hidden) == (layers, hidden)
        assert float(net.gain) != 0.0                 # trained: the gain left its init of 0
        x = torch.randn(16, 2)
        with torch.no_grad():
            d = net(x, torch.tensor(0.5), None)
        assert d.shape == x.shape and torch.isfinite(d).all()


def test_main_model_denoises_class_a(models):
    # A trained main model is close to the exact class-A denoiser at moderate noise levels.
    gt = ground_truth("A")
    for sigma in (0.05, 0.5):
        x = gt.sample(2048, sigma, generator=torch.Generator().manual_seed(0))
        err = (models["main"](x, torch.tensor(sigma)) - gt.denoise(x, sigma)).square().mean()
        gaussian = (x * 0.25 / (0.25 + sigma**2) - gt.denoise(x, sigma)).square().mean()
        assert float(err) < 0.1 * float(gaussian)


def test_start_noise_is_smoothed_class_a():
    gt = ground_truth("A")
    noise = start_noise(gt, 20000, seed=1)
    x = noise * SIGMA_MAX
    mean = gt.phi @ gt.mu
    assert torch.all((x.mean(0) - mean).abs() < 5 * SIGMA_MAX / math.sqrt(20000))
    # Per-axis std: sqrt(class-A variance + 25), ~5.0.
    assert torch.all((x.std(0) - SIGMA_MAX).abs() < 0.1)
    assert torch.equal(noise, start_noise(gt, 20000, seed=1))


def test_metrics_on_known_cases():
    gt = ground_truth("A")
    a = gt.sample(3000, 0.0, generator=torch.Generator().manual_seed(0))
    assert coverage(a, a) == 1.0
    assert coverage(a + 10.0, a) == 0.0
    assert sliced_wasserstein(a, a) == 0.0
    # A shift by v: every projection moves by v.u, so SWD^2 = mean (v.u)^2 = |v|^2 / 2.
    v = torch.tensor([0.3, -0.4])
    assert sliced_wasserstein(a + v, a, projections=4096) == pytest.approx(0.5 / math.sqrt(2),
                                                                         rel=0.03)
    # The outline threshold is the density's maximum minus the drop, and exact samples are
    # mostly inside it.
    thr = outline_threshold(gt)
    assert float(gt.logp(gt.mu.double()).max()) - thr == pytest.approx(OUTLINE_DROP)
    assert float((gt.logp(a.double()) < thr).double().mean()) < 0.05
    with pytest.raises(ValueError, match="same shape"):
        sliced_wasserstein(a, a[:10])


def test_the_table_row_summarises_the_log_density():
    """A row's log p columns: mean, 5th percentile and median (linear interpolation, NumPy's
    default), and the share below the outline threshold, on a scattered sample."""
    gt = ground_truth("A")
    gen = torch.Generator().manual_seed(5)
    x = gt.sample(1001, 0.0, generator=gen) + 0.2 * torch.randn(1001, 2, generator=gen)
    ref = gt.sample(1001, 0.0, generator=gen)
    thr = outline_threshold(gt)
    row = evaluate_samples("x", x, gt, ref, thr, guidance=2.0, seconds=1.5)
    logp = gt.logp(x.double()).numpy()
    assert row.mean_logp == pytest.approx(logp.mean(), rel=1e-12)
    assert row.p05_logp == pytest.approx(np.percentile(logp, 5), rel=1e-12)
    assert row.median_logp == pytest.approx(np.median(logp), rel=1e-12)
    assert row.outside == (logp < thr).mean() and 0.05 < row.outside < 0.95
    assert (row.name, row.guidance, row.seconds) == ("x", 2.0, 1.5)


def test_coverage_matches_brute_force():
    gt = ground_truth("A")
    gen = torch.Generator().manual_seed(4)
    ref = gt.sample(2000, 0.0, generator=gen)
    for shift in (0.0, 0.01, 0.03):
        x = gt.sample(1500, 0.0, generator=gen) + shift
        brute = float((torch.cdist(ref.double(), x.double()).min(dim=1).values <= 0.02)
                      .double().mean())
        assert coverage(x, ref) == brute
        assert coverage(x, ref, radius=0.005) == float(
            (torch.cdist(ref.double(), x.double()).min(dim=1).values <= 0.005).double().mean())


def test_autoguidance_raises_class_a_likelihood_over_unguided(direction_run):
    auto, plain = direction_run["autoguidance"], direction_run["unguided"]
    # Robust summaries (the mean is dominated by a handful of far outliers, see docs/toy.md).
    assert auto.p05_logp > plain.p05_logp
    assert auto.outside < plain.outside


def test_autoguidance_is_closer_to_class_a_than_cfg(direction_run):
    auto, cfg = direction_run["autoguidance"], direction_run["CFG-style"]
    assert auto.coverage > cfg.coverage
    assert auto.swd < cfg.swd


def test_exact_denoiser_lands_on_class_a(direction_run):
    exact = direction_run["exact denoiser"]
    assert exact.outside < 0.02
    assert exact.coverage > 0.85


def test_cli_json_end_to_end(tmp_path, capsys):
    out_json = tmp_path / "toy.json"
    fig = tmp_path / "toy.png"
    code = main(["toy", "--samples", "512", "--json", str(out_json), "--figure", str(fig),
                 "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert str(fig) in printed and "autoguidance" in printed
    data = json.loads(out_json.read_text())
    assert data["samples"] == 512 and data["num_steps"] == 32
    names = [r["name"] for r in data["rows"]]
    assert names[:4] == ["exact denoiser", "unguided", "autoguidance", "CFG-style"]
    for row in data["rows"]:
        for key in ("mean_logp", "p05_logp", "median_logp", "outside", "coverage", "swd"):
            assert math.isfinite(row[key])
        assert 0 <= row["outside"] <= 1 and 0 <= row["coverage"] <= 1
    assert data["rows"][2]["guidance"] == 3.0 and data["rows"][3]["guidance"] == 4.0
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_options_and_errors(tmp_path):
    args = build_parser().parse_args(["toy", "--autoguidance", "2.5", "--cfg", "3", "--steps",
                                      "16", "--samples", "100", "--figure", "none"])
    assert (args.autoguidance, args.cfg, args.steps, args.samples) == (2.5, 3.0, 16, 100)
    train = build_parser().parse_args(["toy", "train", "--models", "autoguide"])
    assert train.toy_action == "train" and train.models == ["autoguide"] and train.seed == 0
    bad = [["--samples", "0"], ["--steps", "1"], ["--autoguidance", "nan"], ["--cfg", "inf"], ["--cfg", "x"],
           ["--figure", "/proc/no/toy.png"], ["--json", str(tmp_path)],
           ["--figure", str(tmp_path / "a_file" / "toy.png")], ["--weights-dir", str(tmp_path)],
           ["--weights-dir", str(tmp_path / "missing")], ["--weights-dir", str(tmp_path / "a_file")],
           ["--seed", str(2**64)], ["--seed", str(2**63)], ["--seed", "-1"], ["--seed", "1.5"]]
    (tmp_path / "a_file").write_text("x")
    for argv in bad:  # argparse errors (exit code 2, the flag named), before any sampling.
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["toy", *argv])
        assert exc.value.code == 2, argv
    for argv in (["train", "--seed", str(2**63)], ["train", "--seed", "-3"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["toy", *argv])
        assert exc.value.code == 2, argv
    assert build_parser().parse_args(["toy", "--seed", str(2**63 - 1)]).experiment_seed == 2**63 - 1
    # A directory still to be created (the experiment makes it) is fine.
    args = build_parser().parse_args(["toy", "--figure", str(tmp_path / "new" / "sub" / "toy.png")])
    assert args.figure == tmp_path / "new" / "sub" / "toy.png"
    with pytest.raises(FileNotFoundError, match="toy weights"):  # The API's own check.
        load_shipped_models(tmp_path)


def test_cli_train_writes_loadable_weights(tmp_path):
    code = main(["toy", "train", "--models", "autoguide", "--iterations", "2", "--batch-size",
                 "64", "--out-dir", str(tmp_path), "--no-progress"])
    assert code == 0
    ckpt = torch.load(tmp_path / "autoguide.pt", weights_only=True)
    assert ckpt["meta"]["iterations"] == 2 and ckpt["hidden"] == 32


def test_cli_version(capsys):
    import autoguide_fast
    from autoguide_fast.cli import build_parser as main_parser

    with pytest.raises(SystemExit) as exc:
        main_parser().parse_args(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"autoguide-fast {autoguide_fast.__version__}"


@pytest.mark.parametrize("flag", ["--autoguidance", "--cfg"])
def test_cli_names_a_weight_whose_samples_overflow(flag, tmp_path, capsys):
    """A weight strong enough to overflow the float32 samples ends with an error naming its flag and
    no output files (it used to end in the sampler's traceback)."""
    out_json, fig = tmp_path / "toy.json", tmp_path / "toy.png"
    code = main(["toy", flag, "1e30", "--samples", "64", "--steps", "4", "--json", str(out_json),
                 "--figure", str(fig)])
    assert code == 1
    err = capsys.readouterr().err
    assert f"error: {flag} 1e+30: the guided samples overflow" in err
    assert not out_json.exists() and not fig.exists()


def test_a_figure_without_matplotlib_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """matplotlib is optional: without it the figure is refused up front, naming --figure (it used
    to end the whole run in a traceback, the JSON unwritten); --figure none still runs."""
    import autoguide_fast.toy.experiment as experiment
    from autoguide_fast.toy.experiment import run_toy_experiment

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError.
    monkeypatch.setattr(experiment, "load_shipped_models", lambda *a: pytest.fail("work began"))
    out_json = tmp_path / "toy.json"
    assert main(["toy", "--samples", "64", "--json", str(out_json), "--figure", str(tmp_path / "t.png")]) == 2
    err = capsys.readouterr().err
    assert "--figure: drawing the figure needs matplotlib" in err and "--figure none" in err
    assert not out_json.exists()
    with pytest.raises(ImportError, match=r"figure: .*matplotlib.*figure=None"):
        run_toy_experiment(samples=64, figure=tmp_path / "t.png")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["toy", "--samples", "64", "--steps", "4", "--json", str(out_json), "--figure", "none"]) == 0
    assert json.loads(out_json.read_text())["figure"] is None


def test_training_without_tqdm_runs_without_a_bar(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    code = main(["toy", "train", "--models", "autoguide", "--iterations", "2", "--batch-size",
                 "64", "--out-dir", str(tmp_path)])  # The bar requested (no --no-progress).
    assert code == 0 and (tmp_path / "autoguide.pt").is_file()
