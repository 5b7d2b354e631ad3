"""Narita & Tamamori 2021: intermediate representations of a trained CNN + Center-Loss VAE.

Hiroki Narita and Akira Tamamori, "Unsupervised anomalous sound detection using intermediate
representation of trained models and metric learning based variational autoencoder" (DCASE
2021 Task 2 technical report).
Features (2.1, after Rippel et al.): every convolutional block's output of a trained CNN,
averaged over time and frequency per channel, concatenated into one vector per clip
(encoders.channel_means). The paper's CNN is PANNs' ResNet38 pre-trained on AudioSet, its 16
BasicBlocks giving 3776 values, on PANNs' log-mel of the clip resampled to 32 kHz (2.3, table
2; features.panns_log_mel). Give its checkpoint with --pretrained PATH. Without one (the file
cannot be downloaded on every machine), the system trains its own extractor first: a
models.MobileNetV2 classifying the clips' sections (their attribute strings where a machine
type has one section) on the year's baseline log-mel of the whole clip; its 19 blocks give the
vector. The log, model.json ("features": "extractor") and the submission's description say
which extractor a model used.
CL-VAE (2.2, table 1): models.VAE on those vectors with a center loss per section on the
encoder's output: L = L_rec + L_kld + lambda L_C (eq. 8), lambda 150; the centres move by eq.
4-5, alpha 1.
Scores (4): eq. 9, L_rec + L_kld (submission 1); eq. 10, L_rec + L_kld + lambda L_C; and the
ensemble, eq. 9 + 0.01 x eq. 10 (submission 2, the default), each computed for one clip with
z = mu and the centre of the clip's own section.
Our choices where the paper is silent: the VAE's training (100 epochs, Adam lr 1e-3, batches
of 64; eq. 6-8 per example, averaged over the batch, see losses.vae_loss_terms), zero initial
centres, and everything about the own extractor (EXTRACTOR_* below, --width,
--extractor-epochs). The gamma threshold (2.4) is asd.py's, as for every system.
"""
import argparse
import os

import torch
import torch.nn.functional as F

import encoders
import features
import losses
import models
import train

