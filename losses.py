"""The losses and margin heads of the reproduced systems, one section per paper's loss: ArcFace
(Deng et al. 2019; Shinmura 2020, JLESS 2022), focal loss (Lin et al. 2017; JLESS 2022), the
VAE's terms and the center loss (Narita & Tamamori 2021; Wen et al. 2016), AdaCos and
sub-cluster AdaCos (Zhang et al. 2019; Wilkinghoff 2021; Midea 2024) and the contrastive loss
(Cai et al. 2021, eq. 4). The networks are in models.py; the systems call both. Split from
models.py when it passed ~720 lines (../shared/DESIGN.md).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


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
# Losses: focal loss (Lin et al., "Focal Loss for Dense Object Detection", 2017; JLESS eq. 5-6)
#
# The multi-class form: -(1 - p_t)^gamma log p_t, p_t the softmax probability of the true
# class, averaged over the batch. gamma = 0 is cross-entropy. (JLESS cite Mask R-CNN for it,
# reference [9]; the focal loss paper is meant.)

def focal_loss(logits, labels, *, gamma=2.0):
    """logits (B, C), labels (B,) class indices. Returns the batch mean, a scalar."""
    log_p = F.log_softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]   # (B,) log p_t
    return -((1 - log_p.exp()) ** gamma * log_p).mean()


# --------------------------------------------------------------------------------------------
# Losses: the VAE's terms and the center loss (Narita & Tamamori 2021, eq. 3-7; Wen et al.,
# "A Discriminative Feature Learning Approach for Deep Face Recognition", 2016)
#
# Both return one value per example, so that a system can average them into a batch loss and
# use the same values as a clip's anomaly score (eq. 9, 10). Eq. 6's (x_i - x_hat_i)^2 of a
# feature vector is read as its squared norm (summed over features, as the Keras VAE example
# the DCASE systems of 2021 grew from: mse * original_dim); eq. 7's sigma is the variance
# (1 + log var - mu^2 - var, the KL divergence from N(0, I)), summed over latent dimensions.

def vae_loss_terms(x, x_hat, mu, logvar):
    """Eq. 6 and eq. 7 per example: the squared reconstruction error ||x - x_hat||^2 and the
    KL divergence -1/2 sum(1 + logvar - mu^2 - exp(logvar)). Returns two (B,) tensors."""
    rec = ((x - x_hat) ** 2).sum(dim=1)
    kld = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(dim=1)
    return rec, kld


class CenterLoss(nn.Module):
    """A centre per class (a buffer, zeros at first: the paper gives no initialisation), not
    learnt by gradient but moved after each batch by eq. 4-5; forward gives eq. 3's terms."""

    def __init__(self, n_classes, dim, *, alpha=1.0):
        super().__init__()
        self.register_buffer("centers", torch.zeros(n_classes, dim))
        self.alpha = alpha

    def forward(self, h, y):
        """1/2 ||h_i - c_{y_i}||^2 per example (eq. 3). h: (B, dim), y: (B,) class indices."""
        return 0.5 * ((h - self.centers[y]) ** 2).sum(dim=1)           # (B,)

    @torch.no_grad()
    def update(self, h, y):
        """Eq. 4-5: dc_j = sum_{i: y_i = j} (c_j - h_i) / (1 + n_j), c_j <- c_j - alpha dc_j;
        a class with no example in the batch stays where it is."""
        onehot = F.one_hot(y, len(self.centers)).to(h.dtype)             # (B, C)
        n = onehot.sum(dim=0)[:, None]                                   # (C, 1)
        delta = (n * self.centers - onehot.T @ h) / (1 + n)              # (C, dim), eq. 4
        self.centers -= self.alpha * delta                               # eq. 5


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
