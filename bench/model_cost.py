"""Cost of each stage per frame on this machine: median and p95 ms over the shared exam-webcam frames.

    python bench/model_cost.py [DATA_DIR] [--repeat N]

Prints one row per registered video stage (analyzer/stages.py; a new stage shows up with no edit here), one per
audio stage (per 0.5 s window of the shared LibriSpeech files, one session state, as a live session; and per
second of audio) and one JSON line. Single thread, the way the inference pool runs each job. Without a session
clock every video stage runs on every frame where its face condition holds (face mesh only with a face,
segmentation only without one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from livekit_proctor.analyzer.offline import read_audio  # noqa: E402
from livekit_proctor.analyzer.pipeline import ModelClock, ModelSet, decode_jpeg  # noqa: E402


def _reencoded(path: Path) -> bytes:
    img = cv2.imread(str(path))
    if img is None:
        raise SystemExit(f"not a readable image: {path}")
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", nargs="?", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--repeat", type=int, default=2, help="passes over the frames (default 2)")
    args = ap.parse_args()
    frames = sorted((Path(args.data_dir) / "faces" / "webcam_oep").glob("*.jpg"))
    if not frames:
        print(f"no frames under {args.data_dir}/faces/webcam_oep", file=sys.stderr)
        return 2
    models = ModelSet.load()
    jpegs = [_reencoded(f) for f in frames]
    times: dict[str, list[float]] = {}
    models.analyze_jpeg(jpegs[0], 0, 0.0)  # warm-up: interpreters are built lazily per thread
    t_all = []
    for _ in range(args.repeat):
        for i, jpg in enumerate(jpegs):
            t0 = time.perf_counter()
            sig = models.analyze_jpeg(jpg, i, 0.0)  # no clock: every stage runs whose condition holds
            t_all.append((time.perf_counter() - t0) * 1000)
            for name, ms in sig.latency_ms.items():
                times.setdefault(name, []).append(ms)
    h, w = decode_jpeg(jpegs[0]).shape[:2]
    print(f"{len(jpegs)} frames x {args.repeat} ({w}x{h}), one thread")
    print(f"{'stage':<14} {'model':<42} {'runs':>5} {'median ms':>10} {'p95 ms':>8}")
    rows = {}
    for stage, model in [*((s.name, s.model) for s in models.video), ("decode", "jpeg_decode")]:
        v = sorted(times.get(model, []))
        if not v:
            print(f"{stage:<14} {model:<42} {0:>5} {'-':>10} {'-':>8}")
            continue
        med, p95 = statistics.median(v), v[min(len(v) - 1, int(0.95 * len(v)))]
        rows[model] = {"stage": stage, "runs": len(v), "median_ms": round(med, 2), "p95_ms": round(p95, 2)}
        print(f"{stage:<14} {model:<42} {len(v):>5} {med:>10.2f} {p95:>8.2f}")
    for name in models.off:
        print(f"{name:<14} {'(off)':<42}")
    t_all.sort()
    print(
        f"{'whole frame':<14} {'every stage due on it':<42} {len(t_all):>5} {statistics.median(t_all):>10.2f} "
        f"{t_all[int(0.95 * len(t_all))]:>8.2f}"
    )
    audio_rows = _audio_cost(models, Path(args.data_dir))
    print(json.dumps({"bench": "model_cost", "frame_size": f"{w}x{h}", "models": rows, "audio_models": audio_rows}))
    return 0


def _audio_cost(models: ModelSet, data: Path) -> dict[str, dict[str, float | int | str]]:
    files = sorted((data / "audio" / "single_speaker").glob("*/*.flac"))
    if not models.audio or not files:
        return {}
    times: dict[str, list[float]] = {}
    audio_s = 0.0
    for f in files:
        pcm = read_audio(f)
        audio_s += len(pcm) / 16000
        clock = ModelClock()  # one session per file
        for n, i in enumerate(range(0, len(pcm), 8000)):
            sig = models.analyze_audio(pcm[i : i + 8000], n, i / 16000, 16000, clock)
            for name, ms in sig.latency_ms.items():
                times.setdefault(name, []).append(ms)
    print(f"{len(files)} audio files, {audio_s:.1f} s in 0.5 s windows, one thread")
    print(f"{'stage':<14} {'model':<42} {'runs':>5} {'median ms':>10} {'p95 ms':>8} {'ms/audio s':>10}")
    rows: dict[str, dict[str, float | int | str]] = {}
    for st in models.audio:
        v = sorted(times.get(st.model, []))
        if not v:
            continue
        med, p95, per_s = statistics.median(v), v[min(len(v) - 1, int(0.95 * len(v)))], sum(v) / audio_s
        rows[st.model] = {"stage": st.name, "runs": len(v), "median_ms": round(med, 3), "p95_ms": round(p95, 3),
                          "ms_per_audio_s": round(per_s, 3)}  # fmt: skip
        print(f"{st.name:<14} {st.model:<42} {len(v):>5} {med:>10.2f} {p95:>8.2f} {per_s:>10.2f}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
