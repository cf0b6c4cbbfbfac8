"""tests/hub_server.py serves repos well enough for the real huggingface_hub / datasets /
transformers download code, and leaves a cache that loads with HF_HUB_OFFLINE=1.

The libraries read HF_ENDPOINT and HF_HUB_OFFLINE when imported, so every download and every
offline load runs in a fresh `python -c` with its own environment; the server runs here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hub_server import HubServer, write_parquet_dataset_repo, write_tiny_model_repo

MODEL = "tiny/llama"
ARC = "allenai/ai2_arc"  # configs in README.md, like the real one
PLAIN = "plain/qa"  # no README: data/{train,test}-00000-of-00001.parquet


def rows(n: int, tag: str) -> list[dict]:
    return [{"question": f"{tag} question {i}", "choices": ["a", "b"], "answer": i % 2}
            for i in range(n)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    write_tiny_model_repo(root / "models" / MODEL)
    write_parquet_dataset_repo(root / "datasets" / ARC, {
        "ARC-Easy": {"train": rows(8, "easy"), "test": rows(4, "easy test")},
        "ARC-Challenge": {"train": rows(6, "hard"), "test": rows(3, "hard test")}})
    write_parquet_dataset_repo(root / "datasets" / PLAIN,
                               {"default": {"train": rows(5, "plain"), "test": rows(2, "pt")}},
                               readme=False)
    with HubServer(root) as server:
        yield server


def python(code: str, hub: HubServer, home: Path, offline: bool = False) -> dict:
    """Run `code` in a new interpreter against `hub` (or offline) with its caches under `home`;
    it ends by printing one JSON line, returned here."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home / "hf"),
           "HF_HUB_CACHE": str(home / "hub"), "HF_DATASETS_CACHE": str(home / "datasets"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HF_TOKEN", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_protocol_headers_and_ranges(hub):
    """What huggingface_hub relies on, by hand: a small file answered directly with its git blob
    id as ETag, an LFS file redirected to another origin with X-Linked-*, byte ranges."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    head = urllib.request.Request(f"{hub.url}/{MODEL}/resolve/main/config.json", method="HEAD")
    with opener.open(head) as response:
        commit, etag = response.headers["X-Repo-Commit"], response.headers["ETag"]
        size = int(response.headers["Content-Length"])
    assert len(commit) == 40 and len(etag) == 42 and size > 0
    assert "X-Xet-Hash" not in response.headers

    lfs = urllib.request.Request(f"{hub.url}/{MODEL}/resolve/main/model.safetensors", method="HEAD")
    with pytest.raises(urllib.error.HTTPError) as redirect:
        opener.open(lfs)
    assert redirect.value.code == 302
    location = redirect.value.headers["Location"]
    assert location.startswith(f"http://localhost:{hub.port}/")
    assert len(redirect.value.headers["X-Linked-Etag"]) == 66  # a quoted sha256
    total = int(redirect.value.headers["X-Linked-Size"])

    ranged = urllib.request.Request(location, headers={"Range": "bytes=100-"})
    with urllib.request.urlopen(ranged) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 100-{total - 1}/{total}"
        assert len(response.read()) == total - 100


def test_model_snapshot_then_offline_load(hub, tmp_path):
    online = python(f"""
        import json, os
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        partial = snapshot_download("{MODEL}", revision="main", allow_patterns=["*.json"],
                                    ignore_patterns=["generation_config.json"])
        partial = sorted(os.listdir(partial))
        path = snapshot_download("{MODEL}", revision="main")
        info = HfApi().model_info("{MODEL}", revision="main", files_metadata=True)
        sizes = {{s.rfilename: s.size for s in info.siblings}}
        config = hf_hub_download("{MODEL}", "config.json")
        print(json.dumps({{"partial": partial, "files": sorted(os.listdir(path)), "sizes": sizes,
                           "sha": info.sha, "config": config}}))
        """, hub, tmp_path)
    repo = hub.root / "models" / MODEL
    assert online["partial"] == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    assert online["files"] == sorted(p.name for p in repo.iterdir())
    assert online["sizes"] == {p.name: p.stat().st_size for p in repo.iterdir()}
    assert f"/snapshots/{online['sha']}/config.json" in online["config"]
    assert ("GET", f"/cdn-lfs/models/{MODEL}/model.safetensors") in hub.requests

    served = len(hub.requests)
    offline = python(f"""
        import json, torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        config = AutoConfig.from_pretrained("{MODEL}")
        tokenizer = AutoTokenizer.from_pretrained("{MODEL}")
        model = AutoModelForCausalLM.from_pretrained("{MODEL}")
        ids = tokenizer("the cat sat on the mat", return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits
        print(json.dumps({{"hidden": config.hidden_size, "ids": ids[0].tolist(),
                           "shape": list(logits.shape)}}))
        """, hub, tmp_path, offline=True)
    assert offline["hidden"] == 16
    assert len(offline["ids"]) == 6 and 0 not in offline["ids"]  # all known words, no <unk>
    assert offline["shape"][:2] == [1, 6]
    assert len(hub.requests) == served  # offline: not one request


LOAD_ALL = f"""
    import json
    from datasets import load_dataset
    out = {{}}
    for key, args, kwargs in [("easy", ("{ARC}", "ARC-Easy"), {{}}),
                              ("challenge", ("{ARC}", "ARC-Challenge"), {{"revision": "main"}}),
                              ("plain", ("{PLAIN}",), {{}})]:
        dataset = load_dataset(*args, **kwargs)
        out[key] = {{split: dataset[split].to_list() for split in dataset}}
    print(json.dumps(out))
    """


def test_datasets_load_then_offline_load(hub, tmp_path):
    online = python(LOAD_ALL, hub, tmp_path)
    assert online["easy"] == {"train": rows(8, "easy"), "test": rows(4, "easy test")}
    assert online["challenge"] == {"train": rows(6, "hard"), "test": rows(3, "hard test")}
    assert online["plain"] == {"train": rows(5, "plain"), "test": rows(2, "pt")}
    served = len(hub.requests)
    assert python(LOAD_ALL, hub, tmp_path, offline=True) == online
    assert len(hub.requests) == served


SNAPSHOT = f"""
    import json
    from huggingface_hub import snapshot_download
    try:
        snapshot_download("{MODEL}", revision="main")
        print(json.dumps("ok"))
    except Exception as error:
        print(json.dumps(f"{{type(error).__module__}}.{{type(error).__name__}}"))
    """


@pytest.mark.parametrize("inject, outcome", [
    # huggingface_hub retries a failed HEAD (/resolve/) once at once, then with backoff.
    (lambda hub: hub.fail("/resolve/", 500, method="HEAD"), "ok"),
    # The download itself (GET on the CDN) is not retried on 5xx...
    (lambda hub: hub.fail("/cdn-lfs/", 500), "huggingface_hub.errors.HfHubHTTPError"),
    # ... but is retried (after 1 s) when the connection closes early,
    (lambda hub: hub.drop("/cdn-lfs/", after_bytes=1000), "ok"),
    # yet not when it is reset, nor when the HEAD gets no answer.
    (lambda hub: hub.drop("/cdn-lfs/", after_bytes=1000, reset=True), "httpx2.ReadError"),
    (lambda hub: hub.drop("/resolve/", method="HEAD"), "httpx2.RemoteProtocolError"),
], ids=["head-500", "cdn-500", "cdn-closed-mid-body", "cdn-reset-mid-body", "head-no-answer"])
def test_injected_failures(hub, tmp_path, inject, outcome):
    inject(hub)
    assert python(SNAPSHOT, hub, tmp_path) == outcome
    assert not any(rule.times for rule in hub._rules)  # the failure did happen
    assert python(SNAPSHOT, hub, tmp_path) == "ok"  # and the next try succeeds
