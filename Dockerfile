# One image for every role in compose.yaml: the analyzer (`proctor serve`, the default command), the dispatcher
# (`proctor dispatcher`), the LiveKit agent (`proctor agent start`) and the reference consumers
# (`proctor consume grpc|kafka|webhook`). No HEALTHCHECK here: each role answers on its own port, so each
# compose service declares its own (a check baked into the image would mark every other role unhealthy).

# Build stage: a wheel, as `pip wheel .` builds it anywhere (setup.py generates the gRPC modules from proto/
# with grpcio-tools, a build requirement fetched into pip's isolated build environment).
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proctor ./proctor
COPY analyzer ./analyzer
COPY dispatcher ./dispatcher
COPY agent ./agent
COPY models ./models
COPY proto ./proto
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# Runtime stage: the wheel installed (not editable; no source tree, no build tools), run by an unprivileged user.
FROM python:3.11.11-slim-bookworm
COPY --from=build /dist /dist
RUN pip install --no-cache-dir "$(ls /dist/livekit_proctor-*.whl)[postgres]" \
    && rm -rf /dist \
    && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home proctor \
    && mkdir -p /data && chown proctor:proctor /data
ENV PROCTOR_HOST=0.0.0.0 PROCTOR_PORT=8080 PROCTOR_DATA_DIR=/data PYTHONUNBUFFERED=1
USER proctor
WORKDIR /data
VOLUME /data
EXPOSE 8080
CMD ["proctor", "serve"]
