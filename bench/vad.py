"""Voice activity (Silero VAD, analyzer/detectors/vad.py) on the shared audio: accuracy and cost.

Usage: python bench/vad.py [DATA_DIR] [--json]   (default: ../shared/data beside the repo)

Every file is decoded and resampled to 16 kHz mono s16 as `proctor audio` does (analyzer/offline.read_audio:
PyAV, libswresample), then streamed through one SileroVad state in 0.5 s windows, as a live session does; each
32 ms frame gets a speech probability.

  labelled   audio/vad/*_speech.csv: a frame is speech when its midpoint lies in a labelled segment; only frames
             inside the labelled windows count. Frame-level precision / recall / F1.
  non_speech audio/non_speech/*: every frame is non-speech (44.1 / 48 kHz files resampled). False-positive rate.
  pooled     the threshold is chosen on the curve over the labelled frames AND the non-speech frames together
             (best F1), not on a single file; the figures are also given at the stage's default threshold.
  rttm       audio/multi_speaker/*.wav: a frame is speech when its midpoint lies in any speaker turn of the RTTM
             file beside it (turns are annotated per speaker, so short pauses inside a turn count as speech and
             gaps between turns as non-speech). Frame-level precision / recall / F1 at the chosen threshold.
  librispeech audio/single_speaker/*: read speech without frame labels: the voiced fraction per file (read speech
             has pauses, so not 1.0) and the longest voiced run, which VOICE_DETECTED (> 0.8 for > 2 s) needs.
Cost: ms of CPU per second of audio (one thread), beside one BlazeFace full-range detection on a 640x480 OEP frame
in the same run, as a ratio (machines of this kind differ in speed: compare ratios).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from livekit_proctor.analyzer.detectors.blazeface import BlazeFaceDetector
from livekit_proctor.analyzer.detectors.vad import DEFAULT_THRESHOLD, FRAME_S, SAMPLE_RATE, SileroVad, VadState
from livekit_proctor.analyzer.offline import read_audio

WINDOW = SAMPLE_RATE // 2  # 0.5 s, as the live session's audio windows
RULE_PROB, RULE_S = 0.8, 2.0  # VOICE_DETECTED's defaults


def stream_probs(vad: SileroVad, pcm: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities and frame start offsets (s) over the file in 0.5 s windows; CPU seconds spent."""
    state = VadState()
    probs, starts = [], []
    t0 = time.process_time()
    for i in range(0, len(pcm), WINDOW):
        p, ts = vad.probabilities(pcm[i : i + WINDOW], state, i / SAMPLE_RATE)
        probs.append(p)
        starts.append(ts)
    return np.concatenate(probs), np.concatenate(starts), time.process_time() - t0


