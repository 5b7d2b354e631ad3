"""Shinmura 2020: self-supervised MobileNetV2 + ArcFace on generated anomalies.

Zero Shinmura, "DCASE2020 Task 2 self-supervised learning solution" (technical report).
Input (4.1): dB magnitude spectrogram (n_fft 512, hop 256) resized to 224 x 224, one channel,
normalised by the training set's mean and standard deviation (features.spectrogram_image).
Pre-training (3.4): MobileNetV2 from random weights, a softmax classifier over machine IDs
with mixup; the paper used 3 IDs of each of 6 machine types (18 classes). It is one network
for every machine type (`fit_shared`): the CLI trains it once a year on the training clips of
every machine type of the dev set and hands it to each machine type's run (`shared`); the
classes are their IDs (sections), up to --pretrain-classes per machine type, or their
attribute strings where a year has one section per machine type. Its accuracy on the clips it
trained on is logged at its end (the paper reports 98%).
Unit (tables 1-4; the author's notebook trains one ID): one ensemble per machine ID (section),
trained on that ID's clips, whose training clips are the nearest-neighbour reference of its
test clips (--per-section, the default; --no-per-section: one per machine type).
Self-supervised training (3.1-3.3): normal clips (label 0) against anomalies generated from
them (label 1: white noise, pink noise, slight line, average Hz; augment.py), with an ArcFace
head; hard samples: 5 x batch candidates, the batch-size of them the model finds least
anomalous.
Score (3.5): the head is dropped; a test clip's score is its cosine distance to the nearest
training clip in the GAP embedding (the paper's "minimum of cosine similarity" read as
nearest-neighbour cosine distance, 1 - max cos; detectors.NearestCosine), averaged over an
ensemble of models.
Where the paper is silent, the author's notebook and weights
(shinmura0/DCASE2020_Task2_Solution-Anomaly_detection-) are followed: MobileNetV2 width 0.5
(his pre-trained weights; --width 1.0 is torchvision's) with Keras' BatchNorm epsilon (BN_EPS),
noise 9-20 dB below the clip, a slight line 5-19 x 2-4 pixels (augment.py). Where his code
differs from the paper, the paper is the default and his code a flag: Adam (4.1; --amsgrad: his Adam(amsgrad=True)); Average Hz flattens
a band a quarter of the image high, as Fig. 3 shows it (--average-rows 2 3: his notebook's 2-3
rows of 224; the paper's tables come from the system that drew Fig. 3).
Our choices: mixup alpha 0.2, 10 pre-training epochs at lr 1e-3 in batches of 64, ensemble
members that differ only in seed and share one pre-trained network, and BatchNorm statistics
recomputed where training was too short for them to settle (BN_RESIDUE, below); with
--per-section the input is still normalised by the mean and deviation of all the machine
type's training clips.
"""
import argparse
import collections
from pathlib import Path

import torch
import torch.nn.functional as F

import augment
import data
import detectors
import features
import losses
import models
import train

# The paper's development-set figures (table 1: AUC per machine ID, one model per ID, an
# ensemble of 10; no pAUC, so no 2020 official score), shown beside ours by `evaluate`.
PAPER_DEV = {
    "year": 2020, "source": "Shinmura 2020, table 1 (AUC per machine ID)",
    "sections": {
        ("fan", "00"): {"auc": 0.642}, ("fan", "02"): {"auc": 0.948},
        ("fan", "04"): {"auc": 0.775}, ("fan", "06"): {"auc": 0.691},
        ("valve", "00"): {"auc": 0.996}, ("valve", "02"): {"auc": 0.999},
        ("valve", "04"): {"auc": 0.959}, ("valve", "06"): {"auc": 0.808},
        ("slider", "00"): {"auc": 0.999}, ("slider", "02"): {"auc": 0.943},
        ("slider", "04"): {"auc": 0.999}, ("slider", "06"): {"auc": 0.951},
        ("pump", "00"): {"auc": 0.899}, ("pump", "02"): {"auc": 0.873},
        ("pump", "04"): {"auc": 0.999}, ("pump", "06"): {"auc": 0.787},
        ("ToyCar", "01"): {"auc": 0.823}, ("ToyCar", "02"): {"auc": 0.899},
        ("ToyCar", "03"): {"auc": 0.919}, ("ToyCar", "04"): {"auc": 0.995},
        ("ToyConveyor", "01"): {"auc": 0.748}, ("ToyConveyor", "02"): {"auc": 0.628},
        ("ToyConveyor", "03"): {"auc": 0.724}},
    "machines": {}, "official_score": None,
    # the paper's run, for the line under the results table where ours differs
    "setting": {"epochs": 7, "batch_size": 32, "ensemble": 10, "image_size": 224,
                "per_section": True, "pretrain": True, "hard_samples": True}}
