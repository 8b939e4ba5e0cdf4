"""Generates the protobuf / gRPC Python modules from proto/ (never committed: proto/gen/ is git-ignored).

ensure_generated() runs grpc_tools.protoc when a generated module is missing or older than any .proto
file (or the .proto contents changed), puts proto/gen on sys.path (the generated modules import each other
as `from proctoring.v1 import alerts_pb2`) and returns proto/gen/proctoring/v1.

    python -m proctor.protogen [--force] [--proto-dir DIR]

Safe to call from several threads and processes at once: protoc writes into a private temp dir and every
file is moved into place with an atomic rename, so an importer never sees a half-written module.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_STAMP = ".protogen-stamp"
_thread_lock = threading.Lock()


def default_proto_dir() -> Path:
    # PROCTOR_PROTO_DIR: for installs where the package does not sit in a checkout next to proto/.
    return Path(os.environ.get("PROCTOR_PROTO_DIR", REPO / "proto"))


def _proto_files(proto_dir: Path) -> list[Path]:
    return sorted(p for p in proto_dir.glob("proctoring/**/*.proto") if "gen" not in p.relative_to(proto_dir).parts)


def _outputs(proto_dir: Path, gen_root: Path, protos: list[Path]) -> list[Path]:
    out = []
    for p in protos:
        stem = p.relative_to(proto_dir).with_suffix("")
        out += [gen_root / f"{stem}{suffix}" for suffix in SUFFIXES]
    return out


def _fingerprint(protos: list[Path]) -> str:
    import grpc_tools

    h = hashlib.sha256(getattr(grpc_tools, "__version__", "").encode())
    for p in protos:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _is_stale(proto_dir: Path, gen_root: Path, protos: list[Path]) -> bool:
    outputs = _outputs(proto_dir, gen_root, protos)
    try:
        oldest_out = min(o.stat().st_mtime_ns for o in outputs)
        stamp = (gen_root / _STAMP).read_text()
    except (FileNotFoundError, ValueError):
        return True
    newest_proto = max(p.stat().st_mtime_ns for p in protos)
    # The fingerprint catches an older .proto restored with an older mtime (git checkout of a branch).
    return oldest_out < newest_proto or stamp != _fingerprint(protos)


@contextlib.contextmanager
def _locked(gen_root: Path) -> Iterator[None]:
    """Serializes generation across threads (lock) and processes (flock, where available)."""
    with _thread_lock:
        gen_root.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # Windows: the atomic renames alone keep readers safe
            yield
            return
        with open(gen_root / ".lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _generate(proto_dir: Path, gen_root: Path, protos: list[Path]) -> None:
    import grpc_tools
    from grpc_tools import protoc

    wkt = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto bundled with grpcio-tools
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-protogen-", dir=gen_root))
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
        # Packages for every generated folder (proctoring/, proctoring/v1/).
        for d in {f.parent for f in tmp.rglob("*.py")}:
            while d != tmp:
                (d / "__init__.py").touch()
                d = d.parent
        for f in sorted(tmp.rglob("*"), key=lambda p: (p.suffix != ".py", str(p))):
            if f.is_file():
                dest = gen_root / f.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)  # atomic per file: importers see the old or the new module
        stamp_tmp = tmp / _STAMP
        stamp_tmp.write_text(_fingerprint(protos))
        os.replace(stamp_tmp, gen_root / _STAMP)  # last: marks the set complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_generated(proto_dir: Path | None = None, *, force: bool = False, add_to_path: bool = True) -> Path:
    """Generates proto_dir/gen/proctoring/v1/*_pb2*.py if missing or stale; returns that folder.

    add_to_path puts proto_dir/gen first on sys.path so `import proctoring.v1.delivery_pb2` works.
    """
    proto_dir = (proto_dir or default_proto_dir()).resolve()
    gen_root = proto_dir / "gen"
    protos = _proto_files(proto_dir)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_dir}/proctoring")
    if force or _is_stale(proto_dir, gen_root, protos):
        with _locked(gen_root):
            if force or _is_stale(proto_dir, gen_root, protos):  # another thread/process may have done it
                _generate(proto_dir, gen_root, protos)
    if add_to_path and str(gen_root) not in sys.path:
        sys.path.insert(0, str(gen_root))
    return gen_root / "proctoring" / "v1"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m proctor.protogen", description=__doc__.split("\n")[0])
    ap.add_argument("--proto-dir", type=Path, default=None, help="folder holding proctoring/v1/*.proto")
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = ap.parse_args(argv)
    try:
        out = ensure_generated(args.proto_dir, force=args.force, add_to_path=False)
    except (RuntimeError, FileNotFoundError) as e:
        print(f"protogen: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
