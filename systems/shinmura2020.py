"""How each reproduced system trains and scores: from clips to one anomaly score per clip.

A system is a class with `fit(clips, workdir)`, `score(clips) -> (n_clips,)`,
`train_scores(clips)` (the training clips' scores that the decision threshold is fitted to),
`state()` / `load_state(state)` for saving, `add_flags(group)` / `options` for its own
command-line flags, and `quick`, the option values of a smoke run (`train --quick`);
`SYSTEMS` maps the CLI names to them. Networks live in
models.py, features in features.py, metrics and thresholds in scoring.py. This file also holds
the on-disk log-mel cache that every system shares.

Systems: "ae", the official DCASE autoencoder baseline (MSE score 2020-2022, and the
Mahalanobis score of the 2023+ baseline).
"""
import argparse
import collections
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import features
import models

CACHE_VERSION = 1   # bump when the log-mel code changes what it returns


# --------------------------------------------------------------------------------------------
# Log-mel cache: one .npy per clip, keyed by the file's identity and every feature setting

FEATURES = {"log_mel": features.log_mel, "spectrogram_image": features.spectrogram_image}


def cache_key(path, kind, settings):
    """A key that changes when the file, the feature kind or any of its settings changes."""
    st = os.stat(path)
    ident = {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "kind": kind, "settings": settings, "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def clip_features(paths, kind, settings, *, sr=features.SR, cache_dir=None, device="cpu",
                  batch=64):
    """FEATURES[kind](wave, **settings) of every clip, read from the cache where present.
    Returns [(..., T_i) tensors], one per clip, on the CPU."""
    out, todo = [None] * len(paths), []
    key = {"sr": sr, **settings}
    for i, p in enumerate(paths):
        hit = cache_dir and Path(cache_dir) / f"{cache_key(p, kind, key)}.npy"
        if hit and hit.exists():
            out[i] = torch.from_numpy(np.load(hit))
        else:
            todo.append(i)
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        waves = [features.load_wav(paths[i], sr=sr) for i in chunk]
        for i, feat in zip(chunk, _batched(FEATURES[kind], waves, settings, device)):
            out[i] = feat
            if cache_dir:
                _save_npy(Path(cache_dir) / f"{cache_key(paths[i], kind, key)}.npy", feat.numpy())
    return out


def _batched(fn, waves, settings, device):
    """Clips of equal length go through the feature function together."""
    feats = [None] * len(waves)
    for n in sorted({len(w) for w in waves}):
        idx = [i for i, w in enumerate(waves) if len(w) == n]
        x = torch.from_numpy(np.stack([waves[i] for i in idx])).to(device)   # (B, n)
        for i, feat in zip(idx, fn(x, **settings).cpu()):                   # (B, ..., T)
            feats[i] = feat
    return feats