# The paper's development-set figures for its default, System 2 (eq. 9 + 0.01 x eq. 10): table
# 6, AUC and pAUC per machine type, section and domain, PANNs ResNet38 features. (The report's
# extraction misplaces the captions of tables 5 and 6; the higher-scoring table, mean AUC
# 80.14 / 73.47, is taken as System 2's.) The paper prints column means only; the official
# score is the 2021 rule's harmonic mean of its 84 figures.
PAPER_DEV = {
    "year": 2021, "source": "Narita 2021, table 6 (System 2, eq. 9 + 0.01 x eq. 10)",
    "sections": {
        ("ToyCar", "00", "source"): {"auc": 0.7546, "pauc": 0.6821},
        ("ToyCar", "00", "target"): {"auc": 0.7980, "pauc": 0.6842},
        ("ToyCar", "01", "source"): {"auc": 0.8218, "pauc": 0.6632},
        ("ToyCar", "01", "target"): {"auc": 0.9431, "pauc": 0.8521},
        ("ToyCar", "02", "source"): {"auc": 0.8787, "pauc": 0.7053},
        ("ToyCar", "02", "target"): {"auc": 0.8228, "pauc": 0.7284},
        ("ToyTrain", "00", "source"): {"auc": 0.7148, "pauc": 0.6274},
        ("ToyTrain", "00", "target"): {"auc": 0.6525, "pauc": 0.5384},
        ("ToyTrain", "01", "source"): {"auc": 0.7444, "pauc": 0.7089},
        ("ToyTrain", "01", "target"): {"auc": 0.6888, "pauc": 0.6132},
        ("ToyTrain", "02", "source"): {"auc": 0.8323, "pauc": 0.4805},
        ("ToyTrain", "02", "target"): {"auc": 0.8224, "pauc": 0.7405},
        ("fan", "00", "source"): {"auc": 0.6555, "pauc": 0.5989},
        ("fan", "00", "target"): {"auc": 0.7059, "pauc": 0.6137},
        ("fan", "01", "source"): {"auc": 0.8013, "pauc": 0.7321},
        ("fan", "01", "target"): {"auc": 0.6842, "pauc": 0.5474},
        ("fan", "02", "source"): {"auc": 0.7446, "pauc": 0.6611},
        ("fan", "02", "target"): {"auc": 0.5778, "pauc": 0.5474},
        ("gearbox", "00", "source"): {"auc": 0.7682, "pauc": 0.6640},
        ("gearbox", "00", "target"): {"auc": 0.9427, "pauc": 0.8624},
        ("gearbox", "01", "source"): {"auc": 0.9648, "pauc": 0.8993},
        ("gearbox", "01", "target"): {"auc": 0.9586, "pauc": 0.8715},
        ("gearbox", "02", "source"): {"auc": 0.8135, "pauc": 0.6755},
        ("gearbox", "02", "target"): {"auc": 0.8125, "pauc": 0.7001},
        ("pump", "00", "source"): {"auc": 0.7246, "pauc": 0.6205},
        ("pump", "00", "target"): {"auc": 0.7117, "pauc": 0.6195},
        ("pump", "01", "source"): {"auc": 0.9343, "pauc": 0.7989},
        ("pump", "01", "target"): {"auc": 0.7417, "pauc": 0.6263},
        ("pump", "02", "source"): {"auc": 0.7366, "pauc": 0.6011},
        ("pump", "02", "target"): {"auc": 0.5934, "pauc": 0.5579},
        ("slider", "00", "source"): {"auc": 0.8094, "pauc": 0.6305},
        ("slider", "00", "target"): {"auc": 0.6102, "pauc": 0.5500},
        ("slider", "01", "source"): {"auc": 0.9391, "pauc": 0.7884},
        ("slider", "01", "target"): {"auc": 0.6951, "pauc": 0.6342},
        ("slider", "02", "source"): {"auc": 0.8194, "pauc": 0.7664},
        ("slider", "02", "target"): {"auc": 0.6359, "pauc": 0.5461},
        ("valve", "00", "source"): {"auc": 0.7885, "pauc": 0.6300},
        ("valve", "00", "target"): {"auc": 0.6673, "pauc": 0.6447},
        ("valve", "01", "source"): {"auc": 0.7607, "pauc": 0.6626},
        ("valve", "01", "target"): {"auc": 0.8484, "pauc": 0.7500},
        ("valve", "02", "source"): {"auc": 0.8222, "pauc": 0.7211},
        ("valve", "02", "target"): {"auc": 0.5150, "pauc": 0.5063},
    },
    "machines": {}, "official_score": 0.6996,
    "setting": {"anomaly_score": "ensemble", "center_weight": 150.0, "center_alpha": 1.0},
    "extractor": "PANNs ResNet38 pre-trained on AudioSet"}
SCORES = ("ensemble", "eq9", "eq10")
EXTRACTOR_LR = 1e-3      # our choice for the own extractor (not in the paper): Adam
EXTRACTOR_BATCH = 32     # clips per batch
EMBED_BATCH = 8          # clips per forward pass when extracting features
# The paper is silent on scaling the features. With our own MobileNetV2 extractor, block
# means differ in scale by orders of magnitude (the first blocks' vary by ~0.05 between clips,
# deep blocks' by ~1e-4) and can be negative (its blocks end in a linear layer), so raw squared
# errors hear only the first blocks; on synthetic 2021 valve sets the raw vectors gave the VAE
# source AUCs of 0.1-0.4 (inverted: quieter anomalous clips have smaller features), the vectors
# min-max scaled by the training clips 0.87-0.89: scaled there (--feature-scaling auto). PANNs'
# BasicBlocks end in a ReLU: their means are non-negative and fit table 1's ReLU output as they
# are, the paper's pipeline as written; no checkpoint could be had here to measure the choice,
# so auto leaves ResNet38's features raw. A dimension that barely moves in training (a dead
# channel) gets its span floored at this share of the median dimension's when scaled.
SPAN_FLOOR = 1e-2
SCALINGS = ("auto", "minmax", "none")
# The paper multiplies eq. 10 by 0.01 "to adjust the scale": in its runs eq. 10 was about 100
# times eq. 9, so that 0.01 x eq. 10 weighs about as much as eq. 9. Our features and extractor
# differ, and with them the two terms' ratio: --ensemble-weight balanced (the default) measures
# it, w = mean eq. 9 / mean eq. 10 over the training clips at the end of fit, which is the
# paper's 0.01 where its scales hold; a number gives the weight itself (0.01: the literal one).


