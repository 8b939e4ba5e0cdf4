# One image for the analyzer (`proctor serve`), the dispatcher (`proctor dispatcher`) and the agent
# (`proctor agent start`); compose.yaml runs all three.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proctor ./proctor
COPY analyzer ./analyzer
COPY dispatcher ./dispatcher
COPY agent ./agent
COPY models ./models
COPY proto ./proto
RUN pip install --no-cache-dir -e '.[postgres]' && python -m livekit_proctor.protogen
ENV PROCTOR_HOST=0.0.0.0 PROCTOR_PORT=8080 PROCTOR_DATA_DIR=/data
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/.well-known/ready')" || exit 1
CMD ["proctor", "serve"]
