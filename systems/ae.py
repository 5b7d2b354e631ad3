"""AE: the official DCASE autoencoder baseline, 2020-2026 (Koizumi et al., and the organisers'
baseline repositories).

Input: 5 consecutive log-mel frames (128 mel bands, n_fft 1024, hop 512) stacked into one
640-value vector, every frame of the clip (features.log_mel with the year's settings, then
features.stack_frames). Network: models.AutoEncoder (dense, 8-unit bottleneck).
Training as the baselines: Adam, lr 1e-3, 100 epochs, batches of 512 vectors (2020-2022,
Keras) or 256 (2023+, PyTorch), shuffled; no early stopping.
Score: the reconstruction MSE of each vector averaged over the clip (2020-2022), or the 2023+
baseline's Mahalanobis score on the reconstruction errors (detectors.Mahalanobis).
2026 (our extension): with --channel both the near and far log-mels are stacked band-wise,
256 bands x 5 frames = 1280-value vectors (the 2026 baseline reads channel 0 alone).
Left out: the baselines' 10% validation split, which only printed a loss.
"""
import numpy as np
import torch

import data
import detectors
import features
import models
import train


# The official baseline's published development-set figures are results.BASELINE_DEV, the
# results table's baseline column; no separate paper column.
PAPER_DEV = None


class AE:
    name = "ae"
    # the baseline's: the part's training clips (eval runs: the dev set's too)
    training_data = dict(additional=False, paper="the part's training clips")
    shared_pool = None                  # no model shared by machine types
    channels = 2                                # can read both 2026 channels (--channel both)
    quick = dict(epochs=2, batch_size=128)      # a smoke run: every step, no detection quality
    meta = dict(                                # the submission template's system description
        acoustic_features="log-mel energies (128 bands, 64 ms window, 32 ms hop), 5 frames "
                          "stacked into 640-value vectors",
        data_augmentation=None,
        machine_learning_method="dense autoencoder (official DCASE baseline)",
        anomaly_score="reconstruction MSE (2020-2022) or the smaller per-domain Mahalanobis "
                      "distance of the reconstruction errors (2023+)",
        external_data_usage=None, pretrained_models=None)

    @staticmethod
    def defaults(year):
        return dict(epochs=100, batch_size=512 if year <= 2022 else 256, lr=1e-3)

    @staticmethod
    def add_flags(group):
        group.add_argument("--ae-score", default="auto", choices=("auto", "mse", "mahalanobis"),
                           help="AE score; auto: MSE to 2022, Mahalanobis from 2023 (baselines)")
        group.add_argument("--n-frames", type=int, default=features.N_FRAMES,
                           help="consecutive log-mel frames stacked into one input vector")

    def __init__(self, *, year, epochs=None, batch_size=None, lr=None, seed=0, device="cpu",
                 cache_dir=None, log=print, ae_score="auto", n_frames=features.N_FRAMES):
        paper = self.defaults(year)
        self.epochs = paper["epochs"] if epochs is None else epochs
        self.batch_size = paper["batch_size"] if batch_size is None else batch_size
        self.lr = paper["lr"] if lr is None else lr
        self.seed, self.device, self.cache_dir, self.log = seed, device, cache_dir, log
        if ae_score not in ("auto", "mse", "mahalanobis"):
            raise ValueError(f"unknown AE score '{ae_score}'; valid: auto, mse, mahalanobis")
        self.ae_score = ("mahalanobis" if year >= 2023 else "mse") if ae_score == "auto" else ae_score
        self.n_frames = n_frames
        self.settings = features.log_mel_settings(year)
        # the shortest clip that gives n_frames frames (and that reflect padding accepts)
        self.min_samples = max((n_frames - 1) * self.settings["hop"], self.settings["n_fft"] // 2 + 1)
        self.n_channels = features.channels_read()      # 2 under --channel both (2026)
        self.model = models.AutoEncoder(
            input_dim=self.settings["n_mels"] * n_frames * self.n_channels).to(device)
        self.detector = detectors.Mahalanobis()          # fitted only for the Mahalanobis score

    def vectors(self, clips):
        """Stacked-frame vectors of every clip: [(T_i - n_frames + 1, n_mels * n_frames)]
        (both channels: near bands then far bands in each frame, 2 * n_mels per frame)."""
        mels = features.clip_features([c.path for c in clips], "log_mel", self.settings,
                                      sr=self.settings["sr"], cache_dir=self.cache_dir,
                                      device=self.device, log=self.log)   # [([2,] n_mels, T)]
        return [features.stack_frames(m.reshape(-1, m.shape[-1]), n_frames=self.n_frames)
                for m in mels]

    def fit(self, clips, workdir):
        vecs = self.vectors(clips)
        x = torch.cat(vecs).to(self.device)                     # (N, 640); both: (N, 1280)
        opt = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        self.model.train()
        for epoch in train.epochs(self.model, opt, gen, self.epochs, workdir / "checkpoint.pt",
                                  self.log):
            for idx in train.batches(len(x), self.batch_size, gen):
                batch = x[idx.to(x.device)]                     # (B, 640)
                loss = torch.mean((self.model(batch) - batch) ** 2)
                epoch.add(train.step(opt, loss), len(idx))
        errors = self._errors(vecs)
        if self.ae_score == "mahalanobis":
            by_domain = {}
            for e, c in zip(errors, clips):
                by_domain.setdefault(c.domain or "source", []).append(e)
            self.detector.fit({d: torch.cat(by_domain[d]) for d in data.DOMAINS if d in by_domain})
        self._train_scores = self._score(errors)

    @torch.no_grad()
    def _errors(self, vecs):
        self.model.eval()
        return [self.model(v.to(self.device)) - v.to(self.device) for v in vecs]  # (T, 640) each

    def _score(self, errors):
        if self.ae_score == "mse":
            return np.array([float(torch.mean(e ** 2)) for e in errors])
        return self.detector.score(errors)

    def score(self, clips):
        return self._score(self._errors(self.vectors(clips)))

    def train_scores(self):
        """The training clips' scores, computed at the end of fit()."""
        return self._train_scores

    def n_parameters(self):
        return sum(p.numel() for p in self.model.parameters())

    def state(self):
        return {"model": self.model.state_dict(), **self.detector.state()}

    def load_state(self, state):
        self.model.load_state_dict(state["model"])
        self.detector.load_state(state, self.device)
