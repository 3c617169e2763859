"""`attnatlas serve ATLAS`: the dashboard on Bokeh's own server (the same directory app `bokeh serve` runs)."""

from __future__ import annotations

import argparse
import errno
import logging
import socket

from attnatlas.errors import AtlasError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="explore an atlas in the browser", description=__doc__)
    p.add_argument("atlas", help="atlas folder written by `attnatlas extract` and `attnatlas project`")
    p.add_argument("--port", type=int, default=5006, help="port (default 5006; 0 picks a free one)")
    p.add_argument("--address", default="127.0.0.1", help="interface to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--show", action="store_true", help="open the dashboard in a web browser")
    p.add_argument("--allow-origin", action="append", default=[], metavar="HOST[:PORT]",
                   help="extra host allowed to open the websocket (when served behind a proxy)")
    p.add_argument("--live", action="store_true",
                   help="start a worker process that runs the atlas's models, so the dashboard can place your own "
                        "text or image into every head (off by default; the dashboard itself never loads a model)")
    p.set_defaults(func=run)


def _free_port(address: str) -> int:
    with socket.socket(_family(address)) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def check_listen(address: str, port: int) -> None:
    """AtlasError unless `port` is a port number and `address` is an interface of this machine that is
    free to bind, so a mistake is one message instead of a traceback from inside the server."""
    if not 0 <= port <= 65535:
        raise AtlasError(f"--port {port} is not a port number; use 1-65535 (or 0 to pick a free one).")
    try:
        infos = socket.getaddrinfo(address, port or None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AtlasError(f"--address {address!r} is not an address or host name here ({exc.strerror}).") from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as exc:
            why = exc.strerror or str(exc)
            if exc.errno == errno.EADDRNOTAVAIL:
                why += " (it is not an address of this machine)"
            raise AtlasError(f"cannot listen on {address}:{port}: {why}; try another --address or --port.") from None


def make_server(atlas: str, port: int = 5006, address: str = "127.0.0.1", allow_origin: list[str] | None = None,
                live: bool = False):
    """A started-but-not-running Bokeh server for the directory app. Checks the atlas first, so a bad path
    fails here with one clear message instead of inside the server."""
    from bokeh.application import Application
    from bokeh.application.handlers import DirectoryHandler
    from bokeh.server.server import Server

    from attnatlas.app import APP_DIR
    from attnatlas.app.data import AppData

    AppData(atlas)  # raises StoreError with a readable message
    check_listen(address, port)
    if port == 0:
        port = _free_port(address)
    handler = DirectoryHandler(filename=str(APP_DIR), argv=[str(atlas), *(["--live"] if live else [])])
    if handler.failed:
        raise AtlasError(f"the dashboard app failed to load: {handler.error}")
    hosts = {f"{address}:{port}", f"localhost:{port}", f"127.0.0.1:{port}", *(allow_origin or [])}
    try:
        server = Server({"/": Application(handler)}, port=port, address=address, allow_websocket_origin=sorted(hosts),
                        num_procs=1)
    except OSError as exc:
        raise AtlasError(f"cannot listen on {address}:{port}: {exc.strerror or exc}; try another --port.") from None
    return server, port


def run(args: argparse.Namespace) -> int:
    server, port = make_server(args.atlas, args.port, args.address, args.allow_origin, live=args.live)
    server.start()
    host = "localhost" if args.address in ("127.0.0.1", "0.0.0.0", "::") else args.address
    url = f"http://{host}:{port}/"
    live = "; live placement on (a worker process loads each model on its first request)" if args.live else ""
    print(f"attnatlas dashboard: {url}  (Ctrl+C stops it){live}", flush=True)
    if args.show:
        server.io_loop.add_callback(server.show, "/")
    try:
        server.io_loop.start()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
