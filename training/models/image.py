"""Image models: the image is binned inside the graph from the constituents tensor.

The tensor contract is unchanged (``constituents`` [N, P, F], ``mask`` [N, P], optionally
``globals`` [N, G]), so an image model reads the same cells as a particle-flow network.
Columns are read as (value, x, y): column 0 is summed into the pixel that columns 1 and 2
fall in; further columns are ignored. A cell's pixel index along an axis is the number of
inner edges at or below its position, so non-uniform edges cost nothing extra and the graph
needs only comparisons, sums and ScatterElements (reduction add, ONNX opset >= 16). Cells
outside the edges (bins are [low, high), the last edge excluded) or masked are dropped.

Checkpoints store every constructor argument; a setting added later gets no default (as
``CNN``'s ``pooling``), so an older checkpoint never loads as a different network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from bsym.errors import SpecMismatchError
from bsym.features import FeatureBatch, FeatureSpec
from bsym.settings import StrictModel
from bsym.training.models.base import (
    BsymModel,
    ModelSettings,
    NetworkModel,
    Standardise,
    mlp,
    n_globals_of,
    need,
)

IMAGE_COLUMNS = 3
POOLING: dict[str, type[nn.Module]] = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


class ImageBinning(nn.Module):
    """Sum the value column of the constituents into an [N, n_x · n_y] image, x-major."""

    x_edges: Tensor
    y_edges: Tensor

    def __init__(self, x_edges: Sequence[float], y_edges: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("x_edges", torch.tensor(x_edges, dtype=torch.float32))
        self.register_buffer("y_edges", torch.tensor(y_edges, dtype=torch.float32))
        self.shape = (len(x_edges) - 1, len(y_edges) - 1)

    @property
    def n_pixels(self) -> int:
        return self.shape[0] * self.shape[1]

    def forward(self, constituents: Tensor, mask: Tensor) -> Tensor:
        value, x, y = constituents[..., 0], constituents[..., 1], constituents[..., 2]
        inside = mask & _within(x, self.x_edges) & _within(y, self.y_edges)
        pixel = _bin_index(x, self.x_edges) * self.shape[1] + _bin_index(y, self.y_edges)
        image = torch.zeros(
            constituents.shape[0], self.n_pixels, dtype=value.dtype, device=value.device
        )
        return image.scatter_add(1, pixel, value * inside.to(value.dtype))


def _within(position: Tensor, edges: Tensor) -> Tensor:
    return (position >= edges[0]) & (position < edges[-1])


def _bin_index(position: Tensor, edges: Tensor) -> Tensor:
    """Index of the bin holding ``position``, in [0, bins - 1] whether inside or not."""
    return (position.unsqueeze(-1) >= edges[1:-1]).sum(dim=-1)


class PixelTransform(nn.Module):
    """``log1p`` (or nothing) on the summed pixel values, before standardisation."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in ("log1p", "none"):
            raise SpecMismatchError(f"unknown pixel transform '{kind}' (log1p or none)")
        self.kind = kind

    def forward(self, image: Tensor) -> Tensor:
        return torch.log1p(torch.clamp(image, min=0.0)) if self.kind == "log1p" else image


class ImageNetwork(NetworkModel):
    """Common part: binning, pixel transform, optional standardised globals."""

    def __init__(
        self,
        n_globals: int,
        x_edges: Sequence[float],
        y_edges: Sequence[float],
        pixel_transform: str,
        use_globals: bool,
    ) -> None:
        super().__init__()
        self.use_globals = use_globals and n_globals > 0
        self.input_names = (
            ("constituents", "mask", "globals") if self.use_globals else ("constituents", "mask")
        )
        self.binning = ImageBinning(x_edges, y_edges)
        self.pixels = PixelTransform(pixel_transform)
        self.norm_globals = Standardise(n_globals)

    @property
    def n_head_globals(self) -> int:
        return int(self.norm_globals.mean.shape[0]) if self.use_globals else 0

    def images(self, batch: FeatureBatch) -> npt.NDArray[np.float32]:
        """The transformed flat images [N, n_x · n_y] of ``batch``, as numpy."""
        constituents, mask = need(batch.constituents, "constituents"), need(batch.mask, "mask")
        if constituents.shape[-1] < IMAGE_COLUMNS:
            raise SpecMismatchError(
                f"model '{self.kind}' needs constituents with at least {IMAGE_COLUMNS} "
                f"features (value, x, y), got {constituents.shape[-1]}"
            )
        with torch.no_grad():
            image = self.binning(torch.from_numpy(constituents), torch.from_numpy(mask))
            pixels: npt.NDArray[np.float32] = self.pixels(image).numpy()
        return pixels

    def prepare(self, batch: FeatureBatch) -> None:
        if self.use_globals:
            self.norm_globals.fit(need(batch.globals, "globals"))

    def head_input(self, features: Tensor, rest: Sequence[Tensor]) -> Tensor:
        if self.use_globals:
            return torch.cat([features, self.norm_globals(rest[0])], dim=1)
        return features


