"""What a TT purifier holds: each layer's cores, the kernel they rebuild, parameter counts.

Free of any UI: the app's Learn tab draws these (``render.layer_figure``).
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

from .data import check_dataset
from .tt import TTConv2d, count_parameters, dense_param_count, tt_layers, tt_param_count
from .unet import UNet, preset


def layer_names(net: torch.nn.Module) -> list[str]:
    """The names of a network's TT layers, in order."""
    return [name for name, _ in tt_layers(net)]


def layer_view(net: torch.nn.Module, layer: str | None = None, dense: torch.nn.Module | None = None,
               model: str = "the model") -> dict:
    """Cores of one TT layer (the first when ``layer`` is None), the kernel they rebuild, and the
    kernel of the same layer in ``dense`` (the dense purifier it was made from) with their
    relative distance. An unknown layer raises ValueError naming the layers there are."""
    layers = dict(tt_layers(net))
    if not layers:
        raise ValueError(f"{model} has no TT layers; pick a TT model (tt, ttm or authors layout) to see its cores")
    layer = layer or next(iter(layers))
    if layer not in layers:
        raise ValueError(f"{model} has no TT layer {layer!r}; it has {', '.join(layers)}")
    tt: TTConv2d = layers[layer]
    with torch.no_grad():
        rebuilt = tt.full_kernel().float()
    dense_kernel, rel_error = None, None
    weight = getattr(dict(dense.named_modules()).get(layer), "weight", None) if dense is not None else None
    if weight is not None:
        dense_kernel = weight.detach().float()
        rel_error = float((rebuilt - dense_kernel).norm() / dense_kernel.norm())
    kh, kw = tt.kernel_size
    return {
        "layer": layer, "layout": tt.layout, "ranks": tt.ranks,
        "shape": (tt.out_channels, tt.in_channels, kh, kw),
        "cores": [c.detach().float() for c in tt.cores],
        "rebuilt": rebuilt, "dense": dense_kernel, "relative_error": rel_error,
        "tt_parameters": tt_param_count(tt.in_channels, tt.out_channels, (kh, kw), tt.ranks, tt.layout, bias=False),
        "dense_parameters": dense_param_count(tt.in_channels, tt.out_channels, (kh, kw), bias=False),
    }


@functools.lru_cache(maxsize=8)
def parameter_table(dataset: str, ranks: Sequence[int] = range(1, 9)) -> list[dict]:
    """Whole-U-Net parameter counts for dense and the ``tt``, ``ttm`` and authors' layouts
    (cached: building the U-Nets takes about a second; ``ranks`` must be hashable)."""
    check_dataset(dataset)
    dense = count_parameters(UNet(preset(dataset)))
    return [{"rank": r, "dense": dense,
             **{layout: count_parameters(UNet(preset(dataset, conv=layout, rank=r))) for layout in ("tt", "ttm", "authors")}}
            for r in ranks]
