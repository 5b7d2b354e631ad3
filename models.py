"""The networks of the reproduced systems, one section per family, blocks before the networks
that use them. Training loops live in the systems' own files (systems/), scores in detectors.py
and the systems, thresholds in scoring.py; this file holds only `nn.Module`s and their forward
passes.

Families: AE (the official DCASE baseline, 2020-2025); MobileNetV2 (Sandler et al. 2018, as
torchvision lays it out, with a 1-channel input); then the losses: ArcFace (Deng et al. 2019).
"""
import math

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
# Dual-branch network with CBAM (Midea 2024, section 2.1, on Wilkinghoff's ICASSP 2023 design)
#
# Two branches, each ending in a 128-dimensional embedding, concatenated to 256: a ResNet on
# the band-limited, time-mean-removed magnitude spectrogram, and 1-D convolutions on the
# whole clip's magnitude spectrum. Layer sizes follow Wilkinghoff's published code (a 7x7
# stride-2 convolution and max pooling, then four stages of two pre-activation residual
# blocks of 16, 32, 64, 128 channels; three strided 1-D convolutions of 128 channels and four
# 128-unit dense layers); where that code puts squeeze-and-excitation, Midea puts CBAM (Woo et
# al. 2018): channel attention, then spatial attention, on each block's residual branch and
# after each 1-D convolution. Bias-free layers, as Wilkinghoff's. Left out: his l2 weight decay.

