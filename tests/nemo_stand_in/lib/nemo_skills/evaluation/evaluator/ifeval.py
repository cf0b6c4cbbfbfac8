"""TEST STAND-IN for NeMo-Skills 0.7.0's ifeval evaluator: like the real one, it runs Google's
scorer from a directory that only NeMo-Skills' container has."""
import subprocess


def eval_if(cfg):
    subprocess.run("cd /opt/benchmarks/google-research && python -m "
                   "instruction_following_eval.evaluation_main", shell=True, check=True)
