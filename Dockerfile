# flintproxy as a container: `flintproxy serve` as a non-root user.
#   docker build -t flintproxy .
#   docker run -p 8080:8080 -p 8081:8081 -v $PWD/my.toml:/etc/flintproxy/flintproxy.toml:ro flintproxy
# The shipped config listens on 127.0.0.1; in a container, mount one that binds
# 0.0.0.0 (deploy/flintproxy.toml does, for deploy/compose.yaml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY flintproxy ./flintproxy
RUN pip install . \
    && rm -rf /src \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/flintproxy \
       --create-home --shell /usr/sbin/nologin flintproxy

COPY config/flintproxy.toml /etc/flintproxy/flintproxy.toml

# The embedded store (var/flintproxy.db) lives under the user's home: mount a volume
# there to keep it; the shared mode keeps nothing in the container.
USER flintproxy
WORKDIR /var/lib/flintproxy
EXPOSE 8080 8081
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["flintproxy"]
CMD ["serve", "--config", "/etc/flintproxy/flintproxy.toml"]
