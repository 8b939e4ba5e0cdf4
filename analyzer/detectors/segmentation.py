"""Person segmentation (mediapipe's selfie segmentation tflite, run with LiteRT): how much of the frame is
a person. A presence cue for the frames where neither a face nor a person box is found (a head bowed under
a cap, a back turned to the camera)."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
from ai_edge_litert.interpreter import Interpreter

from livekit_proctor.analyzer.detectors.base import check_rgb
from livekit_proctor.analyzer.detectors.manifest import mediapipe_model, verify
from livekit_proctor.analyzer.signals import Signals
from livekit_proctor.analyzer.stages import Due, Stage, StageSettings, service_setting

# Pixels with a person probability above this count as person.
MASK_THRESHOLD = 0.5


def model_file(landscape: bool = True) -> Path:
    name = "selfie_segmentation_landscape.tflite" if landscape else "selfie_segmentation.tflite"
    return mediapipe_model(f"selfie_segmentation/{name}")


class SelfieSegmenter:
    """person_fraction(rgb): the share of the frame covered by a person (0-1)."""

    name = "mediapipe.selfie_segmentation_landscape"

    def __init__(self) -> None:
        self._model = model_file(True).read_bytes()
        self.verified = verify("selfie_segmentation_landscape", self._model)
        self._local = threading.local()
        self._interpreter()

    def _interpreter(self) -> tuple[Interpreter, int, int, int, int]:
        st = getattr(self._local, "st", None)
        if st is None:
            it = Interpreter(model_content=self._model, num_threads=1)
            it.allocate_tensors()
            inp = it.get_input_details()[0]
            _, h, w, _ = (int(x) for x in inp["shape"])
            st = self._local.st = (it, inp["index"], it.get_output_details()[0]["index"], w, h)
        return st

    def person_fraction(self, rgb: np.ndarray) -> float:
        rgb = check_rgb(rgb)
        it, i_in, i_out, w, h = self._interpreter()
        # The model takes the whole frame stretched to its input, RGB in [0, 1].
        x = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        it.set_tensor(i_in, x[None])
        it.invoke()
        mask = it.get_tensor(i_out)[0, :, :, 0]
        return float(np.mean(mask > MASK_THRESHOLD))


# ---- the stage (analyzer/stages.py)


class SegmentationSettings(StageSettings):
    segmentation: bool = service_setting("segmentation")


class SegmentationStage(Stage):
    """Only without a face: then it tells "someone is there, face hidden" from "nobody"."""

    name = "segmentation"
    writes = "person_fraction"
    reads = ("faces",)
    settings_model = SegmentationSettings

    def __init__(self, settings: SegmentationSettings) -> None:
        super().__init__(settings)
        self.segmenter = SelfieSegmenter()
        self.model, self.verified = self.segmenter.name, self.segmenter.verified

    @classmethod
    def enabled(cls, settings: SegmentationSettings) -> bool:
        return settings.segmentation

    def due(self) -> Due:
        return Due(if_face=False)

    def run(self, media: np.ndarray, signals: Signals) -> float:
        return self.segmenter.person_fraction(media)