class Narita2021:
    name = "narita2021"
    # table 1 CenterLossLayer(6): one centre per section of the dev and additional training
    training_data = dict(additional=True, paper="sections 00-05, the development and "
                                                "additional training clips (table 1: 6 centres)")
    shared_pool = None                  # one model per machine type
    quick = dict(epochs=2, batch_size=16, width=0.25, extractor_epochs=1, hidden=64,
                 bottleneck=32, latent=16)   # a smoke run: every step, no detection quality
    meta = dict(                             # the submission template's system description
        acoustic_features="PANNs log-mel (32 kHz, 64 bands, 1024 window, 320 hop) into ResNet38, "
                          "or the baseline log-mel into an own MobileNetV2; channel means of "
                          "every convolutional block",
        data_augmentation=None,
        machine_learning_method="variational autoencoder with a center loss per section "
                                "(CL-VAE) on intermediate CNN features",
        anomaly_score="reconstruction error + KL divergence (eq. 9), + weighted center loss "
                      "(eq. 10), or their ensemble eq. 9 + 0.01 x eq. 10",
        external_data_usage="AudioSet (through PANNs' pre-trained ResNet38) when --pretrained",
        pretrained_models="PANNs ResNet38 (ResNet38_mAP=0.434.pth) when --pretrained")

    @staticmethod
    def defaults(year):
        return dict(epochs=100, batch_size=64, lr=1e-3)    # the paper gives none: see above

    @staticmethod
    def add_flags(group):
        group.add_argument("--pretrained", default=None, metavar="PATH",
                           help="PANNs ResNet38 checkpoint (ResNet38_mAP=0.434.pth); without "
                                "it a MobileNetV2 section classifier is trained as extractor")
        group.add_argument("--anomaly-score", default="ensemble", choices=SCORES,
                           help="eq9: L_rec + L_kld; eq10: + lambda L_C; ensemble: eq. 9 + "
                                "--ensemble-weight x eq. 10 (the paper's submission 2)")
        group.add_argument("--ensemble-weight", type=ensemble_weight, default="balanced",
                           help="weight of eq. 10 in the ensemble score: a number, or balanced: "
                                "mean eq. 9 / mean eq. 10 on the training clips, the balance the "
                                "paper's 0.01 strikes on its scales")
        group.add_argument("--feature-scaling", default="auto", choices=SCALINGS,
                           help="min-max scale the features by the training clips; auto: for "
                                "the own extractor, not for PANNs' ResNet38 (non-negative, as "
                                "table 1's ReLU output)")
        group.add_argument("--center-weight", type=float, default=150.0,
                           help="lambda, the center loss weight (eq. 8, 10)")
        group.add_argument("--center-alpha", type=float, default=1.0,
                           help="alpha, the centre update rate (eq. 5)")
        group.add_argument("--hidden", type=int, default=1024, help="VAE hidden FCBlock width")
        group.add_argument("--bottleneck", type=int, default=512,
                           help="width of the encoder's last FCBlock (where the center loss acts)")
        group.add_argument("--latent", type=int, default=512, help="VAE latent dimensions")
        group.add_argument("--width", type=float, default=1.0,
                           help="own extractor (no --pretrained): MobileNetV2 width multiplier")
        group.add_argument("--extractor-epochs", type=int, default=20,
                           help="own extractor: section-classifier epochs (0: keep its seeded "
                                "random weights, e.g. for a machine type with one section)")

    def __init__(self, *, year, epochs=None, batch_size=None, lr=None, seed=0, device="cpu",
                 cache_dir=None, log=print, pretrained=None, anomaly_score="ensemble",
                 ensemble_weight="balanced", feature_scaling="auto", center_weight=150.0,
                 center_alpha=1.0, hidden=1024,
                 bottleneck=512, latent=512, width=1.0, extractor_epochs=20):
        paper = self.defaults(year)
        self.epochs = paper["epochs"] if epochs is None else epochs
        self.batch_size = paper["batch_size"] if batch_size is None else batch_size
        self.lr = paper["lr"] if lr is None else lr
        self.year, self.seed, self.device, self.cache_dir, self.log = year, seed, device, cache_dir, log
        if anomaly_score not in SCORES:
            raise ValueError(f"unknown anomaly score '{anomaly_score}'; valid: {', '.join(SCORES)}")
        self.anomaly_score, self.ensemble_weight = anomaly_score, ensemble_weight_of(ensemble_weight)
        if feature_scaling not in SCALINGS:
            raise ValueError(f"unknown feature scaling '{feature_scaling}'; valid: {', '.join(SCALINGS)}")
        self.minmax = feature_scaling == "minmax" or (feature_scaling == "auto" and not pretrained)
        self.weight = None if self.ensemble_weight == "balanced" else self.ensemble_weight
        self.center_weight, self.center_alpha = center_weight, center_alpha
        self.vae_sizes = dict(hidden=hidden, bottleneck=bottleneck, latent=latent)
        self.pretrained, self.width, self.extractor_epochs = pretrained, width, extractor_epochs
        if pretrained:
            self.kind, self.settings = "panns_log_mel", dict(
                features.PANNS_LOG_MEL, sr_in=features.SR,
                extractor=f"resnet38: PANNs checkpoint {pretrained}")
            # 32 frames at 32 kHz survive ResNet38's five halvings (PANNs' reflect padding
            # needs more than n_fft / 2 samples, far fewer)
            self.min_samples = 31 * 320 * features.SR // features.PANNS_SR
        else:
            self.kind, self.settings = "log_mel", dict(
                features.log_mel_settings(year),
                extractor=f"mobilenetv2 (width {width}): section classifier trained here, "
                          f"{extractor_epochs} epochs" if extractor_epochs else
                          f"mobilenetv2 (width {width}): seeded random weights, not trained")
            self.min_samples = self.settings["n_fft"] // 2 + 1   # reflect padding's minimum
        self.extractor = None        # ResNet38 or MobileNetV2, eval mode, frozen after fit
        self.mean, self.std = 0.0, 1.0                # MobileNetV2 input normalisation
        self.lo = self.span = None                    # feature scaling (SPAN_FLOOR), (D,)
        self.sections = []           # the training clips' sections: centre i is sections[i]
        self.vae = self.center = None

    # ----------------------------------------------------------------------------------------
    # Feature extraction (2.1): channel means of every convolutional block

    def log_mels(self, clips):
        """The extractor's input per clip: [(n_mels, T_i)] on the CPU (features' cache)."""
        settings = {k: v for k, v in self.settings.items() if k != "extractor"}
        return features.clip_features([c.path for c in clips], self.kind, settings,
                                      cache_dir=self.cache_dir, device=self.device, log=self.log)

    def block_outputs(self, x):
        """(B, n_mels, T) -> the extractor's block outputs used as features."""
        if self.pretrained:
            return self.extractor(x)[1:17]            # the 16 BasicBlocks: 3776 channels
        h, outputs = ((x - self.mean) / self.std).unsqueeze(1), []   # (B, 1, n_mels, T)
        for block in self.extractor.features:          # every block of MobileNetV2
            h = block(h)
            outputs.append(h)
        return outputs

    @torch.no_grad()
    def vectors(self, mels):
        """[(n_mels, T_i)] -> (N, D) feature vectors on the device; clips of one length go
        through the extractor together."""
        self.extractor.eval()
        out = [None] * len(mels)
        for length in sorted({m.shape[-1] for m in mels}):
            idx = [i for i, m in enumerate(mels) if m.shape[-1] == length]
            for start in range(0, len(idx), EMBED_BATCH):
                chunk = idx[start:start + EMBED_BATCH]
                x = torch.stack([mels[i] for i in chunk]).to(self.device)     # (B, n_mels, T)
                for i, v in zip(chunk, encoders.channel_means(self.block_outputs(x))):
                    out[i] = v
        return torch.stack(out)                                            # (N, D)

    def _load_resnet38(self):
        net = encoders.ResNet38()
        unused = encoders.load_panns_checkpoint(net, self.pretrained)
        if unused:
            self.log(f"{self.pretrained}: {len(unused)} entries ResNet38 does not use, "
                     f"e.g. {unused[0]}")
        return net.to(self.device).eval()

    def _train_extractor(self, clips, mels, workdir):
        """The own extractor: MobileNetV2 classifying the clips' sections (or attribute
        strings), whole clips cropped to the shortest one, cross-entropy, Adam."""
        with train.seeded(self.seed):
            net = models.MobileNetV2(width=self.width).to(self.device)
        length = min(m.shape[-1] for m in mels)
        x = torch.stack([m[:, :length] for m in mels]).to(self.device)   # (N, n_mels, T)
        self.mean, self.std = float(x.mean()), float(x.std())
        names, labels = classes(clips)
        if self.extractor_epochs and len(names) < 2:
            raise ValueError(f"the own extractor classifies sections or attribute strings, and "
                             f"these {len(clips)} clips have one ({names[0]}); give a PANNs "
                             f"checkpoint with --pretrained, or --extractor-epochs 0 to use the "
                             f"network's random weights")
        self.log(f"extractor: MobileNetV2 (width {self.width}) classifying {len(names)} "
                 f"classes ({', '.join(names)}), {self.extractor_epochs} epochs"
                 if self.extractor_epochs else
                 "extractor: MobileNetV2 with its seeded random weights (--extractor-epochs 0)")
        with train.seeded(self.seed):
            head = torch.nn.Linear(net.embedding_dim, len(names)).to(self.device)
        module = torch.nn.ModuleDict({"net": net, "head": head})
        opt = torch.optim.Adam(module.parameters(), lr=EXTRACTOR_LR)
        gen = torch.Generator(self.device).manual_seed(self.seed)
        labels = labels.to(self.device)
        net.train()
        for epoch in train.epochs(module, opt, gen, self.extractor_epochs,
                                  workdir / "checkpoint_extractor.pt", self.log,
                                  what="extractor epoch"):
            for idx in train.batches(len(x), EXTRACTOR_BATCH, gen):
                logits = head(net(((x[idx] - self.mean) / self.std).unsqueeze(1)))
                loss = F.cross_entropy(logits, labels[idx])
                epoch.add(train.step(opt, loss), len(idx))
        return net.eval()

    # ----------------------------------------------------------------------------------------
    # CL-VAE (2.2): VAE + center loss per section

    def fit(self, clips, workdir):
        mels = self.log_mels(clips)
        if self.pretrained:
            self.log(f"extractor: PANNs ResNet38 from {self.pretrained}")
            self.extractor = self._load_resnet38()
        else:
            self.extractor = self._train_extractor(clips, mels, workdir)
        x = self.vectors(mels)                                           # (N, D)
        self.log(f"{x.shape[1]} features per clip from {len(clips)} clips")
        self.lo, self.span = torch.zeros_like(x[0]), torch.ones_like(x[0])   # (D,)
        if self.minmax:
            self.lo = x.min(dim=0).values
            span = x.max(dim=0).values - self.lo
            self.span = span.clamp(min=SPAN_FLOOR * float(span.median()))
        x = self.scaled(x)
        self.sections = sorted({c.section for c in clips})
        y = self.section_index(clips).to(self.device)
        self._build_vae(x.shape[1])
        module = torch.nn.ModuleDict({"vae": self.vae, "center": self.center})
        opt = torch.optim.Adam(self.vae.parameters(), lr=self.lr)
        gen = torch.Generator(self.device).manual_seed(self.seed)
        self.vae.train()
        for epoch in train.epochs(module, opt, gen, self.epochs, workdir / "checkpoint_vae.pt",
                                  self.log, what="CL-VAE epoch"):
            for idx in train.batches(len(x), self.batch_size, gen):
                x_hat, mu, logvar, h = self.vae(x[idx], gen)
                rec, kld = losses.vae_loss_terms(x[idx], x_hat, mu, logvar)    # eq. 6, 7
                center = self.center(h, y[idx])                                # eq. 3
                loss = eq10(rec, kld, center, self.center_weight).mean()       # eq. 8
                epoch.add(train.step(opt, loss), len(idx))
                self.center.update(h.detach(), y[idx])                         # eq. 4-5
        self._balance(x, y)
        self._train_scores = self._score(x, y)

    @torch.no_grad()
    def _balance(self, x, y):
        """Log the two score terms on the training clips, eq. 9 and lambda L_C, and set the
        balanced ensemble weight (see --ensemble-weight)."""
        self.vae.eval()
        x_hat, mu, logvar, h = self.vae(x)
        rec, kld = losses.vae_loss_terms(x, x_hat, mu, logvar)
        e9, lc = float(eq9(rec, kld).mean()), float(self.center_weight * self.center(h, y).mean())
        balanced = e9 / (e9 + lc)
        if self.ensemble_weight == "balanced":
            self.weight = balanced
        self.log(f"training clips: eq. 9 (L_rec + L_kld) {e9:.4g}, lambda L_C {lc:.4g}: eq. 10 "
                 f"is {(e9 + lc) / e9:.3g} x eq. 9 (the paper's 0.01 balances 100 x); ensemble "
                 f"weight {self.weight:.4g} (balanced: {balanced:.4g}), weight x eq. 10 = "
                 f"{self.weight * (e9 + lc) / e9:.3g} x eq. 9 on these clips")

    def scaled(self, x):
        """Features min-max scaled by the training clips, 0 to 1 there (our choice, see
        SPAN_FLOOR), or as they are (lo 0, span 1). (N, D) -> (N, D)."""
        return (x - self.lo) / self.span

    def _build_vae(self, input_dim):
        with train.seeded(self.seed):
            self.vae = models.VAE(input_dim, **self.vae_sizes).to(self.device)
        self.center = losses.CenterLoss(len(self.sections), self.vae_sizes["bottleneck"],
                                        alpha=self.center_alpha).to(self.device)

    def section_index(self, clips):
        """Each clip's centre: the index of its section among the training sections, (N,)."""
        unknown = sorted({c.section for c in clips} - set(self.sections))
        if unknown:
            raise ValueError(f"section {unknown[0]} has no centre: the model was trained on "
                             f"sections {', '.join(self.sections)}")
        return torch.tensor([self.sections.index(c.section) for c in clips])

    # ----------------------------------------------------------------------------------------
    # Scores (eq. 9, eq. 10, the ensemble)

    @torch.no_grad()
    def _score(self, x, y):
        self.vae.eval()
        x_hat, mu, logvar, h = self.vae(x)                  # z = mu: the same score every time
        rec, kld = losses.vae_loss_terms(x, x_hat, mu, logvar)
        center = self.center(h, y)
        return anomaly_score(rec, kld, center, kind=self.anomaly_score, lam=self.center_weight,
                             weight=self.weight).double().cpu().numpy()

    def score(self, clips):
        y = self.section_index(clips).to(self.device)
        return self._score(self.scaled(self.vectors(self.log_mels(clips))), y)

    def train_scores(self):
        """The training clips' scores (in-sample), computed at the end of fit()."""
        return self._train_scores

    def n_parameters(self):
        """Of the extractor's blocks and the VAE (ResNet38's unused AudioSet head left out)."""
        net = self.extractor.features if not self.pretrained else [
            self.extractor.bn0, self.extractor.conv_block1, self.extractor.resnet]
        return (sum(p.numel() for m in net for p in m.parameters()) +
                sum(p.numel() for p in self.vae.parameters()))

    def state(self):
        """The VAE, the centres and, for the own extractor, its weights; a PANNs checkpoint is
        read again from its path (its size is kept to notice a different file)."""
        state = {"sections": self.sections, "lo": self.lo, "span": self.span, "weight": self.weight,
                 "vae": self.vae.state_dict(), "center": self.center.state_dict()}
        if self.pretrained:
            state["pretrained_bytes"] = self._checkpoint_size()
        else:
            state.update(extractor=self.extractor.state_dict(), mean=self.mean, std=self.std)
        return state

    def load_state(self, state):
        self.sections, self.lo, self.span = state["sections"], state["lo"], state["span"]
        self.weight = state.get("weight", self.weight)
        self._build_vae(len(self.lo))
        self.vae.load_state_dict(state["vae"])
        self.center.load_state_dict(state["center"])
        if self.pretrained:
            if self._checkpoint_size() != state["pretrained_bytes"]:
                raise ValueError(f"{self.pretrained}: {self._checkpoint_size()} bytes, but the "
                                 f"model was trained with a {state['pretrained_bytes']}-byte "
                                 f"checkpoint there; give it back or train again")
            self.extractor = self._load_resnet38()
        else:
            self.mean, self.std = state["mean"], state["std"]
            self.extractor = models.MobileNetV2(width=self.width).to(self.device)
            self.extractor.load_state_dict(state["extractor"])
            self.extractor.eval()

    def _checkpoint_size(self):
        try:
            return os.path.getsize(self.pretrained)
        except FileNotFoundError:
            raise ValueError(f"{self.pretrained}: no such file; the model reads its PANNs "
                             f"checkpoint from there") from None


