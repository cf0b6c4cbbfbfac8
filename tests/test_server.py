"""The inference server eval=nemo starts: transformers serve on the tiny model, for real."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest

from conftest import typed_config
from lmalign import models
from lmalign.evaluation import server


def _tiny_model(cache: Path) -> str:
    return models.resolve(typed_config().model, str(cache))


def _group_gone(pid: int) -> bool:
    return not server.group_alive(pid)


def _nothing_listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.slow  # a real server starts and answers: about 20 s
def test_transformers_server_answers_then_stops_on_ctrl_c_leaving_nothing(tmp_path, lmalign_cache):
    model = _tiny_model(lmalign_cache)
    launch = server.Launch("transformers", model, model, "cpu", dtype="float32")
    log = tmp_path / "server.log"
    with pytest.raises(KeyboardInterrupt):
        with server.serving(launch, log, startup_timeout=180) as running:
            request = urllib.request.Request(
                f"{running.base_url}/chat/completions", headers={"Content-Type": "application/json"},
                data=json.dumps({"model": model, "max_tokens": 4, "messages": [
                    {"role": "user", "content": "What is 2 + 3?"}]}).encode())
            with urllib.request.urlopen(request, timeout=120) as answer:
                reply = json.load(answer)
            port = int(running.base_url.rsplit(":", 1)[1].split("/")[0])
            raise KeyboardInterrupt  # the user's Ctrl-C while benchmarks run
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["completion_tokens"] > 0
    assert _group_gone(running.pid) and _nothing_listens(port)
    text = log.read_text()
    assert text.startswith("$ ") and "--host 127.0.0.1" in text and "/chat/completions" in text


def test_a_server_that_dies_while_starting_is_reported_with_its_log(tmp_path):
    launch = server.Launch("transformers", str(tmp_path / "no-such-model"), "m", "cpu",
                           extra_args=("--no-such-flag",))
    with pytest.raises(server.ServerFailed, match=r"(?s)the transformers server exited with "
                       r"status 2 while starting; its log \(.*server.log\) ends:\n.*--port"):
        with server.serving(launch, tmp_path / "server.log", startup_timeout=120):
            pass
    assert "No such option '--no-such-flag'" in (tmp_path / "server.log").read_text()
