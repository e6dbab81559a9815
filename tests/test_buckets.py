"""``BucketedSampler`` without a GPU: bucket choice, padding, chunking, per-image results that do
not depend on the bucket, zero-copy views, argument errors, threads. Graph modes run with the
CPU stand-in for CUDA graphs of tests/test_engine_cpu.py."""

from __future__ import annotations

import pytest
import torch

from autoguide_fast import BucketedSampler, fast_guided_sample, seeded_noise
from tests.nets import PointwiseDenoiser, TinyConvDenoiser, one_hot_labels
from tests.threads import run_in_threads

IMAGE = (3, 6, 5)
LABEL_DIM = 4
CHURN = {"S_churn": 30.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}


def conv_nets(label_dim: int = LABEL_DIM):
    return (TinyConvDenoiser(channels=3, label_dim=label_dim, seed=1),
            TinyConvDenoiser(channels=3, label_dim=label_dim, seed=2, hidden=4))


def buckets(net, gnet, **kwargs) -> BucketedSampler:
    kwargs.setdefault("image_shape", IMAGE)
    kwargs.setdefault("batch_sizes", (1, 2, 4))
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("backend", "torch")
    kwargs.setdefault("num_steps", 5)
    kwargs.setdefault("guidance", 2.1)
    return BucketedSampler(net, gnet, **kwargs)


def reference(net, gnet, noise, labels=None, seeds=None, **kwargs) -> torch.Tensor:
    kwargs.setdefault("num_steps", 5)
    kwargs.setdefault("guidance", 2.1)
    return fast_guided_sample(net, noise, labels, gnet, backend="torch", seeds=seeds, **kwargs)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_bucket_for_picks_the_smallest_bucket_that_fits():
    s = buckets(*conv_nets(), batch_sizes=(8, 1, 2))
    assert s.batch_sizes == (1, 2, 8)
    assert [s.bucket_for(b) for b in (1, 2, 3, 7, 8, 9, 100)] == [1, 2, 8, 8, 8, 8, 8]


@pytest.mark.parametrize("batch", [1, 3, 4])
@pytest.mark.parametrize("graph", ["none", "trajectory", "step"])
def test_seeded_images_do_not_depend_on_the_bucket(fake_graphs, graph, batch):
    """Each image equals the same seed sampled alone: padding and the other rows change nothing
    (a per-element network, so the networks themselves cannot couple the rows)."""
    net, gnet = PointwiseDenoiser(), PointwiseDenoiser(a=0.7, b=-0.1)
    s = buckets(net, gnet, graph=graph, dtype=torch.float64, **CHURN)
    seeds = [11, 2**40 + 3, 7, 5][:batch]
    out = s(seeds=seeds)
    assert out.shape == (batch, *IMAGE) and out.dtype == torch.float64
    for i, seed in enumerate(seeds):
        alone = reference(net, gnet, seeded_noise([seed], (1, *IMAGE)), seeds=[seed], dtype=torch.float64, **CHURN)
        assert torch.equal(out[i:i + 1], alone), f"image {i}"


