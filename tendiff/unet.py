"""A small U-Net noise predictor eps(x_t, t [, y]), dense or with TT convolutions.

The network knows nothing about diffusion: it maps an image and a timestep (and optionally a
class label, for classifier-free guidance) to a tensor of the same shape. Everything is set by
:class:`UNetConfig`, which checkpoints store next to the weights.

Design choices that keep the TT rank visible in the parameter count and the floor low on CPU:
every TT conv sits inside a residual branch, so a rank-R kernel only ever *adds* a rank-R update
to a full-width residual stream and never becomes a bottleneck of the signal path; resampling is
parameter-free (2x2 average pooling down, nearest-neighbour up) and skips are *added*, so no
channel-mixing convs are needed when the width is the same at every level (the presets); there
is no attention; the time embedding is narrow (``time_dim``). Every 3x3 conv with at least
``MIN_TT_CHANNELS`` channels on both sides is a TT conv when ``conv`` is a TT layout (``tt``, ``ttm``, ``authors``);
the 1-or-3-channel stem and head stay dense (a TT gains nothing there). Levels of different
widths are joined by dense 1x1 convs.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .tt import LAYOUTS, TTConv2d, count_parameters, is_tensorizable, per_image_matmul, tensorize, tensors_state

MIN_TT_CHANNELS = 8
CONV_KINDS = ("dense",) + LAYOUTS


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1
    image_size: int = 28
    channels: tuple[int, ...] = (48, 48, 48)  # width at each resolution (28, 14, 7 for MNIST)
    time_dim: int = 32
    num_classes: int = 0  # > 0: class-conditional, with one extra "no label" index for CFG
    groups: int = 8  # GroupNorm groups
    conv: str = "dense"  # "dense", "tt" (one core per mode) or "authors" (authors' layout)
    rank: int = 2
    mode: str = "auto"  # TT execution mode, see tendiff.tt

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.conv not in CONV_KINDS:
            raise ValueError(f"conv must be one of {CONV_KINDS}, got {self.conv!r}")
        if self.image_size % (2 ** (len(self.channels) - 1)):
            raise ValueError(f"image_size {self.image_size} is not divisible by "
                             f"2^{len(self.channels) - 1} (one halving per extra level)")
        if any(c % self.groups for c in self.channels):
            raise ValueError(f"every width in {self.channels} must be divisible by groups={self.groups}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        d = dict(d)
        if d.pop("blocks", 1) != 1:  # (older configs name the one residual block per level)
            raise ValueError("U-Nets with more than one residual block per level are no longer supported")
        return cls(**d)

    @property
    def label(self) -> str:
        return "dense" if self.conv == "dense" else f"{self.conv}-r{self.rank}"


def _conv(cfg: UNetConfig, cin: int, cout: int) -> nn.Module:
    dense = nn.Conv2d(cin, cout, 3, 1, 1)
    if cfg.conv != "dense" and is_tensorizable(dense, MIN_TT_CHANNELS):
        return TTConv2d(cin, cout, 3, 1, 1, rank=cfg.rank, layout=cfg.conv, mode=cfg.mode)
    return dense


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, Sec. 3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.groups, channels)
        self.conv1 = _conv(cfg, channels, channels)
        self.time_proj = nn.Linear(cfg.time_dim, channels)
        self.norm2 = nn.GroupNorm(cfg.groups, channels)
        self.conv2 = _conv(cfg, channels, channels)

    def forward(self, x: torch.Tensor, time_bias: torch.Tensor) -> torch.Tensor:
        """x plus the block's residual; ``time_bias`` (1 or B, C) is ``self.time_proj`` of the
        time embedding, which the U-Net computes for all blocks at once (and caches)."""
        # In-place activations save a full-size allocation each; autograd needs the inputs.
        inplace = not torch.is_grad_enabled()
        h = F.silu(self.norm1(x), inplace=inplace)
        if time_bias.shape[0] == 1:
            # Every image shares one timestep (as in purification): the time offset is a
            # per-channel constant, added for free as part of conv1's bias.
            h = conv_with_extra_bias(self.conv1, h, time_bias[0])
        else:
            h = self.conv1(h) + time_bias[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        return h.add_(x)


def conv_with_extra_bias(conv: nn.Module, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """conv(x) + extra[None, :, None, None], with extra folded into the conv's bias."""
    if not isinstance(conv, nn.Conv2d):  # TTConv2d (or any conv-like module taking extra_bias)
        return conv(x, extra_bias=extra)
    bias = extra if conv.bias is None else conv.bias + extra
    return F.conv2d(x, conv.weight, bias, conv.stride, conv.padding)


