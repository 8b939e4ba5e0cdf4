"""Generates the protobuf / gRPC Python modules from proto/ (never committed: they are git-ignored).

The modules are written beside the .proto files (proto/proctoring/v1/*_pb2*.py), which install as the
package `livekit_proctor.proto`; protoc's absolute imports (`from proctoring.v1 import alerts_pb2`) are
rewritten into that namespace, so nothing is put on sys.path. The build runs this (setup.py's build_py,
with grpcio-tools as a build requirement); at run time ensure_generated() only regenerates in a checkout
whose .proto files changed, and does nothing where grpcio-tools is not installed.

    python -m livekit_proctor.protogen [--force] [--proto-dir DIR]

Safe to call from several threads and processes at once: protoc writes into a private temp dir and every
file is moved into place with an atomic rename, so an importer never sees a half-written module.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "livekit_proctor.proto"  # the import name of the proto/ folder
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_STAMP = ".protogen-stamp"
_thread_lock = threading.Lock()


def default_proto_dir() -> Path:
    """The installed (or, in an editable install, the checkout's) proto/ folder."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE} not found (is livekit-proctor installed?)")
    return Path(next(iter(spec.submodule_search_locations)))


def _proto_files(proto_dir: Path) -> list[Path]:
    return sorted(proto_dir.glob("proctoring/**/*.proto"))


def _outputs(proto_dir: Path, protos: list[Path]) -> list[Path]:
    out = []
    for p in protos:
        stem = p.relative_to(proto_dir).with_suffix("")
        out += [proto_dir / f"{stem}{suffix}" for suffix in SUFFIXES]
    return out


def _fingerprint(protos: list[Path], package: str) -> str:
    # Contents only (not mtimes, which a wheel install or a checkout resets; not the protoc version, which
    # may differ between the build and the run time).
    h = hashlib.sha256(package.encode())
    for p in protos:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _is_stale(proto_dir: Path, protos: list[Path], package: str) -> bool:
    try:
        stamp = (proto_dir / _STAMP).read_text()
    except FileNotFoundError:
        return True
    return stamp != _fingerprint(protos, package) or not all(o.is_file() for o in _outputs(proto_dir, protos))


@contextlib.contextmanager
def _locked(proto_dir: Path) -> Iterator[None]:
    """Serializes generation across threads (lock) and processes (flock, where available)."""
    with _thread_lock:
        try:
            import fcntl
        except ImportError:  # Windows: the atomic renames alone keep readers safe
            yield
            return
        with open(proto_dir / ".protogen.lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _rewrite_imports(text: str, package: str) -> str:
    """`from proctoring.v1 import x` -> `from <package>.proctoring.v1 import x` (and `import proctoring...`)."""
    return re.sub(r"^(from|import) proctoring([. ])", rf"\1 {package}.proctoring\2", text, flags=re.M)


def _generate(proto_dir: Path, protos: list[Path], package: str) -> None:
    import grpc_tools
    from grpc_tools import protoc

    wkt = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto bundled with grpcio-tools
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-protogen-", dir=proto_dir))
    try:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{wkt}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p) for p in protos),
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc failed (exit {rc}) for {', '.join(map(str, protos))}")
        for f in [*tmp.rglob("*.py"), *tmp.rglob("*.pyi")]:
            f.write_text(_rewrite_imports(f.read_text(), package))
        # Packages for every generated folder (proctoring/, proctoring/v1/; committed in the checkout).
        for d in {f.parent for f in tmp.rglob("*.py")}:
            while d != tmp:
                (d / "__init__.py").touch()
                d = d.parent
        for f in sorted(tmp.rglob("*"), key=lambda p: (p.suffix != ".py", str(p))):
            if f.is_file():
                dest = proto_dir / f.relative_to(tmp)
                if f.name == "__init__.py" and dest.exists():
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)  # atomic per file: importers see the old or the new module
        stamp_tmp = tmp / _STAMP
        stamp_tmp.write_text(_fingerprint(protos, package))
        os.replace(stamp_tmp, proto_dir / _STAMP)  # last: marks the set complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_generated(proto_dir: Path | None = None, *, force: bool = False, package: str = PACKAGE) -> Path:
    """Generates proto_dir/proctoring/v1/*_pb2*.py if missing or stale; returns that folder.

    package is the import name of proto_dir (the generated modules import each other through it).
    Without grpcio-tools (a runtime install from a wheel, which carries the generated modules) it only
    returns the folder.
    """
    proto_dir = (proto_dir or default_proto_dir()).resolve()
    protos = _proto_files(proto_dir)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_dir}/proctoring")
    if importlib.util.find_spec("grpc_tools") is None:
        return proto_dir / "proctoring" / "v1"
    if force or _is_stale(proto_dir, protos, package):
        with _locked(proto_dir):
            if force or _is_stale(proto_dir, protos, package):  # another thread/process may have done it
                _generate(proto_dir, protos, package)
    return proto_dir / "proctoring" / "v1"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m livekit_proctor.protogen", description=__doc__.split("\n")[0])
    ap.add_argument("--proto-dir", type=Path, default=None, help="folder holding proctoring/v1/*.proto")
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    ap.add_argument("--package", default=PACKAGE, help="import name of the proto folder (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        out = ensure_generated(args.proto_dir, force=args.force, package=args.package)
    except (RuntimeError, FileNotFoundError) as e:
        print(f"protogen: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
