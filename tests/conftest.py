"""Shared helpers: run `python -m lmalign` for real, compose configs, find ../shared data."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test runs two workers on two cores: one torch thread each (set before torch loads,
    # inherited by every lmalign the tests start), or both slow down many times over
    os.environ["OMP_NUM_THREADS"] = "1"


def _session_root(tmp_path_factory) -> Path:
    """The directory every xdist worker of this session shares (without xdist: the basetemp)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def _once_per_session(tmp_path_factory, name: str, build) -> Any:
    """build(directory) -> a JSON value, run by whichever worker asks first; the others wait
    for it and read its value, so a session fixture trains once, not once per worker."""
    from filelock import FileLock

    root = _session_root(tmp_path_factory)
    done = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            value = build(root / name)
            done.write_text(json.dumps(value))
    return json.loads(done.read_text())


def _completed(found: dict) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(found["args"], found["returncode"], found["stdout"],
                                       found["stderr"])


def _recorded(result: subprocess.CompletedProcess) -> dict:
    return {"args": result.args, "returncode": result.returncode, "stdout": result.stdout,
            "stderr": result.stderr}


# The order make test hands files to its two workers (pytest-xdist --dist loadfile
# --no-loadscope-reorder): the longest first (seconds per file on 2 cores, 2026-12-04: nemo 608,
# methods 497, experiments 479, judge 368, slurm 315, training 244, synthesis 243, ...), so no
# worker is left alone with a long file at the end. test_training goes second: it needs no
# session fixture, so while the first worker builds the README's SFT run the second one works
# instead of waiting for it. Files not named keep their collection order, after these.
FILE_ORDER = ("test_nemo", "test_training", "test_methods", "test_experiments", "test_judge",
              "test_slurm", "test_synthesis", "test_online_methods", "test_launch",
              "test_generate", "test_report", "test_run", "test_cache", "test_watch",
              "test_loggers", "test_gpu_check", "test_cli_corpus", "test_cli")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: index for index, name in enumerate(FILE_ORDER)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).stem, len(rank)))


@pytest.fixture(scope="session")
def lmalign_cache(tmp_path_factory) -> Path:
    """LMALIGN_CACHE (the embedded model's build, the judgment cache), one for all workers."""
    path = _session_root(tmp_path_factory) / "lmalign_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def default_run(tmp_path_factory, lmalign_cache):
    """The README's main job (`python -m lmalign`, as run_name=demo), trained once per session:
    (its result, its run directory, the directory it ran in). Tests that need a trained SFT
    model copy the run directory rather than change it."""
    def build(workdir: Path) -> dict:
        workdir.mkdir(exist_ok=True)
        return _recorded(lmalign("run_name=demo", cwd=workdir, cache=lmalign_cache, check=True))

    result = _completed(_once_per_session(tmp_path_factory, "demo", build))
    workdir = _session_root(tmp_path_factory) / "demo"
    return result, workdir / "runs" / "demo", workdir


@pytest.fixture(scope="session")
def reward_run(tmp_path_factory, lmalign_cache):
    """A tiny reward model trained on tiny_prefs and evaluated (eval=reward), once per session:
    (its run directory, its output). Copy it rather than change it."""
    def build(workdir: Path) -> str:
        workdir.mkdir(exist_ok=True)
        result = lmalign("run_name=rm", "method=reward", "dataset=tiny_prefs", "eval=reward",
                         cwd=workdir, cache=lmalign_cache, check=True)
        return result.stdout + result.stderr

    output = _once_per_session(tmp_path_factory, "reward", build)
    return _session_root(tmp_path_factory) / "reward" / "runs" / "rm", output


def write_careless_chats(path: Path, size: int = 8000) -> Path:
    """Tiny-task chats whose replies ignore "Answer with the digit only.": a bare digit one time
    in five, whatever the question asked (instruct models follow format requests unreliably)."""
    from lmalign import tinytask

    draw = random.Random(1)
    with open(path, "w") as handle:
        for index, record in enumerate(tinytask.generate("train", size)):
            question = tinytask.as_messages(record, index)["messages"][0]["content"]
            reply = record["digit"] if draw.random() < 0.2 else record["answer"]
            handle.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": reply}]}) + "\n")
    return path


@pytest.fixture(scope="session")
def generator_run(tmp_path_factory, lmalign_cache):
    """Synthesis's generator: a tiny instruct model trained on whole conversations (user turns
    too), so that given its template's pre-query text it writes tiny-task questions; trained on
    write_careless_chats, its answers follow the digit-only request only by chance."""
    def build(workdir: Path) -> None:
        workdir.mkdir(exist_ok=True)
        chats = write_careless_chats(workdir / "chats.jsonl")
        lmalign("run_name=gen", "dataset=local", f"dataset.path={chats}",
                "method.assistant_only_loss=false", "eval=none", "method.max_steps=300",
                "method.eval_steps=null", cwd=workdir, cache=lmalign_cache, check=True)

    _once_per_session(tmp_path_factory, "generator", build)
    return _session_root(tmp_path_factory) / "generator" / "runs" / "gen"


