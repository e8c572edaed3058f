"""Serve the browser page for one mpismoe-edge export on 127.0.0.1 (standard library only).

    cd examples/browser && npm ci          # once: transformers.js and its onnxruntime-web (package-lock.json)
    python examples/browser/serve.py EXPORT_DIR [--port 8000] [--name NAME]

then open http://127.0.0.1:8000/. The page (index.html, app.js) loads the export with transformers.js,
which runs it with onnxruntime-web's wasm build; every file comes from this server:

    /                    index.html, app.js (this folder)
    /page.json           what the page loads: the model's name, task, target and pipeline, and the routes below
    /models/NAME/...     the export folder (NAME: --name, default the folder's name)
    /vendor/transformers/  @huggingface/transformers' dist folder (from node_modules here)
    /vendor/ort/         the dist folder of the onnxruntime-web build transformers.js was made with

Exit status: 0 stopped (Ctrl-C); 2 bad input (not a text export, node_modules missing, port taken),
one ``error: ...`` line.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import re
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

HERE = Path(__file__).resolve().parent
PAGE_FILES = ("index.html", "app.js")
MODELS, TRANSFORMERS, ORT = "/models/", "/vendor/transformers/", "/vendor/ort/"
TRANSFORMERS_PACKAGE = "@huggingface/transformers"
TRANSFORMERS_MODULE = "transformers.js"  # the dist file with onnxruntime-web bundled (no bare imports)
# the files transformers.js reads from an export (Hugging Face's ONNX layout, export/hf_layout.py)
NEEDED = ("config.json", "tokenizer.json", "tokenizer_config.json", "onnx/model.onnx")
TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json"}
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


class UsageError(Exception):
    """Bad input: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line (argparse would print the usage too)
        raise UsageError(message)


def vendor_dirs(node_modules: Path) -> tuple[Path, Path]:
    """(transformers.js dist, the matching onnxruntime-web dist) under ``node_modules``."""
    package = node_modules / TRANSFORMERS_PACKAGE
    if not (package / "dist" / TRANSFORMERS_MODULE).is_file():
        raise UsageError(f"{TRANSFORMERS_PACKAGE} is not installed in {node_modules} (cd {HERE} && npm ci)")
    wanted = json.loads((package / "package.json").read_text(encoding="utf-8"))["dependencies"]["onnxruntime-web"]
    for candidate in (package / "node_modules" / "onnxruntime-web", node_modules / "onnxruntime-web"):
        meta = candidate / "package.json"
        if meta.is_file() and json.loads(meta.read_text(encoding="utf-8")).get("version") == wanted:
            return package / "dist", candidate / "dist"
    raise UsageError(
        f"onnxruntime-web {wanted} (what {TRANSFORMERS_PACKAGE} needs) is not installed (cd {HERE} && npm ci)"
    )


def page_settings(export: Path, name: str) -> dict:
    """What /page.json tells the page; UsageError unless ``export`` is a text export transformers.js reads."""
    from mpismoe_edge.runtime.manifest import load_manifest
    from mpismoe_edge.runtime.spec import DATA_FILE, MODEL_DIR, TEXT_INPUTS
    from mpismoe_edge.runtime.tasks import kind

    try:
        manifest = load_manifest(export)
    except (OSError, ValueError) as e:
        raise UsageError(f"{export}: not an mpismoe-edge export ({e})") from None
    missing = [f for f in NEEDED if not (export / f).is_file()]
    if missing:
        raise UsageError(f"{export}: {', '.join(missing)} missing (an export older than the Hugging Face layout?)")
    if not set(manifest.inputs) <= set(TEXT_INPUTS):
        raise UsageError(f"{export}: the page runs text exports; this one takes {', '.join(manifest.inputs)}")
    if (export / MODEL_DIR / DATA_FILE).exists():
        raise UsageError(f"{export}: transformers.js cannot read external weights ({MODEL_DIR}/{DATA_FILE})")
    return {
        "model": name,
        "task": manifest.task,
        "labels": list(manifest.labels or []),
        "target": manifest.target,
        "runtimes": list(manifest.raw.get("runtimes") or []),
        "pipeline": kind(manifest.task).pipeline,
        "models": MODELS,
        "transformers": f"{TRANSFORMERS}{TRANSFORMERS_MODULE}",
        "wasm": ORT,
    }


def make_handler(routes: dict[str, Path], page: bytes, verbose: bool = False):
    """A request handler serving ``page`` at /page.json, this folder's page files, and each
    ``routes`` prefix from its folder (GET and HEAD; nothing outside those folders)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "mpismoe-edge-page"

        def log_message(self, format, *args):  # noqa: A002 (the base class's name)
            if verbose:
                super().log_message(format, *args)

        def _resolve(self, path: str) -> Path | bytes | None:
            if path in ("/", "/index.html"):
                return HERE / "index.html"
            if path == "/page.json":
                return page
            if path.lstrip("/") in PAGE_FILES:
                return HERE / path.lstrip("/")
            for prefix, root in routes.items():
                if path.startswith(prefix):
                    target = (root / path[len(prefix) :]).resolve()
                    inside = os.path.commonpath([target, root.resolve()]) == str(root.resolve())
                    return target if inside and target.is_file() else None
            return None

        def _send(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            found = self._resolve(path)
            if found is None:
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            data = found if isinstance(found, bytes) else found.read_bytes()
            kind = "application/json" if isinstance(found, bytes) else None
            if kind is None:
                kind = TYPES.get(found.suffix) or mimetypes.guess_type(found.name)[0] or "application/octet-stream"
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            # cross-origin isolation: onnxruntime-web may then run its wasm on several threads
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's name)
            self._send(body=True)

        def do_HEAD(self):  # noqa: N802
            self._send(body=False)

    return Handler


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="serve.py", description="Serve the browser page for one mpismoe-edge export (transformers.js, wasm)."
    )
    p.add_argument("export", type=Path, help="an export folder (mpismoe-export -o EXPORT_DIR)")
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--name", help="the model's name in the page's URLs (default: the export folder's name)")
    p.add_argument(
        "--node-modules", type=Path, default=HERE / "node_modules", help="where npm ci put the packages (default: here)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        export = args.export.resolve()
        name = args.name or export.name
        if not _NAME.match(name):
            raise UsageError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (--name)")
        settings = page_settings(export, name)
        transformers_dist, ort_dist = vendor_dirs(args.node_modules)
        handler = make_handler(
            {f"{MODELS}{name}/": export, TRANSFORMERS: transformers_dist, ORT: ort_dist},
            json.dumps(settings).encode(),
            args.verbose,
        )
        try:
            server = ThreadingHTTPServer((args.host, args.port), handler)
        except OSError as e:
            raise UsageError(
                f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another --port"
            ) from None
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    host, port = server.server_address[:2]
    if "transformers.js" not in settings["runtimes"]:
        print(f"warning: target {settings['target']} does not list transformers.js among its runtimes", file=sys.stderr)
    print(f"serving http://{host}:{port}/ ({name}: {settings['task']}, {export}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
