"""Everything that changes *training* inputs with a torch.Generator: generated anomalies
(Shinmura 2020), mixup, time masking and frame shifting (Cai 2021); and Cai 2021's median
filter, which the paper counts among its data augmentations. The median filter is the one
exception to "training only": it draws nothing, and Cai et al.'s code filters the test inputs
too, so their system applies it to both. Other deterministic input representations live in
features.py.

Every function takes its randomness from the generator it is given (and, where a Beta draw is
needed, a numpy Generator seeded from it: torch has no seeded Beta sampler), so a training run
replays exactly from the generator state its checkpoint saved. The generator lives on the
images' device: on a GPU the noise is drawn there, with no copy from the host.
"""
import numpy as np
import torch


# --------------------------------------------------------------------------------------------
# Generated anomalies (Shinmura 2020, section 3.1, figure 3). Each takes dB spectrogram images
# (B, F, T), low frequencies first, and a torch.Generator, and returns new images of the same
# shape. The paper shows the generated spectrograms (Fig. 3) but gives no numbers; where the
# figure shows one, its value is used, elsewhere the author's notebook's
# (shinmura0/DCASE2020_Task2_Solution-Anomaly_detection-, Colaboratory.ipynb).
#
# Noise: the notebook adds 0.002 N(0, 1) (white) or 0.002 x Voss-McCartney (pink) to the
# waveform, 9-20 dB below the power of real DCASE clips. Here the level is drawn in that range
# relative to each clip, and the noise's power is added to the image's: by Parseval, waveform
# noise of power P adds P sum(w^2) to every STFT bin on average, and a clip of power P_x has a
# mean bin power of P_x sum(w^2), so a level relative to the image's mean power is the level
# relative to the clip's waveform (tests/test_shinmura.py adds noise to a waveform to check).
# Sizes in pixels (the line's, the average band's) are the author's on his 224 x 224 image,
# scaled to the image's height and width.

NOISE_DB = (-20.0, -9.0)  # added noise power relative to the clip's power, dB range (notebook)
IMAGE_SIDE = 224          # pixels: the paper's image, in which the sizes below are given
LINE_LENGTH = (5, 19)     # pixels along the slight line (notebook: randint(5, 20))
LINE_THICKNESS = (2, 4)   # pixels across it (notebook: random.randint(2, 4))
AVERAGE_ROWS = (56, 56)   # rows averaged in time: a quarter of the height, as in Fig. 3; the
#                           notebook averages 2-3 rows (randint(2, 4)), shinmura2020's flag


def _uniform(gen, shape, low, high, like):
    return low + (high - low) * torch.rand(shape, generator=gen, device=like.device).to(like.dtype)


def _integers(gen, low, high, n, device):
    """n integers drawn uniformly from low..high (both included), (n,)."""
    return torch.randint(int(low), int(high) + 1, (n,), generator=gen, device=device)


def _scaled(pixels, side):
    """A size in pixels of the paper's 224-pixel image, on an image side of `side` pixels."""
    return max(1, round(pixels * side / IMAGE_SIDE))


def _add_power(spec_db, noise_power):
    """Add noise_power (linear, relative to each image's mean power) to dB images."""
    power = 10.0 ** (spec_db / 10.0)
    mean = power.mean(dim=(-2, -1), keepdim=True)
    return 10.0 * torch.log10(power + mean * noise_power)


def _noise_level(gen, spec_db, level_db):
    return 10.0 ** (_uniform(gen, (len(spec_db), 1, 1), *level_db, spec_db) / 10.0)


def white_noise(spec_db, gen, *, level_db=NOISE_DB) -> torch.Tensor:
    """Noise of equal expected power in every frequency bin, level_db (low, high) below the
    clip's power (drawn per image): disturbs the whole spectrum. A Gaussian noise's power in
    one STFT bin is exponentially distributed: so is the power added to each pixel."""
    fluct = torch.empty_like(spec_db).exponential_(generator=gen)      # noise power, (B, F, T)
    return _add_power(spec_db, _noise_level(gen, spec_db, level_db) * fluct)