def few_channel_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a stride-1, same-padded conv with few input or few output channels (the
    1-or-3-channel stem and head), as one matrix product plus a fold (col2im) or shifted slices.

    oneDNN handles some of these shapes poorly on CPU, others well
    (docs/performance.md, 'Why the code is shaped this way').
    So: heads always, 1-channel stems from batch 8, else ``conv``.
    The arithmetic is the same (the products: :func:`tendiff.tt.per_image_matmul`).
    """
    weight, bias = conv.weight, conv.bias
    cout, cin, kh, kw = weight.shape
    n, _, h, w = x.shape
    ph, pw = conv.padding
    faster = cout < cin or (cin == 1 and n >= 8)
    if not faster or conv.stride != (1, 1) or (ph, pw) != (kh // 2, kw // 2) or conv.groups != 1:
        return conv(x)
    if cout <= cin:
        # Few outputs: project every tap at once (kh*kw*cout channels), then sum the shifted
        # copies with F.fold (col2im, the adjoint of the im2col a conv does; it scatters where
        # the conv gathers, hence the flipped taps). Cheaper than padding and adding shifted
        # slices (docs/performance.md, 'Why the code is shaped this way').
        per_tap = weight.flip(2, 3).reshape(cout, cin, kh * kw).transpose(1, 2).reshape(cout * kh * kw, cin)
        out = F.fold(per_image_matmul(per_tap, x.reshape(n, cin, h * w)), (h, w), (kh, kw), padding=(ph, pw))
    else:
        # Few inputs: gather the kh*kw shifted copies (cin*kh*kw channels), then one projection.
        xp = F.pad(x, (pw, pw, ph, ph))
        taps = [(i, j) for i in range(kh) for j in range(kw)]
        cols = torch.stack([xp[:, :, i:i + h, j:j + w] for i, j in taps], 2).reshape(n, cin * kh * kw, h * w)
        out = per_image_matmul(weight.reshape(cout, cin * kh * kw), cols).reshape(n, cout, h, w)
    return out if bias is None else out + bias[:, None, None]


def downsample(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling, written as four strided adds: the same numbers as
    F.avg_pool2d(x, 2) (up to rounding), and faster on NCHW CPU tensors
    (docs/performance.md, 'Why the code is shaped this way')."""
    return (x[..., ::2, ::2] + x[..., 1::2, ::2] + x[..., ::2, 1::2] + x[..., 1::2, 1::2]).mul_(0.25)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """2x nearest-neighbour upsampling; exactly F.interpolate(x, scale_factor=2, mode="nearest"),
    and faster on NCHW CPU tensors (docs/performance.md, 'Why the code is shaped this way')."""
    return x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)


