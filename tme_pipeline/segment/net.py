"""The StarDist 2D network (U-Net backbone) in plain PyTorch.

Layer for layer the network that ``stardist.models.StarDist2D`` builds with a
``Config2D`` and the ``unet`` backbone, so that official Keras weights load
one-to-one (see ``weights.py``):

1. the input is brought to the output ``grid`` by blocks of
   ``unet_n_conv_per_depth`` 3×3 ReLU convolutions (``unet_n_filter_base``
   filters) each followed by a 2×2 max-pooling, until the pooling reached the
   grid;
2. a U-Net (csbdeep ``unet_block``) of ``unet_n_depth`` levels, nearest
   up-sampling, skip connections concatenated after the up-sampled features;
3. one 3×3 ReLU convolution of ``net_conv_after_unet`` filters (``features``);
4. two 1×1 heads: ``prob`` (sigmoid, 1 channel) and ``dist`` (linear, one
   channel per ray).

The modules are kept in one ``ModuleDict`` under their Keras layer names, which
makes the Keras mapping a lookup and the state dict self-describing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["StarDistConfig", "StarDistNet"]


@dataclass(frozen=True)
class StarDistConfig:
    """Architecture and inference settings of a StarDist 2D model.

    Defaults are those of ``stardist.models.Config2D()`` (unet backbone).

    Attributes
    ----------
    n_rays : int
        Number of radial distances per pixel (rays evenly spaced in angle).
    grid : (int, int)
        Output subsampling (Y, X): the net predicts on a grid ``grid`` times
        coarser than its input. Powers of two.
    n_channel_in : int
        Input channels; only 1 (the nuclear channel) is supported.
    unet_n_depth, unet_n_filter_base, unet_kernel_size, unet_n_conv_per_depth
        U-Net depth, filters of its first level (doubled per level), kernel
        size (odd, px), convolutions per level.
    net_conv_after_unet : int
        Filters of the 3×3 convolution between U-Net and heads (0: none).
    train_patch_size : (int, int)
        Patch size the model was trained on, px (Y, X); informative.
    pixel_um : float or None
        Pixel size the model was trained at, µm. ``None``: unknown, images are
        segmented at their own resolution.
    prob_thresh, nms_thresh : float
        Default object probability threshold and NMS overlap threshold (the
        model's ``thresholds.json`` overrides them when loaded from a folder).
    norm_percentiles : (float, float)
        Low and high percentiles of the input normalisation the model expects.
    """

    n_rays: int = 32
    grid: tuple[int, int] = (2, 2)
    n_channel_in: int = 1
    unet_n_depth: int = 3
    unet_n_filter_base: int = 32
    unet_kernel_size: tuple[int, int] = (3, 3)
    unet_n_conv_per_depth: int = 2
    net_conv_after_unet: int = 128
    train_patch_size: tuple[int, int] = (256, 256)
    pixel_um: float | None = None
    prob_thresh: float = 0.5
    nms_thresh: float = 0.4
    norm_percentiles: tuple[float, float] = (1.0, 99.8)

    def __post_init__(self) -> None:
        # JSON gives lists; keep tuples so that configs compare and hash.
        for name in ("grid", "unet_kernel_size", "train_patch_size", "norm_percentiles"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = []
        if self.n_rays < 3:
            problems.append(f"n_rays must be >= 3, got {self.n_rays}")
        if len(self.grid) != 2 or any(g < 1 or g & (g - 1) for g in self.grid):
            problems.append(f"grid must be two powers of two, got {self.grid}")
        if self.n_channel_in != 1:
            problems.append(f"only n_channel_in=1 (the nuclear channel) is supported, got {self.n_channel_in}")
        if len(self.unet_kernel_size) != 2 or any(k % 2 == 0 for k in self.unet_kernel_size):
            problems.append(f"unet_kernel_size must be two odd sizes, got {self.unet_kernel_size}")
        if self.unet_n_depth < 1 or self.unet_n_conv_per_depth < 1 or self.unet_n_filter_base < 1:
            problems.append("unet_n_depth, unet_n_conv_per_depth and unet_n_filter_base must be >= 1")
        lo, hi = self.norm_percentiles
        if not 0 <= lo < hi <= 100:
            problems.append(f"norm_percentiles must satisfy 0 <= lo < hi <= 100, got {self.norm_percentiles}")
        if self.pixel_um is not None and not self.pixel_um > 0:
            problems.append(f"pixel_um must be > 0, got {self.pixel_um}")
        if problems:
            raise ValueError("unsupported StarDist config: " + "; ".join(problems))

    @property
    def receptive_radius_px(self) -> int:
        """One-sided receptive field of an output pixel, input px (an upper bound).

        Patches with at least this much context give the prob/dist of a
        whole-image pass (up to float rounding).
        """
        k = max(self.unet_kernel_size) // 2
        r, j = 0, 1
        for pool in _grid_pools(self.grid):
            r += self.unet_n_conv_per_depth * k * j
            r += (max(pool) - 1) * j
            j *= max(pool)
        for _ in range(self.unet_n_depth):
            r += self.unet_n_conv_per_depth * k * j + j  # convolutions, then 2x2 pooling
            j *= 2
        r += self.unet_n_conv_per_depth * k * j  # middle
        for _ in range(self.unet_n_depth):
            j //= 2
            r += j  # nearest up-sampling may shift by one pixel of the finer level
            r += self.unet_n_conv_per_depth * k * j
        return r + (k * j if self.net_conv_after_unet > 0 else 0)

    @property
    def div_by(self) -> tuple[int, int]:
        """Input size multiple the net needs, px (Y, X): ``grid * 2**unet_n_depth``."""
        return tuple(g * 2**self.unet_n_depth for g in self.grid)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "StarDistConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown StarDist config keys: {unknown}")
        return cls(**d)


def _conv(n_in: int, n_out: int, kernel_size: tuple[int, int]) -> nn.Conv2d:
    # Keras 'same' padding with an odd kernel is symmetric: k // 2 each side.
    return nn.Conv2d(n_in, n_out, kernel_size, padding=tuple(k // 2 for k in kernel_size))


def _grid_pools(grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Pool sizes that bring the input to ``grid``, as StarDist2D._build does."""
    pools, pooled = [], [1, 1]
    while tuple(pooled) != tuple(grid):
        pool = tuple(1 + int(g > p) for g, p in zip(grid, pooled))
        pooled = [p * q for p, q in zip(pooled, pool)]
        pools.append(pool)
    return pools


class StarDistNet(nn.Module):
    """StarDist 2D U-Net: image → (object probability, ray distances).

    Parameters
    ----------
    config : StarDistConfig
        Architecture.

    Notes
    -----
    ``forward(x)`` takes ``x`` of shape (B, 1, H, W), float32, H and W
    multiples of ``config.div_by``, intensities normalised (~0-1), and returns
    ``prob`` (B, 1, H/gy, W/gx) in [0, 1] and ``dist`` (B, n_rays, H/gy,
    W/gx), distances in input pixels, rays ordered as in ``stardist.geometry``.
    """

    def __init__(self, config: StarDistConfig) -> None:
        super().__init__()
        self.config = config
        c, k = config, config.unet_kernel_size
        nb, n_conv = c.unet_n_filter_base, c.unet_n_conv_per_depth
        layers: dict[str, nn.Module] = {}
        self._grid_pools = _grid_pools(c.grid)
        n_in = c.n_channel_in
        for s in range(len(self._grid_pools)):
            for i in range(n_conv):
                layers[f"grid_{s}_no_{i}"] = _conv(n_in, nb, k)
                n_in = nb
        skip_ch = []
        for n in range(c.unet_n_depth):
            for i in range(n_conv):
                layers[f"down_level_{n}_no_{i}"] = _conv(n_in, nb * 2**n, k)
                n_in = nb * 2**n
            skip_ch.append(n_in)
        for i in range(n_conv - 1):
            layers[f"middle_{i}"] = _conv(n_in, nb * 2**c.unet_n_depth, k)
            n_in = nb * 2**c.unet_n_depth
        # csbdeep names the last convolution of a block "..._no_{n_conv}".
        layers[f"middle_{n_conv}"] = _conv(n_in, nb * 2 ** max(0, c.unet_n_depth - 1), k)
        n_in = nb * 2 ** max(0, c.unet_n_depth - 1)
        for n in reversed(range(c.unet_n_depth)):
            n_in += skip_ch[n]
            for i in range(n_conv - 1):
                layers[f"up_level_{n}_no_{i}"] = _conv(n_in, nb * 2**n, k)
                n_in = nb * 2**n
            layers[f"up_level_{n}_no_{n_conv}"] = _conv(n_in, nb * 2 ** max(0, n - 1), k)
            n_in = nb * 2 ** max(0, n - 1)
        if c.net_conv_after_unet > 0:
            layers["features"] = _conv(n_in, c.net_conv_after_unet, k)
            n_in = c.net_conv_after_unet
        layers["prob"] = nn.Conv2d(n_in, 1, 1)
        layers["dist"] = nn.Conv2d(n_in, c.n_rays, 1)
        self.layers = nn.ModuleDict(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, L = self.config, self.layers
        n_conv = c.unet_n_conv_per_depth
        conv_relu = _fused_conv_relu if _can_fuse(x) else _conv_relu
        for s, pool in enumerate(self._grid_pools):
            for i in range(n_conv - 1):
                x = conv_relu(L[f"grid_{s}_no_{i}"], x)
            x = F.max_pool2d(conv_relu(L[f"grid_{s}_no_{n_conv - 1}"], x), pool)
        skips = []
        for n in range(c.unet_n_depth):
            for i in range(n_conv):
                x = conv_relu(L[f"down_level_{n}_no_{i}"], x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        for i in range(n_conv - 1):
            x = conv_relu(L[f"middle_{i}"], x)
        x = conv_relu(L[f"middle_{n_conv}"], x)
        for n in reversed(range(c.unet_n_depth)):
            x = torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skips[n]], dim=1)
            for i in range(n_conv - 1):
                x = conv_relu(L[f"up_level_{n}_no_{i}"], x)
            x = conv_relu(L[f"up_level_{n}_no_{n_conv}"], x)
        if c.net_conv_after_unet > 0:
            x = conv_relu(L["features"], x)
        # Both 1x1 heads as one convolution: one pass over the features instead of two.
        prob, dist = L["prob"], L["dist"]
        out = F.conv2d(x, torch.cat([prob.weight, dist.weight]), torch.cat([prob.bias, dist.bias]))
        return torch.sigmoid(out[:, :1]), out[:, 1:]


def _conv_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    # In-place ReLU: the activations are the big allocations at full resolution.
    return F.relu(conv(x), inplace=True)


def _fused_conv_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``relu(conv(x))`` as one oneDNN convolution with a ReLU post-op (CPU inference).

    The convolution accumulates exactly as without the post-op and ReLU is exact, so the
    output is bit-identical to :func:`_conv_relu`, with one pass over the activation less
    (5 % of a pass on CPU).
    """
    return torch.ops.mkldnn._convolution_pointwise(
        x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        "relu", [None], "")


def _can_fuse(x: torch.Tensor) -> bool:
    """Inference in float32 on a CPU whose torch has oneDNN's fused convolution."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))