def pink_noise(spec_db, gen, *, level_db=NOISE_DB) -> torch.Tensor:
    """Noise whose power falls as 1/f across the rows, in all level_db below the clip's power:
    disturbs the low frequencies, where many machines have their characteristic sound."""
    n_freq = spec_db.shape[-2]
    tilt = 1.0 / torch.arange(1, n_freq + 1, dtype=spec_db.dtype, device=spec_db.device)
    tilt = (tilt * n_freq / tilt.sum())[:, None]        # (F, 1), mean 1 over the rows
    fluct = torch.empty_like(spec_db).exponential_(generator=gen)
    return _add_power(spec_db, _noise_level(gen, spec_db, level_db) * tilt * fluct)


def slight_line(spec_db, gen) -> torch.Tensor:
    """A short segment at the image's maximum (the squeal of a dry bearing, a click): as the
    notebook's cv2.line, 5-19 pixels long and 2-4 thick, along time (a short tone) or along
    frequency (a click) with equal chance, anywhere in the image. Fig. 3 shows one such
    segment along time."""
    b, n_freq, n_time = spec_db.shape
    device = spec_db.device
    length = _integers(gen, *LINE_LENGTH, b, device)
    thick = _integers(gen, *LINE_THICKNESS, b, device)
    along_time = torch.rand(b, generator=gen, device=device) < 0.5
    rows = torch.where(along_time, thick, length).float() * n_freq / IMAGE_SIDE     # (B,)
    cols = torch.where(along_time, length, thick).float() * n_time / IMAGE_SIDE
    rows, cols = rows.round().clamp(1, n_freq).long(), cols.round().clamp(1, n_time).long()
    top = (torch.rand(b, generator=gen, device=device) * (n_freq - rows + 1)).long()
    left = (torch.rand(b, generator=gen, device=device) * (n_time - cols + 1)).long()
    f = torch.arange(n_freq, device=device)[None, :, None]
    t = torch.arange(n_time, device=device)[None, None, :]
    inside = ((f >= top[:, None, None]) & (f < (top + rows)[:, None, None]) &
              (t >= left[:, None, None]) & (t < (left + cols)[:, None, None]))     # (B, F, T)
    peak = spec_db.amax(dim=(-2, -1), keepdim=True)                              # (B, 1, 1)
    return torch.where(inside, peak, spec_db)


def average_hz(spec_db, gen, *, rows=AVERAGE_ROWS) -> torch.Tensor:
    """A band of adjacent frequency rows, each replaced by its mean over time: the band's
    spectrum stays, its rhythm in time is gone; the other rows are left as they are. The band
    is rows (low, high) rows of a 224-row image high (drawn per image, scaled to the height),
    at a uniform place."""
    b, n_freq, n_time = spec_db.shape
    device = spec_db.device
    high = min(_scaled(rows[1], n_freq), n_freq)
    height = _integers(gen, min(_scaled(rows[0], n_freq), high), high, b, device)      # (B,)
    top = (torch.rand(b, generator=gen, device=device) * (n_freq - height + 1)).long()
    f = torch.arange(n_freq, device=device)[None, :]
    band = ((f >= top[:, None]) & (f < (top + height)[:, None]))[..., None]         # (B, F, 1)
    return torch.where(band, spec_db.mean(dim=-1, keepdim=True), spec_db)


GENERATORS = {"white": white_noise, "pink": pink_noise, "line": slight_line,
              "average": average_hz}


