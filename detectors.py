"""From training embeddings to an anomaly score for new ones: each detector is fitted on the
normal training data alone (`fit`), then scores new data (`score`); larger is more anomalous.
Detectors know nothing of labels, metrics or the systems that call them.

- NearestCosine: cosine distance to the nearest training embedding (Shinmura 2020), with the
  leave-one-out form for the training embeddings themselves.
- Mahalanobis: the 2023+ DCASE autoencoder baseline's score on reconstruction errors.

- LOF, CosineToMean, log_softmax_score: JLESS 2022's three detectors (section 2.4).

k-means joins with the 2024 system. Each is checked against scikit-learn, scipy or a
hand-worked case on the same data (tests/test_detectors.py, tests/test_jless2022.py).
"""
import numpy as np
import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# Nearest-neighbour cosine distance

class NearestCosine:
    """score(x) = 1 - max_i cos(x, train_i): the cosine distance to the nearest training
    embedding (scikit-learn's NearestNeighbors(n_neighbors=1, metric="cosine") distance).
    Computed in float64: near cos = 1, 1 - cos of float32 comes in steps of 6e-8, and a
    model whose embeddings lie within 1e-4 of each other (Midea's on real valve clips) then
    gives tied scores."""

    def fit(self, train):
        """train: (N, D) embeddings; kept unit-length in float64, on the device they came on."""
        self.train = F.normalize(train.double())                     # (N, D)
        return self

    def score(self, x):
        """x: (M, D). Returns (M,) float64 tensor."""
        cos = F.normalize(x.double()) @ self.train.double().T        # (M, N)
        return 1.0 - cos.max(dim=1).values

    def train_scores(self):
        """Leave-one-out: each training embedding's distance to its nearest *other* one (its
        distance to itself is 0, which would put a threshold fitted to these at 0). (N,)."""
        unit = self.train.double()
        cos = unit @ unit.T                                           # (N, N)
        cos.fill_diagonal_(-1.0)
        return 1.0 - cos.max(dim=1).values

    def state(self):
        return {"train": self.train}

    def load_state(self, state):
        self.train = state["train"]
        return self


# --------------------------------------------------------------------------------------------
# Mahalanobis distance (the DCASE 2023+ autoencoder baseline)
#
# One covariance per domain, of the training reconstruction errors (centred, as np.cov and the
# baseline do); a clip's distance under a domain is the mean over its vectors of the squared
# Mahalanobis distance of each error vector from zero, and its score is the smaller of the
# two domains' (a target-domain clip is judged by the target covariance). The inverse is the
# pseudo-inverse: a target domain of 10 clips gives a singular covariance.

class Mahalanobis:
    def __init__(self):
        self.inv_cov = {}        # domain -> (D, D) pseudo-inverse covariance

    def fit(self, vectors_by_domain):
        """vectors_by_domain: {domain: (N_d, D) tensor}, the domains that have training data."""
        self.inv_cov = {}
        for domain, e in vectors_by_domain.items():
            cov = torch.cov(e.double().T)                             # (D, D)
            self.inv_cov[domain] = torch.linalg.pinv(cov).float()
        return self

    def score(self, clips):
        """clips: [(T_i, D) tensors], one per clip. Returns (n_clips,) float64 array."""
        scores = []
        for e in clips:
            per_domain = [torch.mean(torch.sum((e @ ic) * e, dim=1)) for ic in self.inv_cov.values()]
            scores.append(float(min(per_domain)))
        return np.array(scores)

    def state(self):
        return {"inv_cov": self.inv_cov}

    def load_state(self, state, device="cpu"):
        self.inv_cov = {k: v.to(device) for k, v in state["inv_cov"].items()}
        return self


# --------------------------------------------------------------------------------------------
# Local outlier factor (Breunig et al. 2000), scikit-learn's LocalOutlierFactor(novelty=True)
#
# k = min(n_neighbors, N - 1) nearest training points by Euclidean distance (a training point
# is not its own neighbour; its duplicates are, at distance 0). reach-dist(a, o) = max(d(a, o),
# k-distance(o)); lrd(a) = 1 / (mean reach-dist to a's k neighbours + 1e-10), the 1e-10 as
# scikit-learn has it, so that k duplicates give a large finite density; the score of x is the
# mean over its neighbours o of lrd(o) / lrd(x): scikit-learn's -score_samples(x). Distances
# are differences, not the |a|^2 + |b|^2 - 2ab expansion, so a duplicate is exactly 0 away.

