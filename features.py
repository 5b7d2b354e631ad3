"""Sound to features: wav loading with loud errors, STFT, mel filterbank, log-mel, frame stacking.

Follows the DCASE 2020-2025 Task 2 autoencoder baselines (librosa.feature.melspectrogram,
then 20/power * log10), written out by hand in torch so that it batches over clips and runs
on the GPU. The mel filterbank follows librosa.filters.mel (Slaney scale and area norm by
default, HTK on request). The baselines changed twice between years (reflect -> zero centre
padding with librosa 0.10, `S + eps` -> `max(S, eps)` in 2021): LOG_MEL_BY_YEAR records it.

log_mel takes four shortcuts, each named where it happens and timed by `bench.py --stages`:
the power computed in place, a banded filterbank product written in (mel, frame) order, the
floor and log in place, and intermediates in buffers kept between calls (_scratch).
log_mel_reference is the plain path it is tested against (equal to float32 rounding).

Agreement with librosa 0.11 in float32 (tests/test_features.py asserts the bounds): filterbank
1e-7 relative (bound 1e-6); STFT 3e-7 of the largest magnitude (bound 1e-4); log-mel, every
year's settings, below 1e-3 dB: 4e-5 dB on noise plus tones, 1.5e-4 dB on the real DCASE 2023
dev clips, 6e-4 dB on the quieter DCASE 2024 RoboticArm clips. Float32 rounding grows in dB
as a band nears digital silence, so quiet bands dominate these figures.

Also each system's deterministic input representation (Shinmura's spectrogram images, JLESS's
log-power spectrogram; PANNs' 32 kHz log-mel for Narita 2021, the one place that resamples, on
purpose) and the on-disk feature cache every system reads its inputs through (`clip_features`).

Channels: 2020-2025 clips are mono, 2026 clips stereo (channel 0 near microphone, 1 far).
load_wav checks the count against the run's (a stereo clip in a mono year, or a mono clip in
2026, is one line naming the file) and returns the channel the run chose (CHANNELS). The
choice is set once per run with `reading(channels=..., channel=...)`, which asd.py holds around
a command, so that no system file passes it on; the feature cache's key carries it.

Left out: resampling files and silent down-mixing (a wrong rate or channel count is an error,
not a fix; `mean` is a down-mix asked for by name), other windows than Hann, and data
augmentation (augment.py: anything random).
"""

import contextlib
import contextvars
import functools
import hashlib
import json
import math
import os
import struct
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

import data

SR = 16000  # Hz, every DCASE Task 2 data set 2020-2025
N_FFT = 1024  # samples, 64 ms window at 16 kHz
HOP = 512  # samples, 32 ms between frames
N_MELS = 128  # mel bands
POWER = 2.0  # exponent on |STFT|: 2.0 is a power spectrogram
N_FRAMES = 5  # consecutive frames stacked into one AE input vector (5 * 128 = 640 dims)
EPS = sys.float_info.epsilon  # 2.2e-16, the baselines' log floor
PROGRESS_S = 5.0  # s between progress lines of a long check or feature extraction
PROGRESS_CLIPS = 32  # clips: a feature pass over this many says so when it starts
# mel filters per block of log_mel's banded filterbank product. ms per 10-s clip of the product
# and the log, batches of 4, one thread (timed outside bench.py, min of 20 runs): block 8: 0.188,
# 16: 0.192, 32: 0.235, 64: 0.345. Block 16 does 13% of the dense product's multiplications.
MEL_BLOCK = 16
# log_mel's intermediates (frames, power, mel: ~2 MB per 10-s clip in float32) are written
# into buffers kept between calls (_scratch), up to this size each; larger ones are allocated
# afresh. Fresh buffers of that size can come from the system as new pages on every call
# (glibc's malloc may hand memory of this size back on free): up to 2400 page faults and
# 1.2 ms per 4-clip call, more than half of log_mel's time, in some runs.
SCRATCH_MAX_BYTES = 256 * 2 ** 20

MEL_BREAK_HZ = 1000.0  # Hz, Slaney scale: linear below, logarithmic above
MEL_LINEAR_HZ = 200.0 / 3  # Hz per mel below the break (Slaney)
MEL_LOG_STEP = math.log(6.4) / 27.0  # natural-log frequency ratio per mel above the break

LOG_MEL_BY_YEAR = {
    2020: dict(pad_mode="reflect", floor="add"),  # librosa 0.7, 10*log10(S + eps)
    2021: dict(pad_mode="reflect", floor="clip"),  # 10*log10(max(S, eps))
    2022: dict(pad_mode="constant", floor="clip"),  # librosa >= 0.10 pads with zeros
    2023: dict(pad_mode="constant", floor="clip"),
    2024: dict(pad_mode="constant", floor="clip"),
    2025: dict(pad_mode="constant", floor="clip"),
    2026: dict(pad_mode="constant", floor="clip"),  # the same baseline code, channel 0
}


class AudioError(ValueError):
    """A sound file asd cannot use; the one-line message starts with its path."""


def _riff_problem(path: Path) -> str | None:
    """Why a RIFF/WAVE file is truncated, or None (also for non-RIFF files: soundfile judges those)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                present = size - pos - 8
                if chunk_size > present:
                    return f"the data chunk declares {chunk_size} bytes but the file holds {present}"
                return None
            pos += 8 + chunk_size + (chunk_size & 1)  # chunks are padded to an even size
    return "no data chunk before the end of the file"


# --channel: which channel of a stereo (2026) clip a run reads
CHANNELS = {"near": "channel 0, the near microphone (the official baseline's input)",
            "far": "channel 1, the far microphone (more environmental noise)",
            "mean": "the mean of the two channels",
            "both": "both channels, (2, n_samples); only for a system that declares channels = 2"}
_READING = contextvars.ContextVar("reading", default=(1, None))  # (channels, choice) of the run


@contextlib.contextmanager
def reading(*, channels: int, channel: str | None):
    """Within this block, load_wav expects `channels` channels per clip (1, or 2 for 2026) and
    returns the one chosen (CHANNELS; None for mono clips)."""
    if channels == 2 and channel not in CHANNELS or channels == 1 and channel is not None:
        raise ValueError(f"channel {channel!r} for {channels}-channel clips; valid: "
                         f"{', '.join(CHANNELS) if channels == 2 else 'none (mono)'}")
    token = _READING.set((channels, channel))
    try:
        yield
    finally:
        _READING.reset(token)


def channels_read() -> int:
    """Channels each clip of this run gives: 2 under --channel both, else 1. A system that
    declares `channels = 2` sizes its input by it."""
    return 2 if _READING.get()[1] == "both" else 1


def _channel_key() -> dict:
    """The cache key's part for the channel read: nothing for mono clips (keys as before)."""
    channels, channel = _READING.get()
    return {"channel": channel} if channels == 2 else {}


