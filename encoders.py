"""The pre-trained audio encoders: networks written to the published architecture and key
names of a public checkpoint, so that its file loads into them whole, and their loaders, which
refuse a file with any missing or mis-shaped key (EfficientAT and BEATs: any extra key too)
before it embeds anything. Nothing here is trained; the systems that use them are recipes under
systems/ (narita2021: ResNet38's block outputs; encoder_knn: one layer of any of the three).

Networks: ResNet38 of PANNs (Kong et al. 2020; qiuqiangkong/audioset_tagging_cnn), with
Narita & Tamamori's channel means of its block outputs; EfficientAT's MobileNetV3 (Schmid et al.
2023; fschmid56/EfficientAT); BEATs iter3 (Chen et al. 2023; microsoft/unilm beats/). Their
front ends (PANNs', EfficientAT's log-mel, Kaldi fbank) are in features.py. The networks
trained here are in models.py. Split from models.py when it passed ~720 lines
(../shared/DESIGN.md).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

import models


# --------------------------------------------------------------------------------------------
# ResNet38 (Kong et al., "PANNs: Large-Scale Pretrained Audio Neural Networks for Audio Pattern
# Recognition", 2020; qiuqiangkong/audioset_tagging_cnn, pytorch/models.py)
#
# Written so that its state_dict has exactly the key names and shapes of the PANNs checkpoint
# ResNet38_mAP=0.434.pth (its "model" entry), which load_panns_checkpoint reads. The layer
# table: BatchNorm over the 64 mel bins (bn0); a ConvBlock of 64 channels ((3x3 conv, BN, ReLU)
# x 2, 2x2 average pooling); a ResNet of BasicBlocks, [3, 4, 6, 3] blocks of 64, 128, 256, 512
# channels, each stage after the first starting with 2x2 average pooling (in the block and in
# its 1x1-conv shortcut); 2x2 average pooling; a ConvBlock of 2048 channels without pooling;
# then the AudioSet head (fc1, fc_audioset), loaded but unused here.
# Inference only: PANNs' dropout and SpecAugment act in training alone and are left out, and
# the front end (torchlibrosa's STFT convolutions and mel matrix, in the checkpoint as
# spectrogram_extractor.* and logmel_extractor.melW) is held as buffers under its own names so
# that the keys match, but not used: features.panns_log_mel computes the same log-mel and is
# tested against librosa.

RESNET38_LAYERS = [(64, 3), (128, 4), (256, 6), (512, 3)]   # (channels, BasicBlocks) per stage
PANNS_CLASSES = 527      # AudioSet classes of the checkpoint's head


class PannsConvBlock(nn.Module):
    """(3x3 conv, BatchNorm, ReLU) x 2, then average pooling (PANNs' ConvBlock)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.conv1 = nn.Conv2d(n_in, n_out, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(n_out, n_out, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(n_out), nn.BatchNorm2d(n_out)

    def forward(self, x, pool=2):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, pool) if pool > 1 else x


