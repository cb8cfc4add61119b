"""Tensor-train (TT) convolutions.

A 2-D convolution kernel W has four modes: output channels O, input channels I and the
two spatial modes kh, kw. Three TT layouts are provided:

``tt`` (one core per mode; O(N R + k R^2), each layer's output in an R3-dim channel subspace),

    W[o, i, a, b] = sum_{r1, r2, r3} U_in[i, r1] G_h[r1, a, r2] G_w[r2, b, r3] U_out[r3, o]

with cores (I, R1), (R1, kh, R2), (R2, kw, R3), (R3, O): I*R1 + kh*R1*R2 + kw*R2*R3 + R3*O
parameters, linear in the channel count. Because each core touches one mode, the layer can
run as a chain of four small convolutions, 1x1 (I->R1), kh x 1 (R1->R2), 1 x kw (R2->R3),
1x1 (R3->O), which is where the real FLOP saving comes from.

``authors`` (the layout of the TendiffPure authors' public code):

    W[o, i, a, b] = sum_{r0, r1} A[o, i, r0] B[r0, a, r1] C[r1, b]

with cores (O, I, r0), (r0, kh, r1), (r1, kw): O*I*r0 + ... parameters, still quadratic in
the channel count. Its chain is a 1x1 conv to O*r0 channels followed by two grouped
convolutions (groups = O), which is not cheaper than the dense kernel.

``ttm`` (tensor-train *matrix* over factorized channel modes; Garipov, Podoprikhin, Novikov and
Vetrov 2016, "Ultimate tensorization"): with I = c1 c2 and O = s1 s2 (:func:`channel_modes`),

    W[(o1 o2), (i1 i2), a, b] = sum_{r0, r1} K[(a b), r0] G1[r0, i1, o1, r1] G2[r1, i2, o2]

with cores (kh kw, R0), (R0, c1, s1, R1), (R1, c2, s2): kh kw R0 + R0 c1 s1 R1 + R1 c2 s2
parameters. With c1 s1 close to N the middle core holds about N R^2 numbers: this is the
abstract's O(N R^2). For each spatial component r0 the channel mixing is a sum of R1 Kronecker
products, which is full rank (unlike ``tt``, whose output lies in an R3-dim channel subspace).
Its chain is one pixelwise product I -> R0 O (the two channel cores contracted) and a grouped
kh x kw conv with the spatial core shared by every output channel.

Three execution modes compute the same function:
``rebuild`` rebuilds the dense kernel on every call (what the authors' code does);
``chain`` runs the cores as a chain: for ``tt``, the input core as a 1x1 projection I->R1
(a batched matrix product), the two spatial cores as one kh x kw convolution R1->R3 (they are
contracted first: R1 kh kw R3 numbers), and the output core as a 1x1 projection R3->O that
also adds the bias (through an extra channel of ones): three launches, about
(I R1 + R1 R3 kh kw + R3 O) multiply-accumulates per pixel instead of I O kh kw
(:meth:`TTConv2d.chain_weights`). Doing the 1x1 steps as matrix products rather than
convolutions matters on CPU: oneDNN reorders NCHW tensors around 1x1 convolutions
(docs/performance.md, 'Why the code is shaped this way');
``cached`` rebuilds once and reuses the kernel until a core changes (detected through the
parameters' in-place version counters), and falls back to ``rebuild`` whenever gradients are
needed. ``auto`` picks, per call, the chain or the full kernel by their multiply-accumulate
counts at that input size.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LAYOUTS = ("tt", "ttm", "authors")
MODES = ("rebuild", "chain", "cached", "auto")
# How many dense-conv MACs one chain MAC costs, for the "auto" mode's choice (docs/performance.md).
CHAIN_COST = {"tt": 3, "ttm": 6, "authors": 3}


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def channel_modes(channels: int) -> tuple[int, int]:
    """The ``ttm`` factorization of a channel count: the most balanced pair (a, b), a >= b,
    a * b = channels (48 -> (8, 6), 64 -> (8, 8), 3 -> (3, 1)). Balanced modes make the
    middle core's c1 s1 closest to N, the O(N R^2) of the layout."""
    b = max(d for d in range(1, math.isqrt(channels) + 1) if channels % d == 0)
    return channels // b, b