def _pick_channel(path, x, n_channels):
    """The run's channel of x (n_samples, n_channels), after checking the channel count."""
    channels, channel = _READING.get()
    if n_channels != channels:
        fix = ("mix it down (e.g. sox in.wav -c 1 out.wav), or use the year it belongs to "
               "(2026 is stereo)" if channels == 1 else "DCASE 2026 clips are stereo (near and "
               "far microphone): use the year this mono clip belongs to")
        raise AudioError(f"{path}: {n_channels} channel{'s' * (n_channels != 1)}, expected "
                         f"{channels} for this year; {fix}")
    if channels == 1:
        return x[:, 0]  # (n_samples,)
    if channel == "both":
        return np.ascontiguousarray(x.T)  # (2, n_samples)
    return x[:, 0 if channel == "near" else 1] if channel != "mean" else x.mean(axis=1)


def load_wav(path, *, sr: int = SR) -> np.ndarray:
    """Read a wav at `sr` Hz as float32 in [-1, 1], with the channel count the run expects
    (mono, or stereo in 2026: `reading`); raise AudioError naming the file otherwise.
    Returns (n_samples,), or (2, n_samples) for --channel both.

    libsndfile reads a truncated wav without complaint, so the RIFF chunk sizes are checked here.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file; check the path and the data folder given to asd")
    if not path.is_file():
        raise AudioError(f"{path}: not a regular file; pass the path of a wav file")
    try:
        problem = _riff_problem(path)
    except OSError as err:                 # permission denied, an I/O error of the disk
        raise AudioError(f"{path}: cannot be read ({err.strerror or err}); check the file's "
                         "permissions (chmod a+r) or copy it again") from None
    if problem:
        raise AudioError(f"{path}: truncated wav: {problem}; download or copy it again")
    try:
        with sf.SoundFile(path) as f:
            n_channels, found_sr, n_samples = f.channels, f.samplerate, f.frames
            x = f.read(dtype="float32", always_2d=True)  # (n_samples, channels)
    except sf.LibsndfileError as err:
        reason = " ".join(err.error_string.split())
        raise AudioError(f"{path}: not a readable sound file ({reason}); "
                         "asd reads mono 16-bit wav files: download or export it again") from err
    if n_samples == 0 or x.size == 0:
        raise AudioError(f"{path}: empty (0 samples); download it again or remove it")
    if found_sr != sr:
        raise AudioError(f"{path}: sample rate {found_sr} Hz, expected {sr} Hz; "
                         f"resample it (e.g. sox in.wav -r {sr} out.wav)")
    n_bad = int(np.size(x) - np.isfinite(x).sum())
    if n_bad:
        raise AudioError(f"{path}: {n_bad} NaN or Inf samples; the file is corrupt: "
                         "download or export it again")
    return _pick_channel(path, x, n_channels)  # (n_samples,) or (2, n_samples)


def load_batch(paths, *, sr: int = SR) -> list[np.ndarray]:
    """load_wav over many files; clips keep their own lengths."""
    return [load_wav(p, sr=sr) for p in paths]  # [(n_samples,)] * len(paths)


def check_clip(path, *, min_samples: int, training: bool, sr: int = SR,
               shorter_input=None) -> None:
    """load_wav's checks, and: at least min_samples long (the system's shortest input), and,
    for a training clip, not silent (all-zero: it would teach the model that silence, a
    stopped machine or a dead microphone, is normal). Raises AudioError naming the file.
    shorter_input(n_samples): the system's flag and value that would take a clip this long
    (e.g. "--frames 63"), named in the refusal of a short clip."""
    x = load_wav(path, sr=sr)
    if x.shape[-1] < min_samples:
        shorten = shorter_input and f", or shorten the system's input: {shorter_input(x.shape[-1])}"
        raise AudioError(f"{path}: {x.shape[-1] / sr:.3f} s long, shorter than the {min_samples / sr:.3f} s "
                         f"this system needs; remove it or record a longer clip{shorten or ''}")
    if training and not np.any(x):
        raise AudioError(f"{path}: silent (every sample is 0); a training clip must hold the "
                         f"machine's normal sound: remove it from the training folder")


def check_clips(paths, *, min_samples: int, training: bool, log=None, sr: int = SR,
                shorter_input=None) -> None:
    """check_clip on every file, before any work (a few seconds per thousand clips): the first
    broken one stops the run with one line naming it; log(line) hears progress every
    PROGRESS_S seconds."""
    shown = time.monotonic()
    for i, path in enumerate(paths, 1):
        check_clip(path, min_samples=min_samples, training=training, sr=sr,
                   shorter_input=shorter_input)
        if log and time.monotonic() - shown > PROGRESS_S:
            log(f"checked {i} of {len(paths)} clips")
            shown = time.monotonic()


def _as_signal(x) -> torch.Tensor:
    """x as a torch tensor of float samples, dtype and device kept (numpy arrays land on the CPU)."""
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        # integer PCM cast as it is would sit 90 dB above float audio in [-1, 1]
        raise TypeError(f"expected float samples in [-1, 1], got {x.dtype}; read files with load_wav")
    return x


@functools.lru_cache(maxsize=16)
def _hann(n: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Periodic Hann window (scipy.signal.get_window('hann', n)), so overlapped frames sum flat.
    Cached (never written to): built in float64, it costs ~35 us, 1% of a 4-clip log_mel call."""
    k = torch.arange(n, dtype=torch.float64, device=device)
    return (0.5 - 0.5 * torch.cos(2 * math.pi * k / n)).to(dtype)  # (n,)


def stft(x, *, n_fft: int, hop: int, center: bool = True, pad_mode: str = "constant",
         window: str = "hann") -> torch.Tensor:
    """Short-time Fourier transform as librosa.stft computes it (no torch.stft).

    x: (..., n_samples) tensor or array. center=True pads n_fft // 2 samples on both sides so
    that frame t is centred on sample t * hop; pad_mode "constant" pads zeros (librosa >= 0.10),
    "reflect" mirrors the signal (librosa < 0.10). window: only "hann" (periodic).
    Returns complex (..., n_fft // 2 + 1, n_frames), n_frames = 1 + (n_padded - n_fft) // hop.
    """
    return _spectrum(x, n_fft=n_fft, hop=hop, center=center, pad_mode=pad_mode,
                     window=window).transpose(-1, -2)  # (..., n_fft // 2 + 1, n_frames)


