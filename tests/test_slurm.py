"""hydra/launcher=slurm against a real SLURM cluster on this host (tests/local_slurm.sh: two
slurmd daemons as nodes n1 and n2, accounting through slurmdbd). No mocks: sbatch, srun,
scancel, sacct and requeues are SLURM's own."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import DDP_TRAINING, lmalign, lmalign_background

pytestmark = pytest.mark.slow

SLURM = "hydra/launcher=slurm"
CLUSTER_SCRIPT = Path(__file__).resolve().parent / "local_slurm.sh"


def _cluster_up() -> bool:
    """The two nodes answer (a cluster left running, e.g. by an earlier session)."""
    if not shutil.which("sinfo"):
        return False
    found = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True)
    nodes = dict(line.split() for line in found.stdout.splitlines()) if found.returncode == 0 \
        else {}
    return nodes.keys() == {"n1", "n2"} and not any("down" in s or "drain" in s
                                                      for s in nodes.values())


@pytest.fixture(scope="module")
def slurm_cluster():
    """The local two-node cluster: reused when it already runs, else started and stopped."""
    why_not = None
    if os.geteuid() != 0:
        why_not = "starting SLURM's daemons needs root"
    elif not shutil.which("sinfo") and not shutil.which("apt-get"):
        why_not = "SLURM is not installed and apt-get is not here to install it"
    if why_not:
        if os.environ.get("LMALIGN_REQUIRE_SLURM"):
            pytest.fail(f"LMALIGN_REQUIRE_SLURM is set but {why_not}")
        pytest.skip(f"{why_not} (CI runs these tests as root on Debian)")
    started = not _cluster_up()
    if started:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], check=True, timeout=600)
    yield
    if started:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], timeout=60)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, slurm_cluster) -> Path:
    yield tmp_path_factory.mktemp("slurm")
    subprocess.run(["scancel", "--name=lmalign"])  # what a failed test left in the queue


@pytest.fixture
def background():
    """Start `python -m lmalign` in the background; stopped if the test ends before it does."""
    started: list[subprocess.Popen] = []

    def start(*args, **kwargs) -> subprocess.Popen:
        started.append(lmalign_background(*args, **kwargs))
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="module")
def two_nodes(workdir, lmalign_cache):
    """The session's DDP training, submitted as one SLURM job of 2 nodes, 1 process each."""
    result = lmalign(SLURM, "run_name=two_nodes", *DDP_TRAINING, "hardware.num_nodes=2",
                     cwd=workdir, cache=lmalign_cache, check=True)
    return result, workdir / "runs" / "two_nodes"


def _weights(run_dir: Path):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def _assert_same_weights(run_dir: Path, reference_dir: Path) -> None:
    import torch

    expected = _weights(reference_dir)
    found = _weights(run_dir)
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(found[key], value, rtol=0, atol=1e-6)


def _slurm_ids(output: str) -> list[str]:
    return re.findall(r": SLURM job (\d+(?:_\d+)?); log: ", output)


def _sacct(job: str, field: str) -> str:
    found = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", field],
                           capture_output=True, text=True, check=True)
    return found.stdout.strip()


def _queue_state(job: str) -> str:
    """The job's state while SLURM's queue holds it ("" once it left)."""
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                          text=True).stdout.strip()


def test_a_two_node_job_trains_across_both_nodes_to_the_local_weights_and_evaluates(
        two_nodes, ddp_run):
    result, run_dir = two_nodes
    (job,) = _slurm_ids(result.stdout + result.stderr)
    # The job's result can be read before SLURM's accounting has closed the job.
    _wait_for(lambda: _sacct(job, "State") == "COMPLETED", "SLURM to record the job COMPLETED",
              seconds=60)
    assert _sacct(job, "NodeList") == "n[1-2]"
    log = Path(re.search(r"log: (\S+)", result.stdout + result.stderr).group(1))
    main_node, other_node = (log.with_name(f"{job}_{task}_log.out").read_text() for task in (0, 1))
    assert "--num_machines 2 --machine_rank 0" in main_node
    assert "--num_machines 2 --machine_rank 1" in other_node
    assert "node 1 of 2: training done" in other_node
    _assert_same_weights(run_dir, ddp_run[1])  # = 2 processes on one node, run here

    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "done" and record["train"]["global_step"] == 60
    with open(run_dir / "metrics.csv") as handle:
        rows = {r["checkpoint"]: float(r["value"]) for r in csv.DictReader(handle)
                if r["task"] == "tiny_mc" and r["metric"] == "acc"}
    assert rows.keys() == {"base", "final"} and rows["final"] > rows["base"] + 0.3
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-20", "checkpoint-40", "checkpoint-60"]