def labels(csv_path: Path, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(in a labelled window, is speech) per frame."""
    mid = starts + FRAME_S / 2
    inside = np.zeros(len(mid), bool)
    speech = np.zeros(len(mid), bool)
    with csv_path.open() as f:
        for row in csv.DictReader(f):
            inside |= (mid >= float(row["window_start_s"])) & (mid < float(row["window_end_s"]))
            if row["speech_start_s"]:
                speech |= (mid >= float(row["speech_start_s"])) & (mid < float(row["speech_end_s"]))
    return inside, speech


def rttm_speech(rttm: Path, starts: np.ndarray) -> np.ndarray:
    """Per frame: its midpoint lies in a speaker turn (`SPEAKER <uri> 1 <start> <dur> ...`)."""
    mid = starts + FRAME_S / 2
    speech = np.zeros(len(mid), bool)
    for line in rttm.read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and f[0] == "SPEAKER":
            t0, dur = float(f[3]), float(f[4])
            speech |= (mid >= t0) & (mid < t0 + dur)
    return speech


def bridged(pred: np.ndarray, gap_s: float) -> np.ndarray:
    """Voiced frames with gaps of at most gap_s filled in (VOICE_DETECTED's own tolerance of pauses)."""
    out = pred.copy()
    idx = np.flatnonzero(pred)
    most = round(gap_s / FRAME_S)
    for a, c in itertools.pairwise(idx):
        if 1 < c - a <= most + 1:
            out[a:c] = True
    return out


def rms_db(pcm: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Loudness of each 32 ms frame, dB re one int16 step."""
    n = int(FRAME_S * SAMPLE_RATE)
    x = pcm.astype(np.float64)
    at = [int(s * SAMPLE_RATE) for s in starts]
    return np.array([20 * np.log10(np.sqrt(np.mean(x[i : i + n] ** 2)) + 1) for i in at])


def prf(probs: np.ndarray, truth: np.ndarray, threshold: float) -> dict[str, float]:
    pred = probs > threshold
    tp = int(np.sum(pred & truth))
    fp = int(np.sum(pred & ~truth))
    fn = int(np.sum(~pred & truth))
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"threshold": float(threshold), "precision": round(p, 4), "recall": round(r, 4), "f1": round(f1, 4)}


def longest_run_s(probs: np.ndarray, threshold: float) -> float:
    best = run = 0
    for v in probs > threshold:
        run = run + 1 if v else 0
        best = max(best, run)
    return best * FRAME_S


def blazeface_ms(data: Path) -> float | None:
    frames = sorted((data / "faces" / "webcam_oep").glob("*.jpg"))
    if not frames:
        return None
    bgr = cv2.imread(str(frames[0]))
    if bgr is None:
        return None
    rgb = cv2.cvtColor(cv2.resize(bgr, (640, 480)), cv2.COLOR_BGR2RGB)
    det = BlazeFaceDetector("full")
    for _ in range(5):
        det.detect(rgb)
    times = []
    for _ in range(50):
        t0 = time.process_time()
        det.detect(rgb)
        times.append(time.process_time() - t0)
    return float(np.median(times)) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args()
    audio = Path(args.data) / "audio"
    if not audio.is_dir():
        print(f"no shared audio at {audio}")
        return 1
    vad = SileroVad()
    out: dict[str, Any] = {"model": vad.model, "verified": vad.verified, "labelled": {}, "non_speech": {},
                           "librispeech": {}}  # fmt: skip
    lab_p, lab_t, neg_p = [], [], []
    cpu_s = audio_s = 0.0
    for csv_path in sorted((audio / "vad").glob("*_speech.csv")):
        wav = csv_path.with_name(csv_path.name.removesuffix("_speech.csv") + ".wav")
        pcm = read_audio(wav)
        probs, starts, cpu = stream_probs(vad, pcm)
        cpu_s, audio_s = cpu_s + cpu, audio_s + len(pcm) / SAMPLE_RATE
        inside, speech = labels(csv_path, starts)
        lab_p.append(probs[inside])
        lab_t.append(speech[inside])
        out["labelled"][wav.name] = {"frames": int(inside.sum()), "speech_frames": int(speech[inside].sum())}
    for wav in sorted((audio / "non_speech").glob("*.wav")):
        pcm = read_audio(wav)
        probs, _, cpu = stream_probs(vad, pcm)
        cpu_s, audio_s = cpu_s + cpu, audio_s + len(pcm) / SAMPLE_RATE
        neg_p.append(probs)
        out["non_speech"][wav.name] = {
            "duration_s": round(len(pcm) / SAMPLE_RATE, 2),
            "max_probability": round(float(probs.max()), 3),
            "voiced_frames_at_default": int(np.sum(probs > DEFAULT_THRESHOLD)),
            "longest_run_s_over_0.8": round(longest_run_s(probs, RULE_PROB), 3),
        }
    for flac in sorted((audio / "single_speaker").glob("*/*.flac")):
        pcm = read_audio(flac)
        probs, _, cpu = stream_probs(vad, pcm)
        cpu_s, audio_s = cpu_s + cpu, audio_s + len(pcm) / SAMPLE_RATE
        out["librispeech"][flac.name] = {
            "duration_s": round(len(pcm) / SAMPLE_RATE, 2),
            "voiced_fraction": round(float(np.mean(probs > DEFAULT_THRESHOLD)), 3),
            "longest_run_s_over_0.8": round(longest_run_s(probs, RULE_PROB), 3),
        }
    rttm_p, rttm_t = [], []
    out["rttm"] = {}
    for rttm in sorted((audio / "multi_speaker").glob("*.rttm")):
        pcm = read_audio(rttm.with_suffix(".wav"))
        probs, starts, cpu = stream_probs(vad, pcm)
        cpu_s, audio_s = cpu_s + cpu, audio_s + len(pcm) / SAMPLE_RATE
        truth = rttm_speech(rttm, starts)
        rttm_p.append(probs)
        rttm_t.append(truth)
        loud = rms_db(pcm, starts)
        hit, miss = truth & (probs > DEFAULT_THRESHOLD), truth & (probs <= DEFAULT_THRESHOLD)
        out["rttm"][rttm.stem] = {
            "frames": len(probs),
            "speech_frames": int(truth.sum()),
            # How loud the annotated speech the VAD missed is, beside what it found and the non-speech.
            "median_db_found": round(float(np.median(loud[hit])), 1) if hit.any() else None,
            "median_db_missed": round(float(np.median(loud[miss])), 1) if miss.any() else None,
            "median_db_outside_turns": round(float(np.median(loud[~truth])), 1) if (~truth).any() else None,
        }
    lp, lt = np.concatenate(lab_p), np.concatenate(lab_t)
    pool_p = np.concatenate([lp, *neg_p])
    pool_t = np.concatenate([lt, np.zeros(sum(len(n) for n in neg_p), bool)])
    curve = [prf(pool_p, pool_t, round(float(t), 2)) for t in np.arange(0.05, 1.0, 0.05)]
    best = max(curve, key=lambda c: (c["f1"], -abs(c["threshold"] - 0.5)))
    out["curve_pooled"] = curve
    out["chosen_threshold"] = best["threshold"]
    out["labelled_at_chosen"] = prf(lp, lt, best["threshold"])
    out["labelled_at_default"] = prf(lp, lt, DEFAULT_THRESHOLD)
    out["pooled_at_default"] = prf(pool_p, pool_t, DEFAULT_THRESHOLD)
    if rttm_p:
        rp, rt = np.concatenate(rttm_p), np.concatenate(rttm_t)
        out["rttm_at_chosen"] = prf(rp, rt, best["threshold"])
        out["rttm_at_default"] = prf(rp, rt, DEFAULT_THRESHOLD)
        for name, p_, t_ in zip(out["rttm"], rttm_p, rttm_t, strict=True):
            out["rttm"][name].update(prf(p_, t_, DEFAULT_THRESHOLD))
        out["rttm_curve"] = [prf(rp, rt, round(float(t), 2)) for t in np.arange(0.05, 1.0, 0.05)]
        pred = np.concatenate([bridged(x > DEFAULT_THRESHOLD, 0.5) for x in rttm_p])
        # prf on 0/1 "probabilities": the bridged decision at any threshold in (0, 1).
        out["rttm_bridged_0.5s_at_default"] = prf(pred.astype(np.float32), rt, 0.5)
    neg = np.concatenate(neg_p)
    out["non_speech_false_positive_rate_at_default"] = round(float(np.mean(neg > DEFAULT_THRESHOLD)), 4)
    fired = [k for k, v in out["non_speech"].items() if v["longest_run_s_over_0.8"] > RULE_S]
    out["voice_detected_on_non_speech"] = fired
    out["cost_ms_per_audio_s"] = round(cpu_s / audio_s * 1000, 3)
    bf = blazeface_ms(Path(args.data))
    out["blazeface_full_ms_per_frame"] = None if bf is None else round(bf, 3)
    if bf:
        # One second of audio VAD vs BlazeFace at 5 fps (one second of video at the default analysis rate).
        out["ratio_vad_s_to_blazeface_5fps_s"] = round(out["cost_ms_per_audio_s"] / (5 * bf), 3)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"model {out['model']} (manifest verified: {out['verified']})")
    print("pooled curve (labelled + non-speech frames):")
    for c in curve:
        print(f"  t={c['threshold']:.2f}  P={c['precision']:.3f}  R={c['recall']:.3f}  F1={c['f1']:.3f}")
    print(f"chosen threshold {best['threshold']} (best pooled F1); stage default {DEFAULT_THRESHOLD}")
    print(f"labelled frames at chosen: {out['labelled_at_chosen']}")
    print(f"labelled frames at default: {out['labelled_at_default']}")
    print(f"non-speech false-positive frame rate at default: {out['non_speech_false_positive_rate_at_default']}")
    if "rttm_at_default" in out:
        print(f"multi-speaker files vs their RTTM turns, at default: {out['rttm_at_default']}")
        for k, v in out["rttm"].items():
            print(f"  {k}: {v}")
        print(f"  with pauses under 0.5 s bridged (as VOICE_DETECTED does): {out['rttm_bridged_0.5s_at_default']}")
        best_rttm = max(out["rttm_curve"], key=lambda c: c["f1"])
        print(f"  (best on this set alone, for reference only: {best_rttm})")
    for k, v in out["non_speech"].items():
        print(f"  {k}: {v}")
    print(f"a run > {RULE_PROB} for > {RULE_S} s (VOICE_DETECTED) on non-speech: {fired}")
    for k, v in out["librispeech"].items():
        print(f"  {k}: {v}")
    ratio = out.get("ratio_vad_s_to_blazeface_5fps_s")
    print(f"cost: {out['cost_ms_per_audio_s']} ms CPU per audio second; BlazeFace full {bf} ms per 640x480 frame")
    print(f"VAD per audio s / BlazeFace at 5 fps per video s = {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
