"""Streaming activation statistics for static calibration (METHODS.md, "Uniform quantizers").

Observers are fed one batch at a time (typically from forward hooks) and keep memory
independent of the number of batches: running min/max, running per-channel max |x_j|
(``s(X_j)`` in METHODS.md), or a bounded uniform subsample of the values for percentile
and MSE range search after calibration. State is held in plain tensors on the device
of the observed activations.
"""

from __future__ import annotations

import torch

from ditq.errors import DitqError
from ditq.quant.quantizer import TensorPair, find_range, range_dtype
from ditq.quant.spec import PerGroup, PerTensor, QuantSpec

DEFAULT_MAX_SAMPLES = 1_000_000


class MinMaxObserver:
    """Running min and max of everything seen, or per channel of the last dim (the input
    channels of the consuming linear) with ``per_channel=True``."""

    def __init__(self, per_channel: bool = False) -> None:
        self.per_channel = per_channel
        self.reset()

    def reset(self) -> None:
        """Forget all observed batches."""
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Fold one batch (..., C) into the running statistics."""
        x = x.detach()
        dim = 0 if self.per_channel else None
        batch_min, batch_max = torch.aminmax(x.reshape(-1, x.shape[-1]), dim=dim)
        dtype = range_dtype(x.dtype)
        batch_min, batch_max = batch_min.to(dtype), batch_max.to(dtype)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = batch_min, batch_max
            return
        if batch_min.shape != self.min_val.shape:
            raise DitqError(
                f"MinMaxObserver saw {self.min_val.numel()} channels before and "
                f"{batch_min.numel()} now; use one observer per tensor"
            )
        self.min_val = torch.minimum(self.min_val, batch_min)
        self.max_val = torch.maximum(self.max_val, batch_max)

    def result(self) -> TensorPair:
        """``(min, max)``: scalars, or shape (C,) per channel."""
        if self.min_val is None or self.max_val is None:
            raise DitqError("observer has seen no data; run calibration batches through it first")
        return self.min_val, self.max_val


class ChannelAbsMaxObserver:
    """Running ``s(X_j) = max |X_j|`` per input channel j (last dim) over all tokens."""

    def __init__(self) -> None:
        self._minmax = MinMaxObserver(per_channel=True)

    def reset(self) -> None:
        """Forget all observed batches."""
        self._minmax.reset()

    def update(self, x: torch.Tensor) -> None:
        """Fold one batch (..., C) into the running maxima."""
        self._minmax.update(x)

    def result(self) -> torch.Tensor:
        """``s(X)``, shape (C,)."""
        x_min, x_max = self._minmax.result()
        return torch.maximum(-x_min, x_max)


class SampleObserver:
    """A uniform random subsample of at most ``max_samples`` of all observed values.

    Reservoir sampling by random keys: every value gets an independent uniform (float64) key and
    the values with the ``max_samples`` smallest keys are kept, which is a uniform sample
    without replacement of everything seen. Seeded, so calibration is reproducible.
    """

    def __init__(self, max_samples: int = DEFAULT_MAX_SAMPLES, seed: int = 0) -> None:
        if max_samples < 1:
            raise DitqError(f"SampleObserver: max_samples={max_samples} must be at least 1")
        self.max_samples = max_samples
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        """Forget all observed batches and restart the random stream."""
        self.num_seen = 0
        self._values: list[torch.Tensor] = []
        self._keys: list[torch.Tensor] = []
        self._pending = 0
        self._threshold: torch.Tensor | None = None
        self._generator: torch.Generator | None = None

    def update(self, x: torch.Tensor) -> None:
        """Offer every value of one batch to the reservoir.

        Values whose key is not below the largest kept key can never be kept and are
        dropped at once; the others wait in a buffer that is merged (one ``topk``) only
        when it outgrows the reservoir, so most batches cost one comparison per value."""
        values = x.detach().reshape(-1).to(range_dtype(x.dtype))
        if self._generator is None:
            self._generator = torch.Generator(device=values.device).manual_seed(self.seed)
        keys = torch.rand(
            values.numel(), generator=self._generator, device=values.device, dtype=torch.float64
        )
        self.num_seen += values.numel()
        if self._threshold is not None:
            entering = keys < self._threshold
            values, keys = values[entering], keys[entering]
        self._values.append(values)
        self._keys.append(keys)
        self._pending += values.numel()
        if self._pending > 2 * self.max_samples:
            self._merge()

    def _merge(self) -> None:
        values, keys = torch.cat(self._values), torch.cat(self._keys)
        if keys.numel() > self.max_samples:
            # kthvalue is a selection, several times faster than topk; float64 keys make
            # ties (which topk would break) practically impossible.
            self._threshold = keys.kthvalue(self.max_samples).values
            kept = keys <= self._threshold
            if int(kept.sum()) != self.max_samples:
                kept = keys.topk(self.max_samples, largest=False).indices
            values, keys = values[kept], keys[kept]
        self._values, self._keys, self._pending = [values], [keys], values.numel()

    @property
    def samples(self) -> torch.Tensor | None:
        """The kept values, 1-D (``None`` before the first batch)."""
        if not self._values:
            return None
        self._merge()
        return self._values[0]

    def result(self) -> torch.Tensor:
        """The kept values, 1-D, at most ``max_samples`` long."""
        if self.samples is None:
            raise DitqError("observer has seen no data; run calibration batches through it first")
        return self.samples


def _require_static_activation(spec: QuantSpec) -> None:
    if not spec.needs_calibration:
        raise DitqError(
            f"{spec.describe()} needs no calibration, so it has no observer; "
            "check spec.needs_calibration first"
        )
    grouped = isinstance(spec.granularity, PerGroup) and spec.range_method == "minmax"
    if not isinstance(spec.granularity, PerTensor) and not grouped:
        raise DitqError(
            f"static activation ranges are per tensor or min/max per channel group, got "
            f"{spec.describe()}; use granularity=PerTensor(), or PerToken() with "
            "dynamic=True for per-token ranges"
        )


def observer_for(
    spec: QuantSpec, max_samples: int = DEFAULT_MAX_SAMPLES
) -> MinMaxObserver | SampleObserver:
    """The observer a static activation spec needs: ``MinMaxObserver`` for ``minmax``
    (per channel for per-group ranges), ``SampleObserver`` for ``percentile`` and ``mse``."""
    _require_static_activation(spec)
    if spec.range_method == "minmax":
        return MinMaxObserver(per_channel=isinstance(spec.granularity, PerGroup))
    return SampleObserver(max_samples)


def range_from_observer(observer: MinMaxObserver | SampleObserver, spec: QuantSpec) -> TensorPair:
    """``(x_min, x_max)`` for ``spec``'s range method from the statistics of
    ``observer_for(spec)``: shape (1, 1) per tensor, (C / g, 1) per group of g channels;
    pass them to ``Quantizer.set_range``."""
    _require_static_activation(spec)
    if isinstance(observer, SampleObserver):
        return find_range(observer.result(), spec)
    if isinstance(observer, MinMaxObserver) and isinstance(spec.granularity, PerGroup):
        x_min, x_max = observer.result()
        size = spec.granularity.group_size
        return (
            x_min.reshape(-1, size).amin(dim=-1, keepdim=True),
            x_max.reshape(-1, size).amax(dim=-1, keepdim=True),
        )
    if (
        isinstance(observer, MinMaxObserver)
        and not observer.per_channel
        and spec.range_method == "minmax"
    ):
        x_min, x_max = observer.result()
        return x_min.reshape(1, 1), x_max.reshape(1, 1)
    raise DitqError(
        f"{type(observer).__name__} cannot give the range of {spec.describe()}; "
        "create the observer with observer_for(spec)"
    )