def test_an_eval_sweep_on_slurm_gives_the_summary_of_the_local_launcher(
        two_nodes, workdir, lmalign_cache):
    from judge_server import JudgeServer

    shutil.copytree(two_nodes[1], workdir / "runs" / "local_copy")
    # One job per checkpoint, each scoring both few-shot counts (a list runs inside a job), and
    # answering 4 prompts graded by a judge on this host.
    with JudgeServer() as judge:
        sweep = ("stage=eval", "eval.checkpoints=20,40", "eval.harness.num_fewshot=[0,2]",
                 "hardware=cpu", "eval.harness.tasks=[tiny_mc]", "eval.harness.limit=20",
                 "eval=[harness,generate,judge]", "eval.generate.prompts=tiny",
                 "eval.generate.max_prompts=4", "eval.generate.max_new_tokens=24",
                 "eval.judge.model=slurm-sweep-judge", f"eval.judge.base_url={judge.url}",
                 "eval.judge.api_key_env=null")
        on_slurm = lmalign(SLURM, "run_name=two_nodes", *sweep, "hydra.sweep.dir=sweeps/slurm",
                           cwd=workdir, cache=lmalign_cache, check=True)
        assert len(_slurm_ids(on_slurm.stdout + on_slurm.stderr)) == 2
        assert judge.count() == 8  # 4 answers x 2 checkpoints; the local sweep's are cached
        lmalign("-m", "run_name=local_copy", *sweep, "hydra.sweep.dir=sweeps/local",
                cwd=workdir, cache=lmalign_cache, check=True)

    def summary(name: str) -> list[tuple]:
        with open(workdir / "sweeps" / name / "summary.csv") as handle:
            return sorted((r["job"], r["checkpoint"], r["step"], r["backend"], r["task"],
                           r["metric"], r["num_fewshot"], r["value"], r["stderr"],
                           r["ci_low"], r["ci_high"]) for r in csv.DictReader(handle))

    local = summary("local")
    assert {r[1] for r in local} == {"checkpoint-20", "checkpoint-40"}
    assert sorted(r[6] for r in local if r[3] == "harness") == ["0", "0", "2", "2"]
    assert {r[5] for r in local if r[3] == "judge"} == {"score", "invalid"}
    assert summary("slurm") == local
    assert "checkpoint-40" in (workdir / "sweeps" / "slurm" / "samples.md").read_text()


