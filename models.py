"""The networks of the reproduced systems, one section per family, blocks before the networks
that use them. Training loops live in the systems' own files (systems/), scores in detectors.py
and the systems, thresholds in scoring.py; this file holds only `nn.Module`s and their forward
passes.

Families: AE (the official DCASE baseline, 2020-2025); MobileNetV2 (Sandler et al. 2018, as
torchvision lays it out, with a 1-channel input); then the losses: ArcFace (Deng et al. 2019).
"""
import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------------------------
# AE: the official DCASE autoencoder baseline
#
# Dense autoencoder on 5 stacked log-mel frames (5 x 128 = 640 values): four 128-unit layers, an
# 8-unit bottleneck, four 128-unit layers and a linear 640-unit output, every hidden layer
# Linear -> BatchNorm -> ReLU (Koizumi et al., DCASE 2020 baseline; unchanged through 2025).
# The anomaly score is the reconstruction error; systems/ae.py also fits the 2023+ baseline's
# Mahalanobis score on the reconstruction errors (detectors.Mahalanobis).

def dense_block(n_in, n_out):
    return nn.Sequential(nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU())


class AutoEncoder(nn.Module):
    def __init__(self, input_dim=640, hidden=128, bottleneck=8, n_hidden=4):
        super().__init__()
        widths = [input_dim] + [hidden] * n_hidden
        self.encoder = nn.Sequential(*[dense_block(a, b) for a, b in zip(widths, widths[1:])],
                                     dense_block(hidden, bottleneck))
        widths = [bottleneck] + [hidden] * n_hidden
        self.decoder = nn.Sequential(*[dense_block(a, b) for a, b in zip(widths, widths[1:])],
                                     nn.Linear(hidden, input_dim))

    def forward(self, x):
        return self.decoder(self.encoder(x))  # (B, input_dim)


# --------------------------------------------------------------------------------------------
# MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", 2018)
#
# The layer table of the paper (table 2): a 3x3 stride-2 convolution to 32 channels, seventeen
# inverted residual blocks, a 1x1 convolution to 1280 channels, global average pooling. The
# width multiplier scales every channel count (rounded to a multiple of 8, as the reference
# code does; the last layer never below 1280). One input channel: a spectrogram image. The
# classifier is left out: the systems put their own heads (softmax, ArcFace) on the embedding.