def generate_anomalies(spec_db, gen, *, kinds=tuple(GENERATORS),
                       average_rows=AVERAGE_ROWS) -> torch.Tensor:
    """Apply one generator, drawn per image from `kinds`, to each image of (B, F, T);
    average_rows: average_hz's band, in rows of a 224-row image."""
    unknown = [k for k in kinds if k not in GENERATORS]
    if unknown or not kinds:
        raise ValueError(f"unknown generators {unknown}; valid: {', '.join(GENERATORS)}")
    pick = torch.randint(len(kinds), (len(spec_db),), generator=gen, device=spec_db.device)
    out = torch.empty_like(spec_db)
    for k, name in enumerate(kinds):
        idx = (pick == k).nonzero().flatten()
        if len(idx):
            options = dict(rows=average_rows) if name == "average" else {}
            out[idx] = GENERATORS[name](spec_db[idx], gen, **options)
    return out


# --------------------------------------------------------------------------------------------
# Mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", 2018)

def numpy_rng(gen) -> np.random.Generator:
    """A numpy Generator seeded by one draw from gen, for the Beta draws of mixup."""
    return np.random.default_rng(int(torch.randint(2 ** 31, (1,), generator=gen, device=gen.device)))


def mixup(x, gen, rng, *, alpha, per_sample=False):
    """Mix each example with another of the same batch: lam * x + (1 - lam) * x[perm], one
    lam ~ Beta(alpha, alpha) (drawn from rng) for the batch, perm a permutation drawn from gen.
    The loss is mixed the same way: lam * loss(y) + (1 - lam) * loss(y[perm]).
    per_sample: a lam of its own for each example (Wilkinghoff's mixup), returned as a (B,)
    tensor on x's device; labels mix as lam[:, None] * y + (1 - lam[:, None]) * y[perm].
    x: (B, ...). Returns (mixed x (B, ...), perm (B,), lam: a float or (B,))."""
    if per_sample:
        lam = torch.as_tensor(rng.beta(alpha, alpha, size=len(x)), dtype=x.dtype).to(x.device)
        weight = lam.reshape(-1, *[1] * (x.dim() - 1))                 # (B, 1, ...)
    else:
        lam = weight = float(rng.beta(alpha, alpha))
    perm = torch.randperm(len(x), generator=gen, device=gen.device)
    return weight * x + (1 - weight) * x[perm], perm, lam


# --------------------------------------------------------------------------------------------
# FMix (Harris et al., "FMix: Enhancing Mixed Sample Data Augmentation", 2020; JLESS eq. 3)
#
# A binary mask cut from low-frequency noise: complex Gaussian noise over the 2-D Fourier
# grid, each component scaled by 1 / max(|f|, 1 / max(H, W)) ** decay, back to a real image by
# the inverse rFFT; its round(lam * H * W) largest values become 1, the rest 0. As the
# reference code (ecs-vlc/FMix): decay 3, lam ~ Beta(alpha, alpha) with alpha 1, one mask per
# batch, the loss mixed by lam. Here lam is the mask's exact share of ones.

def fmix_mask(shape, lam, gen, *, decay=3.0):
    """A binary (H, W) mask of round(lam * H * W) ones in low-frequency blobs, drawn on the
    generator's device. Returns a float tensor of 0s and 1s."""
    h, w = shape
    fy = torch.fft.fftfreq(h, device=gen.device)[:, None]                  # (H, 1) cycles/px
    fx = torch.fft.rfftfreq(w, device=gen.device)[None, :]                 # (1, W // 2 + 1)
    freq = torch.sqrt(fx ** 2 + fy ** 2).clamp(min=1.0 / max(h, w))
    noise = torch.randn((2, *freq.shape), generator=gen, device=gen.device)
    spectrum = torch.complex(noise[0], noise[1]) / freq ** decay
    grey = torch.fft.irfftn(spectrum, s=(h, w))                             # (H, W) real
    n_ones = int(round(lam * h * w))
    mask = torch.zeros(h * w, device=gen.device)
    mask[torch.argsort(grey.flatten(), descending=True)[:n_ones]] = 1.0
    return mask.reshape(h, w)


