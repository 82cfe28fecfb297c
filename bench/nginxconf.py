"""nginx configurations for the bench: the canned upstream and the plain reverse proxy.

Both run as their own nginx master (``nginx -p DIR -c FILE -e LOG``, ``daemon off``)
with one worker, so each can be pinned to one CPU with taskset and stopped by
process group; neither touches the system's nginx or its files.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from canned import json_body, sse_body

INSTALL_HINT = "apt-get install nginx"


def version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).strip().split("/")[-1]


def _quote(body: bytes) -> str:
    """An nginx single-quoted string holding ``body`` (nginx decodes \\n, \\\\ and \\')."""
    text = body.decode()
    if "$" in text:
        raise ValueError("canned bodies must not contain '$' (nginx variables)")
    text = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{text}'"


_MAIN = """\
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 100000;
events {{ worker_connections 30000; multi_accept on; }}
http {{
    access_log off;
    server_tokens off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_buffer_size 64k;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{body}
}}
"""


def _write(directory: Path, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(_MAIN.format(dir=directory, body=body))
    return conf


def canned_conf(directory: Path, port: int) -> Path:
    """The zero-delay upstream: /json/ answers a chat.completion, /sse/ a 20-chunk stream."""
    directory = directory.resolve()
    body = f"""\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /json/ {{
            default_type application/json;
            return 200 {_quote(json_body())};
        }}
        # Too long for one nginx token (4 KiB): a file. The static module refuses
        # POST (405); error_page turns that into a GET of the file, answered 200.
        location /sse/ {{
            error_page 405 =200 /canned/sse;
            return 405;
        }}
        location = /canned/sse {{
            internal;
            root {directory};
            types {{ }}
            default_type text/event-stream;
            etag off;
            rewrite ^ /sse.txt break;
        }}
    }}"""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sse.txt").write_bytes(sse_body())
    return _write(directory, body)


def proxy_conf(directory: Path, port: int, canned_port: int, mock_port: int) -> Path:
    """nginx as a plain reverse proxy: no buffering, keep-alive to the upstreams."""
    body = f"""\
    upstream canned {{
        server 127.0.0.1:{canned_port};
        keepalive 256;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    upstream mock {{
        server 127.0.0.1:{mock_port};
        keepalive 1024;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_request_buffering off;
        proxy_read_timeout 300s;
        location /json/ {{ proxy_pass http://canned; }}
        location /sse/ {{ proxy_pass http://canned; }}
        location /v1/ {{ proxy_pass http://mock; }}
    }}"""
    return _write(directory, body)


def command(binary: str, conf: Path) -> list[str]:
    return [binary, "-p", str(conf.parent), "-c", str(conf), "-e", str(conf.parent / "error.log")]
