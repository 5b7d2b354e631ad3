"""The networks of the reproduced systems, one section per family, blocks before the networks
that use them. Training loops, scores and thresholds live in systems.py; this file holds only
`nn.Module`s and their forward passes.

Families: AE (the official DCASE baseline, 2020-2025).
"""
import torch
from torch import nn


# --------------------------------------------------------------------------------------------
# AE: the official DCASE autoencoder baseline
#
# Dense autoencoder on 5 stacked log-mel frames (5 x 128 = 640 values): four 128-unit layers, an
# 8-unit bottleneck, four 128-unit layers and a linear 640-unit output, every hidden layer
# Linear -> BatchNorm -> ReLU (Koizumi et al., DCASE 2020 baseline; unchanged through 2025).
# The anomaly score is the reconstruction error; systems.py also fits the 2023+ baseline's
# Mahalanobis score on the reconstruction errors.

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
