"""Speaker counting, voice enrollment and cost of the speaker stage (analyzer/detectors/speaker.py) on the shared data.

Usage: python bench/speakers.py [DATA_DIR] [--json] [--threshold T] [--enroll-threshold T]
       (default data: ../shared/data beside the repo)

Sets, each scored as a whole:
  roc        audio/single_speaker (LibriSpeech, 5 speakers x 3 files): every 1.6 s partial (hop 0.8 s) of every file
             against every partial of every OTHER file: same speaker = genuine, different = impostor; and each
             partial against the mean of every other file's partials (what the tracker compares: a cluster's
             running mean), whose EER point and impostor maximum bound CLUSTER_THRESHOLD.
  enrollment each speaker's first file enrolled (embed_utterance of it, as an enrollment recording would be), every
             partial of every other file a probe: genuine = the enrolled speaker's other files, impostor = the
             other four speakers' files (ENROLL_THRESHOLD); then per file: its lowest partial similarity, i.e.
             whether OTHER_VOICE would fire on it at the threshold (never for the enrolled speaker's files,
             always for the others').
  pairs      each speaker's first file followed by another speaker's (20 orders): the second voice must not join
             the first one's cluster.
  single     each LibriSpeech file, and each speaker's three files as one session, streamed through a
             SpeakerTracker in 0.5 s windows with every sample voiced: the most speakers any 10 s window holds
             (must be 1: no false second speaker).
  multi      audio/multi_speaker/*.wav streamed the same way, voiced where the RTTM has any speaker (the VAD stage's
             place; the RTTM stands in for it); the speakers the tracker counts in the 10 s before each second from
             10 s on (sliding, 21 windows a 30 s file) and in the three disjoint 10 s windows, against the RTTM's:
             the speakers with at least --min-speech seconds of speech in the window (default 1.0: a shorter
             stretch gives no 1.6 s partial; 0 = any speech, reported too). Exact-count rate per file and overall,
             and the confusion of counts.
  --silero   voiced regions from Silero VAD (the vad stage's SileroVad) instead of the RTTM, everywhere; adds the
             non-speech files (no speaker cluster may appear).
  cost       one 1.6 s partial embedded (mel features + encoder, 1 thread) and per second of voiced audio (1.25
             partials), beside one BlazeFace full-range detection of a 640 x 480 frame in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from face_verification import median_ms, roc  # noqa: E402

from livekit_proctor.analyzer.detectors import speaker as spk  # noqa: E402
from livekit_proctor.analyzer.detectors.blazeface import BlazeFaceDetector  # noqa: E402

CHUNK_S = 0.5
MIN_PARTIALS = [spk.MIN_PARTIALS]  # --min-partials
VAD_FRAME_S = 0.032


def load(path: Path) -> np.ndarray:
    """Any audio file -> float32 mono 16 kHz (PyAV)."""
    with av.open(str(path)) as c:
        res = av.AudioResampler(format="flt", layout="mono", rate=spk.SAMPLE_RATE)
        out = [f.to_ndarray().ravel() for fr in c.decode(audio=0) for f in res.resample(fr)]
        out += [f.to_ndarray().ravel() for f in res.resample(None)]
    return np.concatenate(out).astype(np.float32)


def rttm(path: Path) -> list[tuple[float, float, str]]:
    turns = []
    for line in path.read_text().splitlines():
        f = line.split()
        if f and f[0] == "SPEAKER":
            turns.append((float(f[3]), float(f[3]) + float(f[4]), f[7]))
    return turns


@dataclass(frozen=True)
class Frames:
    """Stands in for the VAD stage's Speech: voiced 32 ms frames (here from the RTTM)."""

    voiced: np.ndarray
    frame_ts: np.ndarray


def frames_for(ts: float, n: int, turns: list[tuple[float, float, str]] | None) -> Frames | None:
    if turns is None:
        return None
    starts = ts + np.arange(0.0, n / spk.SAMPLE_RATE - 1e-9, VAD_FRAME_S)
    mid = starts + VAD_FRAME_S / 2
    voiced = np.zeros(len(starts), bool)
    for a, b, _ in turns:
        voiced |= (mid >= a) & (mid < b)
    return Frames(voiced, starts)


class SileroFrames:
    """Voiced frames from the vad stage's Silero VAD (analyzer/detectors/vad.py), one stream per file: what the
    speaker stage reads in a session. Imported by name: the vad stage is another module's work."""

    def __init__(self) -> None:
        vad = importlib.import_module("livekit_proctor.analyzer.detectors.vad")
        self._mod, self._vad, self._state = vad, vad.SileroVad(), vad.VadState()

    def __call__(self, ts: float, piece: np.ndarray) -> Any:
        probs, frame_ts = self._vad.probabilities(piece, self._state, ts)
        return self._mod.Speech(probs, frame_ts, self._mod.DEFAULT_THRESHOLD)