class LOF:
    def __init__(self, n_neighbors=4):
        self.n_neighbors = n_neighbors

    def _neighbours(self, x, exclude_self=False):
        """Distances (M, k) and indices (M, k) of x's k nearest training points, nearest first."""
        d = torch.cdist(x, self.train, compute_mode="donot_use_mm_for_euclid_dist")   # (M, N)
        if exclude_self:
            d.fill_diagonal_(float("inf"))
        return torch.topk(d, self.k, dim=1, largest=False)

    def _lrd(self, dist, idx):
        """Local reachability density from neighbour distances and indices, (M,)."""
        reach = torch.maximum(dist, self.k_distance[idx])                   # (M, k)
        return 1.0 / (reach.mean(dim=1) + 1e-10)

    def fit(self, train):
        """train: (N, D) embeddings, N >= 2; computed in float64."""
        self.train = train.double()
        if len(train) < 2:
            raise ValueError(f"LOF needs at least 2 training embeddings, got {len(train)}")
        self.k = min(self.n_neighbors, len(train) - 1)
        dist, idx = self._neighbours(self.train, exclude_self=True)
        self.k_distance = dist[:, -1]                                       # (N,)
        self.lrd = self._lrd(dist, idx)                                     # (N,)
        self._train_scores = (self.lrd[idx] / self.lrd[:, None]).mean(dim=1)
        return self

    def score(self, x):
        """x: (M, D). Returns (M,) float64 tensor, the local outlier factor (about 1: normal)."""
        dist, idx = self._neighbours(x.double())
        return (self.lrd[idx] / self._lrd(dist, idx)[:, None]).mean(dim=1)

    def train_scores(self):
        """The training points' own factors, each without itself (-negative_outlier_factor_)."""
        return self._train_scores

    def state(self):
        return {"train": self.train, "n_neighbors": self.n_neighbors}

    def load_state(self, state):
        self.n_neighbors = state["n_neighbors"]
        return self.fit(state["train"])


# --------------------------------------------------------------------------------------------
# Cosine distance to the mean training embedding (JLESS 2022, section 2.4)

class CosineToMean:
    """score(x) = 1 - cos(x, mean of the training embeddings)."""

    def fit(self, train):
        """train: (N, D) embeddings."""
        self.mean = train.mean(dim=0)                                       # (D,)
        self._train_scores = self.score(train)
        return self

    def score(self, x):
        """x: (M, D). Returns (M,) float64 tensor."""
        return (1.0 - F.cosine_similarity(x, self.mean[None], dim=1)).double()

    def train_scores(self):
        """In-sample (a training embedding is not the mean, so none of these is 0)."""
        return self._train_scores

    def state(self):
        return {"mean": self.mean}

    def load_state(self, state):
        self.mean = state["mean"]
        return self


# --------------------------------------------------------------------------------------------
# Log-softmax (JLESS 2022, section 2.4; the DCASE 2021-2022 MobileNetV2 baseline's idea)

def log_softmax_score(logits, classes):
    """The negative log-softmax of the expected class: -log p(class | x), large when the
    network does not recognise the section it was told. logits (..., C), classes (...) int64.
    Returns (...) float64; nothing to fit."""
    log_p = F.log_softmax(logits.double(), dim=-1)
    return -log_p.gather(-1, classes[..., None])[..., 0]


# --------------------------------------------------------------------------------------------
# k-means (Lloyd's algorithm, k-means++ seeding: Arthur & Vassilvitskii 2007), as
# scikit-learn's KMeans(n_init=1) computes it. Midea 2024 uses it twice: pseudo-attributes for
# clips whose attributes are hidden, and the source domain's reference points for the score.

class KMeans:
    """Euclidean k-means. fit(x, gen) finds min(n_clusters, N) centres (a set smaller than
    n_clusters keeps every point as its own centre); predict(x) gives each row's nearest one."""

    def __init__(self, n_clusters, *, n_iter=100, tol=1e-6):
        self.n_clusters, self.n_iter, self.tol = n_clusters, n_iter, tol

    def fit(self, x, gen):
        """x: (N, D) float tensor; gen: a torch.Generator for the seeding (on any device)."""
        k = min(self.n_clusters, len(x))
        centres = self._seed(x, k, gen)
        for _ in range(self.n_iter):
            labels = torch.cdist(x, centres).argmin(dim=1)                    # (N,)
            moved = torch.zeros_like(centres).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k).to(x.dtype)[:, None]
            # an empty cluster keeps its centre (k-means++ seeds make one rare)
            moved = torch.where(counts > 0, moved / counts.clamp(min=1), centres)
            shift = float((moved - centres).square().sum())
            centres = moved
            if shift <= self.tol * float(x.var(dim=0).sum()):
                break
        self.centres = centres                                                 # (k, D)
        return self

    @staticmethod
    def _seed(x, k, gen):
        """k-means++: each next centre drawn with probability proportional to its squared
        distance to the nearest centre so far."""
        first = int(torch.randint(len(x), (1,), generator=gen, device=gen.device))
        centres = [x[first]]
        d2 = (x - x[first]).square().sum(dim=1)
        for _ in range(1, k):
            p = d2 / d2.sum() if d2.sum() > 0 else torch.ones_like(d2) / len(d2)
            nxt = int(torch.multinomial(p.to(gen.device), 1, generator=gen))
            centres.append(x[nxt])
            d2 = torch.minimum(d2, (x - x[nxt]).square().sum(dim=1))
        return torch.stack(centres)                                            # (k, D)

    def predict(self, x):
        """x: (M, D). Returns (M,) int64, the index of each row's nearest centre."""
        return torch.cdist(x, self.centres).argmin(dim=1)

    def inertia(self, x):
        """Sum of squared distances of x to their nearest centres (scikit-learn's inertia_)."""
        return float(torch.cdist(x, self.centres).min(dim=1).values.square().sum())

    def state(self):
        return {"centres": self.centres}

    def load_state(self, state):
        self.centres = state["centres"]
        return self