def fmix(x, gen, rng, *, alpha=1.0, decay=3.0):
    """Mix each example with another of the same batch through one FMix mask:
    mask * x + (1 - mask) * x[perm] (eq. 3), lam ~ Beta(alpha, alpha) from rng, perm from gen.
    x: (B, ..., H, W). Returns (mixed x, perm (B,), lam: the mask's share of ones); the loss
    is mixed as for mixup: lam * loss(y) + (1 - lam) * loss(y[perm])."""
    (h, w), lam = x.shape[-2:], float(rng.beta(alpha, alpha))
    mask = fmix_mask((h, w), lam, gen, decay=decay).to(x.dtype)
    perm = torch.randperm(len(x), generator=gen, device=gen.device)
    share = round(lam * h * w) / (h * w)      # the mask's ones, counted without a device sync
    return mask * x + (1 - mask) * x[perm], perm, share


# --------------------------------------------------------------------------------------------
# Time warping (Iwana & Uchida, "An empirical survey of data augmentation for time series
# classification with neural networks", 2021, section 3.1.4) and SMOTE (Chawla et al. 2002),
# as Midea 2024 uses them: time warping multiplies a class of a single clip, SMOTE then
# over-samples the rare (target-domain) classes.

def time_warp(spec, gen, *, hop, sigma=0.2, knots=4):
    """Warp the time axis of complex STFTs at a smoothly varying speed and keep their length and
    every bin's frequency: the speed at knots + 2 evenly spaced points is drawn from N(1, sigma)
    (floored at 0.1) and linearly interpolated to every output frame; its running sum, scaled
    to span 0..T - 1, is the input frame each output frame reads. Magnitudes are interpolated
    between the two neighbouring input frames; phases advance, frame by frame, by each bin's
    own phase advance over one hop where the frame reads (a phase vocoder: Flanagan & Golden
    1966, librosa.phase_vocoder), so an inverse STFT gives a waveform whose tones keep their
    pitch. (Warping the waveform instead shifts every frequency with the speed.) sigma 0 is the
    identity. spec: complex (B, F, T) of n_fft = 2 (F - 1), hop `hop`. Returns (B, F, T)."""
    b, n_freq, n = spec.shape
    speed = 1 + sigma * torch.randn(b, knots + 2, generator=gen, device=gen.device).to(spec.device)
    speed = torch.nn.functional.interpolate(speed.clamp(min=0.1)[:, None], size=n, mode="linear",
                                            align_corners=True)[:, 0].double()  # (B, T)
    t = torch.cumsum(speed, dim=1) - speed[:, :1]                                # starts at 0
    t = t * (n - 1) / t[:, -1:]                                                  # ends at T - 1
    left = t.floor().long().clamp(max=n - 2)[:, None].expand(-1, n_freq, -1)    # (B, F, T)
    frac = (t[:, None] - left).to(spec.real.dtype)
    mag = spec.abs()
    mag = torch.lerp(mag.gather(2, left), mag.gather(2, left + 1), frac)
    phase = spec.angle().double()                                               # (B, F, T)
    bins = torch.arange(n_freq, dtype=torch.float64, device=spec.device)[:, None]
    expected = 2 * torch.pi * hop * bins / (2 * (n_freq - 1))   # (F, 1) a bin's advance per hop
    dev = phase.diff(dim=2) - expected
    advance = expected + dev - 2 * torch.pi * torch.round(dev / (2 * torch.pi))  # (B, F, T - 1)
    step = advance.gather(2, left)                                # (B, F, T) at the frame read
    out = phase[..., :1] + torch.cumsum(step, dim=2) - step       # phase0 + sum of earlier steps
    return torch.polar(mag.double(), out).to(spec.dtype)