def ensemble_weight(text):
    """--ensemble-weight: "balanced" or a number."""
    if text == "balanced":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither balanced nor a number") from None


def ensemble_weight_of(value):
    if value != "balanced" and not isinstance(value, (int, float)):
        raise ValueError(f"ensemble weight {value!r}: balanced or a number")
    return value if value == "balanced" else float(value)


def classes(clips):
    """The own extractor's classes: the clips' sections, or their attribute strings where all
    share one section (2022+ machine types). Returns (sorted names, (N,) class indices)."""
    key = (lambda c: c.section) if len({c.section for c in clips}) > 1 else (lambda c: c.attributes)
    names = sorted({key(c) for c in clips})
    return names, torch.tensor([names.index(key(c)) for c in clips])


def eq9(rec, kld):
    """L_rec + L_kld per clip (eq. 9)."""
    return rec + kld


def eq10(rec, kld, center, lam):
    """L_rec + L_kld + lambda L_C per clip (eq. 10; its batch mean is the loss of eq. 8)."""
    return rec + kld + lam * center


def anomaly_score(rec, kld, center, *, kind, lam, weight):
    """The chosen score per clip: eq. 9, eq. 10, or the ensemble eq. 9 + weight x eq. 10 (the
    paper's 0.01 brings eq. 10 to eq. 9's scale). All arguments (N,) tensors."""
    if kind == "eq9":
        return eq9(rec, kld)
    if kind == "eq10":
        return eq10(rec, kld, center, lam)
    if kind == "ensemble":
        return eq9(rec, kld) + weight * eq10(rec, kld, center, lam)
    raise ValueError(f"unknown anomaly score '{kind}'; valid: {', '.join(SCORES)}")
