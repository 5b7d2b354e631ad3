"""Midea 2024: dual-branch spectrum + spectrogram network with sub-cluster AdaCos, 2023-2025.

Jiawei Yin, Yu Gao, Wenbin Zhang, "First-shot unsupervised anomalous sound detection based on
self-supervised learning", DCASE 2024 Task 2 technical report; its backbone is Wilkinghoff's
ICASSP 2023 design ("Design choices for learning embeddings from auxiliary tasks ...").
Input (2.1): every clip repeated or cropped to one length (features.fixed_length); the
magnitude spectrum of the whole clip and the 200-8000 Hz magnitude spectrogram (STFT
1024/512) less its time mean, both computed on the training device per batch, after the
waveform augmentations.
Network (2.1): models.DualBranch, a ResNet on the spectrogram and 1-D convolutions on the
spectrum, CBAM in both, 128 + 128 = 256-dimensional embedding.
Objective (eq. 1): L = L_joint + L_machine, each a sub-cluster AdaCos cross-entropy: over the
joint class (machine type and section, attributes, domain; Wilkinghoff's classes keep the
domain too) and over the machine (type and section). The classifier is one model for all
machine types, as Wilkinghoff and Midea train it (`fit_shared`, trained once a year by the CLI
and shared by every machine type's run): by default on the training clips of every machine
type of the year, dev and eval parts together where both are there (Wilkinghoff: 16 types in
2024), or of the run's part (--pool part); each machine type's model keeps its references.
Classes without attributes (2.2, submission 2): the source clips of a noAttribute section
(and, our extension, of a section whose source clips share one attribute string) are split
into --n-pseudo k-means clusters of their log mean spectrum; its few target clips stay one
class.
Augmentations (2.2): mixup of waveforms and labels within a batch; for the rare
target-domain classes, time warping (first, when a class has a single clip; on the STFT's
time axis, so that no frequency moves) and SMOTE, which bring each up to the mean size of its
section's source classes.
Score (Wilkinghoff): the cosine distance of a clip's embedding to its nearest reference of
the section: --kmeans-centres k-means centres of the source training embeddings, and the
target training embeddings themselves.
Our choices where the paper is silent (taken from Wilkinghoff's code where it has them):
Adam lr 1e-3, 10 epochs of 64, 16 sub-clusters kept at their random start (not trained),
16 centres, 18 s (288000 samples), mixup on every batch with a weight of its own per clip
drawn from Beta(1, 1) = U(0, 1); the rest is said at each flag.
"""
import argparse
import collections

import numpy as np
import torch

import augment
import detectors
import features
import losses
import models
import train

# The four submissions of table 1, read as cumulative (the report names what each adds).
# Submission 2 had the best development-set official score (harmonic mean of AUC source,
# AUC target and pAUC over table 1: 64.4, against 63.3, 63.8 and 62.4), hence the default.
# The paper's development-set figures for its Submission 2 (our default variant): table 1,
# AUC per domain and pAUC per machine type (one section each in 2024); the official score is
# the harmonic mean of those 21 figures (the table prints the per-metric means). Shown beside
# ours by `evaluate`.
PAPER_DEV = {
    "year": 2024, "source": "Yin 2024, table 1 (Submission 2)",
    "sections": {
        ("ToyCar", "00"): {"auc_source": 0.5308, "auc_target": 0.4848, "pauc": 0.5053},
        ("ToyTrain", "00"): {"auc_source": 0.6572, "auc_target": 0.6740, "pauc": 0.5816},
        ("bearing", "00"): {"auc_source": 0.6864, "auc_target": 0.7208, "pauc": 0.5442},
        ("fan", "00"): {"auc_source": 0.5816, "auc_target": 0.6828, "pauc": 0.5616},
        ("gearbox", "00"): {"auc_source": 0.7504, "auc_target": 0.7548, "pauc": 0.5363},
        ("slider", "00"): {"auc_source": 0.9552, "auc_target": 0.8836, "pauc": 0.7368},
        ("valve", "00"): {"auc_source": 0.8824, "auc_target": 0.6528, "pauc": 0.6384}},
    "machines": {}, "official_score": 0.6444,
    "setting": {"variant": "submission2"}}
