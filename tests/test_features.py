"""features.py against librosa (the DCASE baselines' own feature code) and against naive loops.

The log-mel references are built here the way each year's baseline builds them:
librosa.feature.melspectrogram, then 20 / power * log10 with that year's floor.
"""

import sys
from pathlib import Path

import librosa  # requirements-test.txt: the reference implementation
import numpy as np
import pytest
import soundfile as sf
import torch

import features as F

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEV_SAMPLE = SHARED_DATA / "dcase2023_dev_sample"
ROBOTIC_ARM_SAMPLE = SHARED_DATA / "dcase2024_eval_roboticarm_sample"  # quieter clips, 7.9 s
DB_TOL = 1e-3  # dB, log-mel agreement at normal levels


def machine_like(seconds: float, *, seed: int) -> np.ndarray:
    """Noise plus two tones and a hum at normal recording levels (peaks around -6 dBFS)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * F.SR)) / F.SR
    x = (0.05 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * 440.0 * t)
         + 0.1 * np.sin(2 * np.pi * 3150.0 * t) + 0.05 * np.sin(2 * np.pi * 50.0 * t))
    return x.astype(np.float32)  # (n_samples,)


# Written out here, not read from features.LOG_MEL_BY_YEAR, so that a wrong table fails.
BASELINE_PAD_MODE = {2020: "reflect", 2021: "reflect", 2022: "constant", 2023: "constant",
                     2024: "constant", 2025: "constant", 2026: "constant"}  # librosa<0.10: reflect
BASELINE_FLOOR = {2020: "add", 2021: "clip", 2022: "clip", 2023: "clip", 2024: "clip", 2025: "clip",
                  2026: "clip"}   # 2026: the 2025 code on channel 0 (branch 2026t2/v5.x.x)


def baseline_log_mel(x: np.ndarray, year: int) -> np.ndarray:
    """The official AE baseline's features for `year`, computed with librosa."""
    mel = librosa.feature.melspectrogram(y=x, sr=16000, n_fft=1024, hop_length=512, n_mels=128,
                                         power=2.0, pad_mode=BASELINE_PAD_MODE[year])
    if BASELINE_FLOOR[year] == "add":
        return 20.0 / 2.0 * np.log10(mel + sys.float_info.epsilon)
    return 20.0 / 2.0 * np.log10(np.maximum(mel, sys.float_info.epsilon))