PRETRAIN_LR = 1e-3      # our choice: the paper gives no pre-training settings
PRETRAIN_BATCH = 64
# A BatchNorm layer's running statistics are an exponential average started at mean 0 and
# variance 1: after n updates at momentum 0.1, 0.9^n of that start remains. On small sets
# (52 real clips: ~24 updates, 8% left) the leftover variance swamps the real one and in eval
# mode every embedding shrinks towards one point. Where some layer keeps more than this share
# of its start (at momentum 0.1: fewer than 44 updates), the statistics are recomputed over the
# training clips (--recompute-bn auto). Not sooner (1e-3: 66 updates): on short runs exact
# statistics are no better than trained ones, and the recomputation has no fault of its own:
# statistics that settle by themselves score the same way. Synthetic 2020 valve, one model per
# ID, tests/test_shinmura.py's SMALL settings with --recompute-bn never, the same members
# re-scored with their statistics changed (AUC ID 00 / 02):
#   50 updates: as trained 0.94 / 0.81, less their leftover start (0.9^50 of variance 1, 0.005)
#               0.22 / 0.35; recomputed 0.21 / 0.50, plus that start 0.97 / 0.88
#   180 updates (60 epochs, no start left): as trained 0.21 / 0.46, recomputed 0.42 / 0.29;
#               at lr 1e-3 as trained 0.38 / 0.56, recomputed 0.77 / 0.83
#   any of these recomputed with eps 5e-3 to 1e-2: 0.86-0.97 / 0.62-0.85
# A short run's score swings with its normalisation, either way, and a variance floor (the
# leftover start, or a larger eps) steadies it. The deep depthwise layers' variance is ~1e-3,
# at eps: PyTorch's He initialisation counts all 9C outputs of a depthwise 3x3 filter (std
# sqrt(2/9C)), as Keras' glorot counts its 9C inputs, and a few hundred steps barely move them.
# The author ran ~3,000 updates with Keras' BatchNorm momentum 0.999, which leaves ~5% of the
# start (a floor of ~0.05); at our small sets' ~50 updates it would leave 95%, so we keep
# PyTorch's 0.1 and the author's eps, keep the statistics as trained where they are mostly
# settled, and recompute them only where they are mostly their start.
BN_RESIDUE = train.BN_RESIDUE                 # 1e-2, shared with jless2022
# BatchNorm's epsilon as the author's Keras MobileNetV2 (model.json: 1e-3), not PyTorch's 1e-5:
# with exact statistics (recomputed, or settled), a channel whose variance is below ~1e-3 is
# blown up to unit variance at 1e-5 and its noise fills the embedding. On a synthetic 2020 valve
# set, statistics recomputed over the normal training clips gave AUC 0.40 / 0.39 (IDs 00 / 02)
# at 1e-5, below chance, and 0.86 / 0.84 at 1e-3; the running statistics as trained 0.89 / 0.57
# at either (their leftover start, 0.9^50 of variance 1, had hidden the fault as a floor).
BN_EPS = 1e-3


