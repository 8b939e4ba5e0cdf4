"""Speaker embeddings (analyzer/detectors/speaker.py): numpy mel features and the ONNX encoder against the
reference models/resemblyzer/convert.py stored from librosa and Resemblyzer itself, and the online clustering and
enrollment on the shared LibriSpeech files (skipped without the shared data)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from livekit_proctor.analyzer.detectors import speaker as spk
from livekit_proctor.analyzer.signals import AudioSignals
from tests.conftest import REPO, shared_data

REFERENCE = REPO / "models" / "resemblyzer" / "reference.npz"


@pytest.fixture(scope="module")
def encoder() -> spk.SpeakerEncoder:
    return spk.SpeakerEncoder()


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as z:
        return {k: z[k] for k in z.files}


def librispeech(speaker: str, n: int) -> np.ndarray:
    """File n of a shared LibriSpeech speaker as float32 16 kHz; skips without the shared data."""
    d = shared_data()
    files = sorted((d / "audio" / "single_speaker" / f"librispeech_{speaker}").glob("*.flac")) if d else []
    if len(files) <= n:
        pytest.skip(f"shared LibriSpeech speaker {speaker} not available")
    import av

    with av.open(str(files[n])) as c:
        res = av.AudioResampler(format="flt", layout="mono", rate=spk.SAMPLE_RATE)
        out = [f.to_ndarray().ravel() for fr in c.decode(audio=0) for f in res.resample(fr)]
    return np.concatenate(out).astype(np.float32)


def test_mel_features_match_librosa(reference: dict[str, np.ndarray]) -> None:
    mel = spk.mel_frames(reference["wav"])
    assert mel.shape == reference["mel"].shape == (321, spk.N_MELS)  # 3.2 s: one centred frame per 10 ms, + 1
    assert float(np.abs(mel - reference["mel"]).max() / reference["mel"].max()) < 1e-5
    # int16 PCM reads as the same signal scaled to [-1, 1]
    pcm = np.round(reference["wav"] * 32767).astype(np.int16)
    assert np.allclose(spk.mel_frames(pcm), mel, rtol=1e-2, atol=1e-4 * float(mel.max()))


def test_embed_utterance_matches_resemblyzer(encoder: spk.SpeakerEncoder, reference: dict[str, np.ndarray]) -> None:
    assert encoder.verified  # the bundled file matches models/manifest.json
    emb = encoder.embed_utterance(reference["wav"])
    assert emb.shape == (spk.EMBEDDING_DIM,) and abs(float(np.linalg.norm(emb)) - 1) < 1e-5
    assert float(np.abs(emb - reference["embedding"]).max()) < 1e-5


def test_partials_are_unit_length_and_short_audio_is_padded(encoder: spk.SpeakerEncoder) -> None:
    rng = np.random.default_rng(0)
    out = encoder.embed_partials([rng.standard_normal(8000).astype(np.float32) * 0.1, np.zeros(30000, np.float32)])
    assert out.shape == (2, spk.EMBEDDING_DIM)
    assert np.allclose(np.linalg.norm(out[0]), 1, atol=1e-5)
    assert encoder.embed_partials([]).shape == (0, spk.EMBEDDING_DIM)
    assert spk.partial_starts(16000) == [0]  # shorter than a partial: one, zero-padded
    assert spk.partial_starts(5 * 16000) == [0, 77, 154, 231, 308]  # Resemblyzer's 1.3 partials per second


def test_normalize_volume_raises_quiet_audio_only() -> None:
    quiet = np.full(1600, 0.001, np.float32)
    loud = np.full(1600, 0.5, np.float32)
    assert 20 * np.log10(np.sqrt(np.mean(spk.normalize_volume(quiet) ** 2))) == pytest.approx(spk.TARGET_DBFS, abs=0.01)
    assert np.array_equal(spk.normalize_volume(loud), loud)
    assert not np.any(spk.normalize_volume(np.zeros(10, np.float32)))


def stream(tracker: spk.SpeakerTracker, enc: spk.SpeakerEncoder, wav: np.ndarray, t0: float) -> float:
    n = spk.SAMPLE_RATE // 2
    for i in range(0, len(wav), n):
        tracker.feed(enc, wav[i : i + n], t0 + i / spk.SAMPLE_RATE, None)
    return t0 + len(wav) / spk.SAMPLE_RATE


def test_one_voice_is_one_speaker_and_a_second_voice_is_counted(encoder: spk.SpeakerEncoder) -> None:
    tr = spk.SpeakerTracker()
    end = stream(tr, encoder, librispeech("1688", 0), 0.0)
    assert len(tr.clusters) == 1 and tr.speakers_in(end) == {0}
    end = stream(tr, encoder, librispeech("1998", 0), end + 1.0)  # another reader, a woman, after a pause
    assert len(tr.clusters) == 2 and tr.speakers_in(end) == {1}  # the last 10 s: only her
    assert tr.speakers_in(end, window_s=end) == {0, 1} and tr.speaker_count() == 2
    turns = tr.turns()  # what `proctor audio --json` reports as turns
    assert [sp for _, _, sp in turns] == [0, 1] and turns[0][1] <= turns[1][0] and turns[1][1] <= end


def test_enrolled_voice_matches_its_speaker_not_another(encoder: spk.SpeakerEncoder) -> None:
    enrolled = encoder.embed_voice(librispeech("533", 0))
    for speaker, same in (("533", True), ("2033", False)):
        tr = spk.SpeakerTracker(enrolled=enrolled)
        end = stream(tr, encoder, librispeech(speaker, 1), 0.0)
        mean = tr.enrolled_similarity_in(end)
        assert mean is not None and (mean >= spk.ENROLL_THRESHOLD) == same, (speaker, mean)
    assert spk.SpeakerTracker().enrolled_similarity_in(10.0) is None


def test_voice_enrolled_from_the_session_flags_another_voice(encoder: spk.SpeakerEncoder) -> None:
    tr = spk.SpeakerTracker()
    assert not tr.enroll_main_voice()  # nothing heard yet
    end = stream(tr, encoder, librispeech("2033", 0), 0.0)  # the calibration period: the candidate reads
    assert tr.enroll_main_voice()
    end = stream(tr, encoder, librispeech("2033", 1), end + 1.0)
    own = tr.enrolled_similarity_in(end)
    end = stream(tr, encoder, librispeech("3331", 0), end + 1.0)  # someone else speaks
    other = tr.enrolled_similarity_in(end)
    assert own is not None and other is not None and own >= spk.ENROLL_THRESHOLD > other


@dataclass(frozen=True)
class FakeSpeech:
    """Stands in for the vad stage's Speech signal (analyzer/detectors/vad.py, not on this branch): 32 ms frames."""

    voiced: np.ndarray
    frame_ts: np.ndarray

    def __bool__(self) -> bool:  # Due(if_speech=True) asks this, like Speech
        return bool(np.any(self.voiced))


