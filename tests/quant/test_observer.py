"""Streaming observers and the observer -> static range path."""

import numpy as np
import pytest
import torch

from ditq.errors import DitqError
from ditq.quant import (
    ChannelAbsMaxObserver,
    MinMaxObserver,
    PerChannel,
    PerToken,
    Quantizer,
    QuantSpec,
    SampleObserver,
    observer_for,
    range_from_observer,
)


def batches(seed=0, count=5, shape=(3, 7, 16)):
    """Activation batches (batch, tokens, channels) with different scales and offsets."""
    rng = np.random.default_rng(seed)
    return [
        torch.from_numpy(rng.standard_normal(shape) * (k + 1) + rng.uniform(-2, 2, shape[-1]))
        for k in range(count)
    ]


def test_streaming_minmax_equals_minmax_of_concatenation():
    data = batches()
    every_value = np.concatenate([b.numpy().reshape(-1, 16) for b in data])
    per_tensor, per_channel = MinMaxObserver(), MinMaxObserver(per_channel=True)
    for batch in data:
        per_tensor.update(batch)
        per_channel.update(batch)
    assert [t.item() for t in per_tensor.result()] == [every_value.min(), every_value.max()]
    channel_min, channel_max = per_channel.result()
    np.testing.assert_array_equal(channel_min.numpy(), every_value.min(axis=0))
    np.testing.assert_array_equal(channel_max.numpy(), every_value.max(axis=0))


def test_channel_absmax_is_salience_of_concatenation():
    data = batches(seed=1)
    observer = ChannelAbsMaxObserver()
    for batch in data:
        observer.update(batch)
    every_value = np.concatenate([b.numpy().reshape(-1, 16) for b in data])
    np.testing.assert_array_equal(observer.result().numpy(), np.abs(every_value).max(axis=0))
    observer.reset()
    with pytest.raises(DitqError, match="seen no data"):
        observer.result()


def test_observer_errors():
    with pytest.raises(DitqError, match="seen no data"):
        MinMaxObserver().result()
    with pytest.raises(DitqError, match="seen no data"):
        SampleObserver().result()
    observer = MinMaxObserver(per_channel=True)
    observer.update(torch.randn(4, 16))
    with pytest.raises(DitqError, match="16 channels before and 8 now"):
        observer.update(torch.randn(4, 8))
    with pytest.raises(DitqError, match="max_samples=0"):
        SampleObserver(max_samples=0)


def test_reservoir_is_bounded_and_samples_the_data():
    observer = SampleObserver(max_samples=500, seed=3)
    seen = []
    for batch in batches(count=8):
        observer.update(batch)
        seen.append(batch.reshape(-1))
        assert observer.result().numel() <= 500
        assert observer.result().numel() == min(500, sum(b.numel() for b in seen))
    every_value = torch.cat(seen)
    assert observer.num_seen == every_value.numel() == 8 * 3 * 7 * 16
    assert observer.result().numel() == 500
    assert torch.isin(observer.result(), every_value).all()
    assert observer.result().unique().numel() == 500, "sampling is without replacement"


def test_reservoir_keeps_the_values_with_the_smallest_keys():
    """Independent reference: redraw every batch's keys from the same seeded stream and
    keep the values of the 300 smallest keys over everything seen."""
    observer = SampleObserver(max_samples=300, seed=5)
    generator = torch.Generator().manual_seed(5)
    values, keys = [], []
    for batch in batches(count=12):
        observer.update(batch)
        values.append(batch.reshape(-1))
        keys.append(torch.rand(batch.numel(), generator=generator, dtype=torch.float64))
    expected = torch.cat(values)[torch.cat(keys).topk(300, largest=False).indices]
    assert torch.equal(observer.result().sort().values, expected.sort().values)


def test_reservoir_is_uniform_over_batches():
    observer = SampleObserver(max_samples=2000, seed=0)
    for k in range(4):
        observer.update(torch.full((5000,), float(k)))
    counts = torch.bincount(observer.result().long(), minlength=4).tolist()
    # Each batch holds a quarter of the values: 500 expected, standard deviation ~19.
    assert all(abs(count - 500) < 100 for count in counts), counts


def test_reservoir_keeps_everything_when_large_enough_and_is_reproducible():
    data = batches(seed=2)
    first, second = SampleObserver(max_samples=10_000), SampleObserver(max_samples=10_000)
    for batch in data:
        first.update(batch)
        second.update(batch)
    every_value = torch.cat([b.reshape(-1) for b in data])
    assert torch.equal(first.result().sort().values, every_value.sort().values)
    assert torch.equal(first.result(), second.result())


def test_observer_for_picks_by_range_method():
    assert type(observer_for(QuantSpec())) is MinMaxObserver
    for method in ("percentile", "mse"):
        observer = observer_for(QuantSpec(range_method=method), max_samples=123)
        assert type(observer) is SampleObserver and observer.max_samples == 123
    with pytest.raises(DitqError, match="needs no calibration"):
        observer_for(QuantSpec(granularity=PerToken(), dynamic=True))
    with pytest.raises(DitqError, match="needs no calibration"):
        observer_for(QuantSpec(bits=16))
    with pytest.raises(DitqError, match="static activation ranges are per tensor"):
        observer_for(QuantSpec(granularity=PerChannel()))


def test_minmax_observer_calibrates_like_find_params_on_all_data():
    data = batches(seed=4)
    spec = QuantSpec(bits=8)
    observer = observer_for(spec)
    for batch in data:
        observer.update(batch)
    streamed, direct = Quantizer(spec), Quantizer(spec)
    streamed.set_range(*range_from_observer(observer, spec))
    direct.find_params(torch.cat(data))
    assert torch.equal(streamed.scale, direct.scale)
    assert torch.equal(streamed.zero_point, direct.zero_point)


def test_sample_observer_percentile_equals_numpy_on_all_data():
    data = batches(seed=5)
    spec = QuantSpec(bits=8, range_method="percentile", percentile=99.0)
    observer = observer_for(spec, max_samples=10_000)
    for batch in data:
        observer.update(batch)
    x_min, x_max = range_from_observer(observer, spec)
    every_value = torch.cat(data).numpy().ravel()
    assert x_min.shape == x_max.shape == (1, 1)
    assert x_max.item() == pytest.approx(np.percentile(every_value, 99.0), rel=1e-12)
    assert x_min.item() == pytest.approx(np.percentile(every_value, 1.0), rel=1e-12)


def test_range_from_wrong_observer_raises():
    observer = MinMaxObserver()
    observer.update(torch.randn(4, 8))
    with pytest.raises(DitqError, match="MinMaxObserver cannot give the range"):
        range_from_observer(observer, QuantSpec(range_method="mse"))
    channel = MinMaxObserver(per_channel=True)
    channel.update(torch.randn(4, 8))
    with pytest.raises(DitqError, match="observer_for"):
        range_from_observer(channel, QuantSpec())
