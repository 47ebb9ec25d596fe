# kling-exporter: tails Kling AI event logs and serves Prometheus metrics on :10177.
#   docker build -t kling-exporter .
#   docker run -v /srv/kling/logs:/var/lib/kling-exporter/logs:ro -p 10177:10177 kling-exporter
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/kling-exporter
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN /opt/kling-exporter/bin/pip install --no-cache-dir .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="kling-exporter" \
      org.opencontainers.image.description="Prometheus exporter and budget guard for Kling AI video generation"
RUN useradd --system --uid 10177 --home-dir /var/lib/kling-exporter --create-home kling
COPY --from=build /opt/kling-exporter /opt/kling-exporter
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