def test_stage_embeds_only_voiced_audio_and_keeps_state_per_stream() -> None:
    stage = spk.SpeakerStage(spk.SpeakerSettings())
    assert stage.due().if_speech is True and stage.reads == ("speech",) and stage.media == "audio"
    rng = np.random.default_rng(1)
    noise = (rng.standard_normal(spk.SAMPLE_RATE) * 3000).astype(np.int16)  # 1 s windows
    state = stage.new_state()
    results = []
    for k in range(4):
        sig = AudioSignals(seq=k, ts=float(k), sample_rate=spk.SAMPLE_RATE, duration_s=1.0)
        frame_ts = k + np.arange(31) * 0.032
        sig.put("speech", FakeSpeech(np.arange(31) < (31 if k < 3 else 0), frame_ts))  # voiced for 3 s, then not
        results.append(stage.step(noise, sig, state))
    # 1.6 s partials every 0.8 s of voiced audio: the first after 1.6 s, the last one ends the run at 3 s
    assert [len(r.partials) for r in results] == [0, 1, 1, 1]
    assert results[-1].speakers >= 1 and state.clusters
    assert stage.run(noise[:8000], sig).partials == []  # `run` alone: a fresh stream, 0.5 s: too short to embed
    assert len(stage.run(noise, sig).partials) == 0  # the window's frames are all unvoiced (k = 3)
    assert stage.new_state() is not state and not stage.new_state().clusters


def test_built_in_stage_runs_after_the_vad_only_on_voiced_windows() -> None:
    from livekit_proctor.analyzer.pipeline import ModelClock, ModelSet

    off = ModelSet.load(media="audio")
    assert "speaker" not in [s.name for s in off.audio]  # off by default (counting is weak on meeting audio)
    models = ModelSet.load(media="audio", speaker_embedding=True)
    assert [s.name for s in models.audio] == ["vad", "speaker"]
    voice = (np.clip(librispeech("1998", 0)[: 4 * spk.SAMPLE_RATE], -1, 1) * 32767).astype(np.int16)
    clock = ModelClock()  # one session's stream: the tracker carries the voiced run across windows
    quiet = models.analyze_audio(np.zeros(2 * spk.SAMPLE_RATE, np.int16), 0, 0.0, clock=clock)
    loud = [models.analyze_audio(voice[i : i + 8000], 1 + i // 8000, 2.0 + i / 16000, clock=clock)
            for i in range(0, len(voice), 8000)]  # fmt: skip
    assert "speakers" not in quiet.values  # no speech: not due
    partials = [p for w in loud for p in w.values.get("speakers", spk.Speakers([], 0, 0, None)).partials]
    assert partials and loud[-1].values["speakers"].clusters == 1
    assert any(w.latency_ms.get("resemblyzer.onnx", 0) > 0 for w in loud)