def _save_npy(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def run_epochs(*, module, opt, gen, epochs, checkpoint, epoch_fn, log, what="epoch"):
    """Call epoch_fn() `epochs` times, saving module, optimiser and generator after each, so an
    interrupted run resumes where it stopped with the same random stream."""
    start = 0
    if Path(checkpoint).exists():
        ck = torch.load(checkpoint, weights_only=False)
        module.load_state_dict(ck["model"]), opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        start = ck["epoch"]
        log(f"resuming {what} {start} of {epochs} from {checkpoint}")
    for epoch in range(start, epochs):
        loss = epoch_fn()
        save_atomic({"model": module.state_dict(), "opt": opt.state_dict(),
                     "gen": gen.get_state(), "epoch": epoch + 1}, checkpoint)
        log(f"{what} {epoch + 1}/{epochs}  loss {loss:.4f}")


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# AE: the official DCASE autoencoder baseline
#
# Training as the baselines: Adam, lr 1e-3, 100 epochs, batches of 512 vectors (2020-2022, Keras)
# or 256 (2023+, PyTorch), shuffled; no early stopping. Score: the reconstruction MSE of each
# 640-value vector, averaged over the clip. The 2023+ baseline's Mahalanobis score: covariances
# of the training reconstruction errors, one per domain; a clip's score is the mean squared
# Mahalanobis distance of its errors, the smaller of the two domains'. Left out: the baselines'
# 10% validation split, which only printed a loss.

class AESystem:
    name = "ae"
    description = "official DCASE autoencoder baseline (dense AE on 5 log-mel frames)"
    options = ("ae_score",)
    quick = dict(epochs=2, batch_size=128)      # a smoke run: every step, no detection quality

    @staticmethod
    def add_flags(group):
        group.add_argument("--ae-score", default="auto", choices=("auto", "mse", "mahalanobis"),
                           help="AE score; auto: MSE to 2022, Mahalanobis from 2023 (baselines)")

    def __init__(self, *, year, epochs=None, batch_size=None, lr=None, ae_score="auto",
                 n_frames=5, seed=0, device="cpu", cache_dir=None, log=print):
        self.settings = features.log_mel_settings(year)
        self.n_frames, self.epochs, self.lr, self.seed = n_frames, epochs or 100, lr or 1e-3, seed
        self.batch_size = batch_size or (512 if year <= 2022 else 256)
        self.ae_score = ("mahalanobis" if year >= 2023 else "mse") if ae_score == "auto" else ae_score
        if self.ae_score not in ("mse", "mahalanobis"):
            raise ValueError(f"unknown AE score '{ae_score}'; valid: auto, mse, mahalanobis")
        self.device, self.cache_dir, self.log = device, cache_dir, log
        dim = self.settings["n_mels"] * n_frames
        self.model = models.AutoEncoder(input_dim=dim).to(device)
        self.inv_cov = {}   # domain -> (dim, dim) inverse covariance of reconstruction errors

    def vectors(self, clips):
        """Stacked-frame vectors of every clip: [(T_i - n_frames + 1, n_mels * n_frames)]."""
        mels = clip_features([c.path for c in clips], "log_mel", self.settings,
                             sr=self.settings["sr"], cache_dir=self.cache_dir, device=self.device)
        return [features.stack_frames(m, n_frames=self.n_frames) for m in mels]

    def fit(self, clips, workdir):
        vecs = self.vectors(clips)
        x = torch.cat(vecs).to(self.device)                     # (N, 640)
        self._train(x, Path(workdir) / "checkpoint.pt")
        if self.ae_score == "mahalanobis":
            self._fit_covariances(clips, vecs)

    def _train(self, x, checkpoint):
        opt = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        run_epochs(module=self.model, opt=opt, gen=gen, epochs=self.epochs, checkpoint=checkpoint,
                   epoch_fn=lambda: self._epoch(x, opt, gen), log=self.log)

    def _epoch(self, x, opt, gen):
        self.model.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for start in range(0, len(x), self.batch_size):
            batch = x[order[start:start + self.batch_size].to(x.device)]
            if len(batch) < 2:                                  # BatchNorm needs two rows
                continue
            loss = torch.mean((self.model(batch) - batch) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        return total / len(x)

    @torch.no_grad()
    def _errors(self, vecs):
        self.model.eval()
        return [self.model(v.to(self.device)) - v.to(self.device) for v in vecs]  # (T, 640) each

    def _fit_covariances(self, clips, vecs):
        errors = self._errors(vecs)
        for domain in ("source", "target"):
            e = [err for err, c in zip(errors, clips) if (c.domain or "source") == domain]
            if e:
                e = torch.cat(e).double()
                cov = torch.cov(e.T)                            # (640, 640), centred as baseline
                self.inv_cov[domain] = torch.linalg.pinv(cov).float()

    def score(self, clips):
        errors = self._errors(self.vectors(clips))
        if self.ae_score == "mse":
            return np.array([float(torch.mean(e ** 2)) for e in errors])
        scores = []
        for e in errors:
            per_domain = [torch.mean(torch.sum((e @ ic) * e, dim=1)) for ic in self.inv_cov.values()]
            scores.append(float(min(per_domain)))
        return np.array(scores)

    def train_scores(self, clips):
        return self.score(clips)

    def state(self):
        return {"model": self.model.state_dict(), "inv_cov": self.inv_cov}

    def load_state(self, state):
        self.model.load_state_dict(state["model"])
        self.inv_cov = {k: v.to(self.device) for k, v in state["inv_cov"].items()}




# --------------------------------------------------------------------------------------------
# Shinmura 2020: self-supervised MobileNetV2 + ArcFace on generated anomalies
#
# Zero Shinmura, "DCASE2020 Task 2 self-supervised learning solution" (technical report).
# Input: dB magnitude spectrogram (n_fft 512, hop 256) resized to 224 x 224, one channel,
# normalised by the training set's mean and standard deviation (section 4.1).
# Pre-training (3.4): MobileNetV2 from random weights, a softmax classifier over machine IDs
# of the training data with mixup; the paper used 3 IDs of each of 6 machine types (18
# classes). Here the classes are the IDs (sections) of every machine type found in the same
# data folder, up to --pretrain-classes per type; where a year has one section per machine
# type, the attribute strings of the file names are the classes. One pre-trained network is
# shared by every machine type and ensemble member of a run.
# Self-supervised training (3.1-3.3): normal clips (label 0) against anomalies generated from
# them (label 1: white noise, pink noise, slight line, average Hz), with an ArcFace head;
# hard samples: 5 x batch candidates, the batch-size of them the model finds least anomalous.
# Score (3.5): the head is dropped; a test clip's score is its cosine distance to the nearest
# training clip in the GAP embedding (the paper's "minimum of cosine similarity" read as
# nearest-neighbour cosine distance, 1 - max cos), averaged over an ensemble of models.
# Our choices where the paper is silent: mixup alpha 0.2, 10 pre-training epochs at lr 1e-3,
# generator levels (features.NOISE_DB, LINE_DB).

class Shinmura2020:
    name = "shinmura2020"
    description = "Shinmura 2020: self-supervised MobileNetV2 + ArcFace, generated anomalies"
    options = ("width", "image_size", "arcface_scale", "arcface_margin", "generators",
               "pretrain", "pretrain_epochs", "pretrain_classes", "mixup_alpha",
               "hard_samples", "hard_factor", "ensemble")
    quick = dict(epochs=2, batch_size=16, width=0.25, image_size=64, ensemble=1,
                 pretrain_epochs=1)             # a smoke run: every step, no detection quality

    @staticmethod
    def add_flags(group):
        group.add_argument("--width", type=float, default=1.0, help="MobileNetV2 width multiplier")
        group.add_argument("--image-size", type=int, default=224, help="input image side, pixels")
        # the paper prints "m=30, s=0.05": a scale of 30 and a margin of 0.05 rad is the
        # plausible reading (a margin of 30 rad is meaningless, a scale of 0.05 cannot train)
        group.add_argument("--arcface-scale", type=float, default=30.0, help="ArcFace scale s")
        group.add_argument("--arcface-margin", type=float, default=0.05,
                           help="ArcFace additive angular margin m, radians")
        group.add_argument("--generators", nargs="+", default=list(features.GENERATORS),
                           choices=list(features.GENERATORS), help="generated anomaly kinds")
        group.add_argument("--pretrain", action=argparse.BooleanOptionalAction, default=True,
                           help="pre-train MobileNetV2 as a machine-ID classifier first")
        group.add_argument("--pretrain-epochs", type=int, default=10, help="pre-training epochs")
        group.add_argument("--pretrain-classes", type=int, default=3,
                           help="IDs (or attribute sets) per machine type in pre-training")
        group.add_argument("--mixup-alpha", type=float, default=0.2,
                           help="mixup Beta(alpha, alpha) in pre-training")
        group.add_argument("--hard-samples", action=argparse.BooleanOptionalAction, default=True,
                           help="train on the hardest generated anomalies of each batch")
        group.add_argument("--hard-factor", type=int, default=5,
                           help="candidates generated per normal clip for hard samples")
        group.add_argument("--ensemble", type=int, default=10, help="models averaged (paper: 10)")

    def __init__(self, *, year, epochs=None, batch_size=None, lr=None, seed=0, device="cpu",
                 cache_dir=None, log=print, width=1.0, image_size=224, arcface_scale=30.0,
                 arcface_margin=0.05, generators=tuple(features.GENERATORS), pretrain=True,
                 pretrain_epochs=10, pretrain_classes=3, mixup_alpha=0.2, hard_samples=True,
                 hard_factor=5, ensemble=10):
        self.year, self.seed, self.device, self.cache_dir, self.log = year, seed, device, cache_dir, log
        self.epochs, self.batch_size, self.lr = epochs or 7, batch_size or 32, lr or 1e-4
        self.width, self.image_size = width, image_size
        self.settings = dict(n_fft=512, hop=256, size=image_size, pad_mode="reflect")
        self.arcface = dict(scale=arcface_scale, margin=arcface_margin)
        self.generators = tuple(generators)
        self.pretrain, self.pretrain_epochs = pretrain, pretrain_epochs
        self.pretrain_classes, self.mixup_alpha = pretrain_classes, mixup_alpha
        self.hard_samples, self.hard_factor, self.ensemble = hard_samples, hard_factor, ensemble
        self.mean, self.std = 0.0, 1.0
        self.members = []        # one MobileNetV2 per ensemble member
        self.train_embeddings = []   # (N_train, D) per member, unit length

    def images(self, clips):
        """dB spectrogram images of the clips, (N, size, size)."""
        return torch.stack(clip_features([c.path for c in clips], "spectrogram_image", self.settings,
                                         cache_dir=self.cache_dir, device=self.device))

    def normalise(self, images_db):
        return ((images_db - self.mean) / self.std).unsqueeze(1)      # (B, 1, H, W)

    def fit(self, clips, workdir):
        x = self.images(clips)
        self.mean, self.std = float(x.mean()), float(x.std())
        backbone = self._pretrained(clips, Path(workdir)) if self.pretrain else None
        self.members, self.train_embeddings = [], []
        for i in range(self.ensemble):
            net = self._train_member(i, x, backbone, Path(workdir))
            self.members.append(net)
            self.train_embeddings.append(self._embed(net, x))

    def _pretrain_set(self, clips):
        """Training clips of every machine type in the folder of `clips`, and their class
        index: (machine, section), or (machine, attributes) where a year has one section."""
        folder, spec = clips[0].path.parents[2], data.get_year(self.year)
        machines = sorted(m for m in spec.machines if (folder / m / "train").is_dir())
        pool = [c for m in machines for c in data.list_clips(folder, year=self.year, machine=m,
                                                            split="train")] or list(clips)
        n_sections = {m: len(spec.dev.get(m, spec.eval.get(m, ()))) for m in machines}
        key = {c: (c.machine, c.section if n_sections.get(c.machine, 1) > 1 else c.attributes)
               for c in pool}
        kept = []
        for m in sorted({c.machine for c in pool}):
            counts = collections.Counter(k for c, k in key.items() if c.machine == m)
            kept += sorted(counts, key=lambda k: (-counts[k], k))[:self.pretrain_classes]
        if len(kept) < 2:
            raise ValueError(f"{folder}: pre-training needs two classes (IDs, sections or "
                             f"attribute sets), found {kept}; pass --no-pretrain")
        chosen = [c for c in pool if key[c] in kept]
        return chosen, torch.tensor([kept.index(key[c]) for c in chosen]), len(kept)

    def _pretrained(self, clips, workdir):
        """MobileNetV2 weights after softmax pre-training, shared by the run's machine types."""
        pool, labels, n_classes = self._pretrain_set(clips)
        ident = [sorted(str(c.path) for c in pool), self.width, self.image_size,
                 self.pretrain_epochs, self.mixup_alpha, self.seed, self.batch_size]
        path = workdir.parent / f"pretrained_{hashlib.sha256(repr(ident).encode()).hexdigest()[:16]}.pt"
        if path.exists():
            self.log(f"pre-trained network from {path}")
            return torch.load(path, weights_only=True)
        self.log(f"pre-training on {len(pool)} clips, {n_classes} classes")
        x = self.images(pool)
        x = (x - x.mean()) / x.std()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = models.MobileNetV2(width=self.width).to(self.device)
            head = torch.nn.Linear(net.embedding_dim, n_classes).to(self.device)
        module = torch.nn.ModuleDict({"net": net, "head": head})
        opt = torch.optim.Adam(module.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(self.seed)
        run_epochs(module=module, opt=opt, gen=gen, epochs=self.pretrain_epochs,
                   checkpoint=path.with_suffix(".checkpoint"), log=self.log,
                   epoch_fn=lambda: self._pretrain_epoch(net, head, x, labels, opt, gen),
                   what="pre-training epoch")
        save_atomic(net.state_dict(), path)
        path.with_suffix(".checkpoint").unlink(missing_ok=True)
        return net.state_dict()

    def _pretrain_epoch(self, net, head, x, labels, opt, gen):
        """One epoch of softmax classification with mixup (Zhang et al. 2018), batches of 64."""
        net.train()
        rng = np.random.default_rng(int(torch.randint(2 ** 31, (1,), generator=gen)))
        order, total = torch.randperm(len(x), generator=gen), 0.0
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            if len(idx) < 2:
                continue
            lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            perm = torch.randperm(len(idx), generator=gen)
            xb, yb = x[idx].unsqueeze(1).to(self.device), labels[idx].to(self.device)
            logits = head(net(lam * xb + (1 - lam) * xb[perm]))
            loss = lam * F.cross_entropy(logits, yb) + (1 - lam) * F.cross_entropy(logits, yb[perm])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        return total / len(x)

    def _train_member(self, i, x, backbone, workdir):
        """Self-supervised training of ensemble member i, from the pre-trained weights."""
        done = workdir / f"member_{i}.pt"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + i)
            net = models.MobileNetV2(width=self.width).to(self.device)
            head = models.ArcFace(net.embedding_dim, 2, **self.arcface).to(self.device)
        if done.exists():                                   # finished before an interruption
            net.load_state_dict(torch.load(done, weights_only=True))
            return net
        if backbone is not None:
            net.load_state_dict(backbone)
        module = torch.nn.ModuleDict({"net": net, "head": head})
        opt = torch.optim.Adam(module.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed + 1000 * (i + 1))
        run_epochs(module=module, opt=opt, gen=gen, epochs=self.epochs, log=self.log,
                   checkpoint=workdir / f"checkpoint_{i}.pt",
                   epoch_fn=lambda: self._ssl_epoch(net, head, x, opt, gen),
                   what=f"model {i + 1}/{self.ensemble} epoch")
        save_atomic(net.state_dict(), done)
        (workdir / f"checkpoint_{i}.pt").unlink(missing_ok=True)
        return net

    def _ssl_epoch(self, net, head, x, opt, gen):
        """Normal clips (label 0) against anomalies generated from them (label 1), ArcFace."""
        net.train(), head.train()
        order, total = torch.randperm(len(x), generator=gen), 0.0
        for start in range(0, len(x), self.batch_size):
            normal = x[order[start:start + self.batch_size]].to(self.device)   # (B, H, W) dB
            if len(normal) < 2:
                continue
            anomalies = self._anomalies(net, head, normal, gen)
            labels = torch.cat([torch.zeros(len(normal)), torch.ones(len(anomalies))]).long()
            labels = labels.to(self.device)
            emb = net(self.normalise(torch.cat([normal, anomalies])))
            loss = F.cross_entropy(head(emb, labels), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(normal)
        return total / len(x)

    def _anomalies(self, net, head, normal, gen):
        """Generated anomalies for a batch: hard samples (3.3) or one per normal clip."""
        if not self.hard_samples:
            return features.generate_anomalies(normal, gen, kinds=self.generators)
        candidates = features.generate_anomalies(normal.repeat(self.hard_factor, 1, 1), gen,
                                                 kinds=self.generators)
        with torch.no_grad():
            net.eval()
            p_anomaly = F.softmax(head(net(self.normalise(candidates))), dim=1)[:, 1]
            net.train()
        return select_hard(candidates, p_anomaly, len(normal))

    @torch.no_grad()
    def _embed(self, net, x, batch=64):
        """Unit-length GAP embeddings of dB images (N, H, W) -> (N, D), on the CPU."""
        net.eval()
        out = [F.normalize(net(self.normalise(x[i:i + batch].to(self.device)))).cpu()
               for i in range(0, len(x), batch)]
        return torch.cat(out)

    def score(self, clips):
        """Cosine distance to the nearest training clip, averaged over the ensemble."""
        x = self.images(clips)
        scores = torch.zeros(len(x), dtype=torch.float64)
        for net, train in zip(self.members, self.train_embeddings):
            cos = self._embed(net, x) @ train.T                  # (N_test, N_train)
            scores += (1.0 - cos.max(dim=1).values).double()
        return (scores / len(self.members)).numpy()

    def train_scores(self, clips):
        """Leave-one-out: each training clip's distance to its nearest *other* training clip
        (its distance to itself is 0, which would put the threshold at 0)."""
        scores = torch.zeros(len(clips), dtype=torch.float64)
        for train in self.train_embeddings:
            cos = train @ train.T
            cos.fill_diagonal_(-1.0)
            scores += (1.0 - cos.max(dim=1).values).double()
        return (scores / len(self.train_embeddings)).numpy()

    def state(self):
        return {"mean": self.mean, "std": self.std,
                "members": [net.state_dict() for net in self.members],
                "train_embeddings": self.train_embeddings}

    def load_state(self, state):
        self.mean, self.std = state["mean"], state["std"]
        self.train_embeddings = state["train_embeddings"]
        self.members = []
        for weights in state["members"]:
            net = models.MobileNetV2(width=self.width).to(self.device)
            net.load_state_dict(weights)
            self.members.append(net)


def select_hard(candidates, p_anomaly, k):
    """The k candidates the model finds least anomalous (lowest anomaly-class probability)."""
    return candidates[torch.argsort(p_anomaly)[:k]]


SYSTEMS = {"ae": AESystem, "shinmura2020": Shinmura2020}


def get_system(name):
    if name not in SYSTEMS:
        raise ValueError(f"unknown system '{name}'; valid: {', '.join(SYSTEMS)}")
    return SYSTEMS[name]
