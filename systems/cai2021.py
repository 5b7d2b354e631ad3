"""Cai 2021: a contrastive semi-supervised framework, AE + MobileNetV2 trained jointly.

Xinyu Cai, Heinrich Dinkel, Zhiyong Yan, Yongqing Wang, Junbo Zhang, Zhiyong Wu, Yujun Wang,
"A contrastive semi-supervised learning framework for anomaly sound detection", DCASE 2021
workshop (code: github.com/bibiaaaa/SmallRice_DCASE2021Challenge).
Input (3): log-mel spectrograms, 128 bands, 64 ms window, 32 ms hop (the year's baseline
settings, features.log_mel), median-filtered over 31 frames in each mel band (2.4, 3; see
--median-axis), scaled by the training set's mean and standard deviation, and cut into patches
of 64 frames every 8 frames (features.frame_windows) for training and scoring alike.
Training (2, eq. 5): the baseline's dense AE on the flattened 128 x 64 patch (models.AutoEncoder,
8-unit bottleneck; eq. 1, MSE) and a MobileNetV2 with global average + max pooling and a linear
classifier over the machine type's sections (eq. 2, cross-entropy), trained jointly with the
contrastive loss (eq. 4, rho 0.07) between the bottleneck and the pooled CNN feature, each
projected to 256 dimensions (models.ContrastiveProjection). Adam, 100 epochs, batches of 32
patches, the learning rate halved every 30 epochs; the model of the last epoch is kept.
Augmentations, each a flag: mixup, time
masking and frame shifting (off by default: the paper's results of table 2 use none of them
and it gives no settings for them).
Score (eq. 3): only the CNN is used: the mean over a clip's patches of log((1 - p) / p), p the
softmax probability of the clip's own section. It needs a trained classifier: on a small set
100 epochs at the authors' lr 1e-5 are a few hundred steps and leave p near 1/2 (fit() logs
the median p of the training clips and warns below 0.9; README, the BLDC sample); --score ae
scores with the jointly trained AE's reconstruction error instead.
Where the authors' code (task2/train.py, configs/contrastive.yaml) differs from the paper, the
paper is the default and the code a flag: the code weights the contrastive loss 0.0005 where
eq. 5 adds it with weight 1 (--contrastive-weight), and steps its MultiStepLR([30, 60, 90]) after
every batch, so its lr is 1/8 of the start from iteration 90 on (--lr-schedule iteration). The
authors also scored the development test clips after every epoch and reported the best epoch
(best_result): that chooses the model with the test labels, and we never do (the last epoch
is kept), so figures beside theirs may sit a few points lower for this alone.
Our choices where the paper is silent, from the authors' code where it has them: the learning
rate 1e-5 (their configuration), dropout 0.5 before the classifier (their model); the input
scaling is ours (raw dB values would make the MSE outweigh the other two losses by two orders
of magnitude). Where a machine type's training
clips have one section, the classes are its attribute sets (as shinmura2020 does); where they
have one class, eq. 3 is undefined (p = 1), and --score auto scores with the jointly trained
AE's reconstruction error instead ("inference can be performed using either model
independently", section 2), and says so.
Left out: the zero padding of clips shorter than one patch (a shorter clip is an error naming
it); the EfficientNet-B0 of their challenge submission.
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F

import augment
import features
import losses
import models
import train

# The paper's development-set figures (table 2, "+ CL, MF", our defaults): the official score
# Omega per machine type (harmonic mean of its AUCs and pAUCs) and over all, shown beside
# ours by `evaluate`. The paper gives no per-section figures.
PAPER_DEV = {
    "year": 2021, "source": "Cai 2021, table 2 (MBv2 + CL, MF; Omega per machine type)",
    "sections": {},
    "machines": {"fan": {"score": 0.6445}, "gearbox": {"score": 0.6716},
                 "slider": {"score": 0.5866}, "ToyTrain": {"score": 0.5189},
                 "ToyCar": {"score": 0.5615}, "pump": {"score": 0.5727},
                 "valve": {"score": 0.5346}},
    "official_score": 0.5799,
    "setting": {"epochs": 100, "contrastive": True, "median_filter": 31}}
PROJECTION_DIM = 256    # p, u in R^256 (eq. 4)
SCORE_BATCH = 256       # patches per forward pass when scoring
MEDIAN_AXES = {"time": -1, "frequency": -2}     # axis of a (n_mels, T) log-mel spectrogram
SCORES = ("auto", "cnn", "ae")
LR_SCHEDULES = ("epoch", "iteration")


class Cai2021:
    name = "cai2021"
    # 3: the development set's sections 00-02 (the audit found this a match)
    training_data = dict(additional=False, paper="the development set's sections 00-02")
    shared_pool = None                  # one model per machine type
    quick = dict(epochs=2, batch_size=16, width=0.25, frames=32)   # a smoke run
    meta = dict(                                # the submission template's system description
        acoustic_features="log-mel energies (128 bands, 64 ms window, 32 ms hop), median-"
                          "filtered over 31 frames, 64-frame patches every 8 frames",
        data_augmentation="median filter; optional mixup, time masking, frame shifting",
        machine_learning_method="dense autoencoder and MobileNetV2 (global average + max "
                                "pooling) section classifier trained jointly with MSE, "
                                "cross-entropy and a contrastive loss between their features",
        anomaly_score="mean over patches of log((1 - p) / p), p the softmax probability of "
                      "the clip's section (eq. 3)",
        external_data_usage=None, pretrained_models=None)

    @staticmethod
    def defaults(year):
        # section 3: 100 epochs, batch size 32; lr: the authors' configuration (Adam, 1e-5)
        return dict(epochs=100, batch_size=32, lr=1e-5)

    @staticmethod
    def add_flags(group):
        group.add_argument("--width", type=float, default=1.0, help="MobileNetV2 width multiplier")
        group.add_argument("--pool", default="avg+max", choices=models.POOLS,
                           help="MobileNetV2 pooling: avg+max is the paper's GAMP, avg the "
                                "standard global average pooling")
        group.add_argument("--frames", type=int, default=64, help="frames per patch")
        group.add_argument("--shift", type=int, default=8, help="frames between patches")
        group.add_argument("--temperature", type=float, default=0.07,
                           help="contrastive loss temperature rho (eq. 4)")
        group.add_argument("--contrastive", action=argparse.BooleanOptionalAction, default=True,
                           help="add the contrastive loss (eq. 5); --no-contrastive: MSE + CE")
        group.add_argument("--contrastive-weight", type=float, default=1.0,
                           help="weight of the contrastive loss in eq. 5 (1: the paper; the "
                                "authors' code uses 0.0005)")
        group.add_argument("--lr-step", type=int, default=30,
                           help="epochs (or iterations) between halvings of the learning rate")
        group.add_argument("--lr-schedule", default="epoch", choices=LR_SCHEDULES,
                           help="epoch: halve every --lr-step epochs (the paper); iteration: "
                                "halve after --lr-step, 2x and 3x as many iterations (the "
                                "authors' code: MultiStepLR([30, 60, 90]) stepped per batch)")
        group.add_argument("--dropout", type=float, default=0.5,
                           help="dropout before the classifier (the authors' code; the paper "
                                "is silent)")
        group.add_argument("--median-filter", type=int, default=31,
                           help="median filter window, frames (odd; 0: off)")
        # the paper says "along the frequency axis" (2.4), then "31 frames (i.e., 1 second) for
        # each filter bank respectively" (3) and "along the time axis" (4); the authors' code
        # filters each mel band along time (MedianPool2d((1, 31)) on (mel, time))
        group.add_argument("--median-axis", default="time", choices=list(MEDIAN_AXES),
                           help="median filter axis: time (each mel band on its own, as the "
                                "authors' code) or frequency (each frame on its own)")
        group.add_argument("--mixup-alpha", type=float, default=0.0,
                           help="mixup Beta(alpha, alpha) on training patches (0: off)")
        group.add_argument("--time-mask", type=int, default=0,
                           help="time masking: up to this many frames of a patch set to the "
                                "mean (0: off)")
        group.add_argument("--frame-shift", type=int, default=0,
                           help="frame shifting: patches rolled by up to this many frames "
                                "(0: off)")
        group.add_argument("--score", default="auto", choices=SCORES,
                           help="cnn: eq. 3; ae: the AE's reconstruction error; auto: eq. 3 "
                                "where training has two classes or more, else ae")

    def __init__(self, *, year, epochs=None, batch_size=None, lr=None, seed=0, device="cpu",
                 cache_dir=None, log=print, width=1.0, pool="avg+max", frames=64, shift=8,
                 temperature=0.07, contrastive=True, contrastive_weight=1.0, lr_step=30,
                 lr_schedule="epoch", dropout=0.5, median_filter=31, median_axis="time",
                 mixup_alpha=0.0, time_mask=0, frame_shift=0, score="auto"):
        paper = self.defaults(year)
        self.epochs = paper["epochs"] if epochs is None else epochs
        self.batch_size = paper["batch_size"] if batch_size is None else batch_size
        self.lr = paper["lr"] if lr is None else lr
        self.seed, self.device, self.cache_dir, self.log = seed, device, cache_dir, log
        for flag, value, valid in (("pool", pool, models.POOLS), ("score", score, SCORES),
                                   ("median axis", median_axis, tuple(MEDIAN_AXES)),
                                   ("lr schedule", lr_schedule, LR_SCHEDULES)):
            if value not in valid:
                raise ValueError(f"unknown {flag} '{value}'; valid: {', '.join(valid)}")
        if median_filter < 0 or (median_filter and median_filter % 2 == 0):
            raise ValueError(f"--median-filter must be 0 (off) or an odd window, not {median_filter}")
        self.width, self.pool, self.frames, self.shift = width, pool, frames, shift
        self.temperature, self.contrastive, self.lr_step = temperature, contrastive, lr_step
        self.contrastive_weight, self.lr_schedule = contrastive_weight, lr_schedule
        self.dropout = dropout
        self.median_filter, self.median_axis = median_filter, median_axis
        self.mixup_alpha, self.time_mask, self.frame_shift = mixup_alpha, time_mask, frame_shift
        self.score_kind = score
        self.mel = features.log_mel_settings(year)
        self.settings = dict(self.mel, frames=frames, shift=shift, median_filter=median_filter,
                             median_axis=median_axis)
        # the shortest clip that gives one patch (and that reflect padding accepts)
        self.min_samples = max((frames - 1) * self.mel["hop"], self.mel["n_fft"] // 2 + 1)
        self.mean, self.std = 0.0, 1.0
        self.class_key, self.classes = "section", []
        self.net = None

    def shorter_input(self, n_samples):
        """The --frames that a clip of n_samples gives one patch of (a 2-s clip: 63)."""
        return f"--frames {n_samples // self.mel['hop'] + 1}"

    # ----------------------------------------------------------------------------------------
    # Inputs: log-mel, median filter, scaling; classes

    def inputs(self, clips):
        """Median-filtered, scaled log-mel spectrograms of the clips: [(n_mels, T_i)], on the
        system's device."""
        mels = features.clip_features([c.path for c in clips], "log_mel", self.mel,
                                      sr=self.mel["sr"], cache_dir=self.cache_dir,
                                      device=self.device, log=self.log)
        out = []
        for m in mels:
            m = m.to(self.device)
            if self.median_filter:
                m = augment.median_filter(m, window=self.median_filter,
                                          axis=MEDIAN_AXES[self.median_axis])
            out.append((m - self.mean) / self.std)                      # (n_mels, T)
        return out

    def _classes(self, clips):
        """The classifier's classes: the sections, or the attribute sets where the training
        clips have one section (one section per machine type from 2023 on)."""
        sections = sorted({c.section for c in clips})
        if len(sections) > 1:
            return "section", sections
        return "attributes", sorted({c.attributes for c in clips})

    def _targets(self, clips):
        """Each clip's class index, or -1 where its class is not a training class (an
        anonymised evaluation clip without attributes): eq. 3 then takes the likeliest class."""
        return [self.classes.index(getattr(c, self.class_key))
                if getattr(c, self.class_key) in self.classes else -1 for c in clips]

    def network(self, n_classes):
        with train.seeded(self.seed):
            cnn = models.MobileNetV2(width=self.width, pool=self.pool)
            return torch.nn.ModuleDict({
                "ae": models.AutoEncoder(input_dim=self.mel["n_mels"] * self.frames),
                "cnn": cnn,
                "head": torch.nn.Linear(cnn.embedding_dim, n_classes),
                "projection": models.ContrastiveProjection(8, cnn.embedding_dim, PROJECTION_DIM),
            }).to(self.device)

    # ----------------------------------------------------------------------------------------
    # Training (eq. 5): MSE + cross-entropy + contrastive, lr halved every lr_step epochs

    def fit(self, clips, workdir):
        self.class_key, self.classes = self._classes(clips)
        self.mean, self.std = 0.0, 1.0                                 # inputs() unscaled
        self.scoring = self._scoring()
        mels = self.inputs(clips)                                       # (n_mels, T_i) each
        bank = torch.cat(mels, dim=1)                                   # (n_mels, sum T)
        self.mean, self.std = float(bank.mean()), float(bank.std())
        bank = (bank - self.mean) / self.std
        starts, labels = self._patch_index(mels, self._targets(clips))
        self.log(f"{len(starts)} patches of {len(clips)} clips, {len(self.classes)} classes "
                 f"({self.class_key}); score: {self.scoring}")
        self.net = self.network(len(self.classes))
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        sched = self._scheduler(opt)
        gen = torch.Generator(self.device).manual_seed(self.seed)       # draws on the device
        self.net.train()
        for epoch in train.epochs(self.net, opt, gen, self.epochs, workdir / "checkpoint.pt",
                                  self.log, scheduler=sched):
            rng = augment.numpy_rng(gen)                                # mixup's Beta draws
            for idx in train.batches(len(starts), self.batch_size, gen):
                x, y = patches(bank, starts[idx], self.frames), labels[idx]   # (B, F, frames)
                x, y_mix, lam = self._augment(x, y, gen, rng)
                loss = self.joint_loss(x, y, y_mix, lam)
                epoch.add(train.step(opt, loss), len(idx))
                if self.lr_schedule == "iteration":
                    sched.step()
            if self.lr_schedule == "epoch":
                sched.step()
        self._train_scores = self._score(self._standardise(mels), self._targets(clips))
        if self.scoring == "cnn":
            self._log_confidence(len(starts))

    def _log_confidence(self, n_patches):
        """The classifier's median p of the own class on the training clips (eq. 3 inverted:
        p = 1 / (1 + exp(A))), and a warning where it is near chance."""
        p = float(np.median(1 / (1 + np.exp(self._train_scores))))
        steps = self.epochs * (n_patches // self.batch_size + (n_patches % self.batch_size > 1))
        self.log(f"classifier: median p of the own {self.class_key} on the training clips "
                 f"{p:.2f} after {steps} steps")
        if p < 0.9:
            self.log(f"warning: the classifier has not learnt its classes (p {p:.2f} < 0.9), "
                     f"so eq. 3 ranks clips by little; give it more steps (--epochs, --lr) or "
                     f"score with --score ae")

    def _scheduler(self, opt):
        """The paper: the lr halved every lr_step epochs (StepLR, stepped per epoch). The
        authors' code: MultiStepLR at lr_step, 2 lr_step and 3 lr_step, stepped per iteration
        (ignite's ITERATION_COMPLETED), so from iteration 90 on the lr is 1/8 of its start."""
        if self.lr_schedule == "epoch":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=self.lr_step, gamma=0.5)
        return torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[self.lr_step * k for k in (1, 2, 3)], gamma=0.5)

    def _scoring(self):
        if self.score_kind == "cnn" and len(self.classes) < 2:
            raise ValueError(f"--score cnn (eq. 3) needs two classes or more; the training "
                             f"clips have one {self.class_key} ({self.classes[0]!r}); use "
                             f"--score ae or auto")
        if self.score_kind != "auto":
            return self.score_kind
        if len(self.classes) < 2:
            self.log(f"one class ({self.class_key} {self.classes[0]!r}): eq. 3 is undefined "
                     f"(p = 1); scoring with the AE's reconstruction error")
            return "ae"
        return "cnn"

    def _standardise(self, mels):
        return [(m - self.mean) / self.std for m in mels]

    def _patch_index(self, mels, targets):
        """Every patch's first frame in the concatenated spectrograms, and its class."""
        starts, labels, offset = [], [], 0
        for m, t in zip(mels, targets):
            n = 1 + (m.shape[-1] - self.frames) // self.shift          # frame_windows' count
            starts.append(offset + self.shift * torch.arange(n))
            labels += [t] * n
            offset += m.shape[-1]
        return (torch.cat(starts).to(self.device),
                torch.tensor(labels, dtype=torch.long, device=self.device))

    def _augment(self, x, y, gen, rng):
        """Time masking, frame shifting and mixup, each where its flag is on. Returns the
        patches, the mixed-in classes and the mixing weight (y and 1.0 without mixup)."""
        if self.time_mask:
            x = augment.time_mask(x, gen, max_width=self.time_mask)   # 0: the training mean
        if self.frame_shift:
            x = augment.frame_shift(x, gen, max_shift=self.frame_shift)
        if self.mixup_alpha:
            x, perm, lam = augment.mixup(x, gen, rng, alpha=self.mixup_alpha)
            return x, y[perm], lam
        return x, y, 1.0

    def joint_loss(self, x, y, y_mix, lam):
        """Eq. 5 on patches x (B, n_mels, frames) of classes y (mixed with y_mix by lam)."""
        flat = x.flatten(1)                                             # (B, n_mels * frames)
        v_ae = self.net["ae"].encoder(flat)                             # (B, 8) bottleneck
        v_cnn = self.net["cnn"](x.unsqueeze(1))                         # (B, 1280) GAMP feature
        # dropout before the classifier in training only, as the authors' code
        logits = self.net["head"](F.dropout(v_cnn, self.dropout, self.net.training))  # (B, C)
        mse = F.mse_loss(self.net["ae"].decoder(v_ae), flat)            # eq. 1
        ce = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y_mix)  # eq. 2
        if not self.contrastive:
            return mse + ce
        p, u = self.net["projection"](v_ae, v_cnn)                      # (B, 256) each
        cl = losses.contrastive_loss(u, p, temperature=self.temperature)    # eq. 4
        return mse + ce + self.contrastive_weight * cl                  # eq. 5

    # ----------------------------------------------------------------------------------------
    # Score (eq. 3): the CNN alone; the AE's reconstruction error where there is one class

    @torch.no_grad()
    def _score(self, mels, targets):
        """mels: scaled (n_mels, T_i) spectrograms; targets: class indices (-1: unknown)."""
        self.net.eval()
        scores = []
        for m, target in zip(mels, targets):
            x = features.frame_windows(m, width=self.frames, hop=self.shift)   # (P, F, frames)
            per_patch = []
            for i in range(0, len(x), SCORE_BATCH):
                xb = x[i:i + SCORE_BATCH]
                if self.scoring == "ae":
                    flat = xb.flatten(1)
                    per_patch.append(((self.net["ae"](flat) - flat) ** 2).mean(dim=1))
                else:
                    logits = self.net["head"](self.net["cnn"](xb.unsqueeze(1)))
                    per_patch.append(eq3_scores(logits, target))
            scores.append(float(torch.cat(per_patch).mean()))
        return np.array(scores)

    def score(self, clips):
        return self._score(self.inputs(clips), self._targets(clips))

    def train_scores(self):
        """The training clips' scores (in-sample), computed at the end of fit()."""
        return self._train_scores

    def n_parameters(self):
        """Of what scores: the CNN and its classifier (eq. 3), or the AE."""
        parts = ("ae",) if self.scoring == "ae" else ("cnn", "head")
        return sum(p.numel() for k in parts for p in self.net[k].parameters())

    def state(self):
        return {"model": self.net.state_dict(), "mean": self.mean, "std": self.std,
                "class_key": self.class_key, "classes": self.classes, "scoring": self.scoring}

    def load_state(self, state):
        self.mean, self.std = state["mean"], state["std"]
        self.class_key, self.classes = state["class_key"], state["classes"]
        self.scoring = state["scoring"]
        self.net = self.network(len(self.classes))
        self.net.load_state_dict(state["model"])


def patches(bank, starts, frames):
    """Patches of `frames` frames starting at `starts` (B,) in bank (n_mels, sum T).
    Returns (B, n_mels, frames)."""
    cols = starts[:, None] + torch.arange(frames, device=bank.device)   # (B, frames)
    return bank[:, cols].transpose(0, 1)                                # (B, n_mels, frames)


def eq3_scores(logits, target):
    """Eq. 3 for each patch: A = log((1 - p) / p), p = softmax(logits)[target], the clip's own
    class (target -1: the likeliest class). Computed as logsumexp_{j != target} z_j - z_target,
    the same value without the rounding of 1 - p as p nears 1. logits: (P, C), C >= 2. (P,)."""
    if target < 0:
        target = int(logits.mean(dim=0).argmax())
    own = logits[:, target]                                             # (P,)
    others = torch.cat([logits[:, :target], logits[:, target + 1:]], dim=1)   # (P, C - 1)
    return torch.logsumexp(others, dim=1) - own
