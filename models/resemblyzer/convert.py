"""Rebuild models/resemblyzer/resemblyzer.onnx from Resemblyzer's GE2E speaker encoder (resemblyzer==0.1.4).

Reproducible, run once by hand (nothing here runs at analyzer run time):

    python models/resemblyzer/convert.py             # venv, export, checks, reference; writes the .onnx + .npz
    python models/resemblyzer/convert.py --venv DIR  # another conversion virtualenv (default /work/spkenv)

Steps:

1. A separate virtualenv (default /work/spkenv), never the project's: ``torch==2.13.0`` (the CPU build: do not
   install anything that pulls torchvision / torchaudio, which pull a multi-GB CUDA torch),
   ``resemblyzer==0.1.4`` with ``--no-deps`` (its own pins are loose and pull the same), and what the export and
   the checks need: ``librosa`` (Resemblyzer's features), ``webrtcvad-wheels`` (Resemblyzer's ``audio.py`` imports
   webrtcvad), ``onnx``, ``onnxruntime``. Resolved then: librosa 0.11.0, scipy 1.17.1, numpy 2.4.6, onnx 1.23.2,
   onnxruntime 1.32.0.
2. ``resemblyzer/pretrained.pt`` from the installed wheel, sha256 checked.
3. Export with torch.onnx (TorchScript exporter, opset 17) of the encoder's whole forward: the 3-layer LSTM over
   the mel frames, the final hidden state of the last layer, Linear 256 -> 256, ReLU, L2 normalisation. Input
   ``mels`` [batch, frames, 40] (both dynamic; Resemblyzer feeds 160 frames), output ``embedding`` [batch, 256].
4. Canonical names (models/tfjs_onnx.py: t0, t1, ... in order of use) and fixed metadata, so that two runs give
   byte-identical files; the sha256 is printed.
5. Checks with onnxruntime: the ONNX embedding against torch's on random mel frames and on the partial windows
   of the reference signal (the numpy features and embed_utterance are checked by tests/test_speaker.py).
6. ``reference.npz`` beside the model (not installed with the package; read by tests/test_speaker.py): a
   synthetic 3.2 s signal (a gliding harmonic tone in noise, no third-party audio), librosa's mel frames of it
   with Resemblyzer's parameters, and Resemblyzer's ``embed_utterance`` of it, so that the project's tests check
   the numpy features and the ONNX encoder without torch or librosa.

Model: the GE2E speaker encoder of Resemblyzer (Resemble AI, Apache-2.0; L. Wan et al., "Generalized End-to-End
Loss for Speaker Verification", ICASSP 2018), trained by Resemble AI on LibriSpeech, VoxCeleb 1 and 2.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "resemblyzer.onnx"
REFERENCE = HERE / "reference.npz"
OPSET = 17
VENV_REQUIREMENTS = [
    "torch==2.13.0",
    "librosa==0.11.0",
    "webrtcvad-wheels==2.0.14.post1",
    "onnx==1.23.2",
    "onnxruntime==1.32.0",
]
RESEMBLYZER = "resemblyzer==0.1.4"
PRETRAINED_SHA256 = "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e"
METADATA = {
    "source": "pypi resemblyzer==0.1.4 resemblyzer/pretrained.pt, converted by models/resemblyzer/convert.py",
    "upstream": "https://github.com/resemble-ai/Resemblyzer (GE2E speaker encoder, Resemble AI)",
    "license": "Apache-2.0 (Resemblyzer)",
    "input": "mels: float32 [batch, frames, 40] power mel filterbank frames (not log), 16 kHz, 25 ms Hann window, "
    "10 ms hop, Slaney mel scale 0-8 kHz; Resemblyzer feeds 160 frames (1.6 s)",
    "outputs": "embedding: [batch, 256] non-negative, L2-normalised; compare with cosine similarity",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})


def make_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        run([sys.executable, "-m", "venv", str(venv)])
    run([str(py), "-m", "pip", "install", "-q", *VENV_REQUIREMENTS])
    run([str(py), "-m", "pip", "install", "-q", "--no-deps", RESEMBLYZER])
    return py


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--venv", type=Path, default=Path("/work/spkenv"))
    ap.add_argument("--output", type=Path, default=OUTPUT)
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    args = ap.parse_args()
    py = make_venv(args.venv)
    run([str(py), __file__, "_export", str(args.output)])
    run([str(py), __file__, "_check", str(args.output), str(args.reference)])
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB) sha256 {sha256(args.output)}")


# ---- steps run inside the conversion venv (torch, resemblyzer, librosa, onnx, onnxruntime) ----------


def _encoder():  # type: ignore[no-untyped-def]
    from importlib import resources

    from resemblyzer import VoiceEncoder

    weights = Path(str(resources.files("resemblyzer"))) / "pretrained.pt"
    got = sha256(weights)
    if got != PRETRAINED_SHA256:
        raise SystemExit(f"{weights}: sha256 {got} differs from the expected {PRETRAINED_SHA256}")
    return VoiceEncoder(device="cpu", verbose=False).eval()


def _export(dst: str) -> None:
    import io

    import onnx
    import torch

    sys.path.insert(0, str(HERE.parent))
    from tfjs_onnx import canonical_names  # generic: renames tensors / nodes in order of use

    torch.manual_seed(0)
    enc = _encoder()
    x = torch.rand(2, 160, 40)
    buf = io.BytesIO()
    torch.onnx.export(
        enc,
        (x,),
        buf,
        input_names=["mels"],
        output_names=["embedding"],
        dynamic_axes={"mels": {0: "batch", 1: "frames"}, "embedding": {0: "batch"}},
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )
    model = onnx.load_from_string(buf.getvalue())
    canonical_names(model)
    g = model.graph
    g.name = "resemblyzer_ge2e"
    model.producer_name, model.producer_version = "livekit-proctor models/resemblyzer/convert.py", "1"
    model.doc_string = "Resemblyzer GE2E speaker encoder (3-layer LSTM, 256-d); see models/resemblyzer/README.md"
    del model.metadata_props[:]
    for k, v in METADATA.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, dst)
    print(f"exported: {len(g.node)} nodes ({', '.join(sorted({n.op_type for n in g.node}))})")


def _signal(seconds: float = 3.2, seed: int = 0):  # type: ignore[no-untyped-def]
    """A speech-like synthetic test signal: a gliding harmonic tone with a syllable-rate envelope, in noise."""
    import numpy as np

    sr = 16000
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voice = sum(np.sin(k * phase) / k for k in range(1, 20))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    wav = 0.1 * voice * envelope + 0.005 * rng.standard_normal(len(t))
    return wav.astype(np.float32)


def _check(onnx_path: str, ref_path: str) -> None:
    import librosa
    import numpy as np
    import onnxruntime as ort
    import torch
    from resemblyzer import audio, hparams

    enc = _encoder()
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for shape in ((1, 160, 40), (5, 160, 40), (3, 60, 40)):
        x = (rng.random(shape) * 2).astype(np.float32)
        with torch.no_grad():
            ref = enc(torch.from_numpy(x)).numpy()
        got = sess.run(["embedding"], {"mels": x})[0]
        print(f"random mels {shape}: max |torch - onnx| = {np.abs(ref - got).max():.3g}")
        assert np.abs(ref - got).max() < 1e-5

    wav = _signal()
    mel_ref = librosa.feature.melspectrogram(
        y=wav, sr=hparams.sampling_rate, n_fft=400, hop_length=160, n_mels=hparams.mel_n_channels
    ).T.astype(np.float32)
    assert np.array_equal(mel_ref, audio.wav_to_mel_spectrogram(wav))  # the parameters are Resemblyzer's
    embed_ref, partials, _ = enc.embed_utterance(wav, return_partials=True)
    # The same partial windows through onnxruntime (the numpy features are checked by tests/test_speaker.py).
    slices = enc.compute_partial_slices(len(wav), 1.3, 0.75)[1]
    padded = np.pad(wav, (0, max(0, slices[-1].stop * 160 - len(wav))))
    mel_padded = audio.wav_to_mel_spectrogram(padded)
    got = sess.run(["embedding"], {"mels": np.stack([mel_padded[s] for s in slices])})[0]
    print(f"partials of the reference signal: max |torch - onnx| = {np.abs(got - partials).max():.3g}")
    assert np.abs(got - partials).max() < 1e-5
    np.savez_compressed(
        ref_path, wav=wav, mel=mel_ref, embedding=embed_ref.astype(np.float32), librosa=librosa.__version__
    )
    print(f"wrote {ref_path}")


if __name__ == "__main__":
    steps = {"_export": _export, "_check": _check}
    if len(sys.argv) > 1 and sys.argv[1] in steps:
        steps[sys.argv[1]](*sys.argv[2:])
    else:
        main()