class Shinmura2020:
    name = "shinmura2020"
    # 3.4 and 4.1: the development set's training clips (the notebook: one ID's)
    training_data = dict(additional=False, paper="the development set's training clips of "
                                                 "each machine ID (one model per ID)")
    shared_name = "pretraining"
    # the self-supervised stage's own options, which the shared pre-training ignores
    shared_ignores = ("epochs", "batch_size", "lr", "arcface_scale", "arcface_margin",
                      "generators", "hard_samples", "hard_factor", "ensemble", "recompute_bn",
                      "per_section", "average_rows", "amsgrad")
    quick = dict(epochs=2, batch_size=16, width=0.25, image_size=64, ensemble=1,
                 pretrain_epochs=1)             # a smoke run: every step, no detection quality
    meta = dict(                                # the submission template's system description
        acoustic_features="dB magnitude spectrogram (512-sample window, 256 hop) resized to "
                          "224 x 224",
        data_augmentation="mixup (pre-training); generated anomalies: white and pink noise, "
                          "a slight line, average Hz",
        machine_learning_method="MobileNetV2 pre-trained as a machine-ID classifier, then "
                                "trained with an ArcFace head on normal vs generated anomalies",
        anomaly_score="cosine distance to the nearest training clip's embedding, averaged "
                      "over the ensemble",
        external_data_usage=None, pretrained_models=None)

    @staticmethod
    def defaults(year):
        return dict(epochs=7, batch_size=32, lr=1e-4)      # section 4.2: Adam

    @staticmethod
    def add_flags(group):
        group.add_argument("--width", type=float, default=0.5,
                           help="MobileNetV2 width multiplier (the paper is silent; the "
                                "author's pre-trained weights are 0.5)")
        group.add_argument("--image-size", type=int, default=224, help="input image side, pixels")
        # the paper prints "m=30, s=0.05": a scale of 30 and a margin of 0.05 rad is the
        # plausible reading (a margin of 30 rad is meaningless, a scale of 0.05 cannot train)
        group.add_argument("--arcface-scale", type=float, default=30.0, help="ArcFace scale s")
        group.add_argument("--arcface-margin", type=float, default=0.05,
                           help="ArcFace additive angular margin m, radians")
        group.add_argument("--generators", nargs="+", default=list(augment.GENERATORS),
                           choices=list(augment.GENERATORS), help="generated anomaly kinds")
        group.add_argument("--average-rows", type=int, nargs=2, default=list(augment.AVERAGE_ROWS),
                           metavar=("LOW", "HIGH"),
                           help="Average Hz: rows flattened, drawn from LOW..HIGH rows of a "
                                "224-row image (scaled to --image-size); 56 56: a quarter, as "
                                "Fig. 3 (the paper); 2 3: the author's notebook")
        group.add_argument("--amsgrad", action=argparse.BooleanOptionalAction, default=False,
                           help="AMSGrad in the self-supervised training, as the author's code "
                                "(the paper: Adam)")
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
        group.add_argument("--per-section", action=argparse.BooleanOptionalAction, default=True,
                           help="one ensemble per machine ID (section), its clips the reference "
                                "of its test clips, as the paper's tables; else one per type")
        group.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                           help="bf16: bfloat16 autocast on CUDA (half the memory; no faster "
                                "than fp32 on an H100); on the CPU fp32 is used and said")
        group.add_argument("--recompute-bn", default="auto", choices=("auto", "always", "never"),
                           help="recompute BatchNorm statistics over the training images after "
                                "a member's training; auto: only where some BatchNorm layer had "
                                "too few updates to forget its start (not in the paper; see "
                                "BN_RESIDUE in the code)")

    def __init__(self, *, year, epochs=None, batch_size=None, lr=None, seed=0, device="cpu",
                 cache_dir=None, log=print, width=0.5, image_size=224, arcface_scale=30.0,
                 arcface_margin=0.05, generators=tuple(augment.GENERATORS),
                 average_rows=augment.AVERAGE_ROWS, amsgrad=False, pretrain=True,
                 pretrain_epochs=10, pretrain_classes=3, mixup_alpha=0.2, hard_samples=True,
                 hard_factor=5, ensemble=10, precision="fp32", recompute_bn="auto",
                 per_section=True):
        paper = self.defaults(year)
        self.epochs = paper["epochs"] if epochs is None else epochs
        self.batch_size = paper["batch_size"] if batch_size is None else batch_size
        self.lr = paper["lr"] if lr is None else lr
        self.year, self.seed, self.device, self.cache_dir, self.log = year, seed, device, cache_dir, log
        self.width, self.image_size = width, image_size
        self.settings = dict(n_fft=512, hop=256, size=image_size, pad_mode="reflect")
        self.min_samples = self.settings["n_fft"] // 2 + 1      # reflect padding's minimum
        self.arcface = dict(scale=arcface_scale, margin=arcface_margin)
        self.generators, self.average_rows = tuple(generators), tuple(average_rows)
        self.amsgrad = amsgrad
        self.pretrain, self.pretrain_epochs = pretrain, pretrain_epochs
        self.pretrain_classes, self.mixup_alpha = pretrain_classes, mixup_alpha
        self.hard_samples, self.hard_factor, self.ensemble = hard_samples, hard_factor, ensemble
        self.recompute_bn, self.precision = recompute_bn, precision
        self.per_section = per_section
        self.shared_pool = "dev" if pretrain else None      # asd.shared_pool's kind
        self.bf16 = precision == "bf16" and str(device).startswith("cuda")
        if precision == "bf16" and not self.bf16:
            log(f"--precision bf16 is for CUDA; on {device} this run uses fp32")
        # NHWC images and weights on CUDA, whatever the precision: one training step at the
        # paper's sizes on an H100 took 29-32 ms instead of 45 (fp32; cuDNN's NCHW BatchNorm
        # kernels are slow), and bf16 gained nothing beyond it (32-38 ms)
        self.channels_last = str(device).startswith("cuda")
        self.mean, self.std = 0.0, 1.0
        self.members = {}        # section (or "all") -> one MobileNetV2 per ensemble member
        self.detectors = {}      # section (or "all") -> one NearestCosine per member

    def images(self, clips):
        """dB spectrogram images of the clips, (N, size, size)."""
        return torch.stack(features.clip_features(
            [c.path for c in clips], "spectrogram_image", self.settings,
            cache_dir=self.cache_dir, device=self.device, log=self.log))

    def normalise(self, images_db):
        x = ((images_db - self.mean) / self.std).unsqueeze(1)          # (B, 1, H, W)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self):
        """bfloat16 matrix products and convolutions on CUDA with --precision bf16."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16)

    def network(self):
        net = models.MobileNetV2(width=self.width, bn_eps=BN_EPS).to(self.device)
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

    def unit(self, clip):
        """The model a clip belongs to: its machine ID (section), or "all" (--no-per-section)."""
        return clip.section if self.per_section else "all"

    def fit(self, clips, workdir, *, shared=None):
        """Self-supervised training of each unit's ensemble from the shared pre-trained
        network (`shared`; pre-trained here on the clips themselves when none is given)."""
        x = self.images(clips).to(self.device)        # (N, H, W) dB; stays on the device
        self.mean, self.std = float(x.mean()), float(x.std())
        backbone = shared
        if backbone is None and self.pretrain:
            backbone = self._own_pretraining(clips, Path(workdir))
        self.members, self.detectors = {}, {}
        for unit in sorted({self.unit(c) for c in clips}):
            xu = x[[i for i, c in enumerate(clips) if self.unit(c) == unit]]
            tag = f"id{unit}_" if self.per_section else ""
            self.members[unit] = [self._train_member(i, xu, backbone, workdir, tag)
                                  for i in range(self.ensemble)]
            self.detectors[unit] = [detectors.NearestCosine().fit(self._embed(net, xu))
                                    for net in self.members[unit]]

    # ----------------------------------------------------------------------------------------
    # Pre-training (3.4): a softmax classifier over machine IDs, with mixup

    def _pretrain_set(self, pool):
        """The clips of the pool in the kept classes, and their class index: (machine,
        section), or (machine, attributes) where a year has one section per machine type."""
        spec = data.get_year(self.year)
        n_sections = {m: len(spec.dev.get(m, spec.eval.get(m, ()))) for m in spec.machines}
        key = {c: (c.machine, c.section if n_sections.get(c.machine, 1) > 1 else c.attributes)
               for c in pool}
        kept = []
        for m in sorted({c.machine for c in pool}):
            counts = collections.Counter(k for c, k in key.items() if c.machine == m)
            kept += sorted(counts, key=lambda k: (-counts[k], k))[:self.pretrain_classes]
        if len(kept) < 2:
            machines = sorted({c.machine for c in pool})
            raise ValueError(f"pre-training needs two classes (IDs, sections or attribute "
                             f"sets); the {len(pool)} training clips of {', '.join(machines)} "
                             f"give {kept}; pass --no-pretrain")
        chosen = [c for c in pool if key[c] in kept]
        return chosen, torch.tensor([kept.index(key[c]) for c in chosen]), len(kept)

    def _own_pretraining(self, clips, workdir):
        """Pre-training on the clips being fitted (no shared pool: your own machine), kept in
        the model folder, so that an interrupted run does not pre-train again."""
        path = workdir / "pretrained.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        state, _, _ = self.fit_shared(clips, workdir)
        train.save(state, path)
        return state

    def fit_shared(self, pool, workdir):
        """MobileNetV2 weights after softmax pre-training on the pool (3.4): (the weights, the
        clips of the kept classes, {"accuracy": on those clips, after training})."""
        pool, labels, n_classes = self._pretrain_set(pool)
        self.log(f"pre-training on {len(pool)} clips, {n_classes} classes")
        x = self.images(pool).to(self.device)
        x = (x - x.mean()) / x.std()
        labels = labels.to(self.device)
        with train.seeded(self.seed):
            net = self.network()
            head = torch.nn.Linear(net.embedding_dim, n_classes).to(self.device)
        module = torch.nn.ModuleDict({"net": net, "head": head})
        opt = torch.optim.Adam(module.parameters(), lr=PRETRAIN_LR)
        gen = torch.Generator(self.device).manual_seed(self.seed)     # draws on the device
        net.train()
        for epoch in train.epochs(module, opt, gen, self.pretrain_epochs,
                                  Path(workdir) / "checkpoint_pretraining.pt", self.log,
                                  what="pre-training epoch"):
            rng = augment.numpy_rng(gen)                             # mixup's Beta draws
            for idx in train.batches(len(x), PRETRAIN_BATCH, gen):
                xb, yb = x[idx].unsqueeze(1), labels[idx]
                mixed, perm, lam = augment.mixup(xb, gen, rng, alpha=self.mixup_alpha)
                with self.autocast():
                    logits = head(net(mixed)).float()
                loss = lam * F.cross_entropy(logits, yb) + (1 - lam) * F.cross_entropy(logits, yb[perm])
                epoch.add(train.step(opt, loss), len(idx))
        accuracy = self._accuracy(net, head, x, labels)
        self.log(f"pre-training accuracy on its {len(pool)} clips: {accuracy:.1%} (the paper "
                 f"reports 98%)")
        (Path(workdir) / "checkpoint_pretraining.pt").unlink(missing_ok=True)
        return net.state_dict(), pool, {"accuracy": accuracy}

    @torch.no_grad()
    def _accuracy(self, net, head, x, labels, batch=64):
        """The share of clips (N, H, W) that the classifier, in eval mode, gives their class."""
        net.eval()
        with self.autocast():
            right = sum(int((head(net(x[i:i + batch].unsqueeze(1))).argmax(1) ==
                             labels[i:i + batch]).sum()) for i in range(0, len(x), batch))
        net.train()
        return right / len(x)

    # ----------------------------------------------------------------------------------------
    # Self-supervised training (3.1-3.3): normal against generated anomalies, ArcFace

    def _train_member(self, i, x, backbone, workdir, tag=""):
        """Self-supervised training of ensemble member i (of the unit `tag` names), from the
        pre-trained weights."""
        done = workdir / f"member_{tag}{i}.pt"
        with train.seeded(self.seed + i):
            net = self.network()
            head = losses.ArcFace(net.embedding_dim, 2, **self.arcface).to(self.device)
        if done.exists():                                   # finished before an interruption
            net.load_state_dict(torch.load(done, weights_only=True))
            return net
        if backbone is not None:
            net.load_state_dict(backbone)
        module = torch.nn.ModuleDict({"net": net, "head": head})
        opt = torch.optim.Adam(module.parameters(), lr=self.lr, amsgrad=self.amsgrad)
        gen = torch.Generator(self.device).manual_seed(self.seed + 1000 * (i + 1))
        checkpoint = workdir / f"checkpoint_{tag}{i}.pt"
        net.train(), head.train()
        labels = torch.zeros(2 * self.batch_size, dtype=torch.long, device=self.device)
        labels[self.batch_size:] = 1                              # normal clips, then anomalies
        for epoch in train.epochs(module, opt, gen, self.epochs, checkpoint, self.log,
                                  what=f"{tag.replace('_', ' ')}model {i + 1}/{self.ensemble} epoch"):
            for idx in train.batches(len(x), self.batch_size, gen):
                normal = x[idx]                                            # (B, H, W) dB
                anomalies = self._anomalies(net, head, normal, gen)
                y = labels[self.batch_size - len(idx):self.batch_size + len(idx)]  # 0s, then 1s
                with self.autocast():
                    emb = net(self.normalise(torch.cat([normal, anomalies]))).float()
                loss = F.cross_entropy(head(emb, y), y)
                epoch.add(train.step(opt, loss), len(idx))
        if self.recompute_bn == "always" or (self.recompute_bn == "auto" and
                                             train.bn_unsettled(net, BN_RESIDUE)):
            self.log(f"model {i + 1}: BatchNorm statistics recomputed over the training clips "
                     f"(fewest updates of a layer: {train.bn_updates(net)})")
            self._recompute_bn(net, x)
        train.save(net.state_dict(), done)
        checkpoint.unlink(missing_ok=True)
        return net

    def _recompute_bn(self, net, x):
        """BatchNorm statistics as plain averages (SWA's update_bn) over the normal training
        images, in batches of the training's size, none of one (BN_EPS, BN_RESIDUE)."""
        train.recompute_bn(net, x, self.batch_size, self.normalise)

    def _anomalies(self, net, head, normal, gen):
        """Generated anomalies for a batch: hard samples (3.3) or one per normal clip."""
        if not self.hard_samples:
            return augment.generate_anomalies(normal, gen, kinds=self.generators,
                                              average_rows=self.average_rows)
        candidates = augment.generate_anomalies(normal.repeat(self.hard_factor, 1, 1), gen,
                                                kinds=self.generators,
                                                average_rows=self.average_rows)
        with torch.no_grad():
            net.eval()
            with self.autocast():
                emb = net(self.normalise(candidates)).float()
            p_anomaly = F.softmax(head(emb), dim=1)[:, 1]
            net.train()
        return select_hard(candidates, p_anomaly, len(normal))

    # ----------------------------------------------------------------------------------------
    # Score (3.5): nearest-neighbour cosine distance, averaged over the ensemble

    @torch.no_grad()
    def _embed(self, net, x, batch=64):
        """GAP embeddings of dB images (N, H, W) -> (N, D), on the CPU."""
        net.eval()
        with self.autocast():
            return torch.cat([net(self.normalise(x[i:i + batch].to(self.device))).float().cpu()
                              for i in range(0, len(x), batch)])

    def score(self, clips):
        """Each clip against its own unit's ensemble and training clips (its machine ID's)."""
        unknown = sorted({self.unit(c) for c in clips} - set(self.members))
        if unknown:
            raise ValueError(f"machine IDs (sections) {unknown} were not in training; trained: "
                             f"{sorted(self.members)}")
        x = self.images(clips)
        scores = torch.zeros(len(x), dtype=torch.float64)
        for unit, members in self.members.items():
            idx = [i for i, c in enumerate(clips) if self.unit(c) == unit]
            if not idx:
                continue
            for net, detector in zip(members, self.detectors[unit]):
                scores[idx] += detector.score(self._embed(net, x[idx])) / len(members)
        return scores.numpy()

    def train_scores(self):
        """Leave-one-out distances of the training clips, averaged over each ensemble."""
        return torch.cat([sum(d.train_scores() for d in ds) / len(ds)
                          for ds in self.detectors.values()]).numpy()

    def n_parameters(self):
        """Of every unit's ensemble (the heads are dropped at test time)."""
        return sum(p.numel() for nets in self.members.values() for net in nets
                   for p in net.parameters())

    def state(self):
        return {"mean": self.mean, "std": self.std,
                "members": {u: [net.state_dict() for net in nets]
                            for u, nets in self.members.items()},
                "train_embeddings": {u: [d.train for d in ds] for u, ds in self.detectors.items()}}

    def load_state(self, state):
        self.mean, self.std = state["mean"], state["std"]
        # on the CPU, where _embed leaves the test embeddings (asd's torch.load maps the
        # saved tensors to the run's device)
        self.detectors = {u: [detectors.NearestCosine().load_state({"train": t.cpu()})
                              for t in ts] for u, ts in state["train_embeddings"].items()}
        self.members = {u: [self.network() for _ in ws] for u, ws in state["members"].items()}
        for u, ws in state["members"].items():
            for net, weights in zip(self.members[u], ws):
                net.load_state_dict(weights)


def select_hard(candidates, p_anomaly, k):
    """The k candidates the model finds least anomalous (lowest anomaly-class probability)."""
    return candidates[torch.argsort(p_anomaly)[:k]]
