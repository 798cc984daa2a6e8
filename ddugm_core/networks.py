"""NCSN++-style score network and the adapter from network output to score.

The architecture follows score_sde's "ncsnpp" U-Net: Gaussian Fourier embedding of
log(sigma), BigGAN-style residual blocks that carry the time embedding and resample with
a [1, 3, 3, 1] FIR filter, self-attention at chosen resolutions, skip connections scaled
by 1/sqrt(2), output divided by sigma. Width and depth come from :class:`NetConfig`; the
published configuration is ``NetConfig.paper()``.

Inputs and outputs are 2 channels (real, imaginary) of single 2D frames.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .profiling import stage


@dataclass
class NetConfig:
    nf: int = 32
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple = (12,)
    dropout: float = 0.0
    fourier_scale: float = 16.0
    in_channels: int = 2
    image_size: int = 96  # training size; attention resolutions are relative to it
    extra: dict = field(default_factory=dict)

    @classmethod
    def paper(cls) -> "NetConfig":
        """The published DD-UGM network: nf=128, ch_mult (1,1,2,2,2,2,2), 192 x 192."""
        return cls(nf=128, ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2, attn_resolutions=(12,),
                   dropout=0.0, image_size=192)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown network settings: {sorted(unknown)}")
        for k in ("ch_mult", "attn_resolutions"):
            if k in known:
                known[k] = tuple(int(v) for v in known[k])
        cfg = cls(**known)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """ValueError naming what cannot build a network (a width of 0 used to fail deep inside torch)."""
        if self.nf < 1 or self.num_res_blocks < 1 or self.in_channels < 1 or self.image_size < 1:
            raise ValueError(f"need nf, num_res_blocks, in_channels and image_size >= 1, got {self.nf}, "
                             f"{self.num_res_blocks}, {self.in_channels}, {self.image_size}")
        if not self.ch_mult or any(int(m) < 1 for m in self.ch_mult) or any(int(r) < 1 for r in self.attn_resolutions):
            raise ValueError(f"ch_mult needs at least one level, every multiplier and attention resolution >= 1, "
                             f"got {tuple(self.ch_mult)} and {tuple(self.attn_resolutions)}")
        if not 0 <= self.dropout < 1 or not 0 < self.fourier_scale < math.inf:
            raise ValueError(f"need dropout in [0, 1) and a finite fourier_scale > 0, got {self.dropout}, "
                             f"{self.fourier_scale}")

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this (one halving per level below the first)."""
        return 2 ** (len(self.ch_mult) - 1)