def stream(
    enc: spk.SpeakerEncoder, wav: np.ndarray, turns: list[tuple[float, float, str]] | None, threshold: float,
    tracker: spk.SpeakerTracker | None = None, t0: float = 0.0, silero: bool = False,
) -> tuple[spk.SpeakerTracker, dict[int, int]]:  # fmt: skip
    """Feeds wav in CHUNK_S windows, voiced where the RTTM turns say (every sample without them) or, with
    silero, where Silero VAD says; returns the tracker and the count it reports at each whole second >= 10."""
    tr = tracker or spk.SpeakerTracker(threshold=threshold, min_partials=MIN_PARTIALS[0])
    vad = SileroFrames() if silero else None
    n = round(CHUNK_S * spk.SAMPLE_RATE)
    counts: dict[int, int] = {}
    for i in range(0, len(wav), n):
        ts = t0 + i / spk.SAMPLE_RATE
        piece = wav[i : i + n]
        tr.feed(enc, piece, ts, vad(ts, piece) if vad else frames_for(ts, len(piece), turns))
        end = ts + len(piece) / spk.SAMPLE_RATE
        if abs(end - round(end)) < 1e-6 and round(end - t0) >= 10:
            counts[round(end - t0)] = len(tr.speakers_in(end))
    return tr, counts


def truth(turns: list[tuple[float, float, str]], end: float, min_speech: float) -> int:
    speech: dict[str, float] = {}
    for a, b, who in turns:
        speech[who] = speech.get(who, 0.0) + max(0.0, min(b, end) - max(a, end - spk.WINDOW_S))
    return sum(1 for s in speech.values() if s > 0 and s >= min_speech)


