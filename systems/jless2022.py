"""JLESS 2022: batch mixing, MobileFaceNet or a dual-path transformer trained on machine IDs,
and LOF, cosine or log-softmax anomaly detectors.

Jisheng Bai et al., "JLESS submission to DCASE2022 Task 2: batch mixing strategy based method
with anomaly detector for anomalous sound detection" (technical report).
Input (3.2): 128-band log-mel (n_fft 1024, hop 512) in patches of 64 frames, or the log-power
spectrogram's lowest 512 bins in patches of 32 frames (features.log_mel, log_spectrogram).
Training (2.1-2.3): every patch labelled with its section (the machine ID), all sections of the
machine type (dev and additional training), batches mixing source and target clips
(train.domain_mixed_batches), mixup and/or FMix inside the batch (augment.py); MobileFaceNet
(table 1, STFT variant for spectrograms) or the DPT (models.py); ArcFace or focal loss on the
IDs; the DPT adds masked-tile reconstruction (MSE), its ID loss on the unmasked input, the one
it is scored on.
Score (2.4): per section, on the clip embedding (the mean of its patches' embeddings): LOF
(k = 4), cosine distance to the section's mean training embedding, the negative log-softmax of
the section's class averaged over the patches, or (DPT) log-softmax and MSE together.
RECIPES is table 3: which feature, model, loss, augmentation and detector each machine type
used in the ensemble submission; every part can also be chosen by its flag.

Our choices where the report is silent, each said where it is made: the training settings
(Adam, lr 1e-3, batches of 32, 20 epochs), a patch every 32 frames, the target domain's own
share of the data in each batch (at least one patch; --target-share for more), LOF on the raw
embeddings (--l2-normalise: unit length first), BatchNorm statistics recomputed over the
training patches where training gave some layer fewer than 44 updates (--recompute-bn; never
at the report's sizes), mixup's alpha 0.2, one of the recipe's augmentations per batch,
ArcFace's s 64 and m 0.5 and focal gamma 2 (their papers' values), the DPT's sizes, how the
log-softmax and the MSE are combined, and the classes and recipe where a machine type has one
section (OTHER, OTHER_ONE_CLASS).
"""
import argparse

import torch
import torch.nn.functional as F

import augment
import detectors
import features
import losses
import models
import train

# The paper's development-set figures for the table 3 ensemble (Submission 1), per machine
# type: the harmonic-mean AUC per domain of the table 2 row whose feature, model and detector
# table 3 picks (valve: table 2's log-mel MFN row scores valve with log-softmax, table 3 picks
# LOF), and table 4's figure for Submission 1 (no metric named; read as the machine type's
# score). No per-section figures, no official score. Shown beside ours by `evaluate`.
PAPER_DEV = {
    "year": 2022, "source": "Bai 2022, tables 2 and 4 (Submission 1, per machine type)",
    "sections": {},
    "machines": {
        "ToyCar": {"auc_source": 0.8947, "auc_target": 0.7552, "score": 0.7228},
        "ToyTrain": {"auc_source": 0.6958, "auc_target": 0.5946, "score": 0.5956},
        "bearing": {"auc_source": 0.7618, "auc_target": 0.8347, "score": 0.7231},
        "fan": {"auc_source": 0.7592, "auc_target": 0.5863, "score": 0.6671},
        "gearbox": {"auc_source": 0.8697, "auc_target": 0.8656, "score": 0.8151},
        "slider": {"auc_source": 0.9542, "auc_target": 0.7804, "score": 0.8174},
        "valve": {"auc_source": 0.8895, "auc_target": 0.8571, "score": 0.8541}},
    "official_score": None,
    "setting": {}}
