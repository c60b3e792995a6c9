# keen_stream hub image. Point it at PostgreSQL with KEEN_DATABASE_URL; without it the hub
# starts the embedded PostgreSQL in /data (mount a volume there to keep it).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    KEEN_EMBEDDED_DIR=/data/pgdata

RUN useradd --create-home --uid 10001 keen && mkdir -p /data && chown keen /data
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY keen_stream ./keen_stream
COPY migrations ./migrations
RUN pip install --no-cache-dir -e .

USER keen
EXPOSE 8765
VOLUME ["/data"]
CMD ["python", "-m", "keen_stream", "serve", "--host", "0.0.0.0", "--port", "8765"]
