"""Build glue that pyproject.toml cannot express: the repository's top-level folders installed under one
import namespace, and the gRPC code generated from proto/ at build time.

    proctor/    -> livekit_proctor            (CLI, settings, contracts)
    analyzer/   -> livekit_proctor.analyzer
    dispatcher/ -> livekit_proctor.dispatcher
    agent/      -> livekit_proctor.agent
    models/     -> livekit_proctor.models     (model files as package data)
    proto/      -> livekit_proctor.proto      (.proto files + the generated *_pb2 modules)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import find_namespace_packages, find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
ROOTS = {
    "livekit_proctor": "proctor",
    "livekit_proctor.analyzer": "analyzer",
    "livekit_proctor.dispatcher": "dispatcher",
    "livekit_proctor.agent": "agent",
    "livekit_proctor.models": "models",
    "livekit_proctor.proto": "proto",
}


def _packages() -> list[str]:
    out = []
    for ns, folder in ROOTS.items():
        out.append(ns)
        out += [f"{ns}.{p}" for p in find_packages(folder)]
    # The model folders hold data only (setuptools wants data folders listed as packages).
    out += [f"livekit_proctor.models.{p}" for p in find_namespace_packages("models")]
    return out


MODEL_DATA = ["*.json", "*.tflite", "*.onnx", "README.md"]


class BuildPy(build_py):
    """Runs protoc (grpcio-tools, a build requirement) before the modules are collected."""

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        modules = list(super().find_package_modules(package, package_dir))
        if package == "livekit_proctor.models" or package.startswith("livekit_proctor.models."):
            # The extraction / conversion scripts beside the models (and their shared tfjs_onnx.py) stay in
            # the checkout; only the package marker is installed.
            return [m for m in modules if m[1] == "__init__" and package == "livekit_proctor.models"]
        return modules

    def run(self) -> None:
        # Loaded by path: the package itself is not importable while it is being built.
        spec = importlib.util.spec_from_file_location("_protogen", HERE / "proctor" / "protogen.py")
        assert spec and spec.loader
        protogen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(protogen)
        protogen.ensure_generated(HERE / "proto")
        super().run()


setup(
    packages=_packages(),
    package_dir=ROOTS,
    package_data={
        "livekit_proctor": ["py.typed"],
        **{p: MODEL_DATA for p in _packages() if p.startswith("livekit_proctor.models")},
        "livekit_proctor.proto": ["README.md", "proctoring/v1/*.proto", "proctoring/v1/*.pyi", ".protogen-stamp"],
    },
    cmdclass={"build_py": BuildPy},
)
