"""hydra-submitit-launcher's SLURM launcher, with what lmalign's runs need on a cluster:

- A queued job runs the config composed when it was submitted. Upstream composes it again
  from the YAML files when the job starts, so an edit to conf/ changes jobs still in the queue.
  Composing also fixes the sweep directory, so a requeued job comes back to the same directory.
- Resources come from each job's own config (its hardware profile), so a sweep over
  hardware profiles submits one job array per distinct set of resources.
- The wait polls SLURM's accounting every few seconds. A job that crashed, was cancelled
  or timed out is reported with its SLURM id and log within seconds, and the other jobs
  are still waited for. Upstream raises on the first failure and polls less often as jobs age.
- A job that accounting calls ended but the queue still holds is waited for: while SLURM
  requeues a job (a preemption, USR2 to a checkpointing run) sacct can report the ending
  attempt FAILED before the queue shows the job PENDING again.
- A job that raised logs its traceback to its own log (upstream only returns it).
"""

from __future__ import annotations

import copy
import logging
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as SubmititSlurmLauncher,
)
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)
POLL_SECONDS = 5  # how often the submitting process asks SLURM about its jobs
# squeue's states of a job that will still run (or runs) without anyone's help, and the held
# ones a user releases; squeue also lists ended jobs for a while (MinJobAge), in other states.
STILL_QUEUED = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                "REQUEUE_HOLD", "SPECIAL_EXIT", "RESIZING", "SIGNALING", "STAGE_OUT",
                "SUSPENDED", "STOPPED", "RESV_DEL_HOLD"}


class SlurmLauncher(SubmititSlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        from lmalign import callbacks, config_tree, outcome, secrets

        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        jobs = []
        for offset, overrides in enumerate(job_overrides):
            number = initial_job_idx + offset
            config = self.hydra_context.config_loader.load_sweep_config(self.config,
                                                                        list(overrides))
            with open_dict(config):
                config.hydra.sweep.dir = str(sweep_dir)  # fixed now: the same after a requeue
                config.hydra.job.num = number
            # What is pickled to disk for the job holds no secret: they travel in the
            # environment, which sbatch passes on.
            secrets.keep_in_environment(config)
            jobs.append((number, list(config.hydra.overrides.task), config))
        config_tree.refuse_invalid_sweep([(number, config) for number, _, config in jobs])
        self.config = copy.deepcopy(self.config)  # pickled with the launcher: no secret in it
        secrets.keep_in_environment(self.config)
        callbacks.redact_sweep_record(sweep_dir, self.config)

        groups: dict[str, tuple[dict[str, Any], list[tuple[int, list[str], DictConfig]]]] = {}
        for job in jobs:
            resources = self._resources(job[2])
            groups.setdefault(repr(sorted(resources.items())), (resources, []))[1].append(job)
        submitted = []
        for resources, group in groups.values():
            executor = self._executor(resources)
            arguments = [(config, "hydra.sweep.dir", number, f"job_id_for_{number}",
                          Singleton.get_state()) for number, _, config in group]
            for (number, overrides, _), job in zip(group, executor.map_array(
                    self, *zip(*arguments))):
                log.info("job %d (%s): SLURM job %s; log: %s", number,
                         " ".join(filter_overrides(overrides)), job.job_id, job.paths.stderr)
                submitted.append((number, overrides, job))
        try:
            return self._wait(submitted, sweep_dir, submitit)
        except KeyboardInterrupt:
            ids = " ".join(sorted({job.job_id.split("_")[0] for _, _, job in submitted}))
            log.warning("stopped waiting: the jobs keep running on the cluster (scancel %s stops "
                        "them); collate them later with: python -m lmalign stage=report "
                        "report.dir=%s", ids, sweep_dir)
            outcome.collate_later(None)  # nothing to collate yet
            raise

    def _resources(self, config: DictConfig) -> dict[str, Any]:
        """This job's launcher settings, resolved in its own config."""
        return OmegaConf.to_container(config.hydra.launcher, resolve=True)

    def _executor(self, params: dict[str, Any]):
        """submitit's executor for these settings (as hydra-submitit-launcher builds it)."""
        import submitit

        params = {key: value for key, value in params.items() if key != "_target_"}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR,
                                         folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{key if key in shared else f"{self._EXECUTOR}_{key}": value
                                      for key, value in params.items()})
        return executor

    @staticmethod
    def _wait(submitted, sweep_dir: Path, submitit) -> list[JobReturn]:
        from lmalign import callbacks
        from lmalign.errors import JobFailed

        returns: dict[int, JobReturn] = {}
        pending = {number: (overrides, job) for number, overrides, job in submitted}
        watcher = submitted[0][2].watcher
        while pending:
            watcher.update()  # one sacct call for every job
            for number, (overrides, job) in list(pending.items()):
                if not job.done() or _still_queued(job):
                    continue
                del pending[number]
                described = f"job {number} ({' '.join(filter_overrides(overrides))})"
                try:
                    returned = job.results()[0]  # task 0 is the main node's
                except (submitit.core.utils.UncompletedJobError,
                        submitit.core.utils.FailedJobError) as exc:
                    state = job.state
                    error = (f"SLURM job {job.job_id} ended {state} without a result"
                             if isinstance(exc, submitit.core.utils.UncompletedJobError)
                             else f"SLURM job {job.job_id} failed ({state})")
                    callbacks.record_lost_job(sweep_dir, number, overrides, error,
                                              str(job.paths.stderr))
                    returned = JobReturn(overrides=overrides, status=JobStatus.FAILED,
                                         _return_value=JobFailed(
                                             f"{described}: {error}; log: {job.paths.stderr}"))
                log.info("%s: %s (SLURM job %s)", described,
                         "failed" if returned.status == JobStatus.FAILED else "finished",
                         job.job_id)
                returns[number] = returned
            if pending:
                time.sleep(POLL_SECONDS)
        return [returns[number] for number, _, _ in submitted]

    def __call__(self, config: DictConfig, job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict[type, Singleton]) -> JobReturn:
        """One job on the cluster: the config composed at submission, not the files now."""
        import submitit

        from lmalign.config_tree import register_resolvers
        from lmalign.errors import JobFailed

        assert self.hydra_context is not None and self.task_function is not None
        Singleton.set_state(singleton_state)
        setup_globals()
        register_resolvers()
        environment = submitit.JobEnvironment()
        config = copy.deepcopy(config)  # the submitted one stays as it was, for a requeue
        with open_dict(config.hydra.job):
            config.hydra.job.id = environment.job_id
        returned = run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                           config=config, job_dir_key=job_dir_key,
                           job_subdir_key="hydra.sweep.subdir")
        if returned.status == JobStatus.FAILED:
            error = returned._return_value
            traceback.print_exception(error)  # into this job's log; the submitter names it
            returned._return_value = JobFailed(
                f"job {job_num} ({' '.join(filter_overrides(returned.overrides or []))}): "
                f"{type(error).__name__}: {error}; log: {environment.paths.stderr}")
        return returned


def _still_queued(job) -> bool:
    """Whether SLURM's queue still holds a job that has written no result (a requeue under
    way). Where squeue cannot answer, accounting's word stands."""
    if job.paths.result_pickle.exists():
        return False
    found = subprocess.run(["squeue", "-h", "-j", job.job_id, "-o", "%T"], capture_output=True,
                           text=True)
    states = set(found.stdout.split()) if found.returncode == 0 else set()
    if states & STILL_QUEUED:
        job.watcher.clear()  # submitit keeps a state it took as final: ask accounting again
        return True
    return False
