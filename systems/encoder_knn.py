"""A frozen pre-trained audio encoder and nearest neighbours: nothing is trained.

After GenRep (Saengthong & Shinozaki, "Deep Generic Representations for Domain-Generalized
Anomalous Sound Detection", ICASSP 2025; code github:Phuriches/GenRepASD), which reaches 73.79
on the DCASE 2023 evaluation set with a frozen BEATs and kNN: every clip goes whole through an
AudioSet encoder; one layer's output, pooled, is the clip's embedding; the normal training
clips' embeddings are the memory bank of their section, one bank per domain; a clip's score is
its mean cosine distance to the k nearest entries of each bank, standardised per bank, the
smaller of the two (detectors.MemoryBank, which says what was taken from GenRep and what not).

Encoders (--encoder), each written in encoders.py to its published architecture and key names,
each with its own front end computed on the device (features.*; the 16 kHz clip resampled to
the encoder's rate there):
- mn04 (default): EfficientAT's MobileNetV3 mn04_as (Schmid et al., ICASSP 2023), 1 M
  parameters, on its 32 kHz log-mel; weights `python asd.py download --weights mn04`.
- beats: BEATs iter3 (Chen et al. 2023; BEATs_iter3_plus_AS2M.pt by --pretrained), on Kaldi
  fbank; GenRep's encoder. Its layer 5 and mean over time per frequency patch are GenRep's.
- resnet38: PANNs' ResNet38 (Kong et al. 2020; ResNet38_mAP=0.434.pth by --pretrained).
Pooling (--pooling): "mean" over time and frequency (one value per channel), or "time" (over
time only, every frequency row kept: GenRep's temporal pooling).
Our choices: mn04's layer and pooling (ENCODERS below, with the sweep on the real BLDC and
RoboticArm samples that chose them), batches of 16 clips. Embedding at 1 thread: 100 clips/s
of 2 s, 18-22 of 7.9 s, 16 of 10-12 s (CPU time; AMD EPYC). GenRep's
values: k = 1, domain normalisation on, MemMixup off by default (--memmixup K, alpha 0.9;
GenRep's best used K = all 990 source clips with BEATs fine-tuned).
"""
import os
import time

import numpy as np
import torch

import data
import detectors
import download
import encoders
import features

# where `python asd.py download --weights mn04` puts the mn04 weights
DEFAULT_MN04 = str(data.DEFAULT_DATA_ROOT / "weights" / download.WEIGHTS["mn04"]["file"])
# encoder -> its input rate, how many layer outputs forward() gives, default layer and pooling
# (index into those outputs), and its checkpoint's name
ENCODERS = {
    # layer 13 (the 2nd block of the last stage, 64 channels x 4 frequency rows) with GenRep's
    # time pooling. A sweep of every layer and pooling on the real samples (a bank of all the
    # training clips): BLDC AUC/pAUC 1.0/1.0 on both motors for layers 0-16 with either pooling
    # (but 0-1 with mean pooling); RoboticArm near chance for all, h-mean 0.47-0.56 (13/time
    # 0.561 the highest, 16/mean 0.491), differences within that sample's +-0.13 noise
    "mn04": dict(sr=features.EFFICIENTAT_SR, n_layers=17, layer=13, pooling="time",
                 file="mn04_as_mAP_432.pt (python asd.py download --weights mn04)"),
    "beats": dict(sr=features.SR, n_layers=13, layer=5, pooling="time",
                  file="BEATs_iter3_plus_AS2M.pt (microsoft/unilm beats)"),
    "resnet38": dict(sr=features.PANNS_SR, n_layers=18, layer=16, pooling="mean",
                     file="ResNet38_mAP=0.434.pth (PANNs, Zenodo 3987831)"),
}
POOLINGS = ("mean", "time")