# Table 3: the ensemble submission's choice per machine type
RECIPES = {
    "ToyCar":   dict(feature="stft",   model="mfn", loss="arcface", augment=("mixup",),         detector="lof"),
    "ToyTrain": dict(feature="stft",   model="mfn", loss="arcface", augment=("fmix", "mixup"), detector="lof"),
    "bearing":  dict(feature="logmel", model="dpt", loss="focal",   augment=("mixup",),         detector="log-softmax+mse"),
    "fan":      dict(feature="stft",   model="mfn", loss="arcface", augment=("fmix", "mixup"), detector="lof"),
    "gearbox":  dict(feature="logmel", model="mfn", loss="focal",   augment=("fmix", "mixup"), detector="lof"),
    "slider":   dict(feature="logmel", model="mfn", loss="focal",   augment=("fmix", "mixup"), detector="log-softmax"),
    "valve":    dict(feature="logmel", model="mfn", loss="arcface", augment=("mixup",),         detector="lof"),
}
# machine types outside table 3 (2023+ sets, your own machine): fan's and ToyTrain's column,
# the table's commonest model, loss, augmentation and detector. Where the clips give one class
# (one section, one attribute string), any machine type gets bearing's: the DPT, whose masked
# reconstruction learns without a second class (MobileFaceNet's ID loss is 0 for one class and
# teaches it nothing; each clip its own class, tried on the real RoboticArm sample, scored
# below chance)
OTHER, OTHER_ONE_CLASS = "fan", "bearing"
CHOICES = dict(feature=("stft", "logmel"), model=("mfn", "dpt"), loss=("arcface", "focal"),
               augment=("mixup", "fmix", "none"),
               detector=("lof", "cosine", "log-softmax", "log-softmax+mse"))
CLASSES = ("auto", "section", "attribute", "clip")
# the numeric flags: (flag, default, help); the section numbers are the report's
NUMBERS = [
    ("--n-fft", 1024, "STFT window, samples (3.2)"),
    ("--hop", 512, "STFT hop, samples (3.2)"),
    ("--n-mels", 128, "log-mel bands (3.2)"),
    ("--mel-frames", 64, "log-mel patch frames (3.2)"),
    ("--stft-bins", 512, "spectrogram patch bins (3.3)"),
    ("--stft-frames", 32, "spectrogram patch frames (3.2)"),
    ("--patch-hop", 32, "frames between patches (our choice: about 1 s)"),
    ("--mixup-alpha", 0.2, "mixup Beta(alpha, alpha) (our choice, the mixup paper's range)"),
    ("--fmix-alpha", 1.0, "FMix Beta(alpha, alpha) (FMix's own default)"),
    ("--fmix-decay", 3.0, "FMix spectrum decay power (FMix's own default)"),
    ("--arcface-scale", 64.0, "ArcFace scale s (the ArcFace paper's)"),
    ("--arcface-margin", 0.5, "ArcFace angular margin m, radians (the ArcFace paper's)"),
    ("--focal-gamma", 2.0, "focal loss gamma (the focal loss paper's)"),
    ("--lof-neighbors", 4, "LOF's k (2.4)"),
    ("--mfn-width", 1.0, "MobileFaceNet channel multiplier (1: table 1)"),
    ("--embedding-dim", 128, "MobileFaceNet embedding size (table 1)"),
    ("--dpt-dim", 64, "DPT token width (our choice)"),
    ("--dpt-depth", 2, "DPT dual-path blocks (our choice)"),
    ("--dpt-heads", 4, "DPT attention heads (our choice)"),
    ("--mask-ratio", 0.25, "share of DPT tiles masked and reconstructed (our choice)"),
]


