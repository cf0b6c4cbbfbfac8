"""A local stand-in for the Hugging Face Hub, for tests of downloading and offline caching.

`HubServer(root)` serves the repositories found as plain files under `root/models/<org>/<name>/`
and `root/datasets/<org>/<name>/` on 127.0.0.1, closely enough to the real Hub that the real
download code of huggingface_hub, datasets and transformers works against it once
`HF_ENDPOINT=hub.url` is set (before those libraries are imported: they read it at import).

Each repository has one revision, "main", whose commit sha is derived from the repository's
content (paths and git blob ids), so it changes when a file does. The endpoints:

  GET  /api/{models,datasets}/<org>/<name>[/revision/<rev>]    repo info (siblings; ?blobs: sizes)
  GET  /api/{models,datasets}/<org>/<name>/tree/<rev>[/<dir>]  tree listing (?recursive=true)
  POST /api/{models,datasets}/<org>/<name>/paths-info/<rev>    info on the paths posted (form data)
  HEAD/GET /[datasets/]<org>/<name>/resolve/<rev>/<path>       a file
  HEAD/GET /cdn-lfs/{models,datasets}/<org>/<name>/<path>      the content of an LFS file

As on the Hub, a small file is answered directly (ETag = its git blob id) and an LFS file (by
suffix: weights, parquet, ...) is answered with a 302 to a "CDN" carrying X-Linked-Etag (its
sha256) and X-Linked-Size. The CDN is this same server reached as `localhost` rather than
127.0.0.1: another origin, so huggingface_hub treats it as the real Hub's CDN (it stops its HEAD
at the redirect and downloads from the Location). Every answer carries X-Repo-Commit; errors
carry the X-Error-Code the libraries map to exceptions (RepoNotFound, RevisionNotFound,
EntryNotFound). Files are sent with Content-Length and honour single `Range: bytes=a-[b]`
requests (huggingface_hub resumes an interrupted download that way). No Xet header is ever
sent, so downloads are plain HTTP. GET /api/agent-harnesses (huggingface_hub's agent
detection) answers an empty registry. The dataset viewer (datasets-server.<host>) is not served:
`datasets` asks it for exported dataset infos, fails to resolve that host, and does without.

`hub.fail(...)` and `hub.drop(...)` inject HTTP errors and dropped connections; `hub.requests`
lists every (method, path) received, in order, failed ones included (paths are unquoted and
without their query string; failures match on the same form).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

# Suffixes stored with Git LFS by the Hub's default .gitattributes (the ones our fixtures use).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".parquet", ".arrow", ".h5", ".msgpack")
REVISION = "main"
DATE = "2024-01-01T00:00:00.000Z"


@dataclass
class _Rule:
    substring: str
    method: str | None  # None: any method
    times: int
    status: int | None  # None: drop the connection
    after_bytes: int | None = None  # for a drop: send headers and this many body bytes first
    reset: bool = False  # for a drop: reset the connection (RST) rather than close it (FIN)


class HubServer:
    """Serves `root` as the Hub would, on a free port, from a background thread."""

    def __init__(self, root: Path | str, lfs_suffixes: tuple[str, ...] = LFS_SUFFIXES):
        self.root = Path(root)
        self.lfs_suffixes = lfs_suffixes
        self.requests: list[tuple[str, str]] = []
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._digests: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cdn_url = f"http://localhost:{self.port}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def fail(self, path_substring: str, status: int = 500, times: int = 1,
             method: str | None = None) -> None:
        """The next `times` requests whose path contains `path_substring` (and whose method is
        `method`, if given: "HEAD", "GET", "POST") answer HTTP `status`."""
        with self._lock:
            self._rules.append(_Rule(path_substring, method, times, status))

    def drop(self, path_substring: str, times: int = 1, after_bytes: int | None = None,
             method: str | None = None, reset: bool = False) -> None:
        """The next `times` matching requests lose their connection: at once, without an answer,
        or (`after_bytes`, never a HEAD) after the headers and that many bytes of the body. The
        server closes it (the client reads end-of-stream), or with `reset` resets it (RST)."""
        with self._lock:
            self._rules.append(_Rule(path_substring, method, times, None, after_bytes, reset))

    def heal(self) -> None:
        """Forget every failure still pending: the hub is healthy again."""
        with self._lock:
            self._rules.clear()

    def _take_rule(self, method: str, path: str) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if (rule.times > 0 and rule.substring in path and rule.method in (None, method)
                        and not (method == "HEAD" and rule.after_bytes is not None)):
                    rule.times -= 1
                    return rule
        return None

    # --- repository content -------------------------------------------------------------------

    def repo_dir(self, kind: str, repo_id: str) -> Path | None:
        path = self.root / kind / repo_id
        return path if path.is_dir() else None

    def files(self, repo: Path) -> dict[str, Path]:
        return {p.relative_to(repo).as_posix(): p for p in sorted(repo.rglob("*")) if p.is_file()}

    def digests(self, path: Path) -> tuple[str, str]:
        """(git blob sha1, sha256) of a file, cached while its size and mtime stay the same."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            blob, sha256 = hashlib.sha1(b"blob %d\0" % stat.st_size), hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    blob.update(chunk)
                    sha256.update(chunk)
            self._digests[key] = (blob.hexdigest(), sha256.hexdigest())
        return self._digests[key]

    def commit(self, repo: Path) -> str:
        """A fake commit sha: a hash of the repo's paths and contents."""
        summary = "".join(f"{name}\0{self.digests(p)[0]}\n" for name, p in self.files(repo).items())
        return hashlib.sha1(summary.encode()).hexdigest()

    def is_lfs(self, name: str) -> bool:
        return name.endswith(self.lfs_suffixes)

    def entry(self, repo: Path, name: str, expand: bool = False) -> dict:
        """A tree / paths-info entry, shaped as the Hub's (a file or a directory)."""
        path = repo / name
        info: dict = {"path": name}
        if path.is_dir():
            info.update(type="directory", size=0, oid=hashlib.sha1(name.encode()).hexdigest())
        else:
            blob, sha256 = self.digests(path)
            size = path.stat().st_size
            info.update(type="file", size=size, oid=blob)
            if self.is_lfs(name):
                pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
                           f"size {size}\n").encode()
                # The git blob of an LFS file is its pointer, not its content.
                info["oid"] = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
                info["lfs"] = {"oid": sha256, "size": size, "pointerSize": len(pointer)}
        if expand:
            info["lastCommit"] = {"id": self.commit(repo), "title": "Upload", "date": DATE}
        return info


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the libraries' connection pools expect
    server: ThreadingHTTPServer

    def log_message(self, format, *args) -> None:  # noqa: A002 - keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        hub: HubServer = self.server.hub
        raw_path, _, query = self.path.partition("?")
        # Segments are unquoted one by one: a revision or a tree path may hold a quoted "/".
        segments = [unquote(s) for s in raw_path.strip("/").split("/")]
        path = "/" + "/".join(segments)
        self.drop_rule = None
        if ".." in segments:  # stay inside root
            return self._error(400, None, "no '..' in paths")
        self.query = {k: v[-1] for k, v in parse_qs(query).items()}
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with hub._lock:
            hub.requests.append((self.command, path))
        self.drop_rule = rule = hub._take_rule(self.command, path)
        if rule is not None and rule.status is not None:
            return self._error(rule.status, None, f"injected HTTP {rule.status}")
        if rule is not None and rule.after_bytes is None:
            return self._hang_up()  # answer nothing
        try:
            self._route(hub, segments)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _route(self, hub: HubServer, seg: list[str]) -> None:
        if seg == ["api", "agent-harnesses"]:  # huggingface_hub's agent detection: know none
            return self._json({"standardEnvVars": [], "harnesses": {}}, None)
        if seg[0] == "api" and len(seg) >= 4 and seg[1] in ("models", "datasets"):
            kind, repo_id, rest = seg[1], "/".join(seg[2:4]), seg[4:]
            if rest[:1] == ["revision"] and len(rest) == 2:
                return self._repo_info(hub, kind, repo_id, rest[1])
            if not rest:
                return self._repo_info(hub, kind, repo_id, REVISION)
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(hub, kind, repo_id, rest[1], "/".join(rest[2:]))
            if rest[0] == "paths-info" and len(rest) == 2 and self.command == "POST":
                return self._paths_info(hub, kind, repo_id, rest[1])
        if seg[0] == "cdn-lfs" and len(seg) >= 5:
            repo = hub.repo_dir(seg[1], "/".join(seg[2:4]))
            file = repo / "/".join(seg[4:]) if repo else None
            if file is not None and file.is_file():
                return self._send_file(file, {"ETag": f'"{hub.digests(file)[1]}"'})
            return self._error(404, "EntryNotFound", "no such LFS object")
        kind, seg = ("datasets", seg[1:]) if seg[0] == "datasets" else ("models", seg)
        if len(seg) >= 5 and seg[2] == "resolve":
            return self._resolve(hub, kind, "/".join(seg[:2]), seg[3], "/".join(seg[4:]))
        self._error(404, None, "no such endpoint")

    def _repo(self, hub: HubServer, kind: str, repo_id: str, revision: str):
        """The repo's directory and commit, or None after answering the Hub's 404."""
        repo = hub.repo_dir(kind, repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        commit = hub.commit(repo)
        if revision not in (REVISION, commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", commit)
            return None
        return repo, commit

    def _repo_info(self, hub: HubServer, kind: str, repo_id: str, revision: str) -> None:
        if (found := self._repo(hub, kind, repo_id, revision)) is None:
            return
        repo, commit = found
        blobs = self.query.get("blobs", "").lower() == "true"
        siblings = []
        for name in hub.files(repo):
            sibling: dict = {"rfilename": name}
            if blobs:  # `files_metadata=True`: sizes, blob ids and LFS info, keys as the Hub's
                entry = hub.entry(repo, name)
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in entry:
                    lfs = entry["lfs"]
                    sibling["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"],
                                      "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        org = repo_id.split("/")[0]
        info = {"_id": commit[:24], "id": repo_id, "author": org, "sha": commit,
                "lastModified": DATE, "createdAt": DATE, "private": False, "gated": False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "usedStorage": sum(p.stat().st_size for p in hub.files(repo).values())}
        if kind == "models":
            info.update(modelId=repo_id, library_name="transformers")
        self._json(info, commit)

    def _tree(self, hub: HubServer, kind: str, repo_id: str, revision: str, sub: str) -> None:
        if (found := self._repo(hub, kind, repo_id, revision)) is None:
            return
        repo, commit = found
        base = repo / sub
        if not base.is_dir():
            return self._error(404, "EntryNotFound", f"{sub} does not exist on {revision}", commit)
        recursive = self.query.get("recursive", "").lower() == "true"
        expand = self.query.get("expand", "").lower() == "true"
        children = base.rglob("*") if recursive else base.iterdir()
        # One page with everything: no `Link: <...>; rel="next"` header, so no pagination.
        self._json([hub.entry(repo, p.relative_to(repo).as_posix(), expand)
                    for p in sorted(children)], commit)

    def _paths_info(self, hub: HubServer, kind: str, repo_id: str, revision: str) -> None:
        if (found := self._repo(hub, kind, repo_id, revision)) is None:
            return
        repo, commit = found
        form = parse_qs(self.body.decode())
        expand = form.get("expand", ["false"])[-1].lower() == "true"
        # Paths that do not exist are left out of the answer, as the Hub does.
        self._json([hub.entry(repo, p.strip("/"), expand) for p in form.get("paths", [])
                    if (repo / p.strip("/")).exists()], commit)

    def _resolve(self, hub: HubServer, kind: str, repo_id: str, revision: str, name: str) -> None:
        if (found := self._repo(hub, kind, repo_id, revision)) is None:
            return
        repo, commit = found
        file = repo / name
        if not file.is_file():  # X-Repo-Commit lets huggingface_hub cache the absence (.no_exist)
            return self._error(404, "EntryNotFound", f"{name} does not exist on {revision}", commit)
        entry = hub.entry(repo, name)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{entry["oid"]}"'}
        if "lfs" in entry:
            headers.update({"X-Linked-Etag": f'"{entry["lfs"]["oid"]}"',
                            "X-Linked-Size": str(entry["size"]),
                            "Location": f"{hub.cdn_url}/cdn-lfs/{kind}/{repo_id}/{name}"})
            return self._send(302, headers, b"")
        self._send_file(file, headers)

    # --- answers -------------------------------------------------------------------------------

    def _send_file(self, file: Path, headers: dict[str, str]) -> None:
        size = file.stat().st_size
        start, end, status = 0, size, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:  # a resumed download asks for the rest of the file
            start = int(match[1])
            end = min(size, int(match[2]) + 1) if match[2] else size
            if start >= size:
                return self._send(416, {"Content-Range": f"bytes */{size}"}, b"")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers.update({"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                        "Content-Disposition": f'inline; filename="{file.name}"'})
        self._send(status, headers, (file, start, end))

    def _json(self, data, commit: str | None) -> None:
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(200, headers, json.dumps(data).encode())

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None):
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, headers, json.dumps({"error": message}).encode())

    def _send(self, status: int, headers: dict[str, str], body) -> None:
        """Send an answer whose body is bytes or a (file, start, end) slice, streamed; cut it
        short and close the connection if a drop(after_bytes=...) rule matched."""
        length = len(body) if isinstance(body, bytes) else body[2] - body[1]
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(length)}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        cut = self.drop_rule.after_bytes if self.drop_rule else None
        budget = length if cut is None else min(length, cut)
        if isinstance(body, bytes):
            self.wfile.write(body[:budget])
        else:
            file, start, _ = body
            with open(file, "rb") as handle:
                handle.seek(start)
                while budget > 0 and (chunk := handle.read(min(budget, 1 << 20))):
                    self.wfile.write(chunk)
                    budget -= len(chunk)
        if cut is not None:
            self._hang_up()  # a connection lost mid-body

    def _hang_up(self) -> None:
        self.wfile.flush()
        if self.drop_rule.reset:  # linger 0: closing sends RST, not FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()  # really closed once the handler's files are (in finish())
        else:
            self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True


# --- fixture repositories ------------------------------------------------------------------------

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "the answer is four",
             "what is two plus two", "hello world this is a test"]


def write_tiny_model_repo(directory: Path | str) -> Path:
    """A tiny Llama (one layer, hidden size 16) and a real word-level tokenizer, saved as
    `save_pretrained` would (config.json, model.safetensors, tokenizer.json, ...)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def write_parquet_dataset_repo(directory: Path | str, configs: dict[str, dict[str, list[dict]]],
                               readme: bool = True) -> Path:
    """A dataset repo of parquet files, {config: {split: rows}}. With `readme`, laid out like
    allenai/ai2_arc: `<config>/<split>-00000-of-00001.parquet` and a README.md whose YAML
    `configs:` maps each config's splits to them. Without, like a plain upload: one config
    only (its name is unused; `datasets` calls it "default"), `data/<split>-00000-of-00001.parquet`,
    splits inferred from the file names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    if not readme and len(configs) != 1:
        raise ValueError("a repo without README.md holds exactly one config")
    yaml = ["---", "configs:"]
    for config, splits in configs.items():
        folder = config if readme else "data"
        yaml += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            path = directory / folder / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), path)
            yaml += [f"  - split: {split}", f"    path: {folder}/{split}-*"]
    if readme:
        (directory / "README.md").write_text("\n".join(yaml + ["---", "", "# A test dataset", ""]))
    return directory