class CBAM(nn.Module):
    """Convolutional Block Attention Module on (B, C, *spatial) maps, 1-D or 2-D:
    x' = Mc(x) * x with Mc = sigmoid(MLP(avgpool x) + MLP(maxpool x)) over the spatial axes,
    then x'' = Ms(x') * x' with Ms = sigmoid(conv([mean_c x'; max_c x'])) over the channels."""

    def __init__(self, channels, *, dims=2, reduction=16, kernel=7):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(),
                                 nn.Linear(hidden, channels, bias=False))
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.spatial = conv(2, 1, kernel, padding=kernel // 2, bias=False)

    def channel_map(self, x):
        """(B, C, *S) -> (B, C, 1, ...) in (0, 1)."""
        flat = x.flatten(2)                                              # (B, C, S)
        att = self.mlp(flat.mean(dim=2)) + self.mlp(flat.amax(dim=2))    # (B, C)
        return torch.sigmoid(att).view(*att.shape, *[1] * (x.dim() - 2))

    def spatial_map(self, x):
        """(B, C, *S) -> (B, 1, *S) in (0, 1)."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(pooled))

    def forward(self, x):
        x = x * self.channel_map(x)
        return x * self.spatial_map(x)                                   # (B, C, *S)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, CBAM, plus the shortcut; a strided block's shortcut is
    2x2 max pooling and a 1x1 convolution (Wilkinghoff's)."""

    def __init__(self, n_in, n_out, stride=1):
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(n_in), nn.ReLU(), nn.Conv2d(n_in, n_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(n_out), nn.ReLU(), nn.Conv2d(n_out, n_out, 3, 1, 1, bias=False),
            CBAM(n_out, dims=2))
        self.shortcut = nn.Identity() if stride == 1 and n_in == n_out else nn.Sequential(
            nn.MaxPool2d(stride, ceil_mode=True), nn.Conv2d(n_in, n_out, 1, bias=False))

    def forward(self, x):
        return self.shortcut(x) + self.residual(x)


class SpectrogramResNet(nn.Module):
    """(B, F, T) spectrogram -> (B, 128): per-bin BatchNorm, the stem, four stages, the maximum
    over time, then a dense layer over frequency x channels (the time length is free)."""

    def __init__(self, n_bins, *, channels=(16, 32, 64, 128), embedding_dim=128):
        super().__init__()
        self.norm = nn.BatchNorm1d(n_bins)
        layers = [nn.Conv2d(1, channels[0], 7, 2, 3, bias=False), nn.BatchNorm2d(channels[0]),
                  nn.ReLU(), nn.MaxPool2d(3, 2)]
        n_in = channels[0]
        for i, c in enumerate(channels):
            layers += [PreActBlock(n_in, c, 1 if i == 0 else 2), PreActBlock(c, c)]
            n_in = c
        self.blocks = nn.Sequential(*layers, nn.BatchNorm2d(n_in), nn.ReLU())
        with torch.no_grad():                              # frequency rows left after strides
            n_rows = self.blocks(torch.zeros(2, 1, n_bins, 32)).shape[2]
        self.head = nn.Sequential(nn.BatchNorm1d(n_in * n_rows),
                                  nn.Linear(n_in * n_rows, embedding_dim, bias=False))

    def forward(self, spec):
        x = self.blocks(self.norm(spec).unsqueeze(1))       # (B, C, F', T')
        return self.head(x.amax(dim=3).flatten(1))          # (B, embedding_dim)


class SpectrumConv1d(nn.Module):
    """(B, L) magnitude spectrum -> (B, 128): three strided 1-D convolutions (128 channels;
    kernels 256, 64, 16; strides 64, 32, 4), each with BN, ReLU and CBAM, then four 128-unit
    dense layers and a linear 128-unit output."""

    def __init__(self, n_freqs, *, channels=128, embedding_dim=128):
        super().__init__()
        layers, n_in = [], 1
        for kernel, stride in ((256, 64), (64, 32), (16, 4)):
            layers += [nn.Conv1d(n_in, channels, kernel, stride, kernel // 2, bias=False),
                       nn.BatchNorm1d(channels), nn.ReLU(), CBAM(channels, dims=1)]
            n_in = channels
        self.convs = nn.Sequential(*layers)
        with torch.no_grad():
            n_flat = self.convs(torch.zeros(2, 1, n_freqs)).numel() // 2
        dense = [n_flat] + [128] * 4
        self.dense = nn.Sequential(*[nn.Sequential(nn.Linear(a, b, bias=False), nn.BatchNorm1d(b),
                                                   nn.ReLU()) for a, b in zip(dense, dense[1:])],
                                   nn.Linear(128, embedding_dim, bias=False))

    def forward(self, spectrum):
        return self.dense(self.convs(spectrum.unsqueeze(1)).flatten(1))  # (B, embedding_dim)


class DualBranch(nn.Module):
    """(spectrum (B, L), spectrogram (B, F, T)) -> (B, 256): the two branches' embeddings
    side by side."""

    def __init__(self, n_freqs, n_bins, *, branch_dim=128):
        super().__init__()
        self.spectrum = SpectrumConv1d(n_freqs, embedding_dim=branch_dim)
        self.spectrogram = SpectrogramResNet(n_bins, embedding_dim=branch_dim)
        self.embedding_dim = 2 * branch_dim

    def forward(self, spectrum, spectrogram):
        return torch.cat([self.spectrum(spectrum), self.spectrogram(spectrogram)], dim=1)


# --------------------------------------------------------------------------------------------
# Losses: AdaCos (Zhang et al., "AdaCos: Adaptively Scaling Cosine Logits", 2019) and
# sub-cluster AdaCos (Wilkinghoff, IJCNN 2021)
#
# AdaCos: logits s * cos(theta_j) with no margin, s adapted at every training step from the
# batch: s = log(B_avg) / cos(min(pi/4, theta_med)), B_avg the batch mean of
# sum_{j != y_i} exp(s_old cos theta_ij) over the non-target classes and theta_med the median
# angle to the target class (torch.median: the lower median of an even count); it starts at
# sqrt(2) log(C - 1). Sub-cluster AdaCos gives each class J centres: the probability of a class
# is the sum of the softmax over all C * J centres of its own J, the start is
# sqrt(2) log(C J - 1), the non-target sum runs over every centre of the other classes, and a
# clip's angle to a class is its angle to that class's nearest centre. With J = 1 the two are
# the same. Labels may be soft (mixup): every class with label 0 is non-target, and the angle
# is the label-weighted mean of the angles to the labelled classes. Both return log class
# probabilities (B, C); the loss is -(y * log p).sum(1).mean().

def adacos_scale(scaled_cos_nontarget, theta_target, n):
    """The adaptive scale from s_old * cos of the batch's non-target (clip, centre) pairs and
    each clip's angle to its target: log(B_avg) / cos(min(pi/4, median angle))."""
    log_b_avg = torch.logsumexp(scaled_cos_nontarget, dim=0) - math.log(n)
    return log_b_avg / torch.cos(theta_target.median().clamp(max=math.pi / 4))


class AdaCos(nn.Module):
    def __init__(self, embedding_dim, n_classes, *, trainable=True):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"AdaCos needs two classes or more, got {n_classes}")
        self.weight = nn.Parameter(torch.empty(n_classes, embedding_dim), requires_grad=trainable)
        nn.init.xavier_uniform_(self.weight)
        self.register_buffer("scale", torch.tensor(math.sqrt(2) * math.log(n_classes - 1)))

    def forward(self, x, y=None):
        """x: (B, D); y: (B, C) labels (one-hot or soft), which move the scale in training."""
        cos = F.linear(F.normalize(x), F.normalize(self.weight))        # (B, C)
        if self.training and y is not None:
            with torch.no_grad():
                theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
                self.scale.copy_(adacos_scale(self.scale * cos[y == 0], (y * theta).sum(1) /
                                              y.sum(1), len(x)))
        return F.log_softmax(self.scale * cos, dim=1)                     # (B, C)


class SubClusterAdaCos(nn.Module):
    def __init__(self, embedding_dim, n_classes, n_subclusters=16, *, trainable=True):
        super().__init__()
        if n_classes * n_subclusters < 2:
            raise ValueError("sub-cluster AdaCos needs two centres or more")
        self.n_classes, self.n_subclusters = n_classes, n_subclusters
        self.weight = nn.Parameter(torch.empty(n_classes * n_subclusters, embedding_dim),
                                   requires_grad=trainable)
        nn.init.xavier_uniform_(self.weight)
        self.register_buffer("scale", torch.tensor(
            math.sqrt(2) * math.log(n_classes * n_subclusters - 1)))

    def forward(self, x, y=None):
        """x: (B, D); y: (B, C) labels (one-hot or soft), which move the scale in training."""
        cos = F.linear(F.normalize(x), F.normalize(self.weight))        # (B, C * J)
        cos = cos.view(len(x), self.n_classes, self.n_subclusters)      # (B, C, J)
        if self.training and y is not None and bool((y == 0).any()):
            with torch.no_grad():
                theta = torch.acos(cos.amax(dim=2).clamp(-1 + 1e-7, 1 - 1e-7))   # (B, C)
                nontarget = (y == 0)[:, :, None].expand_as(cos)
                self.scale.copy_(adacos_scale(self.scale * cos[nontarget],
                                              (y * theta).sum(1) / y.sum(1), len(x)))
        logits = self.scale * cos
        return torch.logsumexp(logits, dim=2) - torch.logsumexp(logits.flatten(1), dim=1,
                                                                  keepdim=True)  # (B, C)