# --------------------------------------------------------------------------------------------
# Memory bank k-nearest-neighbour cosine distance, source and target banks (GenRep:
# Saengthong & Shinozaki, "Deep Generic Representations for Domain-Generalized Anomalous Sound
# Detection", ICASSP 2025, and their code github:Phuriches/GenRepASD)
#
# One bank per domain. A clip's distance to a bank is the mean cosine distance to its k nearest
# entries; its score is the smaller of the banks' distances, each standardised (domain
# normalisation: a target bank of 10 clips is sparser than a source bank of 990, so its raw
# distances run larger). GenRep standardises by the mean and standard deviation over the test
# clips; here the statistics are the bank's own leave-one-out distances, so that a clip's
# score does not depend on which other clips are scored with it. MemMixup (GenRep's eq. for the
# target bank) adds, for each target entry t, alpha t + (1 - alpha) s for its K nearest source
# entries s (GenRep: Euclidean neighbours, alpha 0.9; here cosine, the bank's distance).
# Leave-one-out leaves out an entry's whole group: itself and the mixups made from it.

class MemoryBank:
    def __init__(self, *, k=1, normalise=True, memmixup=0, alpha=0.9):
        self.k, self.normalise, self.memmixup, self.alpha = k, normalise, memmixup, alpha

    def fit(self, banks):
        """banks: {domain: (N_d, D) embeddings}, each domain with at least one entry."""
        self.banks, self.groups = {}, {}
        for domain, x in banks.items():
            self.banks[domain] = F.normalize(x.double())
            self.groups[domain] = torch.arange(len(x), device=x.device)
        if self.memmixup and "source" in banks and "target" in banks:
            self._mix()
        self.stats = {}
        for domain in self.banks:
            loo = self._distance(domain, self.banks[domain][self._real(domain)],
                                 exclude=self.groups[domain][self._real(domain)])
            spread = float(loo.std()) if len(loo) > 1 else 0.0
            self.stats[domain] = ((float(loo.mean()), spread) if self.normalise and spread > 0
                                  else (0.0, 1.0))
        return self

    def _mix(self):
        """MemMixup: alpha t + (1 - alpha) s for each target t and its memmixup nearest s."""
        source, target = self.banks["source"], self.banks["target"]
        k = min(self.memmixup, len(source))
        nearest = torch.topk(target @ source.T, k, dim=1).indices            # (N_t, k)
        mixed = self.alpha * target[:, None] + (1 - self.alpha) * source[nearest]  # (N_t, k, D)
        self.real_target = len(target)
        self.banks["target"] = torch.cat([target, F.normalize(mixed.flatten(0, 1))])
        self.groups["target"] = torch.cat([self.groups["target"],
                                           self.groups["target"].repeat_interleave(k)])

    def _real(self, domain):
        """The bank's own entries (not its mixups): a slice."""
        return slice(0, getattr(self, "real_target", None) if domain == "target" else None)

    def _distance(self, domain, x, exclude=None):
        """Mean cosine distance of unit rows x (M, D) to their k nearest entries of a bank; an
        entry whose group equals exclude[i] is not a neighbour of row i. Returns (M,)."""
        dist = 1.0 - x @ self.banks[domain].T                                # (M, N)
        if exclude is not None:
            dist = dist.masked_fill(exclude[:, None] == self.groups[domain][None, :], float("inf"))
        left = int(torch.isfinite(dist).sum(dim=1).min()) if len(dist) else self.k
        k = max(1, min(self.k, left))          # a bank smaller than k: all of it
        return torch.topk(dist, k, dim=1, largest=False).values.mean(dim=1)

    def _combine(self, per_bank):
        """Standardise each bank's distances by its leave-one-out mean and spread, keep the
        smaller. per_bank: {domain: (M,)}. Returns (M,) float64."""
        z = [(d - self.stats[b][0]) / self.stats[b][1] for b, d in per_bank.items()]
        return torch.stack(z).min(dim=0).values

    def score(self, x):
        """x: (M, D). Returns (M,) float64 tensor."""
        x = F.normalize(x.double())
        return self._combine({b: self._distance(b, x) for b in self.banks})

    def train_scores(self):
        """Each real bank entry scored with its own group left out of its bank, in domain order
        (source entries, then target). (N,)."""
        out = []
        for domain in self.banks:
            real = self.banks[domain][self._real(domain)]
            per_bank = {b: self._distance(b, real, exclude=self.groups[domain][self._real(domain)]
                                          if b == domain else None) for b in self.banks}
            out.append(self._combine(per_bank))
        return torch.cat(out)

    def state(self):
        return {"banks": self.banks, "groups": self.groups, "stats": self.stats,
                "real_target": getattr(self, "real_target", None)}

    def load_state(self, state):
        self.banks, self.groups, self.stats = state["banks"], state["groups"], state["stats"]
        if state["real_target"] is not None:
            self.real_target = state["real_target"]
        return self