def pad_last(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([x, x[-1:].expand(rows, *x.shape[1:])])


def test_explicit_noise_and_labels_run_padded_with_the_last_image():
    """Bit for bit the padded batch's first rows. (Not the unpadded batch's: without seeds the churn
    noise is torch.randn_like of the whole padded state, 4 rows, so the first 3 rows draw other noise
    than a 3-row state would.)"""
    net, gnet = conv_nets()
    s = buckets(net, gnet, image_label_shape=(LABEL_DIM,), **CHURN)
    noise, labels = randn(3, *IMAGE, seed=4), one_hot_labels(3, LABEL_DIM, seed=1)
    torch.manual_seed(9)
    out = s(noise, labels)
    torch.manual_seed(9)
    expected = reference(net, gnet, pad_last(noise, 1), pad_last(labels, 1), **CHURN)
    assert torch.equal(out, expected[:3])
    assert s.report.keys() == {4}  # Only the bucket used was prepared.


def test_larger_batches_run_in_chunks_of_the_largest_bucket():
    net, gnet = PointwiseDenoiser(), PointwiseDenoiser(a=0.7)
    s = buckets(net, gnet, batch_sizes=(1, 2), **CHURN)
    seeds = list(range(100, 105))
    out = s(seeds=seeds)
    expected = reference(net, gnet, seeded_noise(seeds, (5, *IMAGE)), seeds=seeds, **CHURN)
    assert torch.equal(out, expected)
    assert s.report.keys() == {1, 2}  # 2 + 2 + 1.


class Recording(torch.nn.Module):
    """Records every input batch (x and labels) of the network it wraps."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.inputs = inner, []

    def forward(self, x, t, labels=None):
        self.inputs.append((x.clone(), labels.clone()))
        return self.inner(x, t, labels)


def test_pad_rows_repeat_the_last_image_and_copy_output_false_is_a_view(fake_graphs):
    net, gnet = conv_nets()
    net = Recording(net)
    s = buckets(net, gnet, graph="trajectory", image_label_shape=(LABEL_DIM,), copy_output=False)
    noise, labels = randn(3, *IMAGE, seed=5), one_hot_labels(3, LABEL_DIM, seed=2)
    out = s(noise, labels)
    assert torch.equal(out, reference(net, gnet, pad_last(noise, 1), pad_last(labels, 1))[:3])
    assert net.inputs and all(x.shape[0] == 4 for x, _ in net.inputs)
    for x, c in net.inputs:  # The pad row is the last image again, in every evaluation.
        assert torch.equal(x[3], x[2]) and torch.equal(c[3], c[2])
    kept = out.clone()
    again = s(randn(3, *IMAGE, seed=6), labels)
    assert again.data_ptr() == out.data_ptr()  # The bucket's static buffer: a view, overwritten by the next call.
    assert not torch.equal(out, kept)


def test_copy_output_returns_a_fresh_tensor_of_the_call_rows_only(fake_graphs):
    net, gnet = conv_nets(label_dim=0)
    s = buckets(net, gnet, graph="trajectory")
    a = s(seeds=[1, 2, 3])
    a_values = a.clone()
    b = s(seeds=[4, 5, 6])
    assert a.untyped_storage().nbytes() == a.numel() * a.element_size()  # No pad row kept alive.
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, a_values)


def test_batch_size_alone_draws_torch_noise():
    net, gnet = conv_nets(label_dim=0)
    s = buckets(net, gnet)
    torch.manual_seed(3)
    out = s(batch_size=3)
    torch.manual_seed(3)
    assert torch.equal(out, reference(net, gnet, torch.randn(4, *IMAGE))[:3])


def test_prepare_prepares_the_buckets_asked_for():
    s = buckets(*conv_nets(label_dim=0))
    with pytest.raises(ValueError, match=r"^batch_sizes: expected sizes among the buckets \(1, 2, 4\), got \[3\]"):
        s.prepare([2, 3])
    assert s.report == {}  # Nothing prepared before the bad bucket was named.
    reports = s.prepare([2])
    assert reports.keys() == {2} and reports[2]["prepared"]
    assert s.prepare().keys() == {1, 2, 4}
    s.release()
    assert s.report == {}


BAD_CONSTRUCTIONS = [
    ({"batch_sizes": ()}, TypeError, "batch_sizes"),
    ({"batch_sizes": 8}, TypeError, "batch_sizes"),
    ({"batch_sizes": (1, 0)}, ValueError, "batch_sizes"),
    ({"batch_sizes": (2, 2)}, ValueError, "batch_sizes"),
    ({"batch_sizes": (1, True)}, TypeError, "batch_sizes"),
    ({"image_shape": (3, 0)}, ValueError, "image_shape"),
    ({"image_label_shape": "4"}, TypeError, "image_label_shape"),
    ({"noise_shape": (2, 3)}, TypeError, "noise_shape"),
    ({"label_shape": (2, 4)}, TypeError, "label_shape"),
    ({"graph": "full"}, ValueError, "graph"),
    ({"copy_output": 1}, TypeError, "copy_output"),
    ({"guidance": 2.0, "gnet": None}, TypeError, "gnet"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD_CONSTRUCTIONS, ids=[str(b[0]) for b in BAD_CONSTRUCTIONS])
def test_bad_constructor_arguments_name_the_argument(kwargs, exc, name):
    net, gnet = conv_nets()
    gnet = kwargs.pop("gnet", gnet)
    with pytest.raises(exc, match=name):
        buckets(net, gnet, **kwargs)


BAD_CALLS = [
    ({}, ValueError, "batch_size: needed"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"batch_size": True}, TypeError, "batch_size"),
    ({"noise": "x"}, TypeError, "noise"),
    ({"noise": torch.randn(2, 3, 6, 6)}, ValueError, r"noise: .*\(a batch of the sampler's image_shape\)"),
    ({"noise": torch.randn(3, 6, 5)}, ValueError, r"noise: expected shape \(batch, 3, 6, 5\)"),
    ({"noise": torch.randn(0, *IMAGE)}, ValueError, "^noise: expected at least one image"),
    ({"seeds": []}, ValueError, "^seeds: expected at least one image"),  # The argument that gave 0 named.
    ({"seeds": torch.zeros(0, dtype=torch.int64)}, ValueError, "^seeds: expected at least one image"),
    ({"noise": torch.randn(2, *IMAGE), "seeds": [1, 2, 3]}, ValueError, "disagree"),
    ({"seeds": [1, 2], "batch_size": 3}, ValueError, "disagree"),
    ({"seeds": [1.5]}, TypeError, "seeds"),
    ({"seeds": [1, 2], "labels": torch.zeros(2, LABEL_DIM)}, ValueError, "labels"),
]


@pytest.mark.parametrize("kwargs,exc,message", BAD_CALLS, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_CALLS)])
def test_bad_call_arguments_name_the_argument_before_any_network_call(kwargs, exc, message):
    calls = []
    s = buckets(lambda x, t, c=None: calls.append(1) or x, None, guidance=1)
    with pytest.raises(exc, match=message):
        s(**kwargs)
    assert calls == [] and s.report == {}


def test_labels_refused_without_image_label_shape_name_that_argument():
    s = buckets(*conv_nets())
    with pytest.raises(ValueError, match="built without image_label_shape, .*pass image_label_shape="):
        s(seeds=[1, 2], labels=torch.zeros(2, LABEL_DIM))


def test_labels_are_required_with_image_label_shape():
    s = buckets(*conv_nets(), image_label_shape=(LABEL_DIM,))
    with pytest.raises(ValueError, match=r"labels: required, a tensor of shape \(2, 4\) .*image_label_shape"):
        s(seeds=[1, 2])
    with pytest.raises(ValueError, match=r"labels: expected shape \(2, 4\) .*image_label_shape"):
        s(seeds=[1, 2], labels=torch.zeros(2, LABEL_DIM + 1))


def test_threads_on_several_buckets_get_their_own_images(fake_graphs):
    net, gnet = PointwiseDenoiser(), PointwiseDenoiser(a=0.7)
    s = buckets(net, gnet, graph="trajectory", **CHURN)
    seed_sets = [list(range(10 * i, 10 * i + 1 + i % 4)) for i in range(8)]
    expected = [reference(net, gnet, seeded_noise(seeds, (len(seeds), *IMAGE)), seeds=seeds, **CHURN)
                for seeds in seed_sets]
    failures: list[str] = []

    def worker(i: int) -> None:
        for _ in range(3):
            if not torch.equal(s(seeds=seed_sets[i]), expected[i]):
                failures.append(f"thread {i}")

    run_in_threads(worker)
    assert failures == []


@pytest.mark.parametrize("copy_output", [True, False])
def test_chunked_calls_copy_each_chunk_out_of_its_bucket(fake_graphs, copy_output):
    """Chunks of one bucket replay into the same static buffer: each must be copied out inside its
    own call, before the next chunk overwrites the buffer."""
    net, gnet = PointwiseDenoiser(), PointwiseDenoiser(a=0.7)
    s = buckets(net, gnet, batch_sizes=(1, 2), graph="trajectory", copy_output=copy_output, **CHURN)
    seeds = list(range(100, 105))
    out = s(seeds=seeds)
    for i, seed in enumerate(seeds):
        alone = reference(net, gnet, seeded_noise([seed], (1, *IMAGE)), seeds=[seed], **CHURN)
        assert torch.equal(out[i:i + 1], alone), i


def test_class_index_labels():
    """image_label_shape=() takes one class index per image (labels [b], int64)."""
    class IndexNet(torch.nn.Module):
        def forward(self, x, t, labels):
            return x * (0.25 / (0.25 + t**2)) + labels.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1)) * 0.01

    net, gnet = IndexNet(), IndexNet()
    s = buckets(net, gnet, image_label_shape=(), label_dtype=torch.int64)
    labels = torch.tensor([3, 1, 4])
    out = s(labels=labels, seeds=[5, 6, 7])
    assert out.shape == (3, *IMAGE)
    expected = reference(net, gnet, seeded_noise([5, 6, 7, 7], (4, *IMAGE)), pad_last(labels, 1), seeds=[5, 6, 7, 7])
    assert torch.equal(out, expected[:3])


def test_noise_shape_in_place_of_image_shape_is_named():
    """The mistake the message is for: a GuidedSampler's noise_shape given instead of image_shape
    (before, Python's own "missing keyword argument 'image_shape'" came first)."""
    net, gnet = conv_nets()
    with pytest.raises(TypeError, match=r"^noise_shape: not an argument of BucketedSampler"):
        BucketedSampler(net, gnet, noise_shape=(2, 3, 8, 8))
    with pytest.raises(TypeError, match=r"^image_shape: required"):
        BucketedSampler(net, gnet)
