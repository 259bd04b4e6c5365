# vdistream's daemon: python:3.11-slim with the PostgreSQL 15 client tools, vdistream
# installed from this checkout, running `vdistream serve` as the unprivileged user
# "vdistream". The entrypoint is exec form, so PID 1 is vdistream itself and the
# SIGTERM of `docker stop` reaches it: it stops intake, aborts the running jobs
# (every device drains, nothing partial stays) and exits within
# service.grace_period. Give `docker stop` more time than that (its default is 10 s
# before SIGKILL): `docker run --stop-timeout 45 ...` for the default grace of 30 s.
# A SIGKILL is safe too: the next start marks the interrupted jobs failed and removes
# their partial backups. As PID 1, vdistream reaps its own children (the engines'
# tools, each in its own process group, killed as a group on abort); it does not reap
# orphans that a tool might leave behind: if yours does, run with `docker run --init`.
#
#   docker build -t vdistream .
#   docker run -d --name vdistream --stop-timeout 45 \
#     -v /srv/vdistream/vdistream.toml:/etc/vdistream/vdistream.toml:ro \
#     -v vdistream-state:/var/lib/vdistream -v vdistream-run:/run/vdistream \
#     -v /srv/backups:/var/backups/vdistream \
#     vdistream
#   docker exec vdistream vdistream jobs          # the CLI talks to the socket
#   docker kill --signal HUP vdistream            # reload the settings
#
# Volumes: /var/lib/vdistream (state: the job database and its lock; keep it),
# /run/vdistream (the control socket, mode service.socket_mode; mount it into another
# container to control the daemon from there), /var/backups/vdistream (a place for a
# file destination). The settings file is yours to mount at
# /etc/vdistream/vdistream.toml; the environment below pins the state directory and
# the socket to the volumes whatever the file says. Databases are reached over the
# network (postgresql://) or through a mounted file (sqlite:///data/app.db).
# Pinned to Debian 12 (bookworm): its postgresql-client is 15, whose pg_basebackup and
# pg_dump back up servers up to 15. For a newer server, add the PGDG apt repository
# and install postgresql-client-NN instead.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Debian 12's postgresql-client is 15: pg_basebackup, pg_dump, pg_restore, psql, and
# pg_verifybackup (in /usr/lib/postgresql/15/bin, where vdistream looks for it).
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 vdistream \
    && useradd --system --uid 10001 --gid vdistream --home-dir /var/lib/vdistream \
        --no-create-home --shell /usr/sbin/nologin vdistream \
    && install -d -o vdistream -g vdistream -m 0700 /var/lib/vdistream \
    && install -d -o vdistream -g vdistream -m 0750 /run/vdistream /var/backups/vdistream \
    && install -d -m 0755 /etc/vdistream

WORKDIR /opt/vdistream

# Dependencies in their own layer: rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN mkdir vdistream && touch vdistream/__init__.py \
    && pip install . \
    && pip uninstall -y vdistream \
    && rm -rf vdistream build

COPY vdistream ./vdistream
COPY config/vdistream.toml /etc/vdistream/vdistream.toml.example
RUN pip install --no-deps . && rm -rf build

ENV VDISTREAM_CONFIG=/etc/vdistream/vdistream.toml \
    VDISTREAM_SERVICE__STATE_DIR=/var/lib/vdistream \
    VDISTREAM_SERVICE__SOCKET=/run/vdistream/vdistream.sock \
    VDISTREAM_SOCKET=/run/vdistream/vdistream.sock

USER vdistream:vdistream
VOLUME ["/var/lib/vdistream", "/run/vdistream"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["vdistream", "status"]
ENTRYPOINT ["vdistream"]
CMD ["serve"]
