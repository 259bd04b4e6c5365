# vdistream: a slim image, dependencies in their own layer, a non-root user, and
# vdistream as PID 1 (exec form) so that signals reach it directly.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --uid 10001 vdistream

WORKDIR /opt/vdistream
COPY pyproject.toml README.md ./
COPY vdistream ./vdistream
RUN pip install --no-cache-dir .

USER vdistream
VOLUME ["/var/lib/vdistream", "/run/vdistream"]
ENTRYPOINT ["vdistream"]
CMD ["--version"]
