# kling-exporter: tails Kling AI event logs and serves Prometheus metrics on :10177.
#   docker build -t kling-exporter .
#   docker run -v /srv/kling/logs:/var/lib/kling-exporter/logs:ro -p 10177:10177 kling-exporter
FROM python:3.11-slim AS build
WORKDIR /src
# uv at one version, checked by hash; it installs the runtime exactly as uv.lock pins it
# (--locked: no resolution at build time, and a stale lock fails the build).
COPY scripts/uv-requirements.txt /tmp/uv-requirements.txt
RUN pip install --no-cache-dir --require-hashes -r /tmp/uv-requirements.txt
ENV UV_PROJECT_ENVIRONMENT=/opt/kling-exporter UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_NO_CACHE=1
COPY pyproject.toml uv.lock README.md LICENSE ./
COPY exporter ./exporter
RUN uv sync --locked --no-editable --python /usr/local/bin/python3

FROM python:3.11-slim
LABEL org.opencontainers.image.title="kling-exporter" \
      org.opencontainers.image.description="Prometheus exporter and budget guard for Kling AI video generation" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --system --uid 10177 --home-dir /var/lib/kling-exporter --create-home kling
COPY --from=build /opt/kling-exporter /opt/kling-exporter
COPY LICENSE /usr/share/doc/kling-exporter/LICENSE
ENV PATH=/opt/kling-exporter/bin:$PATH PYTHONUNBUFFERED=1
# The built-in defaults read logs/kling-*.jsonl and keep kling-exporter.state here.
WORKDIR /var/lib/kling-exporter
RUN mkdir -p logs && chown kling:kling logs
VOLUME ["/var/lib/kling-exporter", "/var/lib/kling-exporter/logs"]
USER kling
EXPOSE 10177
# With TLS or another port, set KLING_EXPORTER_HEALTH_URL (e.g. https://127.0.0.1:9443/-/healthy).
ENV KLING_EXPORTER_HEALTH_URL=http://127.0.0.1:10177/-/healthy
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["kling-exporter", "healthcheck"]
ENTRYPOINT ["kling-exporter"]
CMD ["serve"]
