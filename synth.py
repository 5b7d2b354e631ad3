"""Small synthetic DCASE data sets, written with a year's exact folders and file names.

A machine sound here is a harmonic hum whose pitch depends on the machine ID or section, plus
coloured broadband noise and periodic events whose kind depends on the machine type (clicks,
bursts, a sweep). The target domain shifts the speed (pitch and event rate) and raises the
noise. An anomaly is one of: an added high tone, random impulses, or one harmonic grown
strong. Everything is seeded: the same arguments write the same bytes. The evaluation part
gets anonymised test names (in shuffled order) and the ground truth in each year's format:
2020 eval_data_list.csv, 2021 one table per domain, 2022+ the label, domain and attribute tables.

On request (n_attributes > 1) each section's clips take turns among several operating
conditions, heard as a speed 4% higher per step (pitch and event rate) and named in the attribute
string, hidden where the year's table says noAttribute: Midea 2024's pseudo-attributes must
find them. 2025 sets can get supplemental/ normal clips (n_supplemental). A set can have more
sections than the first two (n_sections), and its anomalies can be drawn from fewer kinds
(anomalies). All default off, and then every year's files are the same bytes as before they
existed.

2026 clips are stereo, as the real ones: channel 0 the near microphone (the sound above),
channel 1 a far one (far_channel: the near sound delayed, low-passed, weaker, under a louder
noise of its own, which no anomaly reaches), so a detector that reads --channel far has a
measurably harder task.

Not modelled: reverberation, microphone colouring, the real machines' spectra. The point is a
data set where a working detector must score near 1 and a broken one near 0.5.
"""
import zlib

import numpy as np
import soundfile as sf

import data

SR = 16000              # Hz
SECONDS = 2.0           # clip length; real clips are 6-12 s
EVENTS = {"clicks": 0, "bursts": 1, "sweep": 2}
TARGET_SPEED = 1.12     # target domain: 12% faster
TARGET_NOISE_DB = 6.0   # and 6 dB more noise
ATTRIBUTE_SPEED = 0.04  # operating condition a: (1 + 0.04 a) times faster
ANOMALIES = ("tone", "impulses", "harmonic")   # the kinds machine_sound can add
# 2026's far microphone, relative to the near one: the path from the machine ...
FAR_DELAY_S = 0.003     # s: about 1 m more of air
FAR_GAIN = 0.35         # the machine 9 dB weaker
FAR_LOWPASS_TAPS = 9    # moving-average taps: the high band falls off (first null at 1.8 kHz)
FAR_NOISE = 0.08        # ... and environmental noise the near microphone barely hears (RMS)


def machine_sound(rng, *, kind, f0, speed=1.0, noise_db=-30.0, anomaly=None, seconds=SECONDS):
    """One clip of machine-like sound, float32 in [-1, 1]. shape = (seconds * SR,)"""
    t = np.arange(int(seconds * SR)) / SR
    f = f0 * speed
    gains = 1.0 / np.arange(1, 7)                          # six harmonics, falling 6 dB/oct
    if anomaly == "harmonic":
        gains[rng.integers(2, 6)] = 1.2                     # one upper harmonic grown strong
    x = sum(g * np.sin(2 * np.pi * f * (k + 1) * t + rng.uniform(0, 2 * np.pi))
            for k, g in enumerate(gains))
    x = x * (1 + 0.2 * np.sin(2 * np.pi * 0.7 * speed * t))   # slow load variation
    x += _events(rng, kind, t, speed)
    noise = np.cumsum(rng.standard_normal(t.size)) * 0.02     # brown-ish: machine rumble
    noise = noise - np.convolve(noise, np.ones(64) / 64, mode="same")
    x += 10 ** (noise_db / 20) * (rng.standard_normal(t.size) + 3 * noise)
    if anomaly == "tone":
        x += 0.25 * np.sin(2 * np.pi * rng.uniform(3000, 5000) * t)
    elif anomaly == "impulses":
        for start in rng.integers(0, t.size - 64, size=12):
            x[start:start + 64] += rng.standard_normal(64) * 1.5
    return (0.25 * x / np.max(np.abs(x))).astype(np.float32)