def _resize_channels(cin: int, cout: int) -> nn.Module:
    return nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        self.memory_format = torch.contiguous_format  # of the activations; see use_channels_last
        ch = cfg.channels
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_dim, cfg.time_dim), nn.SiLU())
        self.label_embed = nn.Embedding(cfg.num_classes + 1, cfg.time_dim) if cfg.num_classes else None
        self.stem = nn.Conv2d(cfg.in_channels, ch[0], 3, 1, 1)
        self.enc = nn.ModuleList([ResBlock(cfg, c) for c in ch[:-1]])
        self.down = nn.ModuleList([_resize_channels(a, b) for a, b in zip(ch[:-1], ch[1:])])
        self.mid = ResBlock(cfg, ch[-1])
        self.up = nn.ModuleList([_resize_channels(b, a) for a, b in zip(ch[:-1], ch[1:])])
        self.dec = nn.ModuleList([ResBlock(cfg, c) for c in ch[:-1]])
        self.head_norm = nn.GroupNorm(cfg.groups, ch[0])
        self.head = nn.Conv2d(ch[0], cfg.in_channels, 3, 1, 1)
        # Start as the zero predictor: the loss begins at E|eps|^2 = 1 and training is stable.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self._time_cache: dict[int, list[torch.Tensor]] = {}  # see _shared_time_biases
        self._time_cache_state = None

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def blocks(self) -> list[ResBlock]:
        """Every residual block, in the order forward runs them (the decoder from the bottom up)."""
        return [*self.enc, self.mid, *reversed(self.dec)]

    def time_biases(self, t: torch.Tensor, y: torch.Tensor | None, dtype: torch.dtype) -> list[torch.Tensor]:
        """Each block's per-channel time (and label) offset, in :meth:`blocks` order: (1, C)
        when every image shares the timestep and label (then it can be folded into a bias),
        else (B, C). t: (B,) timesteps."""
        temb = timestep_embedding(t, self.config.time_dim).to(dtype)
        if self.label_embed is not None:
            if y is None:
                y = torch.full((temb.shape[0],), self.null_label, dtype=torch.long, device=t.device)
            temb = temb + self.label_embed(y)
        elif y is not None:
            raise ValueError("this U-Net is unconditional; it takes no label")
        if temb.shape[0] > 1 and bool((temb == temb[:1]).all()):
            temb = temb[:1]  # the same timestep (and label) everywhere
        temb = self.time_mlp(temb)
        return [block.time_proj(temb) for block in self.blocks()]

    def _shared_time_biases(self, t: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """time_biases for one timestep shared by the batch, cached per timestep in inference
        mode: a sampler visits the same few timesteps on every call, and at batch 1 the ~25
        small ops of the time path are a noticeable part of a TT model's step
        (docs/performance.md, 'Why the code is shaped this way')."""
        if not torch.is_inference_mode_enabled() or torch.compiler.is_compiling():
            return self.time_biases(t.reshape(1), None, dtype)
        # Read through the modules' dicts: cheaper per forward than Module.parameters() or
        # attribute lookups (docs/performance.md, 'Why the code is shaped this way').
        time_layers = [self.time_mlp._modules["0"], *(b._modules["time_proj"] for b in self.blocks())]
        weights = [p for layer in time_layers for p in layer._parameters.values() if p is not None]
        state = (tensors_state(weights), dtype, t.device)
        if self._time_cache_state != state:  # new weights (or dtype): start afresh
            self._time_cache.clear()
            self._time_cache_state = state
        key = int(t)
        if key not in self._time_cache:
            self._time_cache[key] = self.time_biases(t.reshape(1), None, dtype)
        return self._time_cache[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        # A 0-dim t is one timestep shared by the batch (as in purification): the time path is
        # then computed once (cached per timestep) and the blocks fold it into a conv bias.
        if t.ndim == 0 and y is None and not t.is_floating_point():
            time_biases = self._shared_time_biases(t, x.dtype)
        else:
            time_biases = self.time_biases(t.expand(x.shape[0]) if t.ndim == 0 else t, y, x.dtype)
        biases = iter(time_biases)  # in blocks() order, which is the order they run in
        h = few_channel_conv(self.stem, x).contiguous(memory_format=self.memory_format)
        skips = []
        for block, down in zip(self.enc, self.down):
            h = block(h, next(biases))
            skips.append(h)
            h = down(downsample(h))
        h = self.mid(h, next(biases))
        for i in reversed(range(len(self.up))):
            h = self.dec[i](self.up[i](upsample(h)) + skips[i], next(biases))
        return few_channel_conv(self.head, F.silu(self.head_norm(h), inplace=not torch.is_grad_enabled()))

    def num_parameters(self) -> int:
        return count_parameters(self)

    def macs(self, height: int | None = None, width: int | None = None) -> int:
        """Multiply-accumulates of one forward of one image of ``height`` x ``width`` (default:
        the config's ``image_size``), from the layers' own formulas, walking the resolution levels
        the way :meth:`forward` does.

        Counted: every conv, Ho Wo Cout Cin kh kw / groups for a dense one (however it is called:
        module call, :func:`conv_with_extra_bias` or :func:`few_channel_conv`), and
        :meth:`TTConv2d.macs` for a TT one on the path its ``mode`` takes in inference ("chain"
        for the chain, "auto" by the layer's own MAC rule, "cached" and "rebuild" as the dense
        kernel they convolve with); every Linear, in x out features (the time MLP once and each
        block's ``time_proj`` once: the timestep is shared, as in purification). Not counted:
        biases, GroupNorm, SiLU, the label embedding (a lookup), residual and skip additions,
        pooling and upsampling.
        """
        cfg = self.config
        height = cfg.image_size if height is None else int(height)
        width = cfg.image_size if width is None else int(width)
        scale = 2 ** (len(cfg.channels) - 1)
        if height < 1 or width < 1 or height % scale or width % scale:
            raise ValueError(f"{height}x{width} is not divisible by {scale} (one halving per extra level)")
        sizes = [(height // 2 ** i, width // 2 ** i) for i in range(len(cfg.channels))]

        def block_macs(block, size) -> int:
            return layer_macs(block.conv1, *size) + layer_macs(block.conv2, *size)

        total = layer_macs(self.time_mlp[0], 1, 1) + sum(layer_macs(b.time_proj, 1, 1) for b in self.blocks())
        total += layer_macs(self.stem, *sizes[0])
        for i, down in enumerate(self.down):
            total += block_macs(self.enc[i], sizes[i])
            total += layer_macs(down, *sizes[i + 1])  # (after the pooling)
        total += block_macs(self.mid, sizes[-1])
        for i in reversed(range(len(self.up))):
            total += layer_macs(self.up[i], *sizes[i])  # (after the upsampling)
            total += block_macs(self.dec[i], sizes[i])
        return total + layer_macs(self.head, *sizes[0])

    def use_channels_last(self, enabled: bool = True) -> "UNet":
        """Run the activations (and dense conv weights) channels-last. oneDNN's dense 3x3 convs
        are faster that way on CPU, while TT chains and GroupNorm prefer NCHW
        (docs/performance.md, 'Why the code is shaped this way');
        tendiff.bench measures both, and purification takes whichever the model is set to."""
        self.memory_format = torch.channels_last if enabled else torch.contiguous_format
        return self.to(memory_format=self.memory_format)


def layer_macs(layer: nn.Module, height: int, width: int) -> int:
    """Multiply-accumulates of one layer on one image whose input is ``height`` x ``width``
    (ignored by a Linear, which counts in x out features): see :meth:`UNet.macs`."""
    if isinstance(layer, nn.Identity):
        return 0
    if isinstance(layer, nn.Linear):
        return layer.in_features * layer.out_features
    if isinstance(layer, TTConv2d):
        # The path a forward in inference would take, decided by the layer itself (a meta
        # tensor carries the size without any data).
        with torch.no_grad():
            path = layer.resolve_mode(torch.empty(1, layer.in_channels, height, width, device="meta"))
        return layer.macs(height, width, "chain" if path == "chain" else "dense")
    if isinstance(layer, nn.Conv2d):
        if isinstance(layer.padding, str):
            raise ValueError("string padding is not supported")
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
        ho = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return ho * wo * layer.out_channels * (layer.in_channels // layer.groups) * kh * kw
    raise TypeError(f"no MAC formula for {type(layer).__name__}")


def unet_from_dense(dense: UNet, rank, layout: str = "tt", mode: str = "auto") -> UNet:
    """A TT U-Net initialised by TT-SVD of every eligible conv of a trained dense U-Net."""
    if dense.config.conv != "dense":
        raise ValueError("unet_from_dense takes a dense U-Net")
    model = tensorize(copy.deepcopy(dense), rank=rank, layout=layout, mode=mode, min_channels=MIN_TT_CHANNELS)
    model.config = replace(dense.config, conv=layout, rank=int(rank), mode=mode)
    return model


PRESETS: dict[str, UNetConfig] = {
    "mnist": UNetConfig(in_channels=1, image_size=28, channels=(48, 48, 48)),
    "fashion_mnist": UNetConfig(in_channels=1, image_size=28, channels=(48, 48, 48)),
    "cifar10": UNetConfig(in_channels=3, image_size=32, channels=(48, 48, 48)),
}


def preset(dataset: str, conv: str = "dense", rank: int = 2, **overrides) -> UNetConfig:
    if dataset not in PRESETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(PRESETS)}")
    return replace(PRESETS[dataset], conv=conv, rank=rank, **overrides)