def partials(enc: spk.SpeakerEncoder, wav: np.ndarray) -> np.ndarray:
    hop, n = round(spk.HOP_S * spk.SAMPLE_RATE), spk.PARTIAL_SAMPLES
    pieces = [spk.normalize_volume(wav[s : s + n]) for s in range(0, max(1, len(wav) - n + 1), hop)]
    return enc.embed_partials(pieces)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("data", nargs="?", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--threshold", type=float, default=spk.CLUSTER_THRESHOLD)
    ap.add_argument("--enroll-threshold", type=float, default=spk.ENROLL_THRESHOLD)
    ap.add_argument("--min-speech", type=float, default=1.0)
    ap.add_argument("--min-partials", type=int, default=spk.MIN_PARTIALS)
    ap.add_argument(
        "--silero", action="store_true", help="voiced regions from Silero VAD (the vad stage), not the RTTM"
    )
    args = ap.parse_args()
    MIN_PARTIALS[0] = args.min_partials
    audio = args.data / "audio"
    enc = spk.SpeakerEncoder()
    report: dict[str, Any] = {
        "cluster_threshold": args.threshold,
        "enroll_threshold": args.enroll_threshold,
        "min_partials": args.min_partials,
    }

    # ---- LibriSpeech: partial vs partial ROC, enrollment ----
    files = sorted((audio / "single_speaker").glob("*/*.flac"))
    if not files:
        raise SystemExit(f"no LibriSpeech files under {audio / 'single_speaker'}")
    wavs = {f: load(f) for f in files}
    who = {f: f.parent.name.removeprefix("librispeech_") for f in files}
    embs = {f: partials(enc, w) for f, w in wavs.items()}
    genuine: list[float] = []
    impostor: list[float] = []
    for a, b in itertools.combinations(files, 2):
        sims = (embs[a] @ embs[b].T).ravel().tolist()
        (genuine if who[a] == who[b] else impostor).extend(sims)
    r = roc(genuine, impostor)
    report["partial_roc"] = r.__dict__ | {
        "genuine_mean": float(np.mean(genuine)), "impostor_mean": float(np.mean(impostor)),
        "impostor_p99": float(np.percentile(impostor, 99)), "genuine_p1": float(np.percentile(genuine, 1)),
    }  # fmt: skip
    print(f"partial vs partial (1.6 s, other files): {r.row()}")
    print(f"  same speaker mean {np.mean(genuine):.3f} (1st pct {np.percentile(genuine, 1):.3f}); "
          f"different mean {np.mean(impostor):.3f} (99th pct {np.percentile(impostor, 99):.3f})")  # fmt: skip

    # A partial against the mean of another file's partials: what the tracker compares (a cluster's running mean).
    mg: list[float] = []
    mi: list[float] = []
    for a, c in itertools.permutations(files, 2):
        m = embs[c].mean(axis=0)
        (mg if who[a] == who[c] else mi).extend((embs[a] @ (m / np.linalg.norm(m))).tolist())
    mr = roc(mg, mi)
    report["partial_vs_mean_roc"] = mr.__dict__ | {"impostor_max": max(mi), "genuine_p1": float(np.percentile(mg, 1))}
    print(f"partial vs another file's mean (the tracker's comparison): {mr.row()}")
    print(f"  different speakers' max {max(mi):.3f}; same speaker 1st pct {np.percentile(mg, 1):.3f}")

    speakers = sorted(set(who.values()))
    enrolled = {s: enc.embed_voice(wavs[min(f for f in files if who[f] == s)]) for s in speakers}
    eg: list[float] = []
    ei: list[float] = []
    per_file: list[dict[str, Any]] = []
    for s in speakers:
        first = min(f for f in files if who[f] == s)
        for f in files:
            if f == first:
                continue
            sims = embs[f] @ enrolled[s]
            (eg if who[f] == s else ei).extend(sims.tolist())
            lowest = float(sims.min())
            per_file.append({"enrolled": s, "file": f.name, "same": who[f] == s, "min": lowest,
                             "mean": float(sims.mean()), "other_voice": lowest < args.enroll_threshold,
                             "other_voice_by_mean": float(sims.mean()) < args.enroll_threshold})  # fmt: skip
    er = roc(eg, ei)
    wrong = [p for p in per_file if p["other_voice"] == p["same"]]
    wrong_mean = [p for p in per_file if p["other_voice_by_mean"] == p["same"]]
    report["enrollment_roc"] = er.__dict__ | {"genuine_mean": float(np.mean(eg)), "impostor_mean": float(np.mean(ei))}
    report["enrollment_files"] = {"pairs": len(per_file), "wrong": wrong, "wrong_by_mean": wrong_mean}
    print(f"enrolled first file vs partials of the other files: {er.row()}")
    print(
        f"  same speaker mean {np.mean(eg):.3f} min {min(eg):.3f}; different mean {np.mean(ei):.3f} max {max(ei):.3f}"
    )
    print(
        f"  per file at {args.enroll_threshold}: OTHER_VOICE (lowest partial below) wrong on {len(wrong)} of "
        f"{len(per_file)} (enrolled speaker, file) pairs" + "".join(f"\n    {w}" for w in wrong)
    )
    print(
        f"  per file, mean of its partials below {args.enroll_threshold}: wrong on {len(wrong_mean)} of "
        f"{len(per_file)}" + "".join(f"\n    {w}" for w in wrong_mean)
    )

    # ---- single speaker: never a second speaker ----
    worst: dict[str, int] = {}
    for f in files:
        tr, _ = stream(enc, wavs[f], None, args.threshold, silero=args.silero)
        worst[f.name] = max((len(tr.speakers_in(p.end)) for p in tr.partials), default=0)
    for s in speakers:
        tr, t = spk.SpeakerTracker(threshold=args.threshold, min_partials=MIN_PARTIALS[0]), 0.0
        for f in (f for f in files if who[f] == s):
            tr, _ = stream(enc, wavs[f], None, args.threshold, tr, t, silero=args.silero)
            t += len(wavs[f]) / spk.SAMPLE_RATE + 1.0
        worst[f"speaker {s}, 3 files"] = max((len(tr.speakers_in(p.end)) for p in tr.partials), default=0)
        worst[f"speaker {s}, clusters"] = len(tr.clusters)
    report["single_speaker_max_count"] = worst
    # Two speakers one after the other (each speaker's first file, 1 s apart): the second must be a new cluster.
    merged = []
    for s1, s2 in itertools.permutations(speakers, 2):
        f1, f2 = (min(f for f in files if who[f] == s) for s in (s1, s2))
        tr, _ = stream(enc, wavs[f1], None, args.threshold, silero=args.silero)
        t = len(wavs[f1]) / spk.SAMPLE_RATE + 1.0
        tr, _ = stream(enc, wavs[f2], None, args.threshold, tr, t, silero=args.silero)
        if {p.speaker for p in tr.partials if p.start >= t} & {p.speaker for p in tr.partials if p.end <= t}:
            merged.append(f"{s1}->{s2}")
    report["speaker_pairs_merged"] = merged
    print(f"two speakers in turn: the second joins the first's cluster in {len(merged)} of 20 orders {merged}")
    bad = {k: v for k, v in worst.items() if "clusters" not in k and v > 1}
    print(
        f"single speaker: a second speaker in some 10 s window: {bad or 'never'}; most speakers in a window / "
        f"clusters: {worst}"
    )
    # Non-speech files: with the RTTM stand-in every sample would be voiced, so only Silero says anything here.
    if args.silero:
        noise = {f.name: len(stream(enc, load(f), None, args.threshold, silero=True)[0].clusters)
                 for f in sorted((audio / "non_speech").glob("*.wav"))}  # fmt: skip
        report["non_speech_clusters"] = noise
        print(f"non-speech files, speaker clusters (must be 0): {noise}")

    # ---- multi speaker: count per 10 s window against the RTTM ----
    multi: dict[str, Any] = {}
    confusion: Counter[tuple[int, int]] = Counter()
    confusion_any: Counter[tuple[int, int]] = Counter()
    disjoint: Counter[bool] = Counter()
    for w in sorted((audio / "multi_speaker").glob("*.wav")):
        turns = rttm(w.with_suffix(".rttm"))
        tr, counts = stream(enc, load(w), turns, args.threshold, silero=args.silero)
        rows = [(end, truth(turns, end, args.min_speech), truth(turns, end, 0.0), got) for end, got in counts.items()]
        exact = sum(t == g for _, t, _, g in rows)
        exact_any = sum(t == g for _, _, t, g in rows)
        for _, t, ta, g in rows:
            confusion[(t, g)] += 1
            confusion_any[(ta, g)] += 1
        for end, t, _, g in rows:
            if end % 10 == 0:
                disjoint[t == g] += 1
        multi[w.name] = {"windows": len(rows), "exact": exact, "exact_any_speech": exact_any,
                         "clusters": len(tr.clusters), "per_window": rows}  # fmt: skip
        print(f"{w.name}: exact {exact}/{len(rows)} (truth: >= {args.min_speech} s each), {exact_any}/{len(rows)} "
              f"(any speech); {len(tr.clusters)} clusters; (end s, truth, truth any, counted): "
              + " ".join(f"{e}:{t}/{ta}/{g}" for e, t, ta, g in rows))  # fmt: skip
    n = sum(confusion.values())
    ok = sum(v for (t, g), v in confusion.items() if t == g)
    ok_any = sum(v for (t, g), v in confusion_any.items() if t == g)
    report["multi_speaker"] = multi | {
        "overall_exact": ok / n, "overall_exact_any_speech": ok_any / n,
        "disjoint_exact": f"{disjoint[True]}/{disjoint[True] + disjoint[False]}",
        "confusion": {f"{t}->{g}": v for (t, g), v in sorted(confusion.items())},
        "confusion_any_speech": {f"{t}->{g}": v for (t, g), v in sorted(confusion_any.items())},
    }  # fmt: skip
    print(
        f"multi speaker overall: exact {ok}/{n} = {100 * ok / n:.1f}% sliding windows (any speech: "
        f"{100 * ok_any / n:.1f}%), disjoint 10 s windows {disjoint[True]}/{disjoint[True] + disjoint[False]}"
    )
    print("  confusion truth->counted: " + ", ".join(f"{t}->{g}: {v}" for (t, g), v in sorted(confusion.items())))
    print("  (any speech)            : " + ", ".join(f"{t}->{g}: {v}" for (t, g), v in sorted(confusion_any.items())))

    # ---- cost ----
    rng = np.random.default_rng(0)
    piece = spk.normalize_volume(wavs[files[0]][: spk.PARTIAL_SAMPLES])
    t_feat = median_ms(lambda: spk.mel_frames(piece), 30)
    t_part = median_ms(lambda: enc.embed_partials([piece]), 30)
    det = BlazeFaceDetector("full")
    frame = rng.integers(0, 255, (480, 640, 3), np.uint8)
    t_det = median_ms(lambda: det.detect(frame), 30)
    per_s = t_part / spk.HOP_S  # one partial per HOP_S of voiced audio
    report["cost_ms"] = {
        "mel_features_1_6s": t_feat,
        "partial_1_6s": t_part,
        "per_voiced_second": per_s,
        "blazeface_full_640x480": t_det,
        "per_voiced_second_over_blazeface": per_s / t_det,
    }
    print(f"cost: one 1.6 s partial {t_part:.1f} ms (mel features {t_feat:.2f} ms) = {t_part / t_det:.2f} x one "
          f"BlazeFace full-range detection ({t_det:.1f} ms); per second of voiced audio {per_s:.1f} ms = "
          f"{per_s / t_det:.2f} x BlazeFace, {per_s / 10:.2f} % of one core")  # fmt: skip
    if args.json:
        print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