def _events(rng, kind, t, speed):
    """The machine type's periodic events: valve-like clicks, pump-like bursts, slider sweeps."""
    period = {0: 0.25, 1: 0.5, 2: 1.0}[EVENTS[kind]] / speed   # seconds
    phase = (t + rng.uniform(0, period)) % period
    if EVENTS[kind] == 0:
        return 1.5 * np.exp(-phase * 400) * np.sin(2 * np.pi * 1800 * t)
    if EVENTS[kind] == 1:
        return 0.6 * (phase < 0.08 / speed) * rng.standard_normal(t.size)
    return 0.5 * np.sin(2 * np.pi * (400 + 600 * phase / period) * t)


def far_channel(rng, near):
    """The far microphone of one clip (2026): `near` delayed by FAR_DELAY_S, low-passed
    (FAR_LOWPASS_TAPS-tap moving average), scaled by FAR_GAIN, plus brown-ish environmental
    noise of RMS FAR_NOISE drawn from rng. near: (n,) float32. Returns (n,) float32 in [-1, 1]."""
    delay = int(FAR_DELAY_S * SR)
    path = np.convolve(np.r_[np.zeros(delay), near[:near.size - delay]],
                       np.ones(FAR_LOWPASS_TAPS) / FAR_LOWPASS_TAPS, mode="same")
    noise = np.cumsum(rng.standard_normal(near.size))
    noise = noise - np.convolve(noise, np.ones(256) / 256, mode="same")    # no DC drift
    noise = FAR_NOISE * noise / np.sqrt(np.mean(noise ** 2)) + 0.3 * FAR_NOISE * (
        rng.standard_normal(near.size))
    return np.clip(FAR_GAIN * path + noise, -1, 1).astype(np.float32)


def machine_profile(machine, section):
    """Pitch and event kind of one machine type and section, stable across runs."""
    h = zlib.crc32(machine.encode())
    kind = list(EVENTS)[h % 3]
    f0 = (80 + (h % 7) * 15) * (1 + 0.1 * int(section))   # Hz; each section its own speed
    return kind, float(f0)


def clip_names(year, section, domain, split, label, i, attrs):
    """The official file name of one clip of `year`."""
    if year == 2020:
        return f"{label}_id_{section}_{i:08d}.wav"
    return f"section_{section}_{domain}_{split}_{label}_{i:04d}_{attrs}.wav"


def write_clip(path, x):
    data.write_atomic(path, lambda f: sf.write(f, x, SR, subtype="PCM_16", format="WAV"))


