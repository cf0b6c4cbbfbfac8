"""Offline clusters: stage=cache_plan against lm-eval's real task registry; cache_prepare with
the real huggingface_hub and datasets download code against a local hub on 127.0.0.1 (with
injected failures); cache_verify on the prepared cache, its unpacked pack and a damaged copy;
offline=true runs under a guard that records any connection beyond loopback."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import guarded, lmalign
from hub_server import HubServer, write_parquet_dataset_repo

# The run the cache is for: the embedded tiny model and tiny chats, published on the local hub,
# trained briefly, then evaluated on arc_easy (a real lm-eval task whose dataset is on the hub
# as allenai/ai2_arc) and tiny_mc (generated locally).
RUN = ("model=tiny", "model.source=pretrained", "model.name_or_path=lmalign-test/tiny",
       "model.revision=main", "dataset=tulu3_sft_mixture", "dataset.path=lmalign-test/tiny-chat",
       "dataset.eval_size=0", "method.max_steps=3", "method.eval_steps=null",
       "eval.harness.tasks=[arc_easy,tiny_mc]", "eval.harness.limit=8", "eval.harness.apply_chat_template=false")


@pytest.mark.slow  # a whole lmalign command with lm-eval's task scan
def test_plan_expands_lm_eval_groups_without_network(tmp_path, lmalign_cache):
    cache, log = tmp_path / "cache", tmp_path / "network.log"
    result = lmalign("stage=cache_plan", "eval.harness.tasks=[mmlu,hellaswag,arc_easy]",
                     "model=smollm2_1.7b", f"cache.dir={cache}", cwd=tmp_path,
                     cache=lmalign_cache, env=guarded(log), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not log.exists(), log.read_text()
    manifest = json.loads((cache / "manifest.json").read_text())
    mmlu = manifest["tasks"]["mmlu"]
    assert len(mmlu) == 57 and all(key.startswith("dataset:cais/mmlu:") for key in mmlu)
    assert {"dataset:cais/mmlu:abstract_algebra", "dataset:cais/mmlu:world_religions"} <= set(mmlu)
    assert manifest["tasks"]["hellaswag"] == ["dataset:Rowan/hellaswag"]
    assert manifest["tasks"]["arc_easy"] == ["dataset:allenai/ai2_arc:ARC-Easy"]
    keys = [item["kind"] + ":" + item["repo"] for item in manifest["items"]]
    assert keys.count("model:HuggingFaceTB/SmolLM2-1.7B") == 1 and len(keys) == 60
    arc = next(i for i in manifest["items"] if i["repo"] == "allenai/ai2_arc")
    assert arc["splits"] == ["train", "validation", "test"] and arc["needed_by"] == ["arc_easy"]
    for shown in ("HuggingFaceTB/SmolLM2-1.7B", "cais/mmlu (abstract_algebra)",
                  "Rowan/hellaswag", "allenai/ai2_arc (ARC-Easy)", "mmlu -> 57 dataset(s)"):
        assert shown in result.stdout
    assert not (tmp_path / "outputs").exists()  # a plan leaves no run directory behind


def _arc_rows(count: int, offset: int) -> list[dict]:
    return [{"id": f"q{offset + i}", "question": f"What is {i} plus {offset}?",
             "choices": {"text": [str(i + offset + d) for d in range(4)],
                         "label": ["A", "B", "C", "D"]}, "answerKey": "A"}
            for i in range(count)]


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory, lmalign_cache) -> Path:
    """A local hub holding the run's model, its chats and ai2_arc's ARC-Easy config."""
    from lmalign import embedded, tinytask
    from omegaconf import OmegaConf

    root = tmp_path_factory.mktemp("hub")
    tiny = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf/model/tiny.yaml")
    built = embedded.materialize("tiny", OmegaConf.to_container(tiny.architecture), 0,
                                 lmalign_cache)
    shutil.copytree(built, root / "models/lmalign-test/tiny")
    chats = [tinytask.as_messages(r, i) for i, r in enumerate(tinytask.generate("train", 96))]
    write_parquet_dataset_repo(root / "datasets/lmalign-test/tiny-chat",
                               {"default": {"train": chats}}, readme=False)
    write_parquet_dataset_repo(root / "datasets/allenai/ai2_arc", {"ARC-Easy": {
        "train": _arc_rows(12, 0), "validation": _arc_rows(8, 100), "test": _arc_rows(10, 200)}})
    return root


@pytest.fixture(scope="module")
def prepared(hub_root, tmp_path_factory, lmalign_cache):
    """cache_prepare twice: first with failures injected (two transient, one that persists),
    then again with the hub healthy, packing the cache into parts."""
    workdir = tmp_path_factory.mktemp("prepare")
    cache = workdir / "lmalign-cache"
    with HubServer(hub_root) as hub:
        env = {"HF_ENDPOINT": hub.url}
        # Failures huggingface_hub does not retry by itself (measured: tests/hub_server.py).
        hub.fail("/api/models/lmalign-test/tiny/revision/main", status=500, times=1)
        hub.drop("ARC-Easy/test-00000-of-00001.parquet", times=1, reset=True)
        hub.fail("/api/datasets/lmalign-test/tiny-chat", status=500, times=1000)  # all run long
        first = lmalign(*RUN, "stage=cache_prepare", f"cache.dir={cache}", "cache.retries=1",
                        cwd=workdir, cache=lmalign_cache, env=env, timeout=300)
        first_requests = list(hub.requests)
        hub.heal()
        hub.requests.clear()
        second = lmalign(*RUN, "stage=cache_prepare", f"cache.dir={cache}", "cache.pack=true",
                         "cache.pack_part_gib=0.0002", cwd=workdir, cache=lmalign_cache,
                         env=env, timeout=300)
        second_requests = list(hub.requests)
    return cache, first, first_requests, second, second_requests


@pytest.mark.slow
def test_prepare_retries_fetches_only_what_is_missing_and_summarises(prepared):
    cache, first, first_requests, second, second_requests = prepared
    # The chats' repo failed on every attempt: the others were fetched, the run says which
    # failed and why, and exits 1 (an incomplete cache).
    assert first.returncode == 1, first.stderr[-3000:]
    manifest_after_first = first.stdout
    assert "failed: dataset lmalign-test/tiny-chat" in manifest_after_first
    assert "2 of 3 item(s)" in manifest_after_first
    assert "error: 1 item(s) could not be fetched" in first.stderr
    # Transient failures were retried: the 500 and the reset connection were asked again.
    assert "[1/3] model lmalign-test/tiny @ main\n  attempt 1 failed (HfHubHTTPError" in first.stdout, first.stdout
    assert "ReadError" in first.stdout  # the reset download of ARC-Easy's test split
    info = [p for _, p in first_requests if p == "/api/models/lmalign-test/tiny/revision/main"]
    arc_test = [p for _, p in first_requests if p.endswith("ARC-Easy/test-00000-of-00001.parquet")]
    assert len(info) >= 2 and len(arc_test) >= 2
    # The second run fetched only the missing item and completed the manifest.
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1 to fetch" in second.stdout
    assert not [p for _, p in second_requests if "lmalign-test/tiny/" in p or "ai2_arc" in p]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["prepare"]["total"] == 3 and manifest["prepare"]["failed"] == []
    assert manifest["versions"]["datasets"] and manifest["versions"]["huggingface_hub"]
    chats = next(i for i in manifest["items"] if i["repo"] == "lmalign-test/tiny-chat")
    assert chats["status"] == "done" and chats["rows"] == {"train": 96}
    arc = next(i for i in manifest["items"] if i["repo"] == "allenai/ai2_arc")
    assert arc["rows"] == {"train": 12, "validation": 8, "test": 10}
    model = next(i for i in manifest["items"] if i["kind"] == "model")
    assert {Path(f["path"]).name for f in model["files"]} >= {"config.json", "model.safetensors",
                                                             "tokenizer.json"}
    assert manifest["tasks"] == {"arc_easy": ["dataset:allenai/ai2_arc:ARC-Easy"], "tiny_mc": []}


def _unpack(prepared_cache: Path, into: Path) -> Path:
    """What a user does on the cluster with the parts cache_prepare packed."""
    parts = sorted(prepared_cache.parent.glob("lmalign-cache.tar.gz.part-*"))
    assert len(parts) > 1  # split at 0.0002 GiB
    into.mkdir()
    subprocess.run(f"cat {' '.join(map(str, parts))} | tar xz", shell=True, cwd=into, check=True)
    return into / "lmalign-cache"


@pytest.fixture(scope="module")
def cluster_cache(prepared, tmp_path_factory) -> Path:
    return _unpack(prepared[0], tmp_path_factory.mktemp("cluster") / "unpacked")


@pytest.mark.slow
def test_verify_loads_the_unpacked_cache_and_names_damage(cluster_cache, tmp_path,
                                                          lmalign_cache):
    log = tmp_path / "network.log"
    ok = lmalign("stage=cache_verify", f"cache.dir={cluster_cache}", cwd=tmp_path,
                 cache=lmalign_cache, env=guarded(log), timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "all 3 item(s) load offline" in ok.stdout and not log.exists()

    broken = tmp_path / "broken"
    shutil.copytree(cluster_cache, broken, symlinks=True)
    manifest = json.loads((broken / "manifest.json").read_text())
    chats = next(i for i in manifest["items"] if i["repo"] == "lmalign-test/tiny-chat")
    removed = chats["files"][0]["path"]
    (broken / removed).unlink()
    model = next(i for i in manifest["items"] if i["kind"] == "model")
    weights = next(f["path"] for f in model["files"] if f["path"].endswith("model.safetensors"))
    blob = (broken / weights).resolve()
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    bad = lmalign("stage=cache_verify", f"cache.dir={broken}", cwd=tmp_path, cache=lmalign_cache,
                  env=guarded(log), timeout=300)
    assert bad.returncode == 1, bad.stderr[-3000:]
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert any(f"missing file {removed}" in line and "tiny-chat" in line for line in errors)
    assert any("truncated or corrupt safetensors file" in line and "model.safetensors" in line
               for line in errors)
    assert "stage=cache_prepare" in errors[-1] and "Traceback" not in bad.stderr
    assert not log.exists()


@pytest.mark.slow
def test_offline_run_trains_and_evaluates_from_the_cache_alone(cluster_cache, tmp_path,
                                                               lmalign_cache):
    log = tmp_path / "network.log"
    result = lmalign(*RUN, "offline=true", f"cache.dir={cluster_cache}", "run_name=offline",
                     cwd=tmp_path, cache=lmalign_cache, env=guarded(log), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert not log.exists(), log.read_text()  # not one connection beyond loopback was tried
    run = tmp_path / "runs" / "offline"
    assert (run / "final" / "model.safetensors").exists()
    metrics = (run / "metrics.csv").read_text()
    assert "arc_easy" in metrics and "tiny_mc" in metrics


@pytest.mark.slow
def test_offline_run_missing_from_the_cache_exits_2_naming_the_prepare(cluster_cache, tmp_path,
                                                                       lmalign_cache):
    result = lmalign("stage=eval", "model=smollm2_1.7b", "eval.harness.tasks=[arc_easy]", "offline=true",
                     f"cache.dir={cluster_cache}", cwd=tmp_path, cache=lmalign_cache,
                     timeout=60)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: model.name_or_path=")
    assert "model HuggingFaceTB/SmolLM2-1.7B @ main is not in the offline cache" in errors[0]
    # The fix is the prepare of this very run: its overrides, less offline, stage and cache.dir.
    assert errors[0].endswith(f"fix: on a connected machine: python -m lmalign stage=cache_prepare"
                              f" cache.dir={cluster_cache} model=smollm2_1.7b "
                              "eval.harness.tasks=[arc_easy], then copy the cache here")


def test_verify_warns_of_a_datasets_version_unlike_the_one_that_wrote_the_cache():
    from lmalign.cache import fetch, manifest

    here = manifest.library_versions()
    (line,) = fetch.version_warnings({**here, "datasets": "3.6.0"})
    assert line.startswith(f"the cache was written with datasets 3.6.0 and this machine has "
                           f"{here['datasets']}: datasets caches from another major version")
    assert fetch.version_warnings(here) == []


@pytest.mark.slow  # a whole command with lm-eval's task scan
def test_prepare_without_network_stops_at_once_with_one_line(tmp_path, lmalign_cache):
    """No hub answering: one line naming the endpoint within seconds, not one slow failure per
    item with every retry."""
    import socket
    import time

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    started = time.time()
    result = lmalign(*RUN, "stage=cache_prepare", f"cache.dir={tmp_path / 'cache'}",
                     cwd=tmp_path, cache=lmalign_cache, env={"HF_ENDPOINT": endpoint})
    assert result.returncode == 2 and time.time() - started < 60, result.stderr[-2000:]
    (line,) = [l for l in result.stderr.splitlines() if l.strip()]
    assert line.startswith(f"error: stage='cache_prepare': the hub ({endpoint}) cannot be "
                           "reached from this machine; 0 of ") and "fetches only what" in line


@pytest.mark.slow  # a whole lmalign command with lm-eval's task scan
def test_offline_needs_a_cache_only_for_what_comes_from_the_hub(tmp_path, lmalign_cache):
    """The embedded model and lmalign's own tasks need nothing: offline=true runs without a
    cache. A hub model does: one line naming it and the fix."""
    alone = lmalign("offline=true", "stage=eval", "eval.checkpoints=[base]",
                    "eval.harness.limit=2", cwd=tmp_path, cache=lmalign_cache)
    assert alone.returncode == 0, alone.stderr[-2000:]
    hub = lmalign("offline=true", "model=smollm2_135m", "eval=none", cwd=tmp_path,
                  cache=lmalign_cache)
    assert hub.returncode == 2
    (line,) = [l for l in hub.stderr.splitlines() if l.strip()]
    assert line.startswith("error: cache.dir=None: offline=true, and this run needs from the "
                           "hub: model HuggingFaceTB/SmolLM2-135M") and \
        "fix: offline=true cache.dir=" in line


def test_a_group_missing_from_the_cache_is_one_line_not_one_per_subtask(tmp_path):
    from conftest import typed_config
    from lmalign.cache.offline import offline_problems

    subjects = [f"dataset:cais/mmlu:{name}" for name in ("anatomy", "astronomy", "virology",
                                                          "nutrition", "law")]
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format": 1, "items": [], "tasks": {"mmlu": subjects}, "local": []}))
    config = typed_config("stage=eval", "offline=true", f"cache.dir={tmp_path}",
                          "eval.harness.tasks=[mmlu,tiny_mc]", "eval.checkpoints=[base]")
    (line,) = offline_problems(config, ["eval.harness.tasks=[mmlu,tiny_mc]"])
    assert line.startswith("eval.harness.tasks='mmlu': dataset:cais/mmlu:anatomy, "
                           "dataset:cais/mmlu:astronomy, dataset:cais/mmlu:virology and 2 more "
                           "are not in the offline cache")


def test_synthesis_and_served_judge_models_are_planned_and_required_offline(tmp_path):
    """stage=synthesize loads its generator and reward model, not model=; a judge lmalign serves
    is a hub model too; a run of ours is copied over, not fetched."""
    from conftest import typed_config
    from lmalign.cache.offline import offline_problems
    from lmalign.cache.plan import plan

    named = ("synth.generator=org/generator", "synth.reward_model=./rm",
             "eval=[generate,judge]", "eval.judge.server=vllm", "eval.judge.model=org/judge")
    found = plan(typed_config("stage=cache_plan", *named))
    by_repo = {item.repo: item.needed_by for item in found.items}
    assert by_repo["org/generator"] == ["synth.generator"]
    assert by_repo["org/judge"] == ["eval.judge.model"]
    assert "./rm" not in by_repo and "synth.reward_model=./rm (copy it over)" in found.local
    api_judge = plan(typed_config("stage=cache_plan", "eval=[generate,judge]",
                                  "eval.judge.model=gpt-4.1", "eval.judge.base_url=http://x/v1"))
    assert "gpt-4.1" not in {item.repo for item in api_judge.items}

    problems = offline_problems(typed_config("stage=synthesize", "offline=true",
                                             "model=smollm2_135m", *named[:2]),
                                ["stage=synthesize"])
    (line,) = problems  # model= is not loaded by stage=synthesize: not asked for
    assert line.startswith("cache.dir=None: offline=true, and this run needs from the hub: "
                           "model org/generator") and "SmolLM2" not in line