# SFT in 2 processes (DDP over gloo), saving every 20 steps: the local reference that runs on
# SLURM (tests/test_slurm.py) must reproduce weight for weight.
DDP_TRAINING = ("hardware=cpu_ddp", "method.max_steps=60", "method.save_steps=20",
                "dataset.max_samples=1024", "eval.harness.limit=40")


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory, lmalign_cache):
    """DDP_TRAINING trained and evaluated once per session: (its result, its run directory)."""
    def build(workdir: Path) -> dict:
        workdir.mkdir(exist_ok=True)
        return _recorded(lmalign("run_name=ddp_sft", *DDP_TRAINING, cwd=workdir,
                                 cache=lmalign_cache, check=True))

    result = _completed(_once_per_session(tmp_path_factory, "ddp", build))
    return result, _session_root(tmp_path_factory) / "ddp" / "runs" / "ddp_sft"


def lmalign(*overrides: str, cwd: Path, cache: Path, env: dict[str, str] | None = None,
            timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m lmalign` as a user would, in `cwd` (where runs/ and outputs/ appear)."""
    full_env = {**os.environ, "LMALIGN_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false",
                **(env or {})}
    result = subprocess.run([sys.executable, "-m", "lmalign", *overrides], cwd=cwd, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"lmalign {' '.join(overrides)} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def lmalign_in_process(*overrides: str, cwd: Path, cache: Path,
                       env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`lmalign.cli.main()` called in this process, as `python -m lmalign` would run it in `cwd`
    (the CLI keeps no state between commands): for the many commands that are refused before
    anything loads, a second each instead of a new interpreter's ten."""
    import contextlib
    import io
    import warnings

    from hydra.core.global_hydra import GlobalHydra

    from lmalign import cli

    saved = (list(sys.argv), Path.cwd(), dict(os.environ))
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    os.environ.update({"LMALIGN_CACHE": str(cache), **(env or {})})
    sys.argv = ["lmalign", *overrides]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
                warnings.catch_warnings(record=True) as warned:
            try:
                cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        for warning in warned:  # on stderr, as the interpreter would print them
            stderr.write(f"{warning.filename}:{warning.lineno}: {warning.category.__name__}: "
                         f"{warning.message}\n")
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        os.environ.clear()
        os.environ.update(saved[2])
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess(["lmalign", *overrides], code, stdout.getvalue(),
                                       stderr.getvalue())


def lmalign_background(*overrides: str, cwd: Path, cache: Path, log: Path) -> subprocess.Popen:
    """Start `python -m lmalign` and return at once; its output goes to `log`."""
    env = {**os.environ, "LMALIGN_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "lmalign", *overrides], cwd=cwd, env=env,
                                stdout=handle, stderr=subprocess.STDOUT)


def guarded(log: Path) -> dict[str, str]:
    """Environment for a run in which any connection beyond loopback is refused and logged to
    `log` (tests/network_guard), in every process it starts."""
    guard = Path(__file__).resolve().parent / "network_guard"
    return {"PYTHONPATH": str(guard), "LMALIGN_NETWORK_GUARD_LOG": str(log)}


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: ../shared (real third-party data) is beside the repo in "
                    "CI and on the team's machines, not in a fresh clone")
    return path


def compose(*overrides: str):
    """The composed DictConfig for these overrides, as the entrypoint would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmalign.config_tree import CONF_DIR, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def typed_config(*overrides: str, check_environment: bool = False):
    from omegaconf import OmegaConf

    from lmalign.validate import validate

    return validate(OmegaConf.to_container(compose(*overrides), resolve=True),
                    check_environment=check_environment)


def marked_processes(marker: str) -> list[int]:
    """Processes whose environment holds the marker (everything a run started), this one
    excepted; zombies have no environment left and are not counted."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def write_pair_reward_model(path: Path) -> Path:
    """A randomly initialised BERT-style reward model that reads (question, answer) sentence pairs
    with token type ids, as OpenAssistant's deberta reward models do, and has no chat template:
    built here (no hub), with a WordPiece vocabulary of the tiny task's words."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ("which is the largest smallest answer with digit only what a of and to in "
             "0 1 2 3 4 5 6 7 8 9 . ? : ,").split()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(words + letters),
         *[f"##{c}" for c in letters]]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, type_vocab_size=2, num_labels=1,
        pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
