"""The networks of the reproduced systems, one section per family, blocks before the networks
that use them. Training loops live in the systems' own files (systems/), scores in detectors.py
and the systems, thresholds in scoring.py; this file holds only `nn.Module`s and their forward
passes.

Families: AE (the official DCASE baseline, 2020-2025); MobileNetV2 (Sandler et al. 2018, as
torchvision lays it out, with a 1-channel input; average or average + max pooling); the
contrastive projection of Cai et al. 2021; then the losses: ArcFace (Deng et al. 2019), the
contrastive loss (Cai et al. 2021, eq. 4).
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


POOLS = ("avg", "avg+max")


class MobileNetV2(nn.Module):
    """(B, 1, H, W) images -> (B, embedding_dim) pooled features. pool="avg": global average
    pooling (the paper's); "avg+max": global average plus global max pooling, summed (GAMP, Cai
    et al. 2021, section 3.2; the sum as in the authors' code, x.mean(-1) + x.max(-1))."""

    def __init__(self, width=1.0, in_channels=1, pool="avg"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown pooling '{pool}'; valid: {', '.join(POOLS)}")
        self.pool = pool
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
        maps = self.features(x)                       # (B, embedding_dim, H / 32, W / 32)
        if self.pool == "avg+max":
            return maps.mean(dim=(-2, -1)) + maps.amax(dim=(-2, -1))   # (B, embedding_dim), GAMP
        return maps.mean(dim=(-2, -1))   # (B, embedding_dim), global average pool


# --------------------------------------------------------------------------------------------
# Contrastive projection (Cai et al., "A contrastive semi-supervised learning framework for
# anomaly sound detection", DCASE 2021 workshop, section 2.3)
#
# Two views of one input, the AE's bottleneck and the CNN's pooled feature, are each mapped by
# its own linear layer to a common width, then through one MLP with one hidden layer that both
# share, to the space where the contrastive loss (eq. 4, below) compares them. The hidden
# layer's width and the ReLU are the authors' code's (Linear, ReLU, Linear, all 256 wide).

class ContrastiveProjection(nn.Module):
    """(B, ae_dim), (B, cnn_dim) -> p, u: (B, dim) each, ready for contrastive_loss."""

    def __init__(self, ae_dim=8, cnn_dim=1280, dim=256):
        super().__init__()
        self.ae_linear = nn.Linear(ae_dim, dim)
        self.cnn_linear = nn.Linear(cnn_dim, dim)
        self.shared = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, v_ae, v_cnn):
        return self.shared(self.ae_linear(v_ae)), self.shared(self.cnn_linear(v_cnn))  # (B, dim) x2


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
# Losses: contrastive (Cai et al. 2021, equation 4)
#
# L = -sum_i log( exp(<u_i, p_i> / rho) / sum_{j != i} exp(<u_i, p_j> / rho) ): the CNN view u_i
# of example i is pulled toward the AE view p_i of the same example and pushed from the AE views
# of the batch's other examples. Written as printed: the denominator leaves the positive pair
# out (j != i). Our choices where the paper is silent: u and p are scaled to unit length first,
# as in the supervised contrastive loss it cites ([11], Khosla et al. 2020) and SimCLR; with raw
# inner products and rho = 0.07 the logits grow without bound. reduction="mean" divides the sum
# by the batch size, as the cross-entropy of eq. 2 (1/N) and the authors' code do, so that the
# three losses of eq. 5 keep comparable weights; reduction="sum" is eq. 4 exactly.

def contrastive_loss(u, p, *, temperature=0.07, reduction="mean"):
    """u, p: (B, D) two views of the same B examples, B >= 2. Returns a scalar."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unknown reduction '{reduction}'; valid: mean, sum")
    logits = F.normalize(u, dim=1) @ F.normalize(p, dim=1).T / temperature      # (B, B)
    positive = logits.diagonal()                                                 # (B,)
    others = logits.masked_fill(torch.eye(len(u), dtype=torch.bool, device=u.device),
                                float("-inf"))                                   # j != i
    loss = torch.logsumexp(others, dim=1) - positive                             # (B,)
    return loss.mean() if reduction == "mean" else loss.sum()