@pytest.mark.parametrize("sr, n_fft, n_mels, htk, norm, fmin, fmax", [
    (16000, 1024, 128, False, "slaney", 0.0, None),
    (16000, 512, 64, False, "slaney", 0.0, None),
    (16000, 2048, 128, True, "slaney", 0.0, None),
    (22050, 2048, 128, False, None, 0.0, None),
    (22050, 1024, 64, True, None, 20.0, 8000.0),
    (16000, 1024, 64, False, "slaney", 50.0, 7000.0),
])
def test_mel_filterbank_equals_librosa(sr, n_fft, n_mels, htk, norm, fmin, fmax):
    ours = F.mel_filterbank(sr=sr, n_fft=n_fft, n_mels=n_mels, htk=htk, norm=norm, fmin=fmin, fmax=fmax)
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, htk=htk, norm=norm, fmin=fmin, fmax=fmax)
    assert ours.shape == ref.shape == (n_mels, n_fft // 2 + 1)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


FILTERBANKS = [  # (sr, n_fft, n_mels, fmin, fmax): the baselines', others, and one with empty filters
    (16000, 1024, 128, 0.0, None), (16000, 512, 64, 0.0, None), (22050, 2048, 128, 20.0, 8000.0),
    (16000, 1024, 64, 50.0, 7000.0), (16000, 256, 128, 0.0, None)]


@pytest.mark.filterwarnings("ignore:Empty filters")
@pytest.mark.parametrize("block", [1, 16, 40])
@pytest.mark.parametrize("sr, n_fft, n_mels, fmin, fmax", FILTERBANKS)
def test_mel_blocks_hold_every_weight_of_the_filterbank(sr, n_fft, n_mels, fmin, fmax, block):
    """Put back in place, the trimmed blocks are the dense filterbank, bit for bit: no weight
    falls outside its block's bins (block 1 on n_fft 256 also gives blocks with no bins at all)."""
    dense = F._mel_tensor(sr, n_fft, n_mels, fmin, fmax, torch.float32, torch.device("cpu"))
    rebuilt = torch.zeros_like(dense)
    blocks = F._mel_blocks(sr, n_fft, n_mels, fmin, fmax, torch.float32, torch.device("cpu"), block=block)
    assert [b[:2] for b in blocks] == [(m, min(m + block, n_mels)) for m in range(0, n_mels, block)]
    for m0, m1, k0, k1, weights in blocks:
        rebuilt[m0:m1, k0:k1] = weights
    assert torch.equal(rebuilt, dense)


@pytest.mark.filterwarnings("ignore:Empty filters")
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("sr, n_fft, n_mels, fmin, fmax", FILTERBANKS)
def test_mel_banded_equals_dense_product(sr, n_fft, n_mels, fmin, fmax, dtype, rtol):
    """Only the order of the sums differs from the dense product: equal to float rounding."""
    spec_power = torch.rand(2, 3, 50, n_fft // 2 + 1, dtype=dtype) ** 4  # (..., T, n_bins), a wide range
    dense = F._mel_tensor(sr, n_fft, n_mels, fmin, fmax, dtype, torch.device("cpu"))
    blocks = F._mel_blocks(sr, n_fft, n_mels, fmin, fmax, dtype, torch.device("cpu"))
    banded = F.mel_banded(spec_power, blocks, n_mels=n_mels)
    assert banded.shape == (2, 3, n_mels, 50) and banded.dtype == dtype
    torch.testing.assert_close(banded, dense @ spec_power.mT, rtol=rtol, atol=0)


@pytest.mark.parametrize("power", [1.0, 2.0])
@pytest.mark.parametrize("year", [2020, 2023])
def test_log_mel_equals_the_plain_reference(year, power):
    """log_mel's shortcuts (power in place, banded product, floor and log in place) against
    log_mel_reference, on batched and single clips, float32 and float64."""
    settings = {**F.log_mel_settings(year), "power": power}
    clips = np.stack([machine_like(1.5, seed=s) for s in range(2)])[:, None]  # (2, 1, n_samples)
    for x, atol in [(clips, 1e-4), (clips[0, 0], 1e-4), (clips.astype(np.float64), 1e-9)]:
        ours, plain = F.log_mel(x, **settings), F.log_mel_reference(x, **settings)
        assert ours.shape == plain.shape and ours.dtype == plain.dtype and ours.is_contiguous()
        torch.testing.assert_close(ours, plain, rtol=0, atol=atol)


def test_log_mel_results_never_share_its_scratch_buffers():
    """log_mel writes its intermediates into buffers kept between calls (_scratch); a result
    must stay as it was after later calls of every shape, batched or single, and must equal a
    call that grew the buffers first (the reused memory holds the previous call's data)."""
    settings = F.log_mel_settings(2023)
    long, short = machine_like(1.5, seed=0), machine_like(0.7, seed=1)
    first = [F.log_mel(x, **settings) for x in (long, np.stack([long, long]), short)]
    kept = [r.clone() for r in first]
    for x in (short, np.stack([short, short, short]), long):
        F.log_mel(x, **settings)
    assert all(torch.equal(r, k) for r, k in zip(first, kept))
    assert torch.equal(F.log_mel(short, **settings), kept[2])


def test_scratch_buffers_are_reused_per_name_and_grow():
    cpu = torch.device("cpu")
    a = F._scratch("test", (3, 4), torch.float32, cpu)
    assert F._scratch("test", (2, 5), torch.float32, cpu).data_ptr() == a.data_ptr()
    assert F._scratch("other", (3, 4), torch.float32, cpu).data_ptr() != a.data_ptr()
    big = F._scratch("test", (40, 40), torch.float32, cpu)      # grown: a new buffer, kept
    assert big.shape == (40, 40) and F._scratch("test", (5,), torch.float32, cpu).data_ptr() == big.data_ptr()
    huge = (F.SCRATCH_MAX_BYTES // 4 + 1,)                      # above the cap: fresh each time
    assert F._scratch("test", huge, torch.float32, cpu).data_ptr() != big.data_ptr()
    assert F._scratch("test", (5,), torch.float32, cpu).data_ptr() == big.data_ptr()


def test_mel_filterbank_warns_on_empty_filters_like_librosa():
    with pytest.warns(UserWarning, match="Empty filters"):
        F.mel_filterbank(sr=16000, n_fft=256, n_mels=128)
    with pytest.warns(UserWarning, match="Empty filters"):
        librosa.filters.mel(sr=16000, n_fft=256, n_mels=128)


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
@pytest.mark.parametrize("n_fft, hop, n_samples", [(1024, 512, 16000), (512, 128, 5001), (256, 100, 999)])
def test_stft_equals_librosa(pad_mode, n_fft, hop, n_samples):
    x = np.random.default_rng(n_samples).standard_normal(n_samples).astype(np.float32)
    ours = F.stft(x, n_fft=n_fft, hop=hop, pad_mode=pad_mode).numpy()
    ref = librosa.stft(x, n_fft=n_fft, hop_length=hop, center=True, pad_mode=pad_mode, window="hann")
    assert ours.shape == ref.shape == (n_fft // 2 + 1, 1 + n_samples // hop)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 1e-4, f"max |ours - librosa| / max |librosa| = {err:.2e}"


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_edge_only_padding_equals_padding_the_whole_signal(pad_mode):
    # stft pads only the signal's ends (_centred_frames); the frames must be those of the
    # fully padded signal bit for bit, for every hop/n_fft relation and for signals of a
    # few frames, where head and tail meet or no frame lies inside the signal
    for n_fft, hop in [(1024, 512), (512, 128), (255, 100), (64, 64), (64, 100), (16, 3)]:
        window = F._hann(n_fft, dtype=torch.float32, device=torch.device("cpu"))
        for n in (n_fft // 2 + 1, n_fft - 1, n_fft, n_fft + 1, 2 * n_fft, 3 * n_fft + 7, 5000):
            x = torch.from_numpy(np.random.default_rng(n).standard_normal((2, n)).astype(np.float32))
            padded = torch.nn.functional.pad(x[:, None], (n_fft // 2, n_fft // 2), mode=pad_mode)[:, 0]
            plain = padded.unfold(-1, n_fft, hop) * window  # (2, T, n_fft)
            ours = F._centred_frames(x, n_fft=n_fft, hop=hop, pad_mode=pad_mode, window=window)
            assert torch.equal(ours, plain), (n_fft, hop, n)


def test_stft_batches_over_leading_dims():
    x = torch.randn(2, 3, 4000)
    batched = F.stft(x, n_fft=512, hop=256)  # (2, 3, 257, T)
    single = F.stft(x[1, 2], n_fft=512, hop=256)  # (257, T)
    assert batched.shape == (2, 3, 257, 1 + 4000 // 256)
    torch.testing.assert_close(batched[1, 2], single, rtol=1e-5, atol=1e-5)


def test_stft_rejects_integer_pcm():
    with pytest.raises(TypeError, match="float samples"):
        F.stft(np.zeros(4096, dtype=np.int16), n_fft=1024, hop=512)


def test_stft_rejects_other_windows_and_short_reflect():
    with pytest.raises(ValueError, match="hann"):
        F.stft(np.zeros(4096), n_fft=1024, hop=512, window="hamming")
    with pytest.raises(ValueError, match="reflect"):
        F.stft(np.zeros(100), n_fft=1024, hop=512, pad_mode="reflect")


@pytest.mark.parametrize("year", sorted(F.LOG_MEL_BY_YEAR))
def test_log_mel_equals_each_years_baseline(year):
    x = machine_like(3.0, seed=year)
    ours = F.log_mel(x, **F.log_mel_settings(year))
    assert ours.dtype == torch.float32
    ref = baseline_log_mel(x, year)
    assert ours.shape == ref.shape == (128, 1 + x.size // 512)
    diff = np.abs(ours.numpy() - ref).max()
    assert diff < DB_TOL, f"year {year}: max |ours - librosa| = {diff:.2e} dB"


def test_log_mel_padding_differs_between_2021_and_2022():
    """Guards the year table: reflect and zero padding must change the edge frames."""
    x = machine_like(1.0, seed=1)
    a = F.log_mel(x, **F.log_mel_settings(2021))
    b = F.log_mel(x, **F.log_mel_settings(2022))
    assert (a[:, 0] - b[:, 0]).abs().max() > 0.1
    torch.testing.assert_close(a[:, 1:-1], b[:, 1:-1])  # frames clear of the padding


def test_log_mel_floor_near_eps():
    """At levels near eps the two floors differ; each must follow its own formula (float64)."""
    x = 1e-9 * np.random.default_rng(0).standard_normal(F.SR)  # mel energies around 1e-17
    mel = librosa.feature.melspectrogram(y=x, sr=16000, n_fft=1024, hop_length=512, n_mels=128)
    expected = {"clip": 10 * np.log10(np.maximum(mel, sys.float_info.epsilon)),
                "add": 10 * np.log10(mel + sys.float_info.epsilon)}
    assert np.abs(expected["clip"] - expected["add"]).max() > 0.1
    for floor, ref in expected.items():
        ours = F.log_mel(x, sr=16000, n_fft=1024, hop=512, n_mels=128, floor=floor)
        assert ours.dtype == torch.float64
        diff = np.abs(ours.numpy() - ref).max()
        assert diff < 1e-6, f"floor {floor}: max |ours - librosa| = {diff:.2e} dB"


def test_log_mel_batched_equals_one_by_one():
    clips = np.stack([machine_like(2.0, seed=s) for s in range(3)])  # (3, n_samples)
    batched = F.log_mel(clips, **F.log_mel_settings(2023))  # (3, 128, T)
    for i in range(3):
        single = F.log_mel(clips[i], **F.log_mel_settings(2023))
        torch.testing.assert_close(batched[i], single, rtol=0, atol=1e-4)


def test_clip_features_batch_follows_threads_and_never_changes_the_features(tmp_path):
    # clip_features makes CLIPS_PER_THREAD clips per call per torch thread; the batch, the
    # thread count and the cache must leave every clip's features as log_mel gives them alone
    lengths = [2.0, 2.0, 1.5, 2.0, 1.5]           # two lengths: clips of one length batch together
    paths = []
    for i, seconds in enumerate(lengths):
        paths.append(tmp_path / f"clip_{i}.wav")
        sf.write(paths[-1], machine_like(seconds, seed=i), F.SR, subtype="PCM_16")
    settings = F.log_mel_settings(2022)
    alone = [F.log_mel(F.load_wav(p), **settings) for p in paths]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert F.clip_batch() == F.CLIPS_PER_THREAD * n
            for batch in (None, 1, len(paths)):
                got = F.clip_features(paths, "log_mel", settings, batch=batch)
                for g, a in zip(got, alone):
                    torch.testing.assert_close(g, a, rtol=0, atol=1e-4)
    finally:
        torch.set_num_threads(threads)
    made = F.clip_features(paths, "log_mel", settings, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == len(paths)
    cached = F.clip_features(paths, "log_mel", settings, cache_dir=tmp_path / "cache")
    assert all(torch.equal(c, m) for c, m in zip(cached, made))

@pytest.mark.parametrize("folder", [DEV_SAMPLE, ROBOTIC_ARM_SAMPLE], ids=["dev2023", "roboticarm2024"])
def test_log_mel_on_a_real_dcase_clip(folder):
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (a clean clone without ../shared): no real clip to test")
    path = sorted(folder.rglob("*.wav"))[0]
    x = F.load_wav(path)
    for year in (2020, 2023):
        diff = np.abs(F.log_mel(x, **F.log_mel_settings(year)).numpy() - baseline_log_mel(x, year)).max()
        assert diff < DB_TOL, f"{path.name}, year {year}: max |ours - librosa| = {diff:.2e} dB"


@pytest.mark.parametrize("year", sorted(BASELINE_PAD_MODE))
def test_log_mel_settings_follow_the_baselines(year):
    """The floor cannot be seen at normal levels, so the table itself is checked."""
    assert F.log_mel_settings(year) == dict(sr=16000, n_fft=1024, hop=512, n_mels=128, power=2.0,
                                            fmin=0.0, fmax=None, pad_mode=BASELINE_PAD_MODE[year],
                                            floor=BASELINE_FLOOR[year])


def test_log_mel_settings_unknown_year_lists_valid_ones():
    with pytest.raises(ValueError, match="2020.*2025"):
        F.log_mel_settings(2019)


def test_stack_frames_equals_baseline_loop():
    n_mels, n_time, n_frames = 4, 12, 5  # 8 vectors: not n_frames, so a swapped axis shows
    logmel = torch.arange(n_mels * n_time, dtype=torch.float32).reshape(n_mels, n_time)
    # the 2020-2023 AE baseline's loop (common.py, file_to_vector_array)
    n_vectors = n_time - n_frames + 1
    expected = np.zeros((n_vectors, n_mels * n_frames), dtype=np.float32)
    for t in range(n_frames):
        expected[:, n_mels * t: n_mels * (t + 1)] = logmel[:, t: t + n_vectors].numpy().T
    ours = F.stack_frames(logmel, n_frames=n_frames)
    np.testing.assert_array_equal(ours.numpy(), expected)
    batched = F.stack_frames(torch.stack([logmel, -logmel]), n_frames=n_frames)  # (2, V, 20)
    np.testing.assert_array_equal(batched[1].numpy(), -expected)
    with pytest.raises(ValueError, match="too short"):
        F.stack_frames(logmel[:, :4], n_frames=5)


def test_frame_windows_equals_naive_slicing():
    n_mels, n_time, width, hop = 3, 70, 16, 8
    logmel = torch.randn(2, n_mels, n_time)
    ours = F.frame_windows(logmel, width=width, hop=hop)
    n_windows = 1 + (n_time - width) // hop
    assert ours.shape == (2, n_windows, n_mels, width)
    for b in range(2):
        for w in range(n_windows):
            torch.testing.assert_close(ours[b, w], logmel[b, :, w * hop: w * hop + width], rtol=0, atol=0)
    with pytest.raises(ValueError, match="too short"):
        F.frame_windows(logmel[..., :15], width=16, hop=8)


def test_magnitude_spectrum_equals_numpy():
    x = np.random.default_rng(0).standard_normal((2, 1001))
    ours = F.magnitude_spectrum(x)
    assert ours.shape == (2, 501)
    np.testing.assert_allclose(ours.numpy(), np.abs(np.fft.rfft(x)), rtol=1e-10, atol=1e-10)


def write_good(path: Path, n: int = 8000) -> np.ndarray:
    x = (0.1 * np.random.default_rng(0).standard_normal(n)).astype(np.float32)
    sf.write(path, x, F.SR, subtype="PCM_16")
    return x


def test_load_wav_reads_good_mono_file(tmp_path):
    x = write_good(tmp_path / "good.wav")
    y = F.load_wav(tmp_path / "good.wav")
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=1 / 2 ** 15)
    assert [c.shape for c in F.load_batch([tmp_path / "good.wav"] * 2)] == [x.shape, x.shape]


def make_missing(path):
    return path


def make_text(path):
    path.write_text("not a sound file\n")
    return path


def make_empty(path):
    sf.write(path, np.zeros(0, dtype=np.float32), F.SR, subtype="PCM_16")
    return path


def make_truncated(path):
    write_good(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_stereo(path):
    sf.write(path, np.zeros((1000, 2), dtype=np.float32), F.SR, subtype="PCM_16")
    return path


def make_44k(path):
    sf.write(path, np.zeros(1000, dtype=np.float32), 44100, subtype="PCM_16")
    return path


def make_nan(path):
    x = np.zeros(1000, dtype=np.float32)
    x[10] = np.nan
    sf.write(path, x, F.SR, subtype="FLOAT")
    return path


@pytest.mark.parametrize("make, words", [
    (make_missing, "no such file"),
    (make_text, "not a readable sound file"),
    (make_empty, "0 samples"),
    (make_truncated, "truncated"),
    (make_stereo, "2 channels"),
    (make_44k, "44100 Hz, expected 16000 Hz"),
    (make_nan, "NaN"),
])
def test_load_wav_errors_name_the_file(tmp_path, make, words):
    path = make(tmp_path / f"{make.__name__}.wav")
    with pytest.raises(F.AudioError) as info:
        F.load_wav(path)
    message = str(info.value)
    assert message.startswith(str(path)) and path.name in message
    assert words in message
    assert "\n" not in message



def test_bench_features_agrees_with_librosa_and_its_stages_with_log_mel():
    # bench.py raises when its step-by-step copy of log_mel stops computing what log_mel does
    import bench

    result, = bench.main(["--clips", "2", "--repeats", "1", "--passes", "1", "--stages", "--threads", "1"])
    rows = {row["name"]: row for row in result["rows"]}
    assert rows[f"ours, batch {F.CLIPS_PER_THREAD}"]["max_abs_db_diff"] < 1e-3  # at 1 thread
    assert set(result["stages"]["ours"]) == set(result["stages"]["ours, plain"]) - {"pad"}