VARIANTS = {
    "submission1": dict(pseudo_attributes=False, mixup=False, time_warp=False, smote=False),
    "submission2": dict(pseudo_attributes=True, mixup=False, time_warp=False, smote=False),
    "submission3": dict(pseudo_attributes=True, mixup=True, time_warp=False, smote=False),
    "submission4": dict(pseudo_attributes=True, mixup=True, time_warp=True, smote=True),
}
HIDDEN = ("", "noAttribute")     # attribute strings that say nothing about the condition
MEMBER_SEED = 1000               # ensemble member k is seeded seed + 1000 k
WARP_HOP = features.N_FFT // 4   # samples: time warping's STFT overlaps 3 / 4 for resynthesis


class Midea2024:
    name = "midea2024"
    # each machine type's own clips (the classifier's pool is shared_pool, --pool)
    training_data = dict(additional=False, paper="the training clips of every machine type")
    shared_name = "classifier"
    shared_ignores = ("kmeans_centres", "pool")    # the references' k-means; pool: its clips
    quick = dict(epochs=2, batch_size=16, clip_seconds=2.0, n_subclusters=4, kmeans_centres=4)
    meta = dict(
        acoustic_features="magnitude spectrum of the whole clip; 200-8000 Hz magnitude "
                          "spectrogram (1024 window, 512 hop) minus its time mean",
        data_augmentation="mixup, time warping, SMOTE (per variant)",
        machine_learning_method="dual-branch CNN (ResNet + 1-D convolutions, CBAM) trained "
                                "with sub-cluster AdaCos on machine and attribute classes",
        anomaly_score="cosine distance to the nearest of the source k-means centres and the "
                      "target training embeddings",
        external_data_usage=None, pretrained_models=None)

    @staticmethod
    def defaults(year):
        return dict(epochs=10, batch_size=64, lr=1e-3)    # Wilkinghoff's; the report: Adam

    @staticmethod
    def add_flags(group):
        group.add_argument("--variant", default="submission2", choices=list(VARIANTS),
                           help="the report's submission whose switches apply (table 1)")
        for flag, what in (("pseudo-attributes", "k-means pseudo-attributes for noAttribute"),
                           ("mixup", "mixup of waveforms and labels"),
                           ("time-warp", "time warping of rare target classes"),
                           ("smote", "SMOTE over-sampling of rare target classes")):
            group.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction,
                               default=None, help=f"{what} (default: as --variant says)")
        group.add_argument("--clip-seconds", type=float, default=18.0,
                           help="fixed clip length, s (Wilkinghoff's 288000 samples)")
        group.add_argument("--n-subclusters", type=int, default=16,
                           help="sub-cluster AdaCos centres per class (Wilkinghoff)")
        group.add_argument("--learn-centres", action=argparse.BooleanOptionalAction,
                           default=False, help="train the sub-cluster centres; default: kept "
                           "at their random start, as Wilkinghoff's code (the report is silent)")
        group.add_argument("--kmeans-centres", type=int, default=16,
                           help="k-means centres of the source embeddings per section, score")
        group.add_argument("--n-pseudo", type=int, default=4,
                           help="pseudo-attributes per noAttribute section (our choice)")
        group.add_argument("--mixup-alpha", type=float, default=1.0,
                           help="mixup Beta(alpha, alpha) (Wilkinghoff's uniform)")
        group.add_argument("--warp-sigma", type=float, default=0.2,
                           help="time warping: standard deviation of the speed (Iwana's)")
        group.add_argument("--smote-k", type=int, default=5,
                           help="SMOTE neighbours (Chawla's); also the time-warped copies a "
                                "single-clip class gets first")
        group.add_argument("--pool", default="all", choices=("all", "part"),
                           help="the clips of the classifier all machine types share: every "
                                "machine type of the year, dev and eval parts (Wilkinghoff), "
                                "or those of the run's part")
        group.add_argument("--ensemble", type=int, default=1,
                           help="networks trained from different seeds, their scores averaged "
                                "(the report names none; Wilkinghoff averages 5 to 10)")
        group.add_argument("--supplemental", action=argparse.BooleanOptionalAction,
                           default=False, help="2025: train also on supplemental/ normal clips")

    def __init__(self, *, year, epochs=None, batch_size=None, lr=None, seed=0, device="cpu",
                 cache_dir=None, log=print, variant="submission2", pseudo_attributes=None,
                 mixup=None, time_warp=None, smote=None, clip_seconds=18.0, n_subclusters=16,
                 learn_centres=False, kmeans_centres=16, n_pseudo=4, mixup_alpha=1.0,
                 warp_sigma=0.2, smote_k=5, supplemental=False, pool="all", ensemble=1):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant '{variant}'; valid: {', '.join(VARIANTS)}")
        paper = self.defaults(year)
        self.epochs = paper["epochs"] if epochs is None else epochs
        self.batch_size = paper["batch_size"] if batch_size is None else batch_size
        self.lr = paper["lr"] if lr is None else lr
        self.seed, self.device, self.log = seed, device, log
        given = dict(pseudo_attributes=pseudo_attributes, mixup=mixup, time_warp=time_warp,
                     smote=smote)
        self.switches = {k: VARIANTS[variant][k] if v is None else v for k, v in given.items()}
        self.n_subclusters, self.learn_centres = n_subclusters, learn_centres
        self.kmeans_centres, self.n_pseudo, self.mixup_alpha = kmeans_centres, n_pseudo, mixup_alpha
        self.warp_sigma, self.smote_k, self.supplemental = warp_sigma, smote_k, supplemental
        self.shared_pool = pool          # asd.shared_pool's kind for the shared classifier
        self.n_samples = int(round(clip_seconds * features.SR))
        self.settings = dict(sr=features.SR, n_samples=self.n_samples, n_fft=features.N_FFT,
                             hop=features.HOP, band_hz=features.BAND_HZ)
        self.min_samples = features.N_FFT      # 64 ms: a shorter clip holds no frame to repeat
        n_bins = int(features.band_spectrogram(torch.zeros(1, features.N_FFT)).shape[1])
        if ensemble < 1:
            raise ValueError(f"--ensemble must be 1 or more, not {ensemble}")
        self.nets = []           # the ensemble's members; member k starts from seed + 1000 k
        for k in range(ensemble):
            with train.seeded(seed + MEMBER_SEED * k):
                self.nets.append(models.DualBranch(self.n_samples // 2, n_bins).to(device))
        self.references = {}     # section -> [NearestCosine on its references, per member]
        self.train_embeddings = {}     # section -> [(n, 256) per member]

    # ----------------------------------------------------------------------------------------
    # Inputs: fixed-length waveforms on the device; spectrum and spectrogram per batch

    def waves(self, clips):
        """(N, n_samples) fixed-length waveforms, on the device."""
        return torch.stack([features.fixed_length(w, n_samples=self.n_samples) for w in
                            features.load_batch([c.path for c in clips])]).to(self.device)

    def embed_batch(self, w, net):
        """(B, n_samples) waveforms -> (B, 256) embeddings (the spectrum without Nyquist)."""
        spectrum = features.magnitude_spectrum(w)[:, :self.n_samples // 2]   # (B, n / 2)
        return net(spectrum, features.band_spectrogram(w))

    @torch.no_grad()
    def embed(self, w, net, batch=64):
        net.eval()
        return torch.cat([self.embed_batch(w[i:i + batch], net) for i in range(0, len(w), batch)])

    @staticmethod
    def static_spectrum(w):
        """Log mean magnitude spectrum (STFT 1024/512) of each clip, (N, 513): what pseudo-
        attributes are clustered on and SMOTE's neighbours are found by."""
        spec = features.stft(w, n_fft=features.N_FFT, hop=features.HOP).abs().mean(dim=-1)
        return torch.log(spec + 1e-6)

    # ----------------------------------------------------------------------------------------
    # Classes: joint (machine, section, attributes or pseudo-attribute, domain) and machine

    def classes(self, clips, w, gen):
        """(joint class names, machine class names) of every clip."""
        attrs = [c.attributes for c in clips]
        if self.switches["pseudo_attributes"]:
            for key in sorted({(c.machine, c.section) for c in clips}):
                idx = [i for i, c in enumerate(clips) if (c.machine, c.section) == key and
                       c.domain != "target"]
                # hidden attributes, and (our extension) one attribute string for the whole
                # source domain, as the RoboticArm sample has: both leave one source class
                if len({attrs[i] for i in idx} - set(HIDDEN)) <= 1 and len(idx) > self.n_pseudo:
                    # the log spectrum as it is: scaling each bin to unit variance made the
                    # near-silent bins' noise count as much as the machine's lines
                    x = self.static_spectrum(w[idx])
                    labels = detectors.KMeans(self.n_pseudo).fit(x, gen).predict(x)
                    for i, k in zip(idx, labels.tolist()):
                        attrs[i] = f"pseudo{k}"
        machine = [f"{c.machine}_{c.section}" for c in clips]
        joint = [f"{m}|{a}|{c.domain or 'source'}" for m, a, c in zip(machine, attrs, clips)]
        return joint, machine

    def oversample(self, w, joint, gen):
        """Time-warped and SMOTE clips for each target-domain class smaller than the mean of
        its section's source classes: (new waveforms (M, n), their joint class names)."""
        sizes = collections.Counter(joint)
        new_w, new_names = [], []
        for name in sorted(sizes):
            section, _, domain = name.split("|")
            source = [n for s, n in sizes.items() if s.startswith(f"{section}|") and
                      s.endswith("|source")]
            grow = int(round(np.mean(source))) - sizes[name] if source else 0
            if domain != "target" or grow <= 0:
                continue
            members = w[[i for i, n in enumerate(joint) if n == name]]
            made = []
            if self.switches["time_warp"] and (len(members) == 1 or not self.switches["smote"]):
                n = grow if not self.switches["smote"] else min(grow, self.smote_k)
                pick = torch.randint(len(members), (n,), generator=gen, device=gen.device)
                made.append(self.time_warp(members[pick.to(members.device)], gen))
            pool = torch.cat([members, *made])
            if self.switches["smote"] and len(pool) >= 2 and len(pool) - len(members) < grow:
                made.append(augment.smote(pool, gen, n_new=grow - len(pool) + len(members),
                                          k=self.smote_k, space=self.static_spectrum(pool)))
            for m in made:
                new_w.append(m)
                new_names += [name] * len(m)
        return (torch.cat(new_w) if new_w else w[:0]), new_names

    def time_warp(self, w, gen):
        """Time-warped copies of (N, n) waveforms: the STFT's time axis warped, every bin kept at
        its frequency (augment.time_warp), and back to waveforms (N, n). Warping the waveform
        itself would shift its pitch with the speed (a 1 kHz tone, sigma 0.2: 680-1370 Hz)."""
        spec = features.stft(w, n_fft=features.N_FFT, hop=WARP_HOP)       # (N, F, T) complex
        spec = augment.time_warp(spec, gen, hop=WARP_HOP, sigma=self.warp_sigma)
        return features.istft(spec, hop=WARP_HOP, length=w.shape[-1])

    # ----------------------------------------------------------------------------------------
    # Training (eq. 1): sub-cluster AdaCos over joint classes plus over machines

    def fit(self, clips, workdir, *, shared=None, supplemental_clips=()):
        """The classifier as `fit_shared` left it (`shared`), or trained here on the clips
        alone; then this machine type's references."""
        if shared is None:
            shared, _, _ = self.fit_shared(clips, workdir, supplemental_clips=supplemental_clips)
        for net, state in zip(self.nets, shared["nets"]):
            net.load_state_dict(state)
        self.fit_references(clips, torch.Generator(self.device).manual_seed(self.seed))

    def fit_shared(self, pool, workdir, *, supplemental_clips=()):
        """Train the classifier on the pool (every machine type's clips): (its state, the
        clips it saw, what to record)."""
        pool = list(pool)
        if self.supplemental:
            pool += list(supplemental_clips)
            self.log(f"{len(supplemental_clips)} supplemental clips join the training pool")
        gen = torch.Generator(self.device).manual_seed(self.seed)     # draws on the device
        w = self.waves(pool)
        joint, machine = self.classes(pool, w, gen)
        if self.switches["time_warp"] or self.switches["smote"]:
            extra_w, extra = self.oversample(w, joint, gen)
            self.log(f"{len(extra)} time-warped or SMOTE clips for rare target classes")
            w = torch.cat([w, extra_w])
            machine += [n.split("|")[0] for n in extra]
            joint += extra
        y_joint, y_machine = one_hot(joint, self.device), one_hot(machine, self.device)
        self.log(f"training on {len(w)} clips: {y_joint.shape[1]} joint classes, "
                 f"{y_machine.shape[1]} machines")
        if y_joint.shape[1] < 2:
            self.log("warning: one class only (one machine, no attributes, no pseudo-"
                     "attributes): the classifier has nothing to learn; try --pseudo-attributes")
        for k, net in enumerate(self.nets):
            if len(self.nets) > 1:
                self.log(f"ensemble member {k + 1} of {len(self.nets)}")
            name = "checkpoint.pt" if k == 0 else f"checkpoint_{k}.pt"
            self.train_member(net, w, y_joint, y_machine, gen, workdir / name,
                              self.seed + MEMBER_SEED * k + 1)
        return {"nets": [net.state_dict() for net in self.nets]}, pool, {"classes": {
            "joint": y_joint.shape[1], "machine": y_machine.shape[1]}}

    def train_member(self, net, w, y_joint, y_machine, gen, checkpoint, head_seed):
        """Eq. 1 for one network: sub-cluster AdaCos heads over the joint and machine classes
        (their centres fixed unless --learn-centres), Adam, mixup per --mixup."""
        with train.seeded(head_seed):
            heads = torch.nn.ModuleList([losses.SubClusterAdaCos(
                net.embedding_dim, y.shape[1], self.n_subclusters,
                trainable=self.learn_centres) for y in (y_joint, y_machine)]).to(self.device)
        module = torch.nn.ModuleDict({"net": net, "heads": heads})
        opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=self.lr)
        net.train(), heads.train()
        for epoch in train.epochs(module, opt, gen, self.epochs, checkpoint, self.log):
            rng = augment.numpy_rng(gen)                                 # mixup's Beta draws
            for idx in train.batches(len(w), self.batch_size, gen):
                xb, labels = w[idx], [y_joint[idx], y_machine[idx]]
                if self.switches["mixup"]:
                    xb, perm, lam = augment.mixup(xb, gen, rng, alpha=self.mixup_alpha,
                                                  per_sample=True)      # lam: (B,)
                    labels = [lam[:, None] * y + (1 - lam[:, None]) * y[perm] for y in labels]
                emb = self.embed_batch(xb, net)
                # eq. 1; a single machine class gives log p = 0 and adds nothing
                loss = sum(-(y * head(emb, y)).sum(1).mean() for y, head in zip(labels, heads))
                epoch.add(train.step(opt, loss), len(idx))

    def fit_references(self, clips, gen):
        """Per section of the clips to score and per ensemble member: k-means centres of the
        source embeddings and the target embeddings, unit length (Wilkinghoff's score)."""
        w = self.waves(clips)
        self.references, self.train_embeddings = {}, {}
        for net in self.nets:
            emb = torch.nn.functional.normalize(self.embed(w, net))
            for section in sorted({c.section for c in clips}):
                own = [i for i, c in enumerate(clips) if c.section == section]
                source = [i for i in own if clips[i].domain != "target"]
                target = [i for i in own if clips[i].domain == "target"]
                refs = [emb[target]]
                if source:
                    refs.append(detectors.KMeans(self.kmeans_centres).fit(emb[source], gen).centres)
                self.references.setdefault(section, []).append(
                    detectors.NearestCosine().fit(torch.cat(refs)))
                self.train_embeddings.setdefault(section, []).append(emb[own])

    # ----------------------------------------------------------------------------------------
    # Score: cosine distance to the nearest reference of the clip's section (the ensemble's
    # mean)

    def score(self, clips):
        unknown = sorted({c.section for c in clips} - set(self.references))
        if unknown:
            raise ValueError(f"sections {unknown} were not in training; trained: "
                             f"{sorted(self.references)}")
        w = self.waves(clips)
        scores = torch.zeros(len(clips), dtype=torch.float64)
        for k, net in enumerate(self.nets):
            emb = self.embed(w, net)
            for section, refs in self.references.items():
                idx = [i for i, c in enumerate(clips) if c.section == section]
                if idx:
                    scores[idx] += refs[k].score(emb[idx]).cpu() / len(self.nets)
        return scores.numpy()

    def train_scores(self):
        """Fallback only (asd.py scores held-out clips): each training clip's cosine distance
        to its nearest other training clip of the section (the ensemble's mean), since a target
        clip is its own reference and a source clip may be its own k-means centre."""
        return torch.cat([torch.stack([detectors.NearestCosine().fit(e).train_scores().cpu()
                                       for e in members]).mean(0)
                          for members in self.train_embeddings.values()]).numpy()

    def n_parameters(self):
        """Of the networks (the AdaCos heads are dropped at test time)."""
        return sum(p.numel() for net in self.nets for p in net.parameters())

    def state(self):
        return {"nets": [net.state_dict() for net in self.nets],
                "references": {s: [r.train for r in refs] for s, refs in self.references.items()},
                "train_embeddings": self.train_embeddings}

    def load_state(self, state):
        for net, saved in zip(self.nets, state["nets"]):
            net.load_state_dict(saved)
        self.references = {s: [detectors.NearestCosine().load_state({"train": t.to(self.device)})
                               for t in refs] for s, refs in state["references"].items()}
        self.train_embeddings = state["train_embeddings"]


def one_hot(names, device):
    """Class names -> (N, n_classes) float one-hot rows, classes in sorted order."""
    classes = sorted(set(names))
    index = torch.tensor([classes.index(n) for n in names], device=device)
    return torch.nn.functional.one_hot(index, len(classes)).float()