def _groups(ch: int) -> int:
    """GroupNorm groups for ``ch`` channels: min(32, ch / 4) as published, or, where that does
    not divide ``ch`` (widths that are not powers of two, e.g. nf 48: 144 channels), the
    largest divisor of ``ch`` below it. Unchanged for every width that built before."""
    g = min(32, max(1, ch // 4))
    while ch % g:
        g -= 1
    return g


class GaussianFourierEmbedding(nn.Module):
    def __init__(self, dim: int, scale: float):
        super().__init__()
        self.register_buffer("W", torch.randn(dim // 2) * scale)

    def forward(self, x):
        proj = x[:, None] * self.W[None] * 2 * math.pi
        return torch.cat([proj.sin(), proj.cos()], dim=1)


class FIRResample(nn.Module):
    """Down- or up-sampling by 2 with the separable [1, 3, 3, 1] FIR kernel (depthwise)."""

    def __init__(self, up: bool):
        super().__init__()
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        k = torch.outer(k, k)
        k = k / k.sum()
        self.up = up
        self.register_buffer("k", (k * 4 if up else k)[None, None])

    def forward(self, x):
        c = x.shape[1]
        if self.up and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            # the same operator (the kernel is [1, 3, 3, 1] / 4 along each axis): bilinear x2 of the
            # zero-padded input, cropped. oneDNN has no fast bf16 depthwise transposed convolution:
            # 8 to 20 times slower than this, a quarter of a CPU network call (tested equal)
            return F.interpolate(F.pad(x, (1, 1, 1, 1)), scale_factor=2, mode="bilinear",
                                 align_corners=False)[..., 2:-2, 2:-2]
        w = self.k.to(x.dtype).expand(c, 1, 4, 4)
        if self.up:
            return F.conv_transpose2d(x, w, stride=2, padding=1, groups=c)
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), w, stride=2, groups=c)


class ResBlock(nn.Module):
    """BigGAN residual block with time embedding and optional FIR up/down sampling."""

    def __init__(self, cin: int, cout: int, temb: int, dropout: float, up=False, down=False):
        super().__init__()
        self.norm0 = nn.GroupNorm(_groups(cin), cin, eps=1e-6)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.dense = nn.Linear(temb, cout)
        self.norm1 = nn.GroupNorm(_groups(cout), cout, eps=1e-6)
        self.drop = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.resample = FIRResample(up) if (up or down) else None
        self.skip = nn.Conv2d(cin, cout, 1) if (cin != cout or up or down) else None

    def forward(self, x, emb):
        h = F.silu(self.norm0(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.conv0(h)
        h = h + self.dense(F.silu(emb))[:, :, None, None]
        h = self.conv1(self.drop(F.silu(self.norm1(h))))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) / math.sqrt(2.0)


ATTENTION = ("window", "global")


class AttnBlock(nn.Module):
    """Self-attention over the feature map. ``window``: the side of the token grid this block
    saw in training (its level's resolution at the training size). With ``windowed`` set
    (:func:`set_attention`) a larger map attends within tiles of about that size instead of
    globally: a 256 x 208 frame has 13 times the tokens of a 64 x 64 training crop at that level,
    and global attention, quadratic in them, took most of a network call there."""

    def __init__(self, ch: int, window: int = 0):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch, eps=1e-6)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.window = int(window)
        self.windowed = False

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))
        if self.windowed and self.window and (h > self.window or w > self.window):
            a = _tiled_attention(qkv, self.window)
        else:
            q, k, v = qkv.reshape(b, 3, c, h * w).unbind(1)
            a = F.scaled_dot_product_attention(q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None],
                                               v.transpose(1, 2)[:, None])[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return (x + self.proj(a)) / math.sqrt(2.0)


def _tiled_attention(qkv: torch.Tensor, window: int) -> torch.Tensor:
    """Attention within tiles: ``qkv [B, 3C, H, W]`` -> ``[B, C, H, W]``. Each axis is cut into
    round(n / window) (at least 1) tiles of equal size, the last padded; padded tokens are masked
    out as keys, so every tile attends only to its own pixels."""
    b, c3, h, w = qkv.shape
    c = c3 // 3
    ny, nx = max(1, round(h / window)), max(1, round(w / window))
    sy, sx = -(-h // ny), -(-w // nx)
    hp, wp = sy * ny, sx * nx
    mask = None
    if (hp, wp) != (h, w):
        qkv = F.pad(qkv, (0, wp - w, 0, hp - h))
        valid = torch.zeros(hp, wp, dtype=torch.bool, device=qkv.device)
        valid[:h, :w] = True
        mask = valid.reshape(ny, sy, nx, sx).permute(0, 2, 1, 3).reshape(1, ny * nx, 1, 1, sy * sx)
        mask = mask.expand(b, -1, -1, -1, -1).reshape(b * ny * nx, 1, 1, sy * sx)
    tiles = qkv.reshape(b, c3, ny, sy, nx, sx).permute(0, 2, 4, 3, 5, 1).reshape(b * ny * nx, 1, sy * sx, c3)
    q, k, v = tiles.split(c, dim=-1)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[:, 0]
    a = a.reshape(b, ny, nx, sy, sx, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, hp, wp)
    return a[:, :, :h, :w]


def set_attention(net: nn.Module, mode: str) -> None:
    """``window``: attention blocks attend within tiles of their training size on larger maps;
    ``global``: over the whole map (as in training, where the two agree)."""
    if mode not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {mode!r}")
    for m in net.modules():
        if isinstance(m, AttnBlock):
            m.windowed = mode == "window"


class NCSNpp(nn.Module):
    """Score U-Net. ``forward(x [B, 2, H, W], sigma [B]) -> score [B, 2, H, W]`` (already / sigma)."""

    def __init__(self, config: NetConfig | None = None):
        super().__init__()
        self.config = cfg = config or NetConfig()
        nf, temb = cfg.nf, cfg.nf * 4
        self.embed = GaussianFourierEmbedding(nf * 2, cfg.fourier_scale)
        self.temb = nn.Sequential(nn.Linear(nf * 2, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(cfg.in_channels, nf, 3, padding=1)

        self.down = nn.ModuleList()
        chans, ch, res = [nf], nf, cfg.image_size
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(ResBlock(ch, nf * mult, temb, cfg.dropout))
                ch = nf * mult
                if res in cfg.attn_resolutions:
                    self.down.append(AttnBlock(ch, res))
                chans.append(ch)
            if level != len(cfg.ch_mult) - 1:
                self.down.append(ResBlock(ch, ch, temb, cfg.dropout, down=True))
                chans.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, temb, cfg.dropout), AttnBlock(ch, res),
                                  ResBlock(ch, ch, temb, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(ResBlock(ch + chans.pop(), nf * mult, temb, cfg.dropout))
                ch = nf * mult
                if res in cfg.attn_resolutions:
                    self.up.append(AttnBlock(ch, res))
            if level != 0:
                self.up.append(ResBlock(ch, ch, temb, cfg.dropout, up=True))
                res *= 2
        self.norm_out = nn.GroupNorm(_groups(ch), ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        emb = self.temb(self.embed(torch.log(sigma)))
        h = self.conv_in(x)
        hs = [h]
        for m in self.down:
            if isinstance(m, AttnBlock):
                h = m(h)
                hs[-1] = h
            else:
                h = m(h, emb)
                hs.append(h)
        for m in self.mid:
            h = m(h) if isinstance(m, AttnBlock) else m(h, emb)
        for m in self.up:
            if isinstance(m, AttnBlock):
                h = m(h)
            elif m.resample is not None:
                h = m(h, emb)
            else:
                h = m(torch.cat([h, hs.pop()], dim=1), emb)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h.float() / sigma.float()[:, None, None, None]  # in float32 also under autocast


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast speeds up the score networks on ``device``: a CPU whose oneDNN
    has native bf16 (AVX512-BF16 / AMX; elsewhere it only emulates). Not on CUDA: these small
    networks are launch-bound there, and autocast's casts cost more than bf16 saves (H200,
    default preset: 0.56 / 0.42 / 0.58 s per slice in bf16 against 0.40 / 0.34 / 0.55 s in
    float32 for the paper / cine8 / cine16 cases, PSNR within 0.02 dB)."""
    device = torch.device(device)
    if device.type == "cuda":
        return False
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


#: CPU batch size of :class:`ScoreFunction`, in pixels (bf16 activations of at most ~32 MB).
CPU_CHUNK_PIXELS = 1 << 18


class ScoreFunction:
    """Adapter: complex frames ``[B, y, x]`` and a noise level -> complex score ``[B, y, x]``.

    Pads each frame to a multiple of the network's divisor (zeros; frames of any size
    work) and crops back; runs under bf16 autocast when ``amp`` is set (callers decide
    where that pays: :func:`bf16_is_fast`).
    The network's weights are put in channels-last layout, which the (real, imaginary)
    view of complex frames already has, so no layer converts layouts (measured on the
    2-core CPU: network stage of the paper bench case 124.9 -> 120.4 s; bf16 then 75.0 s).

    With ``compile`` the network runs through ``torch.compile`` (fixed shapes; on CUDA in
    "reduce-overhead" mode, which replays CUDA graphs: the small networks here are bound by
    kernel launches there). The first call of each new frame size compiles (tens of seconds).

    On a CPU the frames go through the network in batches of about ``chunk_pixels`` pixels
    (``None``: all at once, as always on CUDA). A whole cine's x-t planes at once make
    activations of hundreds of MB, which glibc maps fresh from the kernel on every call;
    in batches of 2^18 pixels they stay in reused memory and in cache (the cine8 bench
    case, 2-core CPU: network stage 25.5 -> 19.3 s, the same results).

    ``attention``: ``window`` or ``global`` (:func:`set_attention`; the reconstructor passes its
    setting, default ``window``).
    """

    def __init__(self, net: NCSNpp, amp: bool = False, compile: bool = False,
                 chunk_pixels: int | None = CPU_CHUNK_PIXELS, attention: str = "global"):
        self.net = net.eval().to(memory_format=torch.channels_last)
        set_attention(self.net, attention)
        self.amp = amp
        self.divisor = net.config.divisor
        self._forward = self.net
        self._graphs = False
        self.chunk_pixels = chunk_pixels
        if compile:
            self._graphs = next(net.parameters()).device.type == "cuda"
            self._forward = torch.compile(self.net, mode="reduce-overhead" if self._graphs else None, dynamic=False)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        b, ny, nx = x.shape
        py, px = (-ny) % self.divisor, (-nx) % self.divisor
        chunk = b
        if self.chunk_pixels and x.device.type == "cpu":  # CPU: batches of about chunk_pixels pixels (class notes)
            chunk = max(1, self.chunk_pixels // ((ny + py) * (nx + px)))
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(b)
        outs = []
        with stage("network", b), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            for part, sp in zip(x.split(chunk), s.split(chunk)):
                if self._graphs:  # the last call's output was already copied out: its graph memory may be reused
                    torch.compiler.cudagraph_mark_step_begin()
                outs.append(complex_score(self._forward, part, sp, self.divisor))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return torch.complex(out[:, 0], out[:, 1])


def complex_score(forward, x: torch.Tensor, sigma: torch.Tensor, divisor: int) -> torch.Tensor:
    """``forward`` (a network) on complex frames ``[B, y, x]`` of any size: zero-padded to a
    multiple of ``divisor`` and cropped back; the score as real ``[B, 2, y, x]`` (float32).
    Gradients flow where the caller allows them (fine-tuning: :mod:`ddugm_core.artifacts`)."""
    _, ny, nx = x.shape
    py, px = (-ny) % divisor, (-nx) % divisor
    h = torch.view_as_real(x).permute(0, 3, 1, 2)
    if py or px:
        h = F.pad(h, (px // 2, px - px // 2, py // 2, py - py // 2))
    return forward(h, sigma).float()[:, :, py // 2: py // 2 + ny, px // 2: px // 2 + nx]


def cycle_pad(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """Frames ``[T, ...]`` continued around the cardiac cycle (frame T is frame 0 again) to a
    multiple of ``divisor`` frames, as the plane prior's training planes wrap."""
    t = x.shape[0]
    return x[torch.arange(-(-t // divisor) * divisor, device=x.device) % t]


PLANES = ("both", "xt", "yt")


class PlaneScore:
    """The score of a cine ``[T, y, x]`` under a prior of 2D spatio-temporal planes (trained
    with ``ddugm train --domain xt``): the network scores every x-t plane (one per row, all
    rows one batch) and every y-t plane (one per column), and the two are averaged.

    The time axis is padded to a multiple of the network's divisor by continuing the cardiac
    cycle (frame T is frame 0 again), as the planes were drawn in training; so any number of
    frames and any matrix size work. ``score`` is a :class:`ScoreFunction` of the xt network."""

    def __init__(self, score: ScoreFunction):
        self.score = score
        self.divisor = score.divisor

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor, planes: str = "both") -> torch.Tensor:
        """``planes``: ``both`` (the average), or only the ``xt`` or the ``yt`` planes."""
        if planes not in PLANES:
            raise ValueError(f"planes must be one of {PLANES}, got {planes!r}")
        t = x.shape[0]
        xp = cycle_pad(x, self.divisor)
        out = []
        if planes != "yt":
            out.append(self.score(xp.permute(1, 0, 2).contiguous(), sigma).permute(1, 0, 2))   # x-t planes
        if planes != "xt":
            out.append(self.score(xp.permute(2, 0, 1).contiguous(), sigma).permute(1, 2, 0))   # y-t planes
        return (out[0] if len(out) == 1 else 0.5 * (out[0] + out[1]))[:t]