class EncoderKNN:
    name = "encoder_knn"
    # GenRep banks each section's own source and target training clips: the part's clips
    training_data = dict(additional=False, paper="each section's own training clips")
    shared_pool = None                  # nothing trains, so nothing is shared
    quick = dict(batch_size=4)          # nothing trains: quick only makes smaller batches
    meta = dict(
        acoustic_features="the pre-trained encoder's own front end (EfficientAT log-mel, Kaldi "
                          "fbank, or PANNs log-mel)",
        data_augmentation=None,
        machine_learning_method="frozen AudioSet encoder (EfficientAT mn04_as, BEATs iter3 or "
                                "PANNs ResNet38), pooled layer output, memory bank per section "
                                "and domain",
        anomaly_score="mean cosine distance to the k nearest training embeddings of each domain, "
                      "standardised per domain, the smaller one (GenRep)",
        external_data_usage="AudioSet (through the pre-trained encoder)",
        pretrained_models="EfficientAT mn04_as, BEATs iter3 AS2M or PANNs ResNet38")

    @staticmethod
    def defaults(year):
        return dict(epochs=0, batch_size=16, lr=0.0)    # epochs, lr: nothing is trained

    @staticmethod
    def add_flags(group):
        group.add_argument("--encoder", default="mn04", choices=list(ENCODERS),
                           help="pre-trained encoder (mn04: EfficientAT MobileNetV3, 1 M "
                                "parameters; beats, resnet38: give --pretrained)")
        group.add_argument("--pretrained", default=None, metavar="PATH",
                           help=f"the encoder's checkpoint (default for mn04: {DEFAULT_MN04})")
        group.add_argument("--layer", type=int, default=None,
                           help="which layer output is pooled (0: the first; default: the "
                                "encoder's, see ENCODERS in systems/encoder_knn.py)")
        group.add_argument("--pooling", default=None, choices=POOLINGS,
                           help="mean: over time and frequency; time: over time only, frequency "
                                "rows kept (GenRep); default: the encoder's")
        group.add_argument("--k", type=int, default=1, help="nearest neighbours averaged (GenRep: 1)")
        group.add_argument("--domain-norm", default="on", choices=("on", "off"),
                           help="standardise each domain bank's distances (GenRep's domain "
                                "normalisation, here by the bank's leave-one-out distances)")
        group.add_argument("--memmixup", type=int, default=0,
                           help="MemMixup: mix each target entry with its K nearest source "
                                "entries into the target bank (0: off)")
        group.add_argument("--memmixup-alpha", type=float, default=0.9,
                           help="MemMixup's weight of the target entry (GenRep: 0.9)")

    def __init__(self, *, year, epochs=None, batch_size=None, lr=None, seed=0, device="cpu",
                 cache_dir=None, log=print, encoder="mn04", pretrained=None, layer=None,
                 pooling=None, k=1, domain_norm="on", memmixup=0, memmixup_alpha=0.9):
        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder '{encoder}'; valid: {', '.join(ENCODERS)}")
        spec = ENCODERS[encoder]
        self.batch_size = batch_size or self.defaults(year)["batch_size"]
        self.device, self.log = device, log
        self.encoder, self.spec = encoder, spec
        self.pretrained = pretrained or (DEFAULT_MN04 if encoder == "mn04" else None)
        if not self.pretrained:
            raise ValueError(f"--encoder {encoder} needs its checkpoint: --pretrained "
                             f"{spec['file'].split(' ')[0]}")
        self.layer = spec["layer"] if layer is None else layer
        if not 0 <= self.layer < spec["n_layers"]:
            raise ValueError(f"--layer {self.layer}: {encoder} has layers 0 to {spec['n_layers'] - 1}")
        self.pooling = pooling or spec["pooling"]
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling '{self.pooling}'; valid: {', '.join(POOLINGS)}")
        self.bank_options = dict(k=k, normalise=domain_norm == "on", memmixup=memmixup,
                                 alpha=memmixup_alpha)
        self.settings = dict(encoder=encoder, pretrained=str(self.pretrained), layer=self.layer,
                             pooling=self.pooling, sr=spec["sr"])
        # the shortest clip each front end and network takes (in 16 kHz samples)
        self.min_samples = {"mn04": 1600, "beats": 2800, "resnet38": 31 * 320 // 2}[encoder]
        self.net = None
        self.banks = {}          # section -> detectors.MemoryBank

    # ----------------------------------------------------------------------------------------
    # The encoder and the embedding: one layer's output, pooled

    def _load_encoder(self):
        if self.encoder == "mn04":
            net = encoders.load_mobilenetv3(self.pretrained, width=0.4)
        elif self.encoder == "beats":
            net = encoders.load_beats(self.pretrained)
        else:
            net = encoders.ResNet38()
            extra = encoders.load_panns_checkpoint(net, self.pretrained)
            if extra:
                raise ValueError(f"{self.pretrained}: not a PANNs ResNet38 checkpoint: "
                                 f"'{extra[0]}' not in the network ({len(extra)} extra)")
        return net.to(self.device).eval()

    def layer_output(self, x):
        """(B, n) 16 kHz waveforms on the device -> the chosen layer's output: (B, C, F, T)
        for mn04, (B, C, T, F) for ResNet38 (PANNs' layout), (B, N, 768) for BEATs."""
        if self.encoder == "mn04":
            mel = features.efficientat_log_mel(x)                            # (B, 128, T)
            return self.net(mel.unsqueeze(1))[1][self.layer]
        if self.encoder == "beats":
            return self.net(features.kaldi_fbank(x * 2 ** 15))[self.layer]   # BEATs' scale
        x32 = features.resample_on_device(x, sr_in=features.SR, sr_out=features.PANNS_SR)
        mel = features.panns_log_mel(x32, sr_in=features.PANNS_SR)           # (B, 64, T)
        return self.net(mel)[self.layer]

    def pool(self, h):
        """The layer output pooled into one vector per clip: (B, D)."""
        if self.encoder == "beats":
            h = h.reshape(h.shape[0], -1, 8, h.shape[-1])                   # (B, T', 8, 768)
            return h.mean(dim=1).flatten(1) if self.pooling == "time" else h.mean(dim=(1, 2))
        if self.encoder == "resnet38":
            h = h.transpose(-1, -2)                                          # (B, C, F, T)
        return h.mean(dim=-1).flatten(1) if self.pooling == "time" else h.mean(dim=(-2, -1))

    @torch.no_grad()
    def embed(self, clips):
        """Every clip whole through the encoder, clips of one length in batches of batch_size.
        Returns (N, D) on the device."""
        if self.net is None:
            self.net = self._load_encoder()
        waves = [features.load_wav(c.path) for c in clips]
        out = [None] * len(clips)
        for n in sorted({len(w) for w in waves}):
            idx = [i for i, w in enumerate(waves) if len(w) == n]
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                x = torch.from_numpy(np.stack([waves[i] for i in chunk])).to(self.device)
                for i, v in zip(chunk, self.pool(self.layer_output(x))):
                    out[i] = v
        return torch.stack(out)                                              # (N, D)

    # ----------------------------------------------------------------------------------------
    # The memory banks: one per section, its source and target training embeddings

    def fit(self, clips, workdir):
        self.log(f"encoder: {self.encoder} from {self.pretrained}, layer {self.layer}, "
                 f"{self.pooling} pooling; nothing is trained")
        t0 = time.perf_counter()
        x = self.embed(clips)
        self.log(f"{x.shape[1]} values per clip from {len(clips)} clips, "
                 f"{len(clips) / (time.perf_counter() - t0):.1f} clips/s (encoder load included)")
        self.banks, order = {}, []
        for section in sorted({c.section for c in clips}):
            by_domain = {}
            for i, c in enumerate(clips):
                if c.section == section:
                    by_domain.setdefault(c.domain or "source", []).append(i)
            by_domain = {d: by_domain[d] for d in ("source", "target") if d in by_domain}
            self.banks[section] = detectors.MemoryBank(**self.bank_options).fit(
                {d: x[idx] for d, idx in by_domain.items()})
            order += [i for idx in by_domain.values() for i in idx]
        train = torch.cat([b.train_scores() for b in self.banks.values()]).cpu().numpy()
        self._train_scores = np.empty(len(clips))
        self._train_scores[order] = train                   # back into the clips' order

    def score(self, clips):
        unknown = sorted({c.section for c in clips} - set(self.banks))
        if unknown:
            raise ValueError(f"section {unknown[0]} has no memory bank: the model holds "
                             f"sections {', '.join(self.banks)}")
        x = self.embed(clips)
        scores = np.empty(len(clips))
        for section, bank in self.banks.items():
            idx = [i for i, c in enumerate(clips) if c.section == section]
            if idx:
                scores[idx] = bank.score(x[idx]).cpu().numpy()
        return scores

    def train_scores(self):
        """Each training clip's score with itself (and its mixups) left out of its bank."""
        return self._train_scores

    def n_parameters(self):
        """Of the encoder up to the pooled layer, plus the banks' stored values."""
        if self.net is None:
            self.net = self._load_encoder()
        used = {"mn04": lambda n: list(n.features)[:self.layer + 1],
                "beats": lambda n: [n.patch_embedding, n.layer_norm, n.post_extract_proj,
                                    n.encoder.pos_conv, n.encoder.layer_norm,
                                    *list(n.encoder.layers)[:self.layer]],
                "resnet38": lambda n: [n.bn0, n.conv_block1, *n.basic_blocks(),
                                       n.conv_block_after1][:self.layer + 1]}[self.encoder]
        weights = sum(p.numel() for m in used(self.net) for p in m.parameters())
        stored = sum(t.numel() for b in self.banks.values() for t in b.banks.values())
        return weights + stored

    def state(self):
        """The banks; the encoder is read again from its path (its size kept to notice a
        different file)."""
        return {"banks": {s: b.state() for s, b in self.banks.items()},
                "pretrained_bytes": self._checkpoint_size()}

    def load_state(self, state):
        if self._checkpoint_size() != state["pretrained_bytes"]:
            raise ValueError(f"{self.pretrained}: {self._checkpoint_size()} bytes, but the model "
                             f"was built with a {state['pretrained_bytes']}-byte checkpoint "
                             f"there; give it back or train again")
        self.banks = {s: detectors.MemoryBank(**self.bank_options).load_state(b)
                      for s, b in state["banks"].items()}

    def _checkpoint_size(self):
        try:
            return os.path.getsize(self.pretrained)
        except FileNotFoundError:
            raise ValueError(f"{self.pretrained}: no such file; the model reads its encoder "
                             f"there ({self.spec['file']})") from None