class ImageFCN(ImageNetwork):
    """Fully connected network on the flattened image, each pixel standardised."""

    kind = "image_fcn"

    def __init__(
        self,
        n_globals: int,
        x_edges: Sequence[float],
        y_edges: Sequence[float],
        hidden_sizes: Sequence[int],
        pixel_transform: str = "log1p",
        use_globals: bool = False,
    ) -> None:
        super().__init__(n_globals, x_edges, y_edges, pixel_transform, use_globals)
        self.init_kwargs = {
            "n_globals": n_globals,
            "x_edges": list(x_edges),
            "y_edges": list(y_edges),
            "hidden_sizes": list(hidden_sizes),
            "pixel_transform": pixel_transform,
            "use_globals": use_globals,
        }
        self.norm_pixels = Standardise(self.binning.n_pixels)
        n_in = self.binning.n_pixels + self.n_head_globals
        self.hidden = mlp(n_in, hidden_sizes)
        self.out = nn.Linear(hidden_sizes[-1] if hidden_sizes else n_in, 1)

    def prepare(self, batch: FeatureBatch) -> None:
        super().prepare(batch)
        self.norm_pixels.fit(self.images(batch))

    def logits(self, *inputs: Tensor) -> Tensor:
        constituents, mask, *rest = self.unpack(inputs)
        image = self.norm_pixels(self.pixels(self.binning(constituents, mask)))
        output: Tensor = self.out(self.hidden(self.head_input(image, rest)))
        return output


class CNN(ImageNetwork):
    """Convolutions on the image, then a dense head (with the globals, if used).

    Each block is a same-size convolution, ReLU and 2×2 pooling, max or average (an axis
    already down to one pixel is not pooled). The pixels are standardised with one mean and
    one scale over the whole image, which keeps the convolutions' translation symmetry.
    """

    kind = "cnn"

    def __init__(
        self,
        n_globals: int,
        x_edges: Sequence[float],
        y_edges: Sequence[float],
        channels: Sequence[int],
        kernel_size: int,
        dense_sizes: Sequence[int],
        pixel_transform: str,
        use_globals: bool,
        pooling: str,
    ) -> None:
        super().__init__(n_globals, x_edges, y_edges, pixel_transform, use_globals)
        self.init_kwargs = {
            "n_globals": n_globals,
            "x_edges": list(x_edges),
            "y_edges": list(y_edges),
            "channels": list(channels),
            "kernel_size": kernel_size,
            "dense_sizes": list(dense_sizes),
            "pixel_transform": pixel_transform,
            "use_globals": use_globals,
            "pooling": pooling,
        }
        if pooling not in POOLING:
            raise SpecMismatchError(f"unknown pooling '{pooling}' ({' or '.join(POOLING)})")
        self.norm_pixels = Standardise(1)
        layers: list[nn.Module] = []
        n_channels, (n_x, n_y) = 1, self.binning.shape
        for width in channels:
            pool = (2 if n_x >= 2 else 1, 2 if n_y >= 2 else 1)
            layers += [
                nn.Conv2d(n_channels, width, kernel_size, padding="same"),
                nn.ReLU(),
                POOLING[pooling](pool),
            ]
            n_channels, n_x, n_y = width, n_x // pool[0], n_y // pool[1]
        self.convolutions = nn.Sequential(*layers)
        n_in = n_channels * n_x * n_y + self.n_head_globals
        self.dense = mlp(n_in, dense_sizes)
        self.out = nn.Linear(dense_sizes[-1] if dense_sizes else n_in, 1)

    def prepare(self, batch: FeatureBatch) -> None:
        super().prepare(batch)
        self.norm_pixels.fit(self.images(batch).reshape(-1, 1))

    def logits(self, *inputs: Tensor) -> Tensor:
        constituents, mask, *rest = self.unpack(inputs)
        image = self.norm_pixels(self.pixels(self.binning(constituents, mask)))
        maps = self.convolutions(image.reshape(-1, 1, *self.binning.shape))
        output: Tensor = self.out(self.dense(self.head_input(maps.flatten(1), rest)))
        return output