class BasicBlock(nn.Module):
    """PANNs' _ResnetBasicBlock: [2x2 average pooling when stride 2], 3x3 conv, BN, ReLU, 3x3
    conv, BN, plus the shortcut (pooled and 1x1-projected where the shape changes), ReLU."""

    def __init__(self, n_in, n_out, stride):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(n_in, n_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(n_out)
        self.conv2 = nn.Conv2d(n_out, n_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(n_out)
        self.downsample = None
        if stride == 2:              # keys downsample.1 (conv) and downsample.2 (BN)
            self.downsample = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(n_in, n_out, 1, bias=False),
                                            nn.BatchNorm2d(n_out))
        elif n_in != n_out:
            self.downsample = nn.Sequential(nn.Conv2d(n_in, n_out, 1, bias=False),
                                            nn.BatchNorm2d(n_out))

    def forward(self, x):
        out = F.avg_pool2d(x, 2) if self.stride == 2 else x
        out = F.relu(self.bn1(self.conv1(out)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


def _holder(**buffers):
    """A module that only holds named buffers: the checkpoint's unused front-end tensors."""
    module = nn.Module()
    for name, shape in buffers.items():
        module.register_buffer(name, torch.zeros(shape))
    return module


class ResNet38(nn.Module):
    """PANNs' ResNet38. forward: (B, 64, T) log-mel (features.panns_log_mel) -> the output of
    every convolutional block, in order: the first ConvBlock, the 16 BasicBlocks, the last
    ConvBlock; each (B, C_i, T_i, 8 ... 1). T must be 32 frames or more (five halvings)."""

    def __init__(self, *, n_mels=64, n_fft=1024, hop=320, n_classes=PANNS_CLASSES):
        super().__init__()
        n_bins = n_fft // 2 + 1
        self.spectrogram_extractor = nn.Module()
        self.spectrogram_extractor.stft = nn.Module()
        self.spectrogram_extractor.stft.conv_real = _holder(weight=(n_bins, 1, n_fft))
        self.spectrogram_extractor.stft.conv_imag = _holder(weight=(n_bins, 1, n_fft))
        self.logmel_extractor = _holder(melW=(n_bins, n_mels))
        self.bn0 = nn.BatchNorm2d(n_mels)
        self.conv_block1 = PannsConvBlock(1, 64)
        self.resnet = nn.Module()
        n_in = 64
        for i, (n_out, n_blocks) in enumerate(RESNET38_LAYERS):
            blocks = [BasicBlock(n_in if j == 0 else n_out, n_out, 2 if i and not j else 1)
                      for j in range(n_blocks)]
            setattr(self.resnet, f"layer{i + 1}", nn.Sequential(*blocks))
            n_in = n_out
        self.conv_block_after1 = PannsConvBlock(512, 2048)
        self.fc1 = nn.Linear(2048, 2048)
        self.fc_audioset = nn.Linear(2048, n_classes)

    def basic_blocks(self):
        """The 16 BasicBlocks in order (the paper's 3776 = 3*64 + 4*128 + 6*256 + 3*512)."""
        return [b for i in range(len(RESNET38_LAYERS)) for b in getattr(self.resnet, f"layer{i + 1}")]

    def forward(self, logmel):
        x = logmel.transpose(-1, -2).unsqueeze(1)            # (B, 1, T, n_mels), PANNs' layout
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)       # BatchNorm per mel bin
        outputs = [self.conv_block1(x)]                       # (B, 64, T/2, n_mels/2)
        for block in self.basic_blocks():
            outputs.append(block(outputs[-1]))                # (B, C, T/2^k, n_mels/2^k)
        x = F.avg_pool2d(outputs[-1], 2)
        outputs.append(self.conv_block_after1(x, pool=1))     # (B, 2048, T/32, n_mels/32)
        return outputs


def channel_means(maps):
    """Each feature map averaged over its time and frequency axes, concatenated: eq. 1-2 of
    Narita & Tamamori. maps: [(B, C_i, H_i, W_i)]. Returns (B, sum C_i)."""
    return torch.cat([m.mean(dim=(-2, -1)) for m in maps], dim=1)


def _load_reason(err):
    """Why torch.load refused a file, in a few words. Its weights-only refusal advises loading
    with weights_only=False, which runs whatever code the file holds: never advice to pass on
    for a file of unknown origin, so only the unpickler's own reason is kept."""
    text = str(err).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return type(err).__name__ if "weights_only" in line else line


def load_panns_checkpoint(model, path):
    """Load a PANNs checkpoint file into `model` (a ResNet38): the file is a dict whose "model"
    entry is the state_dict, as PANNs saves it, or the state_dict itself. Every tensor of the
    model must be in the file with its shape, or a one-line ValueError names the first missing
    or mis-shaped key; BatchNorm's num_batches_tracked counters may be absent (they change no
    output). Returns the file's keys the model does not have, for the caller to report."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; give the PANNs checkpoint "
                         f"(ResNet38_mAP=0.434.pth) with --pretrained") from None
    except Exception as err:     # torch.load raises several types; the path and reason matter
        raise ValueError(f"{path}: not a PyTorch checkpoint of tensors ({_load_reason(err)}); "
                         f"give the PANNs checkpoint (ResNet38_mAP=0.434.pth) with --pretrained"
                         ) from None
    state = saved.get("model", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a PANNs checkpoint (expected a dict with a 'model' "
                         f"state_dict, found {type(saved).__name__})")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path}: not a PANNs {type(model).__name__} checkpoint: weight "
                         f"'{missing[0]}' {tuple(expected[missing[0]].shape)} is missing "
                         f"({len(missing)} of {len(expected)} missing)")
    wrong = [k for k in expected if k in state and (not isinstance(state[k], torch.Tensor) or
                                                    state[k].shape != expected[k].shape)]
    if wrong:
        k = wrong[0]
        found = tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
        raise ValueError(f"{path}: not a PANNs {type(model).__name__} checkpoint: weight '{k}' "
                         f"has shape {found}, expected {tuple(expected[k].shape)} "
                         f"({len(wrong)} mis-shaped)")
    model.load_state_dict({k: state[k] for k in expected if k in state}, strict=False)
    return sorted(set(state) - set(expected))


# --------------------------------------------------------------------------------------------
# Pre-trained encoders: the checkpoint check shared by the loaders below
#
# A frozen encoder is only the network its checkpoint was trained as when every tensor of the
# file lands in a tensor of the same name and shape. check_checkpoint says in one line which
# keys are missing, extra or mis-shaped (the first of each, and how many), so that a wrong file
# (another width, a fine-tuned head, a different release) is refused before it embeds anything.

def read_checkpoint(path, what):
    """torch.load of a weights file, on the CPU, tensors only; a missing or unreadable file is a
    one-line ValueError naming the path and WHAT it should be."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; give the {what} checkpoint") from None
    except Exception as err:     # torch.load raises several types; the path and reason matter
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a readable PyTorch checkpoint of tensors ({reason})") from err


def check_checkpoint(model, state, path, what, *, assign=False):
    """Load `state` into `model` only if its keys and shapes are exactly the model's (BatchNorm's
    num_batches_tracked may be absent); otherwise one ValueError line names the missing, extra
    and mis-shaped keys. assign: the file's tensors become the model's (a model built on the
    meta device, never initialised)."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a {what} checkpoint (a {type(state).__name__}, not a "
                         f"state dict)")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and (not isinstance(state[k], torch.Tensor) or
                                                    state[k].shape != expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"'{missing[0]}' {tuple(expected[missing[0]].shape)} missing "
                        f"({len(missing)} missing)")
    if extra:
        problems.append(f"'{extra[0]}' not in the network ({len(extra)} extra)")
    if wrong:
        k = wrong[0]
        found = tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
        problems.append(f"'{k}' has shape {found}, expected {tuple(expected[k].shape)} "
                        f"({len(wrong)} mis-shaped)")
    if problems:
        raise ValueError(f"{path}: not a {what} checkpoint: {'; '.join(problems)}")
    model.load_state_dict(state, strict=False, assign=assign)   # strict but num_batches_tracked
    return model


# --------------------------------------------------------------------------------------------
# EfficientAT MobileNetV3 (Schmid, Koutini, Widmer, "Efficient Large-Scale Audio Tagging via
# Transformer-to-CNN Knowledge Distillation", ICASSP 2023; fschmid56/EfficientAT, models/mn/)
#
# MobileNetV3-Large (Howard et al. 2019, tables 1-2) on a (B, 1, 128, T) log-mel image
# (features.efficientat_log_mel), every channel count times the width (0.4 for mn04_as) rounded
# by models.make_divisible; BatchNorm eps 1e-3; squeeze-and-excitation over channels (squeeze to a
# quarter, ReLU, sigmoid) in the blocks the table marks; the last 1x1 convolution to 6 x the
# last block's channels; the "mlp" head: global average pool, Linear to 1280 x width, hardswish,
# dropout, Linear to the 527 AudioSet classes. Key names as EfficientAT's checkpoints have them
# (features.<i>.block.<j>..., conc_se_layers.0 for the channel SE, classifier.2 / classifier.5).
# Left out: EfficientAT's frequency/time SE variants, dilation and other heads, which the
# AudioSet mn* checkpoints do not use.

# (input channels, kernel, expanded channels, output channels, SE, activation, stride) at
# width 1, the MobileNetV3-Large table
MOBILENETV3_BLOCKS = [
    (16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2),
    (24, 3, 72, 24, False, "RE", 1), (24, 5, 72, 40, True, "RE", 2),
    (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1),
    (160, 5, 960, 160, True, "HS", 1)]
AUDIOSET_CLASSES = 527


def conv_bn_act(n_in, n_out, kernel, stride=1, groups=1, act=None):
    """Conv (no bias), BatchNorm (eps 1e-3), then the activation (None: linear)."""
    layers = [nn.Conv2d(n_in, n_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(n_out, eps=0.001, momentum=0.01)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean of x over time and frequency)))), per channel."""

    def __init__(self, channels, squeeze):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(channels, squeeze), nn.Linear(squeeze, channels)

    def forward(self, x):
        scale = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3)))))          # (B, C)
        return x * torch.sigmoid(scale)[:, :, None, None]