def istft(spec, *, hop: int, length: int) -> torch.Tensor:
    """Inverse of stft(center=True), as librosa.istft: each frame's irfft, Hann-windowed again,
    overlap-added, divided by the overlapped squared window (the least-squares inverse), the
    n_fft // 2 centre padding cut off. spec: complex (..., n_fft // 2 + 1, n_frames).
    Returns (..., length), zero-padded where the frames end sooner."""
    n_fft = 2 * (spec.shape[-2] - 1)
    lead, n_frames = spec.shape[:-2], spec.shape[-1]
    window = _hann(n_fft, dtype=spec.real.dtype, device=spec.device)
    frames = torch.fft.irfft(spec.transpose(-1, -2), n=n_fft) * window  # (..., T, n_fft)
    total = n_fft + hop * (n_frames - 1)

    def overlap_add(cols):                                     # (N, n_fft, T) -> (N, total)
        return torch.nn.functional.fold(cols, (1, total), (1, n_fft), stride=(1, hop))[:, 0, 0]
    y = overlap_add(frames.reshape(-1, n_frames, n_fft).transpose(1, 2))
    norm = overlap_add((window ** 2)[None, :, None].expand(1, n_fft, n_frames))   # (1, total)
    y = y / torch.where(norm > 1e-10, norm, 1.0)
    y = torch.nn.functional.pad(y[:, n_fft // 2:n_fft // 2 + length],
                                (0, max(0, length - (total - n_fft // 2))))
    return y.reshape(*lead, length)                                     # (..., length)


def _spectrum(x, *, n_fft: int, hop: int, center: bool = True, pad_mode: str = "constant",
              window: str = "hann", scratch: bool = False) -> torch.Tensor:
    """stft in frame order: complex (..., n_frames, n_fft // 2 + 1). scratch: the frames are
    written into a _scratch buffer (log_mel's use). The spectrum is always new: rfft's out=
    computes into a new tensor and then copies (0.34 -> 0.42 ms per clip, one thread)."""
    if window != "hann":
        raise ValueError(f"window {window!r} is not supported; valid: 'hann'")
    if pad_mode not in ("constant", "reflect"):
        raise ValueError(f"pad_mode {pad_mode!r} is not supported; valid: 'constant', 'reflect'")
    x = _as_signal(x)
    n_samples = x.shape[-1]
    if center and pad_mode == "reflect" and n_samples <= n_fft // 2:
        raise ValueError(f"reflect padding needs more than {n_fft // 2} samples, got {n_samples}")
    n_padded = n_samples + 2 * (n_fft // 2) if center else n_samples
    if n_padded < n_fft:
        raise ValueError(f"signal of {n_samples} samples is shorter than one frame of {n_fft}")
    window = _hann(n_fft, dtype=x.dtype, device=x.device)
    shape = (*x.shape[:-1], 1 + (n_padded - n_fft) // hop, n_fft)  # (..., n_frames, n_fft)
    frames = _scratch("frames", shape, x.dtype, x.device) if scratch else x.new_empty(shape)
    if center:
        _centred_frames(x, n_fft=n_fft, hop=hop, pad_mode=pad_mode, window=window, out=frames)
    else:
        torch.mul(x.unfold(-1, n_fft, hop), window, out=frames)
    return torch.fft.rfft(frames, dim=-1)  # (..., n_frames, n_fft // 2 + 1)


_SCRATCH = threading.local()  # per thread: .buffers = {name: (flat buffer, shape, view)}


def _scratch(name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of `shape` that reuses this thread's buffer `name` (grown as
    needed) on the CPU: see SCRATCH_MAX_BYTES. On other devices, or above that size, a fresh one
    (CUDA's caching allocator already reuses its memory). Valid until the next call for `name`."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})  # name: (buffer, shape, view of it)
    kept = buffers.get(name)
    if kept is not None and kept[1] == shape and kept[2].dtype == dtype and device.type == "cpu":
        return kept[2]                     # the common case, a batch like the last: ~1 us
    n = math.prod(shape)
    if device.type != "cpu" or n * dtype.itemsize > SCRATCH_MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    buf = kept[0] if kept is not None else None
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype)
    view = buf.narrow(0, 0, n).view(shape)
    buffers[name] = (buf, tuple(shape), view)
    return view


def _centred_frames(x, *, n_fft: int, hop: int, pad_mode: str, window, out=None) -> torch.Tensor:
    """Windowed frames of x padded by n_fft // 2 on both sides, frame t centred on sample t * hop.

    Edge-only padding: only the first and last few frames reach into the padding, so only the
    signal's two ends are padded (a few n_fft samples); the inner frames are windowed straight
    from the signal. Padding the whole signal first would copy every sample once more (~8% of
    log_mel, bench.py --stages). Equal to unfold(pad(x)) * window exactly (tests: stft vs librosa).
    out: the (..., n_frames, n_fft) tensor to write them into (None: a new one). Returns it.
    """
    n, pad = x.shape[-1], n_fft // 2
    n_frames = 1 + (n + 2 * pad - n_fft) // hop
    first = -(-pad // hop)                 # first frame that starts inside the signal
    last = (n + pad - n_fft) // hop        # last frame that ends inside the signal
    frames = x.new_empty(*x.shape[:-1], n_frames, n_fft) if out is None else out

    def padded(piece, left, right):        # F.pad's reflect mode wants (N, C, W)
        out = torch.nn.functional.pad(piece.reshape(-1, 1, piece.shape[-1]), (left, right), mode=pad_mode)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    if last < first:                       # no frame inside the signal: pad all of it
        torch.mul(padded(x, pad, pad).unfold(-1, n_fft, hop), window, out=frames)
        return frames
    inner = x[..., first * hop - pad:last * hop - pad + n_fft]  # frames first..last, a view
    torch.mul(inner.unfold(-1, n_fft, hop), window, out=frames[..., first:last + 1, :])
    if pad_mode == "constant":             # zeros: each end frame is zeros beside a windowed piece
        for t in [*range(first), *range(last + 1, n_frames)]:     # 1-2 frames per end, mostly
            start = t * hop - pad          # the frame's first sample; outside [0, n): zero
            lo, hi = max(0, -start), min(n_fft, n - start)
            if lo:
                frames[..., t, :lo] = 0
            if hi < n_fft:
                frames[..., t, hi:] = 0
            torch.mul(x[..., start + lo:start + hi], window[lo:hi], out=frames[..., t, lo:hi])
        return frames                      # framing 0.060 -> 0.049 ms per 10-s clip, 1 thread
    # each end piece holds one inner frame more than it needs, so that it is longer than the
    # padding (reflect mode mirrors the piece's own samples); that frame is sliced off
    head = padded(x[..., :first * hop - pad + n_fft], pad, 0)  # frames 0..first
    torch.mul(head.unfold(-1, n_fft, hop)[..., :first, :], window, out=frames[..., :first, :])
    tail = padded(x[..., last * hop - pad:], 0, pad)           # frames last..n_frames - 1
    torch.mul(tail.unfold(-1, n_fft, hop)[..., 1:, :], window, out=frames[..., last + 1:, :])
    return frames


def hz_to_mel(freqs, *, htk: bool = False) -> np.ndarray:
    """Hz to mel: HTK 2595 * log10(1 + f / 700), or Slaney (linear below 1 kHz, log above)."""
    f = np.asarray(freqs, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + f / 700.0)
    break_mel = MEL_BREAK_HZ / MEL_LINEAR_HZ
    log_part = break_mel + np.log(np.maximum(f, MEL_BREAK_HZ) / MEL_BREAK_HZ) / MEL_LOG_STEP
    return np.where(f >= MEL_BREAK_HZ, log_part, f / MEL_LINEAR_HZ)


def mel_to_hz(mels, *, htk: bool = False) -> np.ndarray:
    """Inverse of hz_to_mel."""
    m = np.asarray(mels, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    break_mel = MEL_BREAK_HZ / MEL_LINEAR_HZ
    log_part = MEL_BREAK_HZ * np.exp(MEL_LOG_STEP * (np.maximum(m, break_mel) - break_mel))
    return np.where(m >= break_mel, log_part, m * MEL_LINEAR_HZ)


def mel_filterbank(*, sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None,
                   htk: bool = False, norm: str | None = "slaney", dtype=np.float32) -> np.ndarray:
    """Triangular mel filters as librosa.filters.mel builds them.

    sr > 0 Hz; n_fft > 0 samples; n_mels > 0 bands; 0 <= fmin < fmax <= sr / 2 Hz (fmax None
    means sr / 2). htk picks the HTK mel scale instead of Slaney's. norm "slaney" divides each
    triangle by its width in Hz (constant energy per band), None leaves peaks at 1.
    Warns, as librosa does, when a filter falls between FFT bins and stays empty.
    Returns (n_mels, n_fft // 2 + 1).
    """
    if norm not in ("slaney", None):
        raise ValueError(f"norm {norm!r} is not supported; valid: 'slaney', None")
    fmax = sr / 2 if fmax is None else fmax
    fft_hz = np.fft.rfftfreq(n_fft, d=1.0 / sr)  # (n_bins,)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin, htk=htk), hz_to_mel(fmax, htk=htk), n_mels + 2),
                         htk=htk)  # (n_mels + 2,) left edge, centre, right edge of each band
    widths = np.diff(edges_hz)  # (n_mels + 1,)
    ramps = edges_hz[:, None] - fft_hz[None, :]  # (n_mels + 2, n_bins)
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))  # (n_mels, n_bins)
    if norm == "slaney":
        weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    if np.any((edges_hz[:-2] > 0) & (weights.max(axis=1) == 0)):
        warnings.warn("Empty filters detected in mel frequency basis. Some channels will produce "
                      "empty responses. Try increasing your sampling rate (and fmax) or reducing "
                      "n_mels.", stacklevel=2)
    return weights.astype(dtype)  # (n_mels, n_fft // 2 + 1)


@functools.lru_cache(maxsize=16)
def _mel_tensor(sr, n_fft, n_mels, fmin, fmax, dtype, device) -> torch.Tensor:
    """mel_filterbank as a tensor, cached per settings, dtype and device (all in the key)."""
    fb = mel_filterbank(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, dtype=np.float64)
    return torch.from_numpy(fb).to(dtype=dtype, device=device)  # (n_mels, n_bins)


@functools.lru_cache(maxsize=16)
def _mel_blocks(sr, n_fft, n_mels, fmin, fmax, dtype, device, block=MEL_BLOCK) -> tuple:
    """_mel_tensor cut into blocks of `block` consecutive filters, each trimmed to the FFT bins
    its filters cover: ((first_mel, end_mel, first_bin, end_bin, weights), ...), weights
    (end_mel - first_mel, end_bin - first_bin), ready for weights @ power.mT. Cached the same way."""
    fb = _mel_tensor(sr, n_fft, n_mels, fmin, fmax, dtype, device)  # (n_mels, n_bins)
    blocks = []
    for m0 in range(0, n_mels, block):
        m1 = min(m0 + block, n_mels)
        covered = fb[m0:m1].any(dim=0).nonzero()  # (n_covered, 1), bins some filter weighs
        k0, k1 = (int(covered[0]), int(covered[-1]) + 1) if len(covered) else (0, 0)
        blocks.append((m0, m1, k0, k1, fb[m0:m1, k0:k1].contiguous()))
    return tuple(blocks)


def mel_banded(spec_power, blocks, *, n_mels: int, scratch: bool = False) -> torch.Tensor:
    """filterbank @ spec_power.mT, block by block over the bins each block covers (_mel_blocks).

    Equal to the dense product to float rounding: only the order of the sums changes. Every
    clip's frames are one (n_bins, N) operand, and the product is written in (n_mels, N) order:
    the matrix product takes its operands transposed at no cost, where turning (N, n_mels) into
    (n_mels, T) afterwards took a strided pass (6% of log_mel, bench.py --stages).
    spec_power: (..., T, n_bins). Returns (..., n_mels, T), a view of one (n_mels, N) tensor
    (contiguous for a single clip; .contiguous() moves whole rows of T frames). scratch: that
    tensor is a _scratch buffer.
    """
    flat = spec_power.reshape(-1, spec_power.shape[-1])  # (N, n_bins), N = frames of all clips
    shape = (n_mels, flat.shape[0])  # (n_mels, N)
    mel = _scratch("mel", shape, flat.dtype, flat.device) if scratch else flat.new_empty(shape)
    bins_first = flat.mT  # (n_bins, N), a view
    for m0, m1, k0, k1, weights in blocks:
        torch.matmul(weights, bins_first[k0:k1], out=mel[m0:m1])  # (end_mel - first_mel, N)
    return mel.reshape(n_mels, *spec_power.shape[:-1]).movedim(0, -2)  # (..., n_mels, T)


def log_mel(x, *, sr: int, n_fft: int, hop: int, n_mels: int, power: float = 2.0,
            pad_mode: str = "constant", floor: str = "clip", fmin: float = 0.0,
            fmax: float | None = None) -> torch.Tensor:
    """Log-mel spectrogram in dB as the DCASE baselines compute it: 20 / power * log10(mel).

    x: (..., n_samples) tensor or array, on any device. power 2.0 gives a power spectrogram.
    floor "clip" is log10(max(S, eps)) (2021 on), "add" is log10(S + eps) (2020), eps = 2.2e-16.
    Pick a year's settings with log_mel_settings(year). Returns (..., n_mels, n_frames).
    The same steps as log_mel_reference, four of them made faster (bench.py --stages).
    """
    if floor not in ("clip", "add"):
        raise ValueError(f"floor {floor!r} is not supported; valid: 'clip', 'add'")
    # every intermediate is a _scratch buffer: fresh pages for them cost more than the arithmetic
    spec = _spectrum(x, n_fft=n_fft, hop=hop, pad_mode=pad_mode, scratch=True)  # (..., T, n_bins)
    # |X| ** power from re**2 + im**2: abs() would take a square root that power then undoes.
    # In place: re and im squared inside the FFT's own buffer, then one add (2 passes, not 4)
    re_im = torch.view_as_real(spec).square_()  # (..., T, n_bins, 2)
    spec_power = torch.add(re_im[..., 0], re_im[..., 1],
                           out=_scratch("power", spec.shape, re_im.dtype, re_im.device))
    if power != 2.0:
        spec_power.pow_(power / 2)
    # banded: each block of MEL_BLOCK filters touches only its own bins, 1/8 of the dense product
    blocks = _mel_blocks(sr, n_fft, n_mels, fmin, fmax, spec_power.dtype, spec_power.device)
    mel = mel_banded(spec_power, blocks, n_mels=n_mels, scratch=True)  # (..., n_mels, T), a view
    # the floor keeps silent frames finite; the baselines' eps is far below any real level.
    # The floor writes the result (whole rows of T frames move into place), the log is in place
    out = torch.empty(mel.shape, dtype=mel.dtype, device=mel.device)  # (..., n_mels, T)
    if floor == "clip":
        torch.clamp(mel, min=EPS, out=out)
    else:
        torch.add(mel, EPS, out=out)
    return out.log10_().mul_(20.0 / power)  # (..., n_mels, T)


def log_mel_reference(x, *, sr: int, n_fft: int, hop: int, n_mels: int, power: float = 2.0,
                      pad_mode: str = "constant", floor: str = "clip", fmin: float = 0.0,
                      fmax: float | None = None) -> torch.Tensor:
    """log_mel the plain way: dense filterbank, out-of-place steps. The reference that log_mel
    is tested and timed against; same arguments, same results to float rounding.
    Returns (..., n_mels, n_frames)."""
    if floor not in ("clip", "add"):
        raise ValueError(f"floor {floor!r} is not supported; valid: 'clip', 'add'")
    spec = stft(x, n_fft=n_fft, hop=hop, center=True, pad_mode=pad_mode)  # (..., n_bins, T)
    # |X| ** power from re**2 + im**2: abs() would take a square root that power then undoes
    spec_power = (spec.real.square() + spec.imag.square()) ** (power / 2)  # (..., n_bins, T)
    fb = _mel_tensor(sr, n_fft, n_mels, fmin, fmax, spec_power.dtype, spec_power.device)
    # filters applied frame by frame, (T, n_bins) @ (n_bins, n_mels), in the STFT's own memory
    # order: one large matrix product, faster than fb @ spec_power on the transposed view
    mel = (spec_power.mT @ fb.mT).mT.contiguous()  # (..., n_mels, T)
    # the floor keeps silent frames finite; the baselines' eps is far below any real level
    mel = mel.clamp(min=EPS) if floor == "clip" else mel + EPS
    return 20.0 / power * torch.log10(mel)  # (..., n_mels, T)


def log_mel_settings(year: int) -> dict:
    """Every log_mel keyword of that year's official AE baseline: log_mel(x, **log_mel_settings(y))."""
    if year not in LOG_MEL_BY_YEAR:
        raise ValueError(f"no log-mel settings for year {year!r}; valid: {sorted(LOG_MEL_BY_YEAR)}")
    return dict(sr=SR, n_fft=N_FFT, hop=HOP, n_mels=N_MELS, power=POWER, fmin=0.0, fmax=None,
                **LOG_MEL_BY_YEAR[year])


def stack_frames(logmel, *, n_frames: int = N_FRAMES) -> torch.Tensor:
    """The AE baseline's input vectors: n_frames consecutive frames laid end to end.

    logmel: (..., n_mels, T). vector[t, n_mels * j : n_mels * (j + 1)] = logmel[..., :, t + j].
    Returns (..., T - n_frames + 1, n_mels * n_frames).
    """
    logmel = torch.as_tensor(logmel)
    n_mels, n_time = logmel.shape[-2:]
    if n_time < n_frames:
        raise ValueError(f"{n_time} frames cannot be stacked by {n_frames}; the clip is too short")
    windows = logmel.unfold(-1, n_frames, 1)  # (..., n_mels, n_vectors, n_frames)
    windows = windows.movedim(-3, -1)  # (..., n_vectors, n_frames, n_mels), frame-major
    return windows.reshape(*windows.shape[:-2], n_frames * n_mels)  # (..., n_vectors, n_frames * n_mels)


def frame_windows(logmel, *, width: int = 64, hop: int = 32) -> torch.Tensor:
    """Cut (..., n_mels, T) into windows of `width` frames every `hop` frames, for the CNNs.

    Window w covers frames w * hop to w * hop + width - 1; a tail shorter than width is dropped.
    Returns (..., n_windows, n_mels, width), n_windows = 1 + (T - width) // hop.
    """
    logmel = torch.as_tensor(logmel)
    n_time = logmel.shape[-1]
    if n_time < width:
        raise ValueError(f"{n_time} frames are fewer than one window of {width}; the clip is too short")
    return logmel.unfold(-1, width, hop).transpose(-3, -2)  # (..., n_windows, n_mels, width)


def magnitude_spectrum(x) -> torch.Tensor:
    """|rFFT| of the whole clip, no window: (..., n_samples) -> (..., n_samples // 2 + 1)."""
    return torch.fft.rfft(_as_signal(x), dim=-1).abs()  # (..., n_samples // 2 + 1)


# --------------------------------------------------------------------------------------------
# Spectrogram images (Shinmura 2020, section 4.1): librosa.stft(n_fft=512, hop_length=256) with
# the reflect padding of librosa 0.7, amplitude_to_db, then resized to 224 x 224 as OpenCV's
# cv2.resize does by default (bilinear, pixel centres at half steps, no anti-aliasing).

AMIN = 1e-5      # amplitude floor of librosa.amplitude_to_db (-100 dB)
TOP_DB = 80.0    # dB kept below the loudest bin of each clip


def amplitude_to_db(spec, *, amin: float = AMIN, top_db: float | None = TOP_DB) -> torch.Tensor:
    """20 * log10(max(amin, |S|)) with ref 1.0, limited to top_db below each clip's peak, as
    librosa.amplitude_to_db. spec: (..., F, T) magnitudes. Returns (..., F, T) in dB."""
    db = 20.0 * torch.log10(spec.clamp(min=amin))
    if top_db is not None:
        peak = db.amax(dim=(-2, -1), keepdim=True)       # per clip, as librosa per call
        db = torch.maximum(db, peak - top_db)
    return db


def resize_image(img, *, size: int) -> torch.Tensor:
    """Bilinear resize of (..., H, W) to (..., size, size), OpenCV's INTER_LINEAR convention."""
    lead = img.shape[:-2]
    flat = img.reshape(-1, 1, *img.shape[-2:])         # (N, 1, H, W) for interpolate
    out = torch.nn.functional.interpolate(flat, size=(size, size), mode="bilinear",
                                          align_corners=False, antialias=False)
    return out.reshape(*lead, size, size)               # (..., size, size)


def spectrogram_image(x, *, n_fft: int = 512, hop: int = 256, size: int = 224,
                      pad_mode: str = "reflect") -> torch.Tensor:
    """Shinmura 2020's network input before normalisation: the dB magnitude spectrogram resized
    to a square image, low frequencies in row 0. x: (..., n_samples). Returns (..., size, size)."""
    spec = stft(x, n_fft=n_fft, hop=hop, center=True, pad_mode=pad_mode).abs()  # (..., F, T)
    return resize_image(amplitude_to_db(spec), size=size)


# --------------------------------------------------------------------------------------------
# Log-power spectrogram (JLESS 2022, section 3.2: the STFT input of their MobileFaceNet): the
# STFT power in dB as log_mel computes it, without the mel filters, the lowest n_bins bins kept
# (512 of the 513 of a 1024-point FFT: the Nyquist bin is dropped so that patches are 512 high).

def log_spectrogram(x, *, n_fft: int, hop: int, n_bins: int, pad_mode: str = "constant") -> torch.Tensor:
    """10 * log10(max(|STFT|^2, eps)) of the lowest n_bins bins. x: (..., n_samples).
    Returns (..., n_bins, n_frames)."""
    if not 0 < n_bins <= n_fft // 2 + 1:
        raise ValueError(f"n_bins {n_bins}: must be between 1 and {n_fft // 2 + 1} (n_fft {n_fft})")
    spec = stft(x, n_fft=n_fft, hop=hop, center=True, pad_mode=pad_mode)[..., :n_bins, :]
    power = spec.real.square() + spec.imag.square()                       # (..., n_bins, T)
    return 10.0 * torch.log10(power.clamp(min=EPS))                        # (..., n_bins, T)


# --------------------------------------------------------------------------------------------
# PANNs' log-mel at 32 kHz (Kong et al. 2020; Narita & Tamamori 2021, section 2.3 and table 2):
# the 16 kHz clip resampled to 32 kHz, then the log-mel of PANNs' front end (torchlibrosa's
# Spectrogram and LogmelFilterBank as PANNs builds them: periodic Hann, centre padding by
# reflection, power 2, librosa's Slaney mel filters from 50 to 14000 Hz, 10 * log10(max(S,
# amin)) with ref 1, amin 1e-10 and no top_db). Resampling is scipy's polyphase filter;
# PANNs itself read its training audio at 32 kHz with librosa (resampy), which differs in the
# anti-aliasing filter only.

PANNS_SR = 32000      # Hz, the rate PANNs' AudioSet models were trained at
PANNS_LOG_MEL = dict(sr=PANNS_SR, n_fft=1024, hop=320, n_mels=64, fmin=50.0, fmax=14000.0,
                     pad_mode="reflect")    # table 2: 32 ms window, 10 ms hop at 32 kHz
PANNS_AMIN = 1e-10    # power floor of PANNs' power_to_db (-100 dB)


def resample(x, *, sr_in: int, sr_out: int) -> torch.Tensor:
    """x: (..., n) at sr_in Hz -> (..., n * sr_out / sr_in) at sr_out Hz, by
    scipy.signal.resample_poly (polyphase, Kaiser-windowed low-pass), on x's device and dtype."""
    import scipy.signal       # here, not at the top: its import is 1.7 s of every command's start
    x = _as_signal(x)
    g = math.gcd(sr_in, sr_out)
    y = scipy.signal.resample_poly(x.cpu().numpy(), sr_out // g, sr_in // g, axis=-1)
    return torch.from_numpy(y).to(dtype=x.dtype, device=x.device)  # (..., n * sr_out / sr_in)


def panns_log_mel(x, *, sr_in: int = SR, sr: int = PANNS_SR, n_fft: int = 1024, hop: int = 320,
                  n_mels: int = 64, fmin: float = 50.0, fmax: float = 14000.0,
                  pad_mode: str = "reflect", amin: float = PANNS_AMIN) -> torch.Tensor:
    """PANNs' input: x (..., n_samples) at sr_in Hz resampled to sr, then 10 * log10(max(mel
    power, amin)) dB (ref 1, no top_db). Returns (..., n_mels, n_frames)."""
    if sr != sr_in:
        x = resample(x, sr_in=sr_in, sr_out=sr)
    db = log_mel(x, sr=sr, n_fft=n_fft, hop=hop, n_mels=n_mels, power=2.0, pad_mode=pad_mode,
                 floor="clip", fmin=fmin, fmax=fmax)     # 10 * log10(max(S, 2.2e-16))
    # log10 is monotonic, so flooring the dB at 10 * log10(amin) is flooring the power at amin
    return db.clamp_(min=10.0 * math.log10(amin))       # (..., n_mels, T)


# --------------------------------------------------------------------------------------------
# The on-disk feature cache: one .npy per clip, keyed by the file's identity and every setting

CACHE_VERSION = 2   # bump when a feature function changes what it returns (2: banded mel product)
FEATURES = {"log_mel": log_mel, "spectrogram_image": spectrogram_image,
            "log_spectrogram": log_spectrogram, "panns_log_mel": panns_log_mel}
# clips per feature call in clip_features (and bench.py's default), per torch thread: each
# thread's share of a call's frames and spectra (3-5 MB per clip) stays near its caches. log_mel
# in clips/s, min-time / median of 9 paired runs of 4 passes, 2 shared cores (AMD EPYC, 1 MB L2
# per core), quiet machine (python asd.py bench features --clips <folder> --threads 1,2
# --batch 2,1,4,8 --repeats 9; melspectrogram's ratio in brackets):
#   batch                        1                2                4                8
#   2023 dev 10-12 s, 1 thread   1671/1589 (3.9)  1828/1733 (4.2)  1531/1346 (3.5)  1312/1231 (3.0)
#   2023 dev 10-12 s, 2 threads  2199/1786 (4.6)  2502/2177 (5.3)  2574/2376 (5.4)  2094/1580 (4.4)
#   RoboticArm 7.9 s, 1 thread   2310/2244 (4.3)  2574/2479 (4.8)  2611/2337 (4.9)  1803/1745 (3.4)
#   RoboticArm 7.9 s, 2 threads  3354/3166 (5.8)  3923/3697 (6.8)  4413/4066 (7.6)  3098/2731 (5.3)
# Two clips per thread (batch 2 at 1 thread, 4 at 2) is the best in every row, or within 2% of
# it. Earlier, single passes: batches of 16-64 were 10-50% slower.
# spectrogram_image, 1 thread: batch 4 1.47, 16 1.57, 64 3.64 ms per clip. Measured on a CPU
# only; a GPU may want larger batches.
CLIPS_PER_THREAD = 2


def clip_batch() -> int:
    """Clips per feature call at torch's present thread count: CLIPS_PER_THREAD per thread."""
    return CLIPS_PER_THREAD * torch.get_num_threads()


def cache_key(path, kind, settings):
    """A key that changes when the file (path, size, mtime), the feature kind or any of its
    settings changes: a stale entry can never be read back."""
    st = os.stat(path)
    ident = {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "kind": kind, "settings": settings, "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def clip_features(paths, kind, settings, *, sr=SR, cache_dir=None, device="cpu", batch=None,
                  log=None):
    """FEATURES[kind](wave, **settings) of every clip, read from the cache where present, made
    `batch` clips per call (None: clip_batch()); log(line), when given, hears the progress and
    the time left every PROGRESS_S seconds.
    Returns [(..., T_i) tensors], one per clip, on the CPU."""
    out, todo = [None] * len(paths), []
    key = {"sr": sr, **settings, **_channel_key()}
    batch = batch or clip_batch()
    for i, p in enumerate(paths):
        hit = cache_dir and Path(cache_dir) / f"{cache_key(p, kind, key)}.npy"
        if hit and hit.exists():
            out[i] = torch.from_numpy(np.load(hit))
        else:
            todo.append(i)
    if log and len(todo) >= PROGRESS_CLIPS:     # a long first pass says at once what it does
        log(f"{kind}: computing the features of {len(todo)} clips"
            + (f" ({len(paths) - len(todo)} more cached)" if len(todo) < len(paths) else "")
            + (f", cached in {cache_dir}" if cache_dir else ""))
    t0 = shown = time.monotonic()
    for start in range(0, len(todo), batch):
        if log and time.monotonic() - shown > PROGRESS_S:
            shown, spent = time.monotonic(), time.monotonic() - t0
            log(f"{kind}: {start} of {len(todo)} clips, about "
                f"{spent / start * (len(todo) - start):.0f} s left")
        chunk = todo[start:start + batch]
        waves = [load_wav(paths[i], sr=sr) for i in chunk]
        for i, feat in zip(chunk, _batched(FEATURES[kind], waves, settings, device)):
            out[i] = feat
            if cache_dir:
                array = feat.numpy()
                data.write_atomic(Path(cache_dir) / f"{cache_key(paths[i], kind, key)}.npy",
                                  lambda f: np.save(f, array))
    return out


def _batched(fn, waves, settings, device):
    """Clips of equal length go through the feature function together."""
    feats = [None] * len(waves)
    for n in sorted({w.shape[-1] for w in waves}):
        idx = [i for i, w in enumerate(waves) if w.shape[-1] == n]
        x = torch.from_numpy(np.stack([waves[i] for i in idx])).to(device)   # (B, n)
        for i, feat in zip(idx, fn(x, **settings).cpu()):                   # (B, ..., T)
            feats[i] = feat
    return feats


# --------------------------------------------------------------------------------------------
# Midea 2024 (Yin et al., section 2.1, after Wilkinghoff, ICASSP 2023): every clip repeated or
# cropped to one fixed length; the magnitude spectrum of the whole clip (magnitude_spectrum
# above); the magnitude spectrogram (STFT 1024/512) between 200 and 8000 Hz with its time
# average subtracted, which removes the static spectrum the first representation carries.

BAND_HZ = (200.0, 8000.0)   # Hz, the spectrogram branch's frequency range


def fixed_length(x, *, n_samples: int) -> torch.Tensor:
    """Repeat a clip end to end until it is n_samples long, then keep the first n_samples
    (a longer clip is cropped to its start). Deterministic: the same clip always gives the same
    input. x: (..., n) tensor or array. Returns (..., n_samples)."""
    x = _as_signal(x)
    reps = -(-n_samples // x.shape[-1])                         # ceil
    return x.repeat(*([1] * (x.dim() - 1)), reps)[..., :n_samples]


def band_spectrogram(x, *, n_fft: int = N_FFT, hop: int = HOP, sr: int = SR,
                     fmin: float = BAND_HZ[0], fmax: float = BAND_HZ[1]) -> torch.Tensor:
    """|STFT| (zero centre padding, periodic Hann) of the bins fmin <= f <= fmax, minus its
    mean over time. x: (..., n_samples). Returns (..., n_bins_in_band, n_frames); at the
    defaults 500 bins (203.1 to 8000 Hz)."""
    spec = stft(x, n_fft=n_fft, hop=hop, center=True, pad_mode="constant").abs()  # (..., F, T)
    hz = torch.arange(spec.shape[-2], device=spec.device) * (sr / n_fft)
    band = spec[..., (hz >= fmin) & (hz <= fmax), :]                          # (..., Fb, T)
    return band - band.mean(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------
# Pre-trained encoders' own front ends (systems/encoder_knn.py), computed on the device in
# batches, not cached: each takes (B, n) 16 kHz waveforms as a tensor on any device.
# - resample_on_device: scipy.signal.resample_poly's polyphase filter (the same Kaiser-windowed
#   firwin taps, the same alignment) as a torch convolution, so 16 -> 32 kHz runs on the GPU.
# - kaldi_mel_banks: Kaldi's triangular mel filters (mel = 1127 ln(1 + f / 700), peaks 1, no
#   area norm), as torchaudio.compliance.kaldi.get_mel_banks builds them with no VTLN warp,
#   the Nyquist bin given a zero weight as both EfficientAT and torchaudio's fbank do.
# - efficientat_log_mel: EfficientAT's AugmentMelSTFT in eval mode (models/preprocess.py):
#   pre-emphasis [-0.97, 1], STFT at 32 kHz (1024 points, 800-sample symmetric Hann centred in
#   them, hop 320, reflect centre padding), power, 128 Kaldi mel bands 0-15000 Hz, ln(S + 1e-5),
#   then (x + 4.5) / 5, their "fast normalisation".
# - kaldi_fbank: torchaudio.compliance.kaldi.fbank at its defaults as BEATs calls it (25 ms
#   frames every 10 ms, no centre padding, DC removed per frame, pre-emphasis 0.97, Povey
#   window, 512-point power spectrum, 128 mel bands 20-8000 Hz, ln(max(S, float32 eps))).

EFFICIENTAT_SR = 32000   # Hz, the rate EfficientAT's AudioSet models were trained at
EFFICIENTAT_LOG_MEL = dict(sr=EFFICIENTAT_SR, n_fft=1024, win=800, hop=320, n_mels=128,
                           fmin=0.0, fmax=15000.0)   # fmax: sr / 2 - 1000, their eval default
FLOAT32_EPS = float(np.finfo(np.float32).eps)     # 1.19e-7, Kaldi fbank's log floor in torch


@functools.lru_cache(maxsize=8)
def _poly_taps(up: int, down: int) -> tuple:
    """scipy.signal.resample_poly's filter and alignment: (taps, samples removed at the start)."""
    import scipy.signal       # here, not at the top (resample)
    half = 10 * max(up, down)
    taps = scipy.signal.firwin(2 * half + 1, 1.0 / max(up, down), window=("kaiser", 5.0)) * up
    pre = down - half % down                          # zeros put before the taps
    return np.concatenate([np.zeros(pre), taps]), (half + pre) // down


def resample_on_device(x, *, sr_in: int, sr_out: int) -> torch.Tensor:
    """x: (..., n) at sr_in Hz -> (..., ceil(n * sr_out / sr_in)) at sr_out Hz, equal to
    scipy.signal.resample_poly (float32 rounding), on x's device: zero-stuff by `up`, filter,
    keep every `down`-th sample. Made for small ratios (16 <-> 32 kHz): the filter has
    20 * max(up, down) + 1 taps over n * up samples."""
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    if up == down:
        return x
    taps, skip = _poly_taps(up, down)
    h = torch.as_tensor(taps[::-1].copy(), dtype=x.dtype, device=x.device)   # flipped: conv1d
    n = x.shape[-1]
    stuffed = x.new_zeros(*x.shape[:-1], n * up)
    stuffed[..., ::up] = x
    flat = stuffed.reshape(-1, 1, n * up)
    # the full convolution, computed only at every down-th output (its stride)
    kept = torch.nn.functional.conv1d(flat, h.view(1, 1, -1), padding=len(taps) - 1,
                                      stride=down)[:, 0]
    n_out = -(-n * up // down)
    return kept[:, skip:skip + n_out].reshape(*x.shape[:-1], n_out)


@functools.lru_cache(maxsize=8)
def _kaldi_banks(n_mels, n_fft, sr, fmin, fmax, dtype, device) -> torch.Tensor:
    return torch.from_numpy(kaldi_mel_banks(n_mels=n_mels, n_fft=n_fft, sr=sr, fmin=fmin,
                                            fmax=fmax)).to(dtype=dtype, device=device)


def kaldi_mel_banks(*, n_mels: int, n_fft: int, sr: int, fmin: float, fmax: float) -> np.ndarray:
    """Kaldi's mel filters: triangles equally spaced on 1127 ln(1 + f / 700) between fmin and
    fmax (fmax <= 0: Nyquist + fmax), peak 1, over the bins k * sr / n_fft, k < n_fft / 2; the
    Nyquist bin's column is 0. Returns (n_mels, n_fft // 2 + 1) float32."""
    mel = lambda f: 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)  # noqa: E731
    fmax = fmax if fmax > 0 else sr / 2 + fmax
    lo, hi = mel(fmin), mel(fmax)
    step = (hi - lo) / (n_mels + 1)
    left = lo + np.arange(n_mels)[:, None] * step                      # (n_mels, 1)
    bins = mel(np.arange(n_fft // 2) * sr / n_fft)[None, :]            # (1, n_fft / 2)
    rising, falling = (bins - left) / step, (left + 2 * step - bins) / step
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return np.pad(weights, ((0, 0), (0, 1))).astype(np.float32)        # (n_mels, n_fft/2 + 1)


def efficientat_log_mel(x, *, sr_in: int = SR, sr: int = EFFICIENTAT_SR, n_fft: int = 1024,
                        win: int = 800, hop: int = 320, n_mels: int = 128, fmin: float = 0.0,
                        fmax: float = 15000.0) -> torch.Tensor:
    """EfficientAT's input: x (B, n) at sr_in Hz -> (B, n_mels, T) normalised log-mel,
    T = 1 + (n * sr / sr_in - 1) // hop."""
    x = resample_on_device(x, sr_in=sr_in, sr_out=sr)
    x = x[..., 1:] - 0.97 * x[..., :-1]                 # pre-emphasis: one sample shorter
    # torch.stft's window of `win` samples sits in the middle of the n_fft-point frame
    k = torch.arange(win, dtype=torch.float64, device=x.device)
    window = x.new_zeros(n_fft)
    window[(n_fft - win) // 2:(n_fft - win) // 2 + win] = (0.5 - 0.5 * torch.cos(
        2 * math.pi * k / (win - 1))).to(x.dtype)         # symmetric Hann
    padded = torch.nn.functional.pad(x[:, None], (n_fft // 2, n_fft // 2), mode="reflect")[:, 0]
    spec = torch.fft.rfft(padded.unfold(-1, n_fft, hop) * window, dim=-1)   # (B, T, n_bins)
    power = spec.real ** 2 + spec.imag ** 2
    banks = _kaldi_banks(n_mels, n_fft, sr, fmin, fmax, x.dtype, x.device)  # (n_mels, n_bins)
    mel = torch.matmul(banks, power.transpose(-1, -2))                       # (B, n_mels, T)
    return (torch.log(mel + 1e-5) + 4.5) / 5.0


def kaldi_fbank(x, *, sr: int = SR, n_mels: int = 128, frame: int = 400, shift: int = 160,
                n_fft: int = 512, fmin: float = 20.0, fmax: float = 0.0,
                preemphasis: float = 0.97) -> torch.Tensor:
    """Kaldi's log mel filterbank (torchaudio.compliance.kaldi.fbank's defaults, no dither) of
    x (B, n) in the sample scale it is given. Returns (B, T, n_mels), T = 1 + (n - frame) // shift."""
    frames = x.unfold(-1, frame, shift)                               # (B, T, frame)
    frames = frames - frames.mean(dim=-1, keepdim=True)               # DC offset per frame
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # x[-1] := x[0], Kaldi's
    frames = frames - preemphasis * previous
    k = torch.arange(frame, dtype=torch.float64, device=x.device)
    povey = ((0.5 - 0.5 * torch.cos(2 * math.pi * k / (frame - 1))) ** 0.85).to(x.dtype)
    spec = torch.fft.rfft(frames * povey, n=n_fft, dim=-1)           # zero-padded to n_fft
    power = spec.real ** 2 + spec.imag ** 2                           # (B, T, n_fft/2 + 1)
    banks = _kaldi_banks(n_mels, n_fft, sr, fmin, fmax, x.dtype, x.device)
    return torch.matmul(power, banks.T).clamp(min=FLOAT32_EPS).log()  # (B, T, n_mels)