def synthesize(out, *, year, machines=None, n_train=20, n_test=10, seed=0, eval_part=True,
               n_attributes=1, n_supplemental=0, n_sections=2, anomalies=ANOMALIES,
               seconds=SECONDS):
    """Write a small data set for `year` below out/dcase<YEAR>/: dev_data and eval_data, the
    latter with anonymised test names and the organisers' ground truth in that year's format.
    n_train: normal training clips per section (2021+: 1 in 10 of them target domain);
    n_test: test clips per section, domain and label; n_attributes: operating conditions that
    clip i takes as i % n_attributes (2021+); n_supplemental: normal clips per section in
    supplemental/ (years that have that folder); n_sections: the first sections (machine IDs) of
    each machine type and part that get clips; anomalies: the kinds an anomalous clip draws from
    (ANOMALIES); seconds: each clip's length. Returns the number of files written."""
    anomalies = tuple(anomalies)
    if not anomalies or set(anomalies) - set(ANOMALIES) or n_sections < 1 or seconds <= 0:
        raise ValueError(f"anomalies {anomalies!r}, sections {n_sections}, {seconds} s: "
                         f"anomalies must be some of {', '.join(ANOMALIES)}, sections >= 1, "
                         f"seconds > 0")
    spec = data.get_year(year)
    machines = machines or default_machines(year)
    count, list_2020 = 0, {}
    for machine in machines:
        for part in ("dev", "eval") if eval_part else ("dev",):
            if machine not in (spec.dev if part == "dev" else spec.eval):
                continue
            for section in spec.sections(machine, part)[:n_sections]:
                rng = np.random.default_rng([seed, year, zlib.crc32(machine.encode()),
                                             int(section), part == "eval"])
                n, truth = _write_section(out, rng, spec, machine, section, part, n_train, n_test,
                                          n_attributes, anomalies, seconds)
                count += n
                if n_supplemental and "supplemental" in spec.extra_dirs:
                    count += _write_supplemental(out, spec, machine, section, part,
                                                 n_supplemental, n_attributes)
                eval_dir = data.part_dir(out, year, "eval")
                if truth and year == 2020:          # one list for all, written at the end
                    list_2020.setdefault(machine, []).extend(truth)
                elif truth and year == 2021:
                    _write_ground_truth_2021(eval_dir, machine, section, truth)
                elif truth:
                    _write_ground_truth(eval_dir, machine, section, truth)
    if list_2020:
        _write_eval_data_list(data.part_dir(out, year, "eval"), list_2020)
    return count


def default_machines(year):
    """Three machine types: shared by the dev and eval sets (2020-2022), else two dev and one
    eval machine type (2023+, where the eval set has machine types of its own)."""
    spec = data.get_year(year)
    both = [m for m in spec.dev if m in spec.eval]
    return both[:3] if both else list(spec.dev)[:2] + list(spec.eval)[:1]


def anonymous_name(year, section, domain, k):
    """The name an evaluation test clip gets in `year`: 2020 id_01_00000000.wav, 2021
    section_03_source_test_0000.wav (numbered per domain), 2022+ section_03_0000.wav."""
    if year == 2020:
        return f"id_{section}_{k:08d}.wav"
    if year == 2021:
        return f"section_{section}_{domain}_test_{k:04d}.wav"
    return f"section_{section}_{k:04d}.wav"


def _write_section(out, rng, spec, machine, section, part, n_train, n_test, n_attributes=1,
                   anomalies=ANOMALIES, seconds=SECONDS):
    """Write one section's clips; returns (count, truth rows of its anonymised test clips:
    (anonymous name, label, domain, full name))."""
    root = data.part_dir(out, spec.year, part) / machine
    kind, f0 = machine_profile(machine, section)
    attrs = "noAttribute" if machine in spec.no_attribute else None
    if spec.year == 2020:                        # no domains: all source, as many test clips
        plan = [("train", "source", "normal", i) for i in range(n_train)]
        plan += [("test", "source", lab, i) for lab in ("normal", "anomaly")
                 for i in range(2 * n_test)]
    else:                                        # 1 in 10 training clips from the target domain
        plan = [("train", "source" if i % 10 else "target", "normal", i) for i in range(n_train)]
        plan += [("test", d, lab, i) for d in data.DOMAINS for lab in ("normal", "anomaly")
                 for i in range(n_test)]
    # eval test clips get their anonymous numbers in a shuffled order, as the real ones (one
    # numbering per domain in 2021); a generator of its own leaves the sounds unchanged
    keys = [domain if spec.year == 2021 else None for split, domain, _, _ in plan
            if split == "test"]
    shuffle = np.random.default_rng([spec.year, zlib.crc32(machine.encode()), int(section)])
    numbers = {k: iter(shuffle.permutation(keys.count(k))) for k in dict.fromkeys(keys)}
    far = np.random.default_rng([spec.year, zlib.crc32(machine.encode()), int(section), 2])
    truth = []
    for split, domain, label, i in plan:
        target = domain == "target"
        anomaly = rng.choice(list(anomalies)) if label == "anomaly" else None
        speed = (TARGET_SPEED if target else 1.0) * (1 + ATTRIBUTE_SPEED * (i % n_attributes))
        x = machine_sound(rng, kind=kind, f0=f0, speed=speed,
                          noise_db=-30 + (TARGET_NOISE_DB if target else 0), anomaly=anomaly,
                          seconds=seconds)
        if spec.channels == 2:                   # 2026: (n, 2), near and far microphone
            x = np.stack([x, far_channel(far, x)], axis=1)
        a = attrs or f"speed_{'B' if target else 'A'}" + (
            f"_load_{i % n_attributes}" if n_attributes > 1 else "")
        name = clip_names(spec.year, section, domain, split, label, i, a)
        folder = split if split == "train" or spec.year != 2021 else f"{domain}_test"
        if part == "eval" and split == "test":
            k = next(numbers[domain if spec.year == 2021 else None])
            anon = anonymous_name(spec.year, section, domain, int(k))
            truth.append((anon, label, domain, name))
            name = anon
        write_clip(root / folder / name, x)
    return len(plan), truth