class UniformEdges(StrictModel):
    """``bins`` equal cells from ``low`` to ``high``."""

    low: float
    high: float
    bins: int = Field(gt=0)

    @model_validator(mode="after")
    def _high_above_low(self) -> UniformEdges:
        if not self.high > self.low:
            raise ValueError(f"high ({self.high}) must be above low ({self.low})")
        return self


def edge_values(edges: UniformEdges | list[float]) -> list[float]:
    """The explicit, increasing bin edges of an image axis."""
    if isinstance(edges, UniformEdges):
        step = (edges.high - edges.low) / edges.bins
        return [edges.low + step * k for k in range(edges.bins)] + [edges.high]
    if len(edges) < 2 or any(edges[k + 1] <= edges[k] for k in range(len(edges) - 1)):
        raise ValueError(f"bin edges must be at least two strictly increasing numbers: {edges}")
    return list(edges)


# the isolation image of arXiv:2102.02278: 32 cells of 0.025 in Δη and π/126 in Δφ
ISOLATION_X_EDGES = UniformEdges(low=-16 * 0.025, high=16 * 0.025, bins=32)
ISOLATION_Y_EDGES = UniformEdges(low=-16 * math.pi / 126, high=16 * math.pi / 126, bins=32)
AxisEdges = UniformEdges | list[float]


class _ImageConfig(ModelSettings):
    """Image binned in the graph from constituent columns (value, x, y); see image_models."""

    x_edges: AxisEdges = Field(description="edges in column 1: a list or {low, high, bins}")
    y_edges: AxisEdges = Field(description="edges in column 2: a list or {low, high, bins}")
    pixel_transform: Literal["log1p", "none"] = "log1p"
    use_globals: bool = Field(default=False, description="concatenate the globals")

    @field_validator("x_edges", "y_edges")
    @classmethod
    def _edges_increase(cls, edges: AxisEdges) -> AxisEdges:
        edge_values(edges)
        return edges

    def check_features(self, spec: FeatureSpec) -> None:
        constituents = spec.constituents
        if constituents is None or len(constituents.features) < 3:
            raise ValueError(
                f"model type '{self.type}' needs features.constituents with at least three "
                "features: the value summed into a pixel, then the x and y positions"
            )
        value = constituents.features[0]
        if value.transform != "none":
            raise ValueError(
                f"model type '{self.type}' sums the first constituent feature "
                f"({value.branch}) into pixels, so it needs transform 'none', not "
                f"'{value.transform}' (sums of logarithms mean nothing)"
            )
        if self.use_globals and not (spec.globals or spec.cones is not None):
            raise ValueError(
                "model.use_globals is true but features has no globals or cones; "
                "add features.globals or set model.use_globals=false"
            )

    def used_globals(self, batch: FeatureBatch) -> int:
        return n_globals_of(batch) if self.use_globals else 0


class ImageFCNConfig(_ImageConfig):
    """Fully connected network on the image (per-pixel standardised), optionally + globals."""

    type: Literal["image_fcn"] = "image_fcn"
    hidden_sizes: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [128, 64])
    use_globals: bool = Field(default=False, description="concatenate the globals to the image")

    def build(self, spec: FeatureSpec, batch: FeatureBatch) -> BsymModel:
        return ImageFCN(
            self.used_globals(batch),
            edge_values(self.x_edges),
            edge_values(self.y_edges),
            self.hidden_sizes,
            self.pixel_transform,
            self.use_globals,
        )


class CNNConfig(_ImageConfig):
    """Convolutions (3×3, ReLU, 2×2 pooling) on the image, then a dense head."""

    type: Literal["cnn"] = "cnn"
    x_edges: AxisEdges = ISOLATION_X_EDGES
    y_edges: AxisEdges = ISOLATION_Y_EDGES
    channels: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [16, 32, 32], min_length=1
    )
    kernel_size: int = Field(default=3, gt=0)
    dense_sizes: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [64])
    pooling: Literal["max", "avg"] = Field(default="avg", description="2×2 pooling per block")
    use_globals: bool = Field(default=True, description="concatenate the globals to the head")

    def build(self, spec: FeatureSpec, batch: FeatureBatch) -> BsymModel:
        return CNN(
            self.used_globals(batch),
            edge_values(self.x_edges),
            edge_values(self.y_edges),
            self.channels,
            self.kernel_size,
            self.dense_sizes,
            self.pixel_transform,
            self.use_globals,
            self.pooling,
        )


ImageConfig = ImageFCNConfig | CNNConfig
CONFIGS = (ImageFCNConfig, CNNConfig)
MODELS = (ImageFCN, CNN)