def normalize_ranks(rank, layout: str) -> tuple[int, ...]:
    """Bond ranks for a layout: 3 for ``tt`` (R1, R2, R3), 2 for ``ttm`` (R0, R1) and
    ``authors`` (r0, r1).

    An int R means the same rank on every bond.
    """
    n = 3 if layout == "tt" else 2
    if layout not in LAYOUTS:
        raise ValueError(f"unknown TT layout {layout!r}; expected one of {LAYOUTS}")
    ranks = (int(rank),) * n if isinstance(rank, int) else tuple(int(r) for r in rank)
    if len(ranks) != n:
        raise ValueError(f"layout {layout!r} takes {n} bond ranks, got {ranks}")
    if any(r < 1 for r in ranks):
        raise ValueError(f"TT ranks must be >= 1, got {ranks}")
    return ranks


def full_ranks(in_channels: int, out_channels: int, kernel_size, layout: str) -> tuple[int, ...]:
    """The smallest bond ranks at which a TT can represent *any* kernel exactly."""
    kh, kw = _pair(kernel_size)
    if layout == "ttm":
        # Unfoldings of the (kh kw, c1 s1, c2 s2) tensor: kh kw | rest, kh kw c1 s1 | c2 s2.
        (c1, c2), (s1, s2) = channel_modes(in_channels), channel_modes(out_channels)
        r0 = min(kh * kw, in_channels * out_channels)
        return (r0, min(r0 * c1 * s1, c2 * s2))
    if layout == "tt":
        # Unfoldings of the (I, kh, kw, O) tensor: I | kh kw O, I kh | kw O, I kh kw | O.
        return (
            min(in_channels, kh * kw * out_channels),
            min(in_channels * kh, kw * out_channels),
            min(in_channels * kh * kw, out_channels),
        )
    # Unfoldings of the (O I, kh, kw) tensor: O I | kh kw, O I kh | kw.
    r0 = min(out_channels * in_channels, kh * kw)
    return (r0, min(r0 * kh, kw))


def tt_param_count(in_channels: int, out_channels: int, kernel_size, rank, layout: str = "tt",
                   bias: bool = True) -> int:
    """Exact number of parameters of a :class:`TTConv2d` (cores plus bias)."""
    kh, kw = _pair(kernel_size)
    ranks = normalize_ranks(rank, layout)
    if layout == "tt":
        r1, r2, r3 = ranks
        n = in_channels * r1 + r1 * kh * r2 + r2 * kw * r3 + r3 * out_channels
    elif layout == "ttm":
        (c1, c2), (s1, s2) = channel_modes(in_channels), channel_modes(out_channels)
        r0, r1 = ranks
        n = kh * kw * r0 + r0 * c1 * s1 * r1 + r1 * c2 * s2
    else:
        r0, r1 = ranks
        n = out_channels * in_channels * r0 + r0 * kh * r1 + r1 * kw
    return n + (out_channels if bias else 0)


def dense_param_count(in_channels: int, out_channels: int, kernel_size, bias: bool = True) -> int:
    kh, kw = _pair(kernel_size)
    return out_channels * in_channels * kh * kw + (out_channels if bias else 0)


def _conv_out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def tensors_state(tensors: Iterable[torch.Tensor]) -> tuple:
    """A key that changes whenever any of ``tensors`` may have: for caches of values computed
    from weights. An in-place update (optimizer step, load_state_dict) bumps a tensor's version
    counter. Inference tensors (parameters created under torch.inference_mode) have none; they
    can only change inside inference mode, which is not how weights are updated."""
    return tuple([(None if p.is_inference() else p._version, p.data_ptr(), p.device, p.dtype) for p in tensors])