class Jless2022:
    name = "jless2022"
    # table 3 "Train-sections 0,1,2,3,4,5", table 1 "linear 6": dev and additional training
    training_data = dict(additional=True, paper="sections 00-05, the development and "
                                                "additional training clips (tables 1 and 3)")
    shared_pool = None                  # one model per machine type
    quick = dict(epochs=1, batch_size=16, mfn_width=0.25, dpt_dim=16, dpt_depth=1,
                 mel_frames=32)          # 64 frames need 2.016 s; the synthetic clips are 2 s
    meta = dict(
        acoustic_features="log-mel (128 bands, 64-frame patches) or log-power spectrogram "
                          "(512 bins, 32-frame patches), n_fft 1024, hop 512",
        data_augmentation="batch mixing of source and target clips; mixup, FMix",
        machine_learning_method="MobileFaceNet or dual-path transformer trained to classify "
                                "sections (ArcFace or focal loss; DPT also masked "
                                "reconstruction), per machine type as table 3",
        anomaly_score="per section: LOF, cosine distance to the mean embedding, "
                      "log-softmax, or log-softmax and reconstruction MSE",
        external_data_usage=None, pretrained_models=None)

    @staticmethod
    def defaults(year):
        return dict(epochs=20, batch_size=32, lr=1e-3)     # the report gives none: our choice

    @staticmethod
    def add_flags(group):
        def choice(flag, what):
            group.add_argument(f"--{flag}", default="auto", choices=("auto", *CHOICES[flag]),
                               help=f"{what}; auto: the machine type's column of table 3")
        choice("feature", "input: STFT spectrogram or log-mel patches")
        choice("model", "MobileFaceNet (table 1) or dual-path transformer")
        choice("loss", "ID classification loss")
        group.add_argument("--augment", nargs="+", default=["auto"],
                           choices=("auto", *CHOICES["augment"]),
                           help="augmentations inside the mixed batch, one drawn per batch; "
                                "auto: table 3")
        choice("detector", "anomaly detector on the clip embeddings")
        group.add_argument("--classes", default="auto", choices=CLASSES,
                           help="training classes; auto: sections, else attribute strings "
                                "(one-section sets, not in the report); clip: each clip its own")
        group.add_argument("--batch-mixing", action=argparse.BooleanOptionalAction, default=True,
                           help="source and target clips in every batch (2.1)")
        group.add_argument("--target-share", type=float, default=None,
                           help="share of each mixed batch from the target domain; default: "
                                "the target patches' own share of the training data (2.1 "
                                "'randomly mixes'), at least one per batch")
        group.add_argument("--l2-normalise", action=argparse.BooleanOptionalAction,
                           default=False, help="scale each patch embedding to unit length "
                           "before the clip mean that LOF and cosine see (ArcFace trains only "
                           "their direction; the report is silent)")
        group.add_argument("--recompute-bn", default="auto", choices=("auto", "always", "never"),
                           help="recompute BatchNorm statistics over the training patches after "
                                "training; auto: only where some BatchNorm layer had too few "
                                "updates to forget its start (train.BN_RESIDUE; the report is "
                                "silent, and at its sizes auto never fires)")
        group.add_argument("--dpt-tile", type=int, nargs=2, default=[8, 8],
                           help="DPT tile, bins x frames (our choice)")
        for flag, default, about in NUMBERS:
            group.add_argument(flag, type=type(default), default=default, help=about)

    def __init__(self, *, year, epochs=None, batch_size=None, lr=None, seed=0, device="cpu",
                 cache_dir=None, log=print, feature="auto", model="auto", loss="auto",
                 augment=("auto",), detector="auto", classes="auto", n_fft=1024, hop=512,
                 n_mels=128, mel_frames=64, stft_bins=512, stft_frames=32, patch_hop=32,
                 batch_mixing=True, target_share=None, l2_normalise=False, recompute_bn="auto",
                 mixup_alpha=0.2, fmix_alpha=1.0,
                 fmix_decay=3.0, arcface_scale=64.0, arcface_margin=0.5, focal_gamma=2.0,
                 lof_neighbors=4, mfn_width=1.0, embedding_dim=128, dpt_dim=64, dpt_depth=2,
                 dpt_heads=4, dpt_tile=(8, 8), mask_ratio=0.25):
        paper = self.defaults(year)
        self.epochs = paper["epochs"] if epochs is None else epochs
        self.batch_size = paper["batch_size"] if batch_size is None else batch_size
        self.lr = paper["lr"] if lr is None else lr
        self.seed, self.device, self.cache_dir, self.log = seed, device, cache_dir, log
        self.asked = dict(feature=feature, model=model, loss=loss, augment=tuple(augment),
                          detector=detector)
        for part, value in self.asked.items():
            for v in (value if part == "augment" else (value,)):
                if v != "auto" and v not in CHOICES[part]:
                    raise ValueError(f"unknown {part} '{v}'; valid: auto, {', '.join(CHOICES[part])}")
        if classes not in CLASSES:
            raise ValueError(f"unknown classes '{classes}'; valid: {', '.join(CLASSES)}")
        self.classes_from = classes
        pad = features.log_mel_settings(year)["pad_mode"]
        self.settings = dict(
            logmel=dict(features.log_mel_settings(year), n_fft=n_fft, hop=hop, n_mels=n_mels),
            stft=dict(n_fft=n_fft, hop=hop, n_bins=stft_bins, pad_mode=pad),
            frames=dict(logmel=mel_frames, stft=stft_frames), patch_hop=patch_hop)
        self.batch_mixing, self.target_share = batch_mixing, target_share
        self.l2_normalise, self.recompute_bn = l2_normalise, recompute_bn
        self.mixup_alpha, self.fmix_alpha, self.fmix_decay = mixup_alpha, fmix_alpha, fmix_decay
        self.arcface = dict(scale=arcface_scale, margin=arcface_margin)
        self.focal_gamma, self.lof_neighbors = focal_gamma, lof_neighbors
        self.mfn = dict(width=mfn_width, embedding_dim=embedding_dim)
        self.dpt = dict(dim=dpt_dim, depth=dpt_depth, heads=dpt_heads, tile=tuple(dpt_tile))
        self.mask_ratio = mask_ratio
        self.recipe = None           # resolved in fit() from the machine type (table 3)

    def resolve(self, machine, n_classes=2):
        """The recipe for a machine type: table 3's column (outside it OTHER), or, where the
        clips give one class, OTHER_ONE_CLASS's for any machine type; where the flags say auto."""
        table = (RECIPES.get(machine, RECIPES[OTHER]) if n_classes >= 2
                 else RECIPES[OTHER_ONE_CLASS])
        recipe = {k: table[k] if v in ("auto", ("auto",)) else v for k, v in self.asked.items()}
        recipe["augment"] = tuple(a for a in recipe["augment"] if a != "none")
        if recipe["detector"] == "log-softmax+mse" and recipe["model"] != "dpt":
            raise ValueError("--detector log-softmax+mse needs --model dpt (the MSE is the "
                             "DPT's reconstruction error)")
        if n_classes < 2 and recipe["model"] == "mfn":
            raise ValueError(f"{machine}: the training clips give one class (section and "
                             f"attributes); MobileFaceNet learns from two or more: use "
                             f"--model dpt or --classes clip")
        return recipe

    @property
    def min_samples(self):
        """The shortest clip that gives one patch of the chosen input; before fit() has chosen
        the recipe, of the input that needs less (fit() then checks the chosen one's)."""
        kinds = [self.recipe["feature"]] if self.recipe else list(self.settings["frames"])
        return min((self.settings["frames"][k] - 1) * self.settings["stft"]["hop"] for k in kinds)

    def shorter_input(self, n_samples, kind=None):
        """The patch-frames flag that a clip of n_samples gives one patch of: frames a
        multiple of 16 (MobileFaceNet) or of the DPT's tile (e.g. 2 s: --mel-frames 48)."""
        kind = kind or (self.recipe or {}).get("feature", "logmel")
        model = (self.recipe or {}).get("model", "mfn")
        step = 16 if model == "mfn" else self.dpt["tile"][1]
        frames = (n_samples // self.settings["stft"]["hop"] + 1) // step * step
        return f"--{'mel' if kind == 'logmel' else 'stft'}-frames {frames}"

    # ----------------------------------------------------------------------------------------
    # Input: patches of every clip (3.2)

    def patches(self, clips):
        """Every clip's patches, normalised: ((P, F, T) on the device, (P,) clip index)."""
        kind = self.recipe["feature"]
        name = "log_mel" if kind == "logmel" else "log_spectrogram"
        feats = features.clip_features([c.path for c in clips], name, self.settings[kind],
                                       cache_dir=self.cache_dir, device=self.device, log=self.log)
        width = self.settings["frames"][kind]
        hop = self.settings["stft"]["hop"]
        for clip, f in zip(clips, feats):          # the recipe's input, chosen after the check
            if f.shape[-1] < width:
                raise features.AudioError(
                    f"{clip.path}: {f.shape[-1]} frames, fewer than the {width} of one {kind} "
                    f"patch of this recipe; remove it, record a longer clip, or shorten the "
                    f"input: {self.shorter_input((f.shape[-1] - 1) * hop, kind)}")
        windows = [features.frame_windows(f, width=width, hop=self.settings["patch_hop"])
                   for f in feats]
        owner = torch.cat([torch.full((len(w),), i) for i, w in enumerate(windows)])
        x = torch.cat(windows).to(self.device)                             # (P, F, T)
        return (x - self.mean) / self.std, owner

    def class_keys(self, clips):
        """Each clip's class: its section, attribute string, or itself (--classes)."""
        by = self.classes_from
        if by == "auto":
            by = next((b for b in ("section", "attribute")
                       if len({self._key(c, b) for c in clips}) >= 2), "section")
        self.log(f"classes: {by}s ({len({self._key(c, by) for c in clips})})")
        return [self._key(c, by) for c in clips]

    @staticmethod
    def _key(clip, by):
        return {"section": clip.section, "attribute": f"{clip.section}/{clip.attributes}",
                "clip": f"{clip.section}/{clip.name}"}[by]

    # ----------------------------------------------------------------------------------------
    # Training (2.1-2.3)

    def build(self, n_classes):
        shape = (self.settings["stft"]["n_bins"] if self.recipe["feature"] == "stft"
                 else self.settings["logmel"]["n_mels"],
                 self.settings["frames"][self.recipe["feature"]])
        with train.seeded(self.seed):
            if self.recipe["model"] == "mfn":
                self.net = models.MobileFaceNet(input_shape=shape, **self.mfn)
            else:
                self.net = models.DPT(input_shape=shape, **self.dpt)
            dim = self.net.embedding_dim
            self.head = (losses.ArcFace(dim, n_classes, **self.arcface)
                         if self.recipe["loss"] == "arcface" else torch.nn.Linear(dim, n_classes))
        self.net.to(self.device), self.head.to(self.device)

    def fit(self, clips, workdir):
        keys = self.class_keys(clips)
        self.classes = sorted(set(keys))
        self.recipe = self.resolve(clips[0].machine, len(self.classes))
        self.log(f"recipe for {clips[0].machine}: " + ", ".join(
            f"{k} {'+'.join(v) if isinstance(v, tuple) else v}" for k, v in self.recipe.items())
            + (f" ({OTHER_ONE_CLASS}'s: the clips give one class)" if len(self.classes) < 2
               else ""))
        self.mean, self.std = 0.0, 1.0
        x, owner = self.patches(clips)
        self.mean, self.std = float(x.mean()), float(x.std())
        x = (x - self.mean) / self.std
        labels = torch.tensor([self.classes.index(k) for k in keys])[owner].to(self.device)
        is_target = torch.tensor([c.domain == "target" for c in clips])[owner].to(self.device)
        self.build(len(self.classes))
        module = torch.nn.ModuleDict({"net": self.net, "head": self.head})
        opt = torch.optim.Adam(module.parameters(), lr=self.lr)
        gen = torch.Generator(self.device).manual_seed(self.seed)
        module.train()
        for epoch in train.epochs(module, opt, gen, self.epochs, workdir / "checkpoint.pt",
                                  self.log):
            rng = augment.numpy_rng(gen)                         # the Beta draws of the epoch
            for idx in self._batches(is_target, gen):
                epoch.add(train.step(opt, self._loss(x[idx], labels[idx], gen, rng)), len(idx))
        self._settle_batchnorm(x)
        self._fit_detectors(clips, x, owner)

    def _settle_batchnorm(self, x):
        """--recompute-bn: after few updates (a small set: BLDC's 40 clips give 40 in 20
        epochs; the 2022 dev set thousands) the running statistics still hold much of their
        start, and in eval mode MobileFaceNet maps every clip to almost one point (train.
        BN_RESIDUE); they are then recomputed over the training patches, unaugmented, as they
        are scored (the DPT has no BatchNorm)."""
        if not train.batchnorms(self.net) or self.recompute_bn == "never" or (
                self.recompute_bn == "auto" and not train.bn_unsettled(self.net)):
            return
        self.log(f"BatchNorm statistics recomputed over the training patches (fewest updates "
                 f"of a layer: {train.bn_updates(self.net)})")
        train.recompute_bn(self.net, x[:, None], self.batch_size)

    def _batches(self, is_target, gen):
        if self.batch_mixing:
            return train.domain_mixed_batches(is_target, self.batch_size, gen,
                                              target_share=self.batch_target_share(is_target))
        return train.batches(len(is_target), self.batch_size, gen)

    def batch_target_share(self, is_target):
        """--target-share, or the target patches' own share of the training data: the report
        "randomly mixes" the two domains (2.1) and gives no share. domain_mixed_batches puts
        at least one target patch in every batch (2022 dev: 1 of 32, so each target patch is
        seen about 4 times an epoch, not the 33 times of a fixed quarter)."""
        if self.target_share is not None:
            return self.target_share
        return float(is_target.float().mean())

    def _loss(self, xb, yb, gen, rng):
        """One batch's loss: augmentation, ID loss on mixed labels, DPT's masked MSE."""
        lam, perm = 1.0, None
        kinds = self.recipe["augment"]
        if kinds:          # one of the recipe's augmentations per batch (the report is silent),
            kind = kinds[int(rng.integers(len(kinds)))]   # drawn on the host: no device sync
            if kind == "mixup":
                xb, perm, lam = augment.mixup(xb, gen, rng, alpha=self.mixup_alpha)
            else:
                xb, perm, lam = augment.fmix(xb, gen, rng, alpha=self.fmix_alpha,
                                             decay=self.fmix_decay)
        mse = 0.0
        if self.recipe["model"] == "dpt":
            mask = torch.rand((len(xb), *self.net.grid), generator=gen, device=gen.device)
            mask = mask < self.mask_ratio
            _, rec = self.net(xb, mask)
            mse = ((rec - self.net.tiles(xb)) ** 2).mean(dim=-1)[mask].mean()
            # the ID loss on the unmasked input, the input it is scored on (2.4): the report
            # names masked reconstruction and ID training as two strategies (2.2)
            emb, _ = self.net(xb)
        else:
            emb = self.net(xb[:, None])
        # mixed labels (eq. 2): both losses are linear in the one-hot target, so the loss of
        # the mixed label is the mix of the two labels' losses
        loss = lam * self._id_loss(emb, yb)
        if perm is not None and lam < 1:
            loss = loss + (1 - lam) * self._id_loss(emb, yb[perm])
        return loss + mse

    def _id_loss(self, emb, y):
        if self.recipe["loss"] == "arcface":
            return F.cross_entropy(self.head(emb, y), y)                    # eq. 4
        return losses.focal_loss(self.head(emb), y, gamma=self.focal_gamma)    # eq. 5-6

    # ----------------------------------------------------------------------------------------
    # Score (2.4): per section, on clip embeddings

    @torch.no_grad()
    def _outputs(self, x, owner, n_clips, batch=64):
        """Per clip: mean embedding (n, D), logits (n, P_i, C) as a list, MSE (n,) (DPT)."""
        self.net.eval(), self.head.eval()
        embs, logits, mses = [], [], []
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            if self.recipe["model"] == "dpt":
                emb, _ = self.net(xb)
                mses.append(self._masked_mse(xb))
            else:
                emb = self.net(xb[:, None])
            logits.append(self.head(emb).cpu())
            embs.append((F.normalize(emb, dim=1) if self.l2_normalise else emb).cpu())
        embs, logits = torch.cat(embs), torch.cat(logits)
        per_clip = [(owner == i).nonzero().flatten() for i in range(n_clips)]
        mse = torch.cat(mses) if mses else torch.zeros(len(x))
        return (torch.stack([embs[p].mean(0) for p in per_clip]), [logits[p] for p in per_clip],
                torch.stack([mse[p].mean() for p in per_clip]).double())

    def _masked_mse(self, xb):
        """Each tile hidden once: the tiles split into 1 / mask_ratio fixed groups (a seeded
        permutation), one pass per group; the mean squared error over every tile, (B,)."""
        n_tiles = self.net.grid[0] * self.net.grid[1]
        n_groups = max(1, round(1 / self.mask_ratio))
        order = torch.randperm(n_tiles, generator=torch.Generator().manual_seed(self.seed))
        group = torch.empty(n_tiles, dtype=torch.long)
        group[order] = torch.arange(n_tiles) % n_groups
        group = group.reshape(self.net.grid).to(xb.device)
        target, err = self.net.tiles(xb), torch.zeros(len(xb), device=xb.device)
        for g in range(n_groups):
            mask = (group == g).expand(len(xb), -1, -1)
            _, rec = self.net(xb, mask)
            err += (((rec - target) ** 2).mean(dim=-1) * mask).sum(dim=(1, 2))
        return (err / n_tiles).cpu()

    def _fit_detectors(self, clips, x, owner):
        emb, logits, mse = self._outputs(x, owner, len(clips))
        self.sections = sorted({c.section for c in clips})
        self.detectors, self.norms = {}, {}
        scores = torch.zeros(len(clips), dtype=torch.float64)
        for s in self.sections:
            rows = [i for i, c in enumerate(clips) if c.section == s]
            det = self.recipe["detector"]
            if det in ("lof", "cosine"):
                d = detectors.LOF(self.lof_neighbors) if det == "lof" else detectors.CosineToMean()
                self.detectors[s] = d.fit(emb[rows])
                scores[rows] = d.train_scores().cpu()
            else:
                lsm = self._log_softmax(s, [logits[i] for i in rows])
                self.norms[s] = [float(v.std()) + 1e-12 for v in (lsm, mse[rows])]
                scores[rows] = self._combine(s, lsm, mse[rows])
        self._train_scores = scores.numpy()

    def _log_softmax(self, section, logits):
        """Per clip, the mean over its patches of -log p of the section's most probable class
        (the section itself where the classes are sections). (n,) float64."""
        own = torch.tensor([i for i, k in enumerate(self.classes) if k.split("/")[0] == section])
        return torch.stack([detectors.log_softmax_score(
            lg[:, None].expand(-1, len(own), -1), own.expand(len(lg), -1)).min(dim=1).values.mean()
            for lg in logits])                                             # (P, n_own) -> ()

    def _combine(self, section, lsm, mse):
        """log-softmax, or log-softmax & MSE (DPT): each divided by its standard deviation over
        the section's training clips, then summed, so that neither scale outweighs the other
        (our choice; the report does not say). Both terms stay positive."""
        s1, s2 = self.norms[section]
        return lsm if self.recipe["detector"] == "log-softmax" else lsm / s1 + mse / s2

    def score(self, clips):
        unknown = sorted({c.section for c in clips} - set(self.sections))
        if unknown:
            raise ValueError(f"sections {', '.join(unknown)} were not trained; trained: "
                             f"{', '.join(self.sections)}")
        x, owner = self.patches(clips)
        emb, logits, mse = self._outputs(x, owner, len(clips))
        scores = torch.zeros(len(clips), dtype=torch.float64)
        for s in {c.section for c in clips}:
            rows = [i for i, c in enumerate(clips) if c.section == s]
            if s in self.detectors:
                scores[rows] = self.detectors[s].score(emb[rows]).cpu()
            else:
                scores[rows] = self._combine(s, self._log_softmax(s, [logits[i] for i in rows]),
                                             mse[rows])
        return scores.numpy()

    def train_scores(self):
        """LOF: leave-one-out factors; the others in-sample (never 0)."""
        return self._train_scores

    def n_parameters(self):
        return sum(p.numel() for m in (self.net, self.head) for p in m.parameters())

    def state(self):
        return {"recipe": self.recipe, "classes": self.classes, "sections": self.sections,
                "mean": self.mean, "std": self.std, "net": self.net.state_dict(),
                "head": self.head.state_dict(), "norms": self.norms,
                "detectors": {s: d.state() for s, d in self.detectors.items()}}

    def load_state(self, state):
        self.recipe, self.classes = state["recipe"], state["classes"]
        self.sections, self.norms = state["sections"], state["norms"]
        self.mean, self.std = state["mean"], state["std"]
        self.build(len(self.classes))
        self.net.load_state_dict(state["net"]), self.head.load_state_dict(state["head"])
        kind = detectors.LOF if self.recipe["detector"] == "lof" else detectors.CosineToMean
        self.detectors = {s: kind().load_state(d) for s, d in state["detectors"].items()}