def smote(x, gen, *, n_new, k=5, space=None):
    """n_new synthetic examples of one class: each starts at a random example x[i] and moves a
    uniform random share u of the way to one of its k nearest neighbours (drawn at random):
    x[i] + u (x[j] - x[i]). Neighbours are found by Euclidean distance in `space` ((N, D), e.g.
    a feature of each example; default x itself, flattened). x: (N, ...), N >= 2.
    Returns (n_new, ...)."""
    if len(x) < 2:
        raise ValueError(f"SMOTE needs two examples of a class, got {len(x)}; time-warp first")
    space = (x if space is None else space).reshape(len(x), -1)
    dist = torch.cdist(space, space)                                  # (N, N)
    dist.fill_diagonal_(float("inf"))
    k = min(k, len(x) - 1)
    neighbours = dist.topk(k, largest=False).indices                 # (N, k)
    i = torch.randint(len(x), (n_new,), generator=gen, device=gen.device).to(x.device)
    pick = torch.randint(k, (n_new,), generator=gen, device=gen.device).to(x.device)
    j = neighbours[i, pick]
    u = torch.rand(n_new, *[1] * (x.dim() - 1), generator=gen, device=gen.device).to(x)
    return x[i] + u * (x[j] - x[i])


# --------------------------------------------------------------------------------------------
# Cai et al. 2021 (section 2.4): median filter, time masking, frame shifting
#
# Inputs are log-mel spectrograms (..., n_mels, T). The paper gives the median filter's window
# (31 frames, "1 second, for each filter bank respectively") and no settings for the other two;
# time masking is SpecAugment's (Park et al. 2019), frame shifting a circular shift in time as
# the authors' code imports it (torch_audiomentations' Shift, with roll-over).

def median_filter(x, *, window=31, axis=-1):
    """Running median of `window` values (odd) along `axis`, edges mirrored (d c b | a b c d,
    torch's "reflect", scipy.ndimage's mode="mirror"). axis=-1: along time, each mel band on its
    own; axis=-2: along frequency, each frame on its own. Returns a tensor of x's shape."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"the median filter's window must be odd and positive, not {window}")
    x = torch.as_tensor(x).movedim(axis, -1)                   # (..., L), L along the axis
    half = window // 2
    if x.shape[-1] <= half:
        raise ValueError(f"{x.shape[-1]} values are too few to mirror {half} at each edge for "
                         f"a median filter of {window}")
    flat = x.reshape(-1, 1, x.shape[-1])                       # (N, 1, L) for F.pad
    padded = torch.nn.functional.pad(flat, (half, half), mode="reflect")
    windows = padded.unfold(-1, window, 1)                     # (N, 1, L, window)
    if windows.is_cuda:   # the median's values are exact, but under torch's deterministic mode
        # CUDA refuses median (its indices may differ between ties); sorting is allowed there
        medians = windows.sort(dim=-1).values[..., half]       # (N, 1, L)
    else:                 # median is twice as fast as sorting on the CPU
        medians = windows.median(dim=-1).values                 # (N, 1, L)
    return medians.reshape(x.shape).movedim(-1, axis)


def time_mask(x, gen, *, max_width, value=0.0):
    """SpecAugment time masking: in each example of (B, F, T), a run of w ~ U{0..max_width}
    frames starting at a uniform frame is set to `value`. Returns a new (B, F, T) tensor."""
    b, _, n_time = x.shape
    width = torch.randint(0, max_width + 1, (b, 1), generator=gen, device=gen.device)
    start = (torch.rand((b, 1), generator=gen, device=gen.device) * (n_time - width + 1)).long()
    t = torch.arange(n_time, device=gen.device)
    masked = (t >= start) & (t < start + width)                # (B, T)
    return x.masked_fill(masked[:, None, :].to(x.device), value)


def frame_shift(x, gen, *, max_shift):
    """Each example of (B, F, T) rolled along time by s ~ U{-max_shift..max_shift} frames, the
    frames pushed out at one end coming back at the other. Returns a new (B, F, T) tensor."""
    b, _, n_time = x.shape
    shift = torch.randint(-max_shift, max_shift + 1, (b, 1), generator=gen, device=gen.device)
    source = (torch.arange(n_time, device=gen.device) - shift) % n_time   # (B, T)
    return torch.gather(x, 2, source[:, None, :].expand_as(x).to(x.device))