def _job_processes(job: str, command: str) -> list[str]:
    """This host's processes of a SLURM job (by their SLURM_JOB_ID) running `command`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            if f"SLURM_JOB_ID={job}".encode() in environ and \
                    command.encode() in (proc / "cmdline").read_bytes():
                found.append(proc.name)
        except OSError:  # it ended meanwhile
            pass
    return found


def _wait_for(condition, what: str, submitter: subprocess.Popen | None = None,
              seconds: float = 300):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        assert submitter is None or submitter.poll() is None, \
            f"the submitting command exited {submitter.returncode} before {what}"
        time.sleep(0.2)


def test_usr2_requeues_the_job_which_resumes_to_the_uninterrupted_weights(
        ddp_run, workdir, lmalign_cache, background):
    log = workdir / "requeued.log"
    submitter = background(SLURM, "run_name=requeued", *DDP_TRAINING, "stage=train",
                                   cwd=workdir, cache=lmalign_cache, log=log)
    run_dir = workdir / "runs" / "requeued"
    _wait_for(lambda: (run_dir / "checkpoints" / "checkpoint-20" / "trainer_state.json").exists(),
              "checkpoint-20", submitter)
    (job,) = _slurm_ids(log.read_text())
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    # SLURM holds a requeued job for a while (its begin time); a test need not wait for that.
    _wait_for(lambda: _queue_state(job) == "PENDING", "the requeue")
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    assert submitter.wait(timeout=300) == 0, log.read_text()[-3000:]

    saved = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    stopped_at = [step for step in saved if step % 20]
    assert len(stopped_at) == 1 and 20 < stopped_at[0] < 60, saved
    job_log = Path(re.search(r"log: (\S+)", log.read_text()).group(1))
    text = job_log.read_text() + job_log.with_suffix(".out").read_text()
    assert "Requeued job" in text and f"checkpoint-{stopped_at[0]} (step {stopped_at[0]})" in text
    record = json.loads((run_dir / "run.json").read_text())
    assert [a["status"] for a in record["attempts"]] == ["stopped", "done"]
    _assert_same_weights(run_dir, ddp_run[1])


def test_crashed_and_cancelled_jobs_fail_the_sweep_within_a_minute_naming_their_logs(
        workdir, lmalign_cache, background):
    log = workdir / "crash.log"
    submitter = background(SLURM, "run_name=crash_a,crash_b", "stage=train", "eval=none",
                                   "method.max_steps=5000", "hydra.sweep.dir=sweeps/crash",
                                   cwd=workdir, cache=lmalign_cache, log=log)
    _wait_for(lambda: len(_slurm_ids(log.read_text())) == 2, "the submission", submitter)
    cancelled, killed = _slurm_ids(log.read_text())
    _wait_for(lambda: _queue_state(killed) == "RUNNING", "job 1 to run")
    _wait_for(lambda: (workdir / "runs" / "crash_b" / "run.json").exists(), "job 1's driver")
    subprocess.run(["scancel", cancelled], check=True)
    task = subprocess.run(["squeue", "-h", "-j", killed, "-o", "%A"], capture_output=True,
                          text=True, check=True).stdout.strip()  # the array task's own job id
    drivers = _job_processes(task, "submitit")
    assert drivers, f"no driver process of SLURM job {task}"
    for pid in drivers:
        os.kill(int(pid), signal.SIGKILL)  # a crash: no Python exception, no record written
    killed_at = time.time()
    submitter.wait(timeout=120)
    assert submitter.returncode == 1
    assert time.time() - killed_at < 60
    output = log.read_text()
    for number, job in ((0, cancelled), (1, killed)):
        line = next(l for l in output.splitlines() if l.startswith(f"  job {number} "))
        assert "failed" in line and f"SLURM job {job}" in line and \
            re.search(rf"log: \S+/{job}_0_log\.err$", line), line
    summary = (workdir / "sweeps" / "crash" / "summary.md").read_text()
    assert "2 job(s): 2 failed." in summary and f"{killed}_0_log.err" in summary


SECRET = "hf_lmalign_test_secret_value"


@pytest.fixture(scope="module")
def held(workdir, lmalign_cache, tmp_path_factory):
    """A run submitted on hold; the experiment file it composed from is edited while it waits,
    then the job is released: (its run directory, its submission's output)."""
    extra = tmp_path_factory.mktemp("extra")
    recipe = extra / "experiment" / "edited.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text("# @package _global_\nmethod:\n  max_steps: 3\n")
    log = workdir / "held.log"
    submitter = lmalign_background(
        "--config-dir", str(extra), SLURM, "+experiment=edited", "run_name=held", "stage=train",
        "eval=none", "method.save_steps=2", "dataset.max_samples=256",
        f"+secrets.HF_TOKEN={SECRET}",
        "+hydra.launcher.additional_parameters.hold=true", cwd=workdir, cache=lmalign_cache,
        log=log)
    try:
        _wait_for(lambda: _slurm_ids(log.read_text()), "the submission", submitter)
        (job,) = _slurm_ids(log.read_text())
        assert _queue_state(job) == "PENDING"
        recipe.write_text("# @package _global_\nmethod:\n  max_steps: 7\n")  # while queued
        subprocess.run(["scontrol", "release", job], check=True)
        assert submitter.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if submitter.poll() is None:
            submitter.kill()
    return workdir / "runs" / "held", log.read_text()


def test_a_queued_job_runs_the_config_of_its_submission_not_later_edits(held):
    run_dir, _ = held
    record = json.loads((run_dir / "run.json").read_text())
    assert record["train"]["global_step"] == 3


def test_no_secret_lands_in_what_a_slurm_submission_writes(held, workdir):
    run_dir, output = held
    assert SECRET not in output
    sweep = Path(re.search(r"log: (\S+)/\.submitit/", output).group(1))
    written = [p for root in (sweep, run_dir) for p in root.rglob("*") if p.is_file()]
    assert any(p.name.endswith("_submitted.pkl") for p in written)
    assert [p for p in written if SECRET.encode() in p.read_bytes()] == []


def test_the_watcher_submits_each_checkpoint_as_its_own_slurm_job(held, workdir, lmalign_cache):
    run_dir, _ = held
    result = lmalign("stage=watch", "run_name=held", "watch.submit_to=slurm", "hardware=cpu",
                     "eval.harness.tasks=[tiny_mc]", "eval.harness.limit=20", "watch.poll_seconds=1",
                     cwd=workdir, cache=lmalign_cache, check=True)
    labels = ["checkpoint-2", "checkpoint-3", "final"]  # trainer saves the last step too
    for label in labels:
        submitted = (run_dir / "watch" / f"{label}.log").read_text()
        (job,) = _slurm_ids(submitted)
        assert f"finished (SLURM job {job})" in submitted, submitted[-2000:]
    cells = sorted(cell.parent.parent.name for cell in (run_dir / "eval").glob("*/*/cell.json"))
    assert cells == labels, result.stdout[-2000:]
