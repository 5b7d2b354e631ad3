"""How each reproduced system trains and scores: from clips to one anomaly score per clip.

A system is a class with `fit(clips, workdir)`, `score(clips) -> (n_clips,)`, and `state()` /
`load_state(state)` for saving; `SYSTEMS` maps the CLI names to them. Networks live in
models.py, features in features.py, metrics and thresholds in scoring.py. This file also holds
the on-disk log-mel cache that every system shares.

Systems: "ae", the official DCASE autoencoder baseline (MSE score 2020-2022, and the
Mahalanobis score of the 2023+ baseline).
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

import features
import models

CACHE_VERSION = 1   # bump when the log-mel code changes what it returns


# --------------------------------------------------------------------------------------------
# Log-mel cache: one .npy per clip, keyed by the file's identity and every feature setting

def cache_key(path, settings):
    """A key that changes when the file or any setting the features depend on changes."""
    st = os.stat(path)
    ident = {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "settings": settings, "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def log_mels(paths, settings, *, cache_dir=None, device="cpu", batch=64):
    """Log-mel spectrograms of the clips, read from the cache where present.
    settings: the keyword arguments of features.log_mel. Returns [(n_mels, T_i) tensors]."""
    out, todo = [None] * len(paths), []
    for i, p in enumerate(paths):
        hit = cache_dir and Path(cache_dir) / f"{cache_key(p, settings)}.npy"
        if hit and hit.exists():
            out[i] = torch.from_numpy(np.load(hit))
        else:
            todo.append(i)
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        waves = [features.load_wav(paths[i], sr=settings["sr"]) for i in chunk]
        for i, mel in zip(chunk, _batched_log_mel(waves, settings, device)):
            out[i] = mel
            if cache_dir:
                _save_npy(Path(cache_dir) / f"{cache_key(paths[i], settings)}.npy", mel.numpy())
    return out


def _batched_log_mel(waves, settings, device):
    """Clips of equal length go through features.log_mel together."""
    mels = [None] * len(waves)
    for n in sorted({len(w) for w in waves}):
        idx = [i for i, w in enumerate(waves) if len(w) == n]
        x = torch.from_numpy(np.stack([waves[i] for i in idx])).to(device)   # (B, n)
        for i, mel in zip(idx, features.log_mel(x, **settings).cpu()):      # (B, n_mels, T)
            mels[i] = mel
    return mels


def _save_npy(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


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
        mels = log_mels([c.path for c in clips], self.settings, cache_dir=self.cache_dir,
                        device=self.device)
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
        start = 0
        if checkpoint.exists():                                 # resume an interrupted run
            ck = torch.load(checkpoint, weights_only=False)
            self.model.load_state_dict(ck["model"]), opt.load_state_dict(ck["opt"])
            gen.set_state(ck["gen"])
            start = ck["epoch"]
            self.log(f"resuming from epoch {start} ({checkpoint})")
        for epoch in range(start, self.epochs):
            loss = self._epoch(x, opt, gen)
            save_atomic({"model": self.model.state_dict(), "opt": opt.state_dict(),
                         "gen": gen.get_state(), "epoch": epoch + 1}, checkpoint)
            self.log(f"epoch {epoch + 1}/{self.epochs}  loss {loss:.4f}")

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

    def state(self):
        return {"model": self.model.state_dict(), "inv_cov": self.inv_cov}

    def load_state(self, state):
        self.model.load_state_dict(state["model"])
        self.inv_cov = {k: v.to(self.device) for k, v in state["inv_cov"].items()}


SYSTEMS = {"ae": AESystem}


def get_system(name):
    if name not in SYSTEMS:
        raise ValueError(f"unknown system '{name}'; valid: {', '.join(SYSTEMS)}")
    return SYSTEMS[name]