class ChannelSE(nn.Module):
    """EfficientAT's concurrent SE with the channel dimension alone (the max over one is the
    identity); it exists for the key names conc_se_layers.0.*"""

    def __init__(self, channels):
        super().__init__()
        self.conc_se_layers = nn.ModuleList([
            SqueezeExcitation(channels, models.make_divisible(channels // 4))])

    def forward(self, x):
        return self.conc_se_layers[0](x)


class MNBlock(nn.Module):
    """MobileNetV3's inverted residual: [1x1 expansion], kxk depthwise, [SE], 1x1 linear
    projection; the input added back where stride 1 keeps the channels."""

    def __init__(self, n_in, kernel, expanded, n_out, se, activation, stride):
        super().__init__()
        act = nn.Hardswish if activation == "HS" else nn.ReLU
        layers = [conv_bn_act(n_in, expanded, 1, act=act)] if expanded != n_in else []
        layers.append(conv_bn_act(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if se:
            layers.append(ChannelSE(expanded))
        layers.append(conv_bn_act(expanded, n_out, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and n_in == n_out

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV3(nn.Module):
    """EfficientAT's MN at `width` (0.4: mn04_as). forward: (B, 1, 128, T) -> (logits (B, 527),
    the output of every layer of `features`: 17 maps (B, C_i, F_i, T_i))."""

    def __init__(self, *, width=0.4, n_classes=AUDIOSET_CLASSES):
        super().__init__()
        ch = lambda c: models.make_divisible(c * width)                 # noqa: E731
        layers = [conv_bn_act(1, ch(16), 3, stride=2, act=nn.Hardswish)]
        for n_in, kernel, expanded, n_out, se, activation, stride in MOBILENETV3_BLOCKS:
            layers.append(MNBlock(ch(n_in), kernel, ch(expanded), ch(n_out), se, activation, stride))
        self.embedding_dim = 6 * ch(160)
        layers.append(conv_bn_act(ch(160), self.embedding_dim, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                        nn.Linear(self.embedding_dim, ch(1280)), nn.Hardswish(),
                                        nn.Dropout(0.2), nn.Linear(ch(1280), n_classes))

    def forward(self, x):
        maps = []
        for layer in self.features:
            x = layer(x)
            maps.append(x)
        return self.classifier(x), maps                                 # (B, 527), 17 maps


def load_mobilenetv3(path, *, width=0.4):
    """An EfficientAT AudioSet checkpoint (a state dict, e.g. mn04_as_mAP_432.pt) in a
    MobileNetV3 of that width, eval mode; any key missing, extra or mis-shaped is refused."""
    state = read_checkpoint(path, f"EfficientAT mn{round(width * 10):02d}_as")
    return check_checkpoint(MobileNetV3(width=width), state, path,
                            f"EfficientAT MobileNetV3 (width {width})").eval()


# --------------------------------------------------------------------------------------------
# BEATs (Chen et al., "BEATs: Audio Pre-Training with Acoustic Tokenizers", ICML 2023;
# microsoft/unilm beats/BEATs.py and backbone.py), iteration 3 as its checkpoints have it
#
# Kaldi log-mel (features.kaldi_fbank of the waveform times 2^15, 128 bands, 10 ms frames)
# normalised by the AudioSet mean and twice its standard deviation; 16 x 16 patches (a conv
# without bias) to 512 values, LayerNorm, a Linear to 768; a grouped convolutional position
# embedding (128 taps, 16 groups, weight-normalised over its taps, GELU) added; LayerNorm; 12
# post-LayerNorm transformer layers with DeepNorm residual scaling (alpha = (2 x 12)^(1/4)),
# 12 heads, GELU FFN 3072, and T5-style bucketed relative position bias (320 buckets, max
# distance 800, one table shared by all layers) gated per query and head (gru_rel_pos). Key
# names as the checkpoint's "model" entry has them, its shared bias table under every layer.
# Inference only: dropout, layer drop and padding masks (every clip here is whole) left out.

BEATS = dict(patch=16, embed_dim=512, dim=768, layers=12, heads=12, ffn=3072, conv_pos=128,
             conv_pos_groups=16, num_buckets=320, max_distance=800)
BEATS_FBANK_MEAN, BEATS_FBANK_STD = 15.41663, 6.55582    # AudioSet statistics, BEATs.py


class WeightNormConv1d(nn.Module):
    """Conv1d whose weight is weight_v scaled to norm weight_g per tap (torch's weight_norm
    with dim=2, as BEATs saves it: weight_g (1, 1, K), weight_v (C, C / groups, K))."""

    def __init__(self, channels, kernel, groups):
        super().__init__()
        self.groups = groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.randn(channels, channels // groups, kernel) * 0.02)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        norm = self.weight_v.norm(dim=(0, 1), keepdim=True)                 # (1, 1, K)
        weight = self.weight_v * (self.weight_g / norm)
        k = weight.shape[-1]
        return F.conv1d(x, weight, self.bias, padding=k // 2, groups=self.groups)


def relative_buckets(length, *, num_buckets, max_distance):
    """T5's bidirectional buckets of key - query offsets: half the buckets per direction,
    exact below a quarter of them, logarithmic up to max_distance. Returns (L, L) int64."""
    offset = torch.arange(length)[None, :] - torch.arange(length)[:, None]   # (L, L)
    half = num_buckets // 2
    bucket = (offset > 0).long() * half
    offset = offset.abs()
    exact = half // 2
    log_part = exact + (torch.log(offset.float().clamp(min=1) / exact) /
                        math.log(max_distance / exact) * (half - exact)).long()
    return bucket + torch.where(offset < exact, offset, log_part.clamp(max=half - 1))


class BeatsAttention(nn.Module):
    """Multi-head self-attention with a gated relative position bias (BEATs' MultiheadAttention
    with gru_rel_pos): bias x gate, gate = a (b grep_a - 1) + 2 from the query."""

    def __init__(self, dim, heads, num_buckets):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.grep_linear = nn.Linear(dim // heads, 8)
        self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def forward(self, x, position_bias):
        B, L, D = x.shape
        split = lambda t: t.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))  # (B,H,L,hd)
        gate_a, gate_b = torch.sigmoid(self.grep_linear(q).view(B, self.heads, L, 2, 4)
                                       .sum(-1)).chunk(2, dim=-1)              # (B, H, L, 1) x2
        gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=gate * position_bias)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class BeatsLayer(nn.Module):
    """Post-LayerNorm transformer layer with DeepNorm: LN(alpha x + attn(x)), then
    LN(alpha x + fc2(gelu(fc1(x))))."""

    def __init__(self, dim, heads, ffn, num_buckets, alpha):
        super().__init__()
        self.alpha = alpha
        self.self_attn = BeatsAttention(dim, heads, num_buckets)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x, position_bias):
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, position_bias))
        return self.final_layer_norm(x * self.alpha + self.fc2(F.gelu(self.fc1(x))))


class BEATs(nn.Module):
    """BEATs iter3 (the pre-trained model; with n_classes, the AudioSet fine-tuned one's linear
    head). forward: (B, T, 128) Kaldi fbank -> the input to the first layer and the output of
    every layer: 13 tensors (B, T / 16 x 8 patches, 768), patches in time-major order (8
    frequency patches per time step)."""

    def __init__(self, *, n_classes=None, **cfg):
        super().__init__()
        c = {**BEATS, **cfg}
        self.cfg = c
        self.patch_embedding = nn.Conv2d(1, c["embed_dim"], c["patch"], c["patch"], bias=False)
        self.layer_norm = nn.LayerNorm(c["embed_dim"])
        self.post_extract_proj = nn.Linear(c["embed_dim"], c["dim"])
        self.encoder = nn.Module()
        self.encoder.pos_conv = nn.Sequential(WeightNormConv1d(c["dim"], c["conv_pos"],
                                                               c["conv_pos_groups"]))
        self.encoder.layer_norm = nn.LayerNorm(c["dim"])
        alpha = (2 * c["layers"]) ** 0.25
        self.encoder.layers = nn.ModuleList([BeatsLayer(c["dim"], c["heads"], c["ffn"],
                                                        c["num_buckets"], alpha)
                                             for _ in range(c["layers"])])
        for layer in self.encoder.layers[1:]:            # one bias table, as BEATs shares it
            layer.self_attn.relative_attention_bias = self.encoder.layers[0].self_attn.relative_attention_bias
        self.predictor = nn.Linear(c["dim"], n_classes) if n_classes else None

    def forward(self, fbank):
        x = ((fbank - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)).unsqueeze(1)  # (B, 1, T, 128)
        x = self.patch_embedding(x)                          # (B, 512, T / 16, 8)
        x = x.flatten(2).transpose(1, 2)                     # (B, N, 512), time-major patches
        x = self.post_extract_proj(self.layer_norm(x))       # (B, N, 768)
        conv = self.encoder.pos_conv(x.transpose(1, 2))      # (B, 768, N + 1): even kernel
        x = self.encoder.layer_norm(x + F.gelu(conv[..., :-1]).transpose(1, 2))
        buckets = relative_buckets(x.shape[1], num_buckets=self.cfg["num_buckets"],
                                   max_distance=self.cfg["max_distance"]).to(x.device)
        table = self.encoder.layers[0].self_attn.relative_attention_bias
        position_bias = table(buckets).permute(2, 0, 1)      # (H, N, N)
        outputs = [x]
        for layer in self.encoder.layers:
            outputs.append(layer(outputs[-1], position_bias))
        return outputs


BEATS_CFG_KEYS = {"input_patch_size": "patch", "embed_dim": "embed_dim",
                  "encoder_embed_dim": "dim", "encoder_layers": "layers",
                  "encoder_attention_heads": "heads", "encoder_ffn_embed_dim": "ffn",
                  "conv_pos": "conv_pos", "conv_pos_groups": "conv_pos_groups",
                  "num_buckets": "num_buckets", "max_distance": "max_distance"}


def load_beats(path):
    """A BEATs checkpoint as microsoft/unilm publishes it ({"cfg": {...}, "model": state
    dict}; BEATs_iter3_plus_AS2M.pt) in a BEATs, eval mode. Its cfg must describe this
    architecture (iter3: relative positions, gated, DeepNorm, post-LayerNorm), and every key
    must be there with its shape and no other (a fine-tuned checkpoint's predictor is kept)."""
    saved = read_checkpoint(path, "BEATs (BEATs_iter3_plus_AS2M.pt)")
    state = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a BEATs checkpoint (no 'model' state dict)")
    cfg = saved.get("cfg") or {}
    for theirs, ours in BEATS_CFG_KEYS.items():
        if theirs in cfg and cfg[theirs] != BEATS[ours]:
            raise ValueError(f"{path}: BEATs cfg {theirs}={cfg[theirs]}, this network has "
                             f"{BEATS[ours]}")
    for flag, want in (("relative_position_embedding", True), ("gru_rel_pos", True),
                       ("deep_norm", True), ("layer_norm_first", False)):
        if flag in cfg and bool(cfg[flag]) != want:
            raise ValueError(f"{path}: BEATs cfg {flag}={cfg[flag]}, this network has {want}")
    head = state.get("predictor.weight")
    with torch.device("meta"):             # 90 M parameters: not initialised, the file's used
        model = BEATs(n_classes=head.shape[0] if isinstance(head, torch.Tensor) else None)
    return check_checkpoint(model, state, path, "BEATs iter3", assign=True).eval()
