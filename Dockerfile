# keen_stream hub image. Point it at PostgreSQL with KEEN_DATABASE_URL; without it the hub
# starts the embedded PostgreSQL in /data (mount a volume there to keep it).
#
# Two stages: the first builds keen_stream's wheel from the source; the image installs only that
# wheel (and its dependencies from the index): no source tree, no editable install. The
# migrations ship inside the wheel: `docker run IMAGE keen-stream migrate` runs them.
# tests/unit/test_dockerfile.py checks the paths, the command and the health check.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY keen_stream ./keen_stream
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    KEEN_EMBEDDED_DIR=/data/pgdata

RUN useradd --create-home --uid 10001 keen && mkdir -p /data && chown keen /data
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-cache-dir /tmp/dist/*.whl && rm -rf /tmp/dist

USER keen
WORKDIR /home/keen
EXPOSE 8765
VOLUME ["/data"]
# The slim image has no curl. /healthz answers 200 when the database and the event listener are
# up, 503 (an HTTPError here, so exit 1) otherwise. The embedded PostgreSQL's first start
# (initdb, migrations) takes a while: start-period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8765/healthz', timeout=4)"]
CMD ["keen-stream", "serve", "--host", "0.0.0.0", "--port", "8765"]