def _write_supplemental(out, spec, machine, section, part, n, n_attributes):
    """n source-domain normal clips in <machine>/supplemental/ (2025's extra folder), from a
    generator of their own so that the other clips stay the same bytes."""
    kind, f0 = machine_profile(machine, section)
    rng = np.random.default_rng([spec.year, zlib.crc32(machine.encode()), int(section), 7])
    attrs = "noAttribute" if machine in spec.no_attribute else None
    for i in range(n):
        x = machine_sound(rng, kind=kind, f0=f0, speed=1 + ATTRIBUTE_SPEED * (i % n_attributes))
        a = attrs or f"speed_A_load_{i % n_attributes}"
        write_clip(data.part_dir(out, spec.year, part) / machine / "supplemental" /
                   f"section_{section}_source_supplemental_normal_{i:04d}_{a}.wav", x)
    return n


def _write_ground_truth(eval_dir, machine, section, truth):
    """The organisers' three tables for one section (2022+), rows sorted by file name."""
    stem = f"ground_truth_{machine}_section_{section}_test.csv"
    columns = {"ground_truth_data": lambda r: "1" if r[1] == "anomaly" else "0",
               "ground_truth_domain": lambda r: "1" if r[2] == "target" else "0",
               "ground_truth_attributes": lambda r: r[3].replace("_test_", "_")[:-4]}
    for folder, value in columns.items():
        data.write_text(eval_dir / folder / stem,
                    "".join(f"{r[0]},{value(r)}\n" for r in sorted(truth)))


def _write_ground_truth_2021(eval_dir, machine, section, truth):
    """2021: one file,label table per domain, as the 2021 evaluator reads them."""
    for domain in data.DOMAINS:
        stem = f"ground_truth_{machine}_section_{section}_{domain}_test.csv"
        rows = [f"{r[0]},{int(r[1] == 'anomaly')}\n" for r in sorted(truth) if r[2] == domain]
        data.write_text(eval_dir / "ground_truth_data" / stem, "".join(rows))


def _write_eval_data_list(eval_dir, rows_by_machine):
    """2020: eval_data_list.csv, a machine-type line then 'file,labelled name,0|1' rows, sorted;
    the blocks of machine types already in the file and not written now are kept as they are."""
    path = eval_dir / data.EVAL_DATA_LIST
    blocks = {}
    for line in (path.read_text().splitlines() if path.exists() else []):
        if line and "," not in line:
            machine = line
            blocks[machine] = []
        elif line:
            blocks[machine].append(line)
    for machine, rows in rows_by_machine.items():
        blocks[machine] = [f"{r[0]},{r[3]},{int(r[1] == 'anomaly')}" for r in sorted(rows)]
    data.write_text(path, "".join(f"{m}\n" + "".join(f"{r}\n" for r in rows)
                              for m, rows in blocks.items()))