def per_image_matmul(weight: torch.Tensor, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """``weight @ x[i] (+ add)`` for every image i as one op: weight (P, Q), x (n, Q, L), add
    broadcastable to (P, L) -> (n, P, L).

    At batch 1, ``mm`` / ``addmm`` (cheaper per call: at batch 1 every op's fixed cost counts);
    else ``bmm`` / ``baddbmm`` with the weight expanded over the batch (stride 0). Not torch.matmul:
    with a weight that requires grad it copies x into a transposed layout first
    (docs/performance.md, 'Why the code is shaped this way').
    """
    n = x.shape[0]
    if n == 1:
        return (torch.mm(weight, x[0]) if add is None else torch.addmm(add, weight, x[0]))[None]
    weight = weight.expand(n, -1, -1)
    return torch.bmm(weight, x) if add is None else torch.baddbmm(add, weight, x)


class TTConv2d(nn.Module):
    """Drop-in replacement for ``nn.Conv2d`` (groups=1, dilation=1) with a TT kernel."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True, rank=2, layout: str = "tt", mode: str = "auto"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown execution mode {mode!r}; expected one of {MODES}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.layout = layout
        self.ranks = normalize_ranks(rank, layout)
        self.mode = mode
        kh, kw = self.kernel_size
        if layout == "tt":
            r1, r2, r3 = self.ranks
            shapes = [(in_channels, r1), (r1, kh, r2), (r2, kw, r3), (r3, out_channels)]
        elif layout == "ttm":
            (c1, c2), (s1, s2) = channel_modes(in_channels), channel_modes(out_channels)
            r0, r1 = self.ranks
            shapes = [(kh * kw, r0), (r0, c1, s1, r1), (r1, c2, s2)]
        else:
            r0, r1 = self.ranks
            shapes = [(out_channels, in_channels, r0), (r0, kh, r1), (r1, kw)]
        self.cores = nn.ParameterList([nn.Parameter(torch.empty(s)) for s in shapes])
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self._cache: dict[str, tuple[tuple, object]] = {}
        self._auto_modes: dict[tuple[int, int], str] = {}  # input size -> the path "auto" takes
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """Initialise so the rebuilt kernel has the variance of PyTorch's default conv init.

        ``nn.Conv2d`` draws W ~ U(-b, b) with b = 1/sqrt(fan_in), i.e. Var(W) = 1/(3 fan_in).
        The rebuilt kernel is a sum over prod(ranks) products of core entries, so each core
        gets std s with s^(2 n_cores) * prod(ranks) = Var(W).
        """
        kh, kw = self.kernel_size
        fan_in = self.in_channels * kh * kw
        target_var = 1.0 / (3.0 * fan_in)
        n_cores = len(self.cores)
        core_std = (target_var / math.prod(self.ranks)) ** (1.0 / (2 * n_cores))
        with torch.no_grad():
            for core in self.cores:
                core.normal_(0.0, core_std)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(fan_in)
                self.bias.uniform_(-bound, bound)
        self._cache = {}

    # ---------------------------------------------------------------- kernel
    def full_kernel(self) -> torch.Tensor:
        """The dense (O, I, kh, kw) kernel these cores represent."""
        if self.layout == "tt":
            u_in, g_h, g_w, u_out = self.cores
            return torch.einsum("ip,paq,qbr,ro->oiab", u_in, g_h, g_w, u_out)
        if self.layout == "ttm":
            kh, kw = self.kernel_size
            k, g1, g2 = self.cores
            w = torch.einsum("kp,pasq,qbt->stabk", k, g1, g2)  # (s1, s2, c1, c2, kh kw)
            return w.reshape(self.out_channels, self.in_channels, kh, kw)
        a, b, c = self.cores
        return torch.einsum("oip,paq,qb->oiab", a, b, c)

    def _weights(self) -> tuple[torch.Tensor, ...]:
        """The cores, then the bias if any. Read from the parameter dicts: iterating the
        ParameterList is slow, and this runs on every call
        (docs/performance.md, 'Why the code is shaped this way')."""
        cores = self._modules["cores"]._parameters.values()
        bias = self._parameters.get("bias")
        return (*cores,) if bias is None else (*cores, bias)

    def _cache_key(self) -> tuple:
        return tensors_state(self._weights())

    def _needs_grad(self, with_bias: bool = True) -> bool:
        if not torch.is_grad_enabled():
            return False
        weights = self._weights()
        n_cores = len(self.ranks) + 1  # (one core more than bonds)
        return any(p.requires_grad for p in (weights if with_bias else weights[:n_cores]))

    def chain_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``tt`` chain's three operators, in the form its forward uses them:

        * the input core transposed, (R1, I) contiguous;
        * the two spatial cores contracted into one (R3 + 1, R1, kh, kw) kernel, and its bias
          (R3 + 1,): the extra output channel has zero weights and bias 1, so the conv also
          emits a channel of ones;
        * the output core with the layer's bias as one more column, (O, R3 + 1): the bias then
          rides on the channel of ones, and the whole output is a single matrix product.

        Cached without gradients (until a core or the bias changes); a compiled graph folds or
        fuses the contraction itself.
        """
        def compute():
            u_in, g_h, g_w, u_out = self.cores
            spatial = torch.einsum("paq,qbr->rpab", g_h, g_w)
            ones = spatial.new_zeros((1,) + spatial.shape[1:])
            ones_bias = spatial.new_zeros(spatial.shape[0] + 1)
            ones_bias[-1] = 1.0
            bias = self.bias if self.bias is not None else u_out.new_zeros(self.out_channels)
            return (u_in.t().contiguous(), torch.cat([spatial, ones]), ones_bias,
                    torch.cat([u_out.t(), bias[:, None]], 1))
        if self.layout != "tt":
            raise ValueError("chain_weights needs the tt layout")
        if torch.compiler.is_compiling() or self._needs_grad():
            return compute()
        return self._cached("chain", compute)

    def ttm_chain_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``ttm`` chain's two operators: the channel cores contracted into one pixelwise
        (O R0, I) matrix, rows ordered (o, r0), and the spatial core as an (O, R0, kh, kw)
        grouped-conv kernel (the same R0 filters for every output channel). Cached like
        :meth:`chain_weights`."""
        def compute():
            k, g1, g2 = self.cores
            mix = torch.einsum("pasq,qbt->stpab", g1, g2).reshape(self.out_channels * self.ranks[0], self.in_channels)
            spatial = k.t().reshape(1, self.ranks[0], *self.kernel_size).expand(self.out_channels, -1, -1, -1)
            return mix, spatial.contiguous()
        if self.layout != "ttm":
            raise ValueError("ttm_chain_weights needs the ttm layout")
        if torch.compiler.is_compiling() or self._needs_grad(with_bias=False):
            return compute()
        return self._cached("ttm-chain", compute)

    def _cached(self, name: str, compute):
        # A kernel made under inference mode is an inference tensor, which autograd refuses to
        # save even as a constant (an attack differentiating w.r.t. the input through frozen
        # weights): such calls get their own entry, made outside inference mode.
        inference = torch.is_inference_mode_enabled()
        key = self._cache_key()
        name = name if inference else name + "/autograd"
        entry = self._cache.get(name)
        if entry is None or entry[0] != key:
            with torch.no_grad():
                entry = self._cache[name] = (key, compute())
        return entry[1]

    def cached_kernel(self) -> torch.Tensor:
        return self._cached("full", self.full_kernel)

    # --------------------------------------------------------------- forward
    def _bias(self, extra_bias: torch.Tensor | None):
        """The layer's bias plus ``extra_bias`` (either may be None)."""
        if extra_bias is None or self.bias is None:
            return self.bias if extra_bias is None else extra_bias
        return self.bias + extra_bias

    def _forward_dense(self, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding)

    def _forward_chain(self, x: torch.Tensor, extra_bias) -> torch.Tensor:
        if self.layout == "tt":
            if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
                x = x.contiguous()  # (a copy; the models run TT layers in NCHW)
            u_in_t, kernel, ones_bias, w = self.chain_weights()
            n, c, h, wd = x.shape
            z = per_image_matmul(u_in_t, x.reshape(n, c, h * wd))  # (n, R1, h*w)
            z = F.conv2d(z.view(n, -1, h, wd), kernel, ones_bias, self.stride, self.padding)  # (n, R3 + 1, ho, wo)
            ho, wo = z.shape[-2:]
            # extra_bias is added by the product itself, so the cached w is used as is.
            out = per_image_matmul(w, z.view(n, -1, ho * wo), None if extra_bias is None else extra_bias[:, None])
            return out.view(n, self.out_channels, ho, wo)
        if self.layout == "ttm":
            mix, spatial = self.ttm_chain_weights()
            n, c, h, wd = x.shape
            z = per_image_matmul(mix, x.reshape(n, c, h * wd)).view(n, -1, h, wd)  # (n, O R0, h, w)
            return F.conv2d(z, spatial, self._bias(extra_bias), self.stride, self.padding, groups=self.out_channels)
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw) = self.stride, self.padding
        bias = self._bias(extra_bias)
        a, b, c = self.cores
        r0, r1 = self.ranks
        o = self.out_channels
        # 1x1 conv to O*r0 channels, then per-output-channel (grouped) kh x 1 and 1 x kw convs.
        x = F.conv2d(x, a.permute(0, 2, 1).reshape(o * r0, self.in_channels, 1, 1))
        wb = b.permute(2, 0, 1).reshape(1, r1, r0, kh, 1).expand(o, -1, -1, -1, -1)
        x = F.conv2d(x, wb.reshape(o * r1, r0, kh, 1), stride=(sh, 1), padding=(ph, 0), groups=o)
        wc = c.reshape(1, 1, r1, 1, kw).expand(o, -1, -1, -1, -1)
        return F.conv2d(x, wc.reshape(o, r1, 1, kw), bias, stride=(1, sw), padding=(0, pw), groups=o)

    def macs(self, height: int, width: int, path: str) -> int:
        """Multiply-accumulates per image for an input of size height x width."""
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw) = self.stride, self.padding
        ho, wo = _conv_out_size(height, kh, sh, ph), _conv_out_size(width, kw, sw, pw)
        if path == "dense":
            return ho * wo * self.out_channels * self.in_channels * kh * kw
        if self.layout == "tt":
            r1, _, r3 = self.ranks
            return height * width * self.in_channels * r1 + ho * wo * r3 * (r1 * kh * kw + self.out_channels)
        if self.layout == "ttm":
            r0 = self.ranks[0]
            return height * width * self.in_channels * self.out_channels * r0 + ho * wo * self.out_channels * r0 * kh * kw
        r0, r1 = self.ranks
        o = self.out_channels
        return (height * width * self.in_channels * o * r0 + ho * width * o * r0 * r1 * kh
                + ho * wo * o * r1 * kw)

    def resolve_mode(self, x: torch.Tensor) -> str:
        """The concrete path (``rebuild``, ``chain`` or ``cached``) a call on x will take."""
        mode = self.mode
        if mode == "auto":
            size = x.shape[-2:]
            mode = self._auto_modes.get(size)
            if mode is None:  # decided once per input size: batch-1 calls are dominated by such overheads
                # The chain launches more ops than one conv (and ttm's grouped conv is slow per
                # MAC on CPU); only worth it when it saves most of the arithmetic (docs/performance.md).
                chain, dense = self.macs(*size, "chain"), self.macs(*size, "dense")
                mode = "chain" if chain * CHAIN_COST[self.layout] < dense else "cached"
                if not torch.compiler.is_compiling():
                    self._auto_modes[size] = mode
        if mode == "cached" and (torch.compiler.is_compiling() or self._needs_grad(with_bias=False)):
            mode = "rebuild"  # (the kernel has no bias)
        return mode

    def forward(self, x: torch.Tensor, extra_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution of x; ``extra_bias`` (O,), if given, is added to the bias for free."""
        mode = self.resolve_mode(x)
        if mode == "chain":
            return self._forward_chain(x, extra_bias)
        bias = self._bias(extra_bias)
        if mode == "cached":
            return self._forward_dense(x, self.cached_kernel(), bias)
        return self._forward_dense(x, self.full_kernel(), bias)

    # ------------------------------------------------------------ conversion
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank="full", layout: str = "tt", mode: str = "auto") -> "TTConv2d":
        """TT-SVD of a trained ``nn.Conv2d``: sequential truncated SVDs of the unfoldings.

        ``rank="full"`` keeps every singular value, so the TT reproduces the kernel exactly.
        """
        if conv.groups != 1 or _pair(conv.dilation) != (1, 1):
            raise ValueError("only convolutions with groups=1 and dilation=1 can be tensorized")
        if isinstance(conv.padding, str):
            raise ValueError("string padding is not supported; use integer padding")
        o, i, kh, kw = conv.weight.shape
        if rank == "full":
            rank = full_ranks(i, o, (kh, kw), layout)
        layer = cls(i, o, (kh, kw), conv.stride, conv.padding, conv.bias is not None, rank, layout, mode)
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        weight = conv.weight.detach().double()
        cores = tt_svd(weight, layer.ranks, layout)
        with torch.no_grad():
            for core, value in zip(layer.cores, cores):
                core.copy_(value.to(core.dtype))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.detach())
        return layer

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}, "
                f"layout={self.layout!r}, ranks={self.ranks}, mode={self.mode!r}")


def _truncated_split(mat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mat ~= left @ right with inner size ``rank``; singular values split evenly (sqrt)
    between the two factors so neither core is much larger than the other."""
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    left = u[:, :rank] * root
    right = root[:, None] * vh[:rank]
    return left, right


def _pad_rank(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad a core along a bond dimension when the SVD had fewer singular values."""
    if t.shape[dim] >= size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def tt_svd(weight: torch.Tensor, ranks: Sequence[int], layout: str = "tt") -> list[torch.Tensor]:
    """TT-SVD (Oseledets 2011, Alg. 1) of an (O, I, kh, kw) kernel into the layout's cores."""
    o, i, kh, kw = weight.shape
    ranks = normalize_ranks(tuple(ranks), layout)
    if layout == "tt":
        r1, r2, r3 = ranks
        t = weight.permute(1, 2, 3, 0)  # (I, kh, kw, O)
        u_in, rest = _truncated_split(t.reshape(i, kh * kw * o), r1)
        k1 = u_in.shape[1]
        g_h, rest = _truncated_split(rest.reshape(k1 * kh, kw * o), r2)
        k2 = g_h.shape[1]
        g_w, u_out = _truncated_split(rest.reshape(k2 * kw, o), r3)
        k3 = g_w.shape[1]
        cores = [u_in, g_h.reshape(k1, kh, k2), g_w.reshape(k2, kw, k3), u_out]
        cores[0] = _pad_rank(cores[0], 1, r1)
        cores[1] = _pad_rank(_pad_rank(cores[1], 0, r1), 2, r2)
        cores[2] = _pad_rank(_pad_rank(cores[2], 0, r2), 2, r3)
        cores[3] = _pad_rank(cores[3], 0, r3)
        return cores
    if layout == "ttm":
        (c1, c2), (s1, s2) = channel_modes(i), channel_modes(o)
        r0, r1 = ranks
        t = weight.reshape(s1, s2, c1, c2, kh * kw).permute(4, 2, 0, 3, 1)  # (kh kw, c1, s1, c2, s2)
        k, rest = _truncated_split(t.reshape(kh * kw, c1 * s1 * c2 * s2), r0)
        k0 = k.shape[1]
        g1, g2 = _truncated_split(rest.reshape(k0 * c1 * s1, c2 * s2), r1)
        k1 = g1.shape[1]
        cores = [_pad_rank(k, 1, r0), g1.reshape(k0, c1, s1, k1), g2.reshape(k1, c2, s2)]
        cores[1] = _pad_rank(_pad_rank(cores[1], 0, r0), 3, r1)
        cores[2] = _pad_rank(cores[2], 0, r1)
        return cores
    r0, r1 = ranks
    a, rest = _truncated_split(weight.reshape(o * i, kh * kw), r0)
    k0 = a.shape[1]
    b, c = _truncated_split(rest.reshape(k0 * kh, kw), r1)
    k1 = b.shape[1]
    cores = [a.reshape(o, i, k0), b.reshape(k0, kh, k1), c]
    cores[0] = _pad_rank(cores[0], 2, r0)
    cores[1] = _pad_rank(_pad_rank(cores[1], 0, r0), 2, r1)
    cores[2] = _pad_rank(cores[2], 0, r1)
    return cores


def is_tensorizable(conv: nn.Module, min_channels: int = 8) -> bool:
    """Convs worth a TT: spatial kernels (k > 1), groups=1, dilation=1, and at least
    ``min_channels`` channels on both sides (a 1->32 stem gains nothing from a TT)."""
    return (isinstance(conv, nn.Conv2d) and conv.groups == 1 and _pair(conv.dilation) == (1, 1)
            and max(conv.kernel_size) > 1 and not isinstance(conv.padding, str)
            and min(conv.in_channels, conv.out_channels) >= min_channels)


def tensorize(model: nn.Module, rank="full", layout: str = "tt", mode: str = "auto",
              min_channels: int = 8) -> nn.Module:
    """Replace, in place, every tensorizable ``nn.Conv2d`` of model by its TT-SVD."""
    for name, child in list(model.named_children()):
        if is_tensorizable(child, min_channels):
            setattr(model, name, TTConv2d.from_conv(child, rank, layout, mode))
        else:
            tensorize(child, rank, layout, mode, min_channels)
    return model


def tt_layers(model: nn.Module) -> Iterable[tuple[str, TTConv2d]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, TTConv2d))


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch the execution mode of every TT layer in model."""
    if mode not in MODES:
        raise ValueError(f"unknown execution mode {mode!r}; expected one of {MODES}")
    for _, layer in tt_layers(model):
        layer.mode = mode
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