# (expansion t, output channels c, repeats n, first stride s), the paper's table 2
MOBILENETV2_BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                      (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def make_divisible(v, divisor=8):
    """Round channels to a multiple of 8, never more than 10% below v (reference code)."""
    rounded = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * v else rounded


def conv_bn_relu6(n_in, n_out, kernel, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(n_in, n_out, kernel, stride, kernel // 2, groups=groups,
                                   bias=False), nn.BatchNorm2d(n_out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, 1x1 linear projection; a skip when shapes allow."""

    def __init__(self, n_in, n_out, stride, expansion):
        super().__init__()
        hidden = n_in * expansion
        layers = [conv_bn_relu6(n_in, hidden, 1)] if expansion != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, n_out, 1, bias=False), nn.BatchNorm2d(n_out)]
        self.block = nn.Sequential(*layers)
        self.skip = stride == 1 and n_in == n_out

    def forward(self, x):
        return x + self.block(x) if self.skip else self.block(x)


class MobileNetV2(nn.Module):
    """(B, 1, H, W) images -> (B, embedding_dim) global-average-pooled features."""

    def __init__(self, width=1.0, in_channels=1):
        super().__init__()
        n_in = make_divisible(32 * width)
        layers = [conv_bn_relu6(in_channels, n_in, 3, stride=2)]
        for t, c, n, s in MOBILENETV2_BLOCKS:
            n_out = make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(n_in, n_out, s if i == 0 else 1, t))
                n_in = n_out
        self.embedding_dim = make_divisible(1280 * max(1.0, width))
        layers.append(conv_bn_relu6(n_in, self.embedding_dim, 1))
        self.features = nn.Sequential(*layers)
        for m in self.modules():                # the reference initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.features(x).mean(dim=(-2, -1))   # (B, embedding_dim), global average pool


# --------------------------------------------------------------------------------------------
# Losses: ArcFace (Deng et al., "ArcFace: Additive Angular Margin Loss", 2019, equation 3)
#
# logits_j = s * cos(theta_j + m * [j == y]), theta_j the angle between the normalised
# embedding and the normalised class weight j; cross-entropy on these logits. Without labels
# (at inference) the logits are s * cos(theta_j), no margin.

class ArcFace(nn.Module):
    def __init__(self, embedding_dim, n_classes, *, scale=30.0, margin=0.05):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = scale, margin

    def forward(self, x, labels=None):
        cos = F.linear(F.normalize(x), F.normalize(self.weight))    # (B, n_classes)
        if labels is None:
            return self.scale * cos
        theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
        margin = self.margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return self.scale * torch.cos(theta + margin)                # (B, n_classes)


# --------------------------------------------------------------------------------------------
# MobileFaceNet (Chen et al., "MobileFaceNets", 2018), as JLESS 2022 lays it out (their table 1)
#
# A 3x3 stride-2 convolution, a 3x3 depthwise convolution, fifteen bottlenecks (1x1 expansion,
# 3x3 depthwise, linear 1x1 projection; PReLU after the first two), a 1x1 convolution to 512
# channels, a *linear* global depthwise convolution (GDConv: one kernel as large as the last
# feature map, in place of global pooling), a linear 1x1 convolution to the 128-value
# embedding. The classifier (table 1's last row) is the system's head: ArcFace or a linear
# layer. Input (B, 1, F, T): 128 x 64 log-mel patches (table 1) or 512 x 32 spectrogram patches
# (the STFT variant of Morita et al. 2021: the same layers, its GDConv kernel the 32 x 2 map
# the four stride-2 stages leave). Table 1 prints the GDConv as "4x8" (time x frequency) and the
# 1x1 convolution's input as 8x4x512 (its output); both read as the original MobileFaceNet has
# them. `width` scales every channel count (1.0 is the paper; smaller ones are for tests).

# (expansion t, output channels c, repeats n, first stride s), JLESS table 1
MOBILEFACENET_BLOCKS = [(2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2),
                        (2, 128, 2, 1)]


def conv_bn(n_in, n_out, kernel, stride=1, groups=1, *, prelu=True):
    """Convolution (padding keeps the size at stride 1), BatchNorm, PReLU unless linear."""
    padding = tuple(k // 2 for k in kernel) if isinstance(kernel, tuple) else kernel // 2
    layers = [nn.Conv2d(n_in, n_out, kernel, stride, padding, groups=groups, bias=False),
              nn.BatchNorm2d(n_out)]
    return nn.Sequential(*layers, *([nn.PReLU(n_out)] if prelu else []))


class FaceBottleneck(nn.Module):
    """MobileFaceNet's bottleneck: 1x1 expansion and 3x3 depthwise with PReLU, linear 1x1
    projection; a skip when stride 1 keeps the channels."""

    def __init__(self, n_in, n_out, stride, expansion):
        super().__init__()
        hidden = n_in * expansion
        self.block = nn.Sequential(conv_bn(n_in, hidden, 1),
                                   conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                   conv_bn(hidden, n_out, 1, prelu=False))
        self.skip = stride == 1 and n_in == n_out

    def forward(self, x):
        return x + self.block(x) if self.skip else self.block(x)


class MobileFaceNet(nn.Module):
    """(B, 1, F, T) patches -> (B, embedding_dim) embeddings. F and T must be multiples of 16
    (four stride-2 stages); the GDConv kernel is the (F / 16, T / 16) map they leave."""

    def __init__(self, *, input_shape=(128, 64), width=1.0, embedding_dim=128):
        super().__init__()
        f, t = input_shape
        if f % 16 or t % 16:
            raise ValueError(f"MobileFaceNet input {f} x {t}: both sides must be multiples of 16")
        ch = lambda c: max(8, int(round(c * width)))                     # noqa: E731
        layers = [conv_bn(1, ch(64), 3, 2), conv_bn(ch(64), ch(64), 3, groups=ch(64))]
        n_in = ch(64)
        for t_, c, n, s in MOBILEFACENET_BLOCKS:
            for i in range(n):
                layers.append(FaceBottleneck(n_in, ch(c), s if i == 0 else 1, t_))
                n_in = ch(c)
        kernel = (f // 16, t // 16)                                        # 8 x 4 for 128 x 64
        layers += [conv_bn(n_in, ch(512), 1),
                   nn.Sequential(nn.Conv2d(ch(512), ch(512), kernel, groups=ch(512), bias=False),
                                 nn.BatchNorm2d(ch(512))),                 # linear GDConv
                   nn.Sequential(nn.Conv2d(ch(512), embedding_dim, 1, bias=False),
                                 nn.BatchNorm2d(embedding_dim))]           # linear 1x1
        self.features = nn.Sequential(*layers)
        self.embedding_dim = embedding_dim

    def forward(self, x):
        return self.features(x).flatten(1)          # (B, embedding_dim)


# --------------------------------------------------------------------------------------------
# DPT: dual-path transformer (Bai et al., APSIPA 2021 and DCASE 2021; JLESS 2022 section 2.2)
#
# The log-mel patch (F x T) is cut into a grid of small tiles (pf x pt values each), each tile
# embedded linearly, with a learned position per frequency row and per time column. Each
# dual-path block is a transformer encoder along time (every frequency row of tiles is one
# sequence) followed by one along frequency (every time column). Self-supervision: a share of
# the tiles is replaced by a learned mask token and a linear decoder reconstructs them (MSE);
# the mean over the tiles is the embedding, on which the system puts a machine-ID head.
# The JLESS report gives no sizes: tile 8 x 8, width 64, 2 blocks, 4 heads and pre-norm
# encoders are our choices (small enough to train on a CPU).

class DualPathBlock(nn.Module):
    """A transformer encoder along time, then one along frequency: (B, Fg, Tg, D) -> same."""

    def __init__(self, dim, heads, ff):
        super().__init__()
        layer = lambda: nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0,    # noqa: E731
                                                   batch_first=True, norm_first=True)
        self.time, self.freq = layer(), layer()

    def forward(self, x):
        b, f, t, d = x.shape
        x = self.time(x.reshape(b * f, t, d)).reshape(b, f, t, d)          # along time
        x = x.transpose(1, 2).reshape(b * t, f, d)                          # (B * Tg, Fg, D)
        return self.freq(x).reshape(b, t, f, d).transpose(1, 2)            # along frequency


class DPT(nn.Module):
    """(B, F, T) patches [, (B, Fg, Tg) bool mask of the tiles to hide] ->
    (embedding (B, dim), reconstruction of every tile (B, Fg, Tg, pf * pt))."""

    def __init__(self, *, input_shape=(128, 64), tile=(8, 8), dim=64, depth=2, heads=4):
        super().__init__()
        (f, t), (pf, pt) = input_shape, tile
        if f % pf or t % pt:
            raise ValueError(f"DPT input {f} x {t} is not a whole number of {pf} x {pt} tiles")
        self.tile, self.grid = (pf, pt), (f // pf, t // pt)
        self.embed = nn.Linear(pf * pt, dim)
        self.pos_f = nn.Parameter(0.02 * torch.randn(1, f // pf, 1, dim))
        self.pos_t = nn.Parameter(0.02 * torch.randn(1, 1, t // pt, dim))
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.blocks = nn.Sequential(*[DualPathBlock(dim, heads, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.decoder = nn.Linear(dim, pf * pt)
        self.embedding_dim = dim

    def tiles(self, x):
        """(B, F, T) -> (B, Fg, Tg, pf * pt), the reconstruction target."""
        (pf, pt), (gf, gt) = self.tile, self.grid
        x = x.reshape(len(x), gf, pf, gt, pt).transpose(2, 3)               # (B, Fg, Tg, pf, pt)
        return x.reshape(len(x), gf, gt, pf * pt)

    def forward(self, x, mask=None):
        h = self.embed(self.tiles(x))                                        # (B, Fg, Tg, D)
        if mask is not None:
            h = torch.where(mask[..., None], self.mask_token, h)
        h = self.norm(self.blocks(h + self.pos_f + self.pos_t))
        return h.mean(dim=(1, 2)), self.decoder(h)          # (B, D), (B, Fg, Tg, pf * pt)


# --------------------------------------------------------------------------------------------
# Losses: focal loss (Lin et al., "Focal Loss for Dense Object Detection", 2017; JLESS eq. 5-6)
#
# The multi-class form: -(1 - p_t)^gamma log p_t, p_t the softmax probability of the true
# class, averaged over the batch. gamma = 0 is cross-entropy. (JLESS cite Mask R-CNN for it,
# reference [9]; the focal loss paper is meant.)

def focal_loss(logits, labels, *, gamma=2.0):
    """logits (B, C), labels (B,) class indices. Returns the batch mean, a scalar."""
    log_p = F.log_softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]   # (B,) log p_t
    return -((1 - log_p.exp()) ** gamma * log_p).mean()
