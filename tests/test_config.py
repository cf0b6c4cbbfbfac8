"""Every option of every config group composes and validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import typed_config
from lmalign.config_tree import CONF_DIR

GROUPS = ["model", "dataset", "method", "hardware", "eval", "logger", "synth"]
# Options that only make sense with a partner choice.
PARTNERS = {
    ("method", "dpo"): ["dataset=tiny_prefs"],
    ("dataset", "tiny_prefs"): ["method=dpo"],
    ("dataset", "ultrafeedback_binarized"): ["method=dpo"],
    ("dataset", "local"): ["dataset.path=data.jsonl"],
    ("dataset", "synthetic"): ["dataset.from_run=synth"],
    ("method", "reward"): ["dataset=tiny_prefs", "eval=reward"],
    ("eval", "reward"): ["method=reward", "dataset=tiny_prefs"],
    ("method", "grpo"): ["dataset=tiny_prompts"],
    ("method", "rloo"): ["dataset=tiny_prompts"],
    ("method", "kto"): ["dataset=tiny_unpaired"],
    ("dataset", "tiny_unpaired"): ["method=kto"],
    ("dataset", "tiny_prompts"): ["method=grpo"],
    ("dataset", "gsm8k"): ["method=grpo"],
}
# Options that only work beside another of their group: selected together.
TOGETHER = {("eval", "judge"): "eval=[generate,judge]"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")
                  if not p.stem.startswith("_"))


ALL_OPTIONS = [(g, o) for g in GROUPS for o in options(g)]


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no options"
    assert {"tiny", "smollm2_135m", "smollm2_360m", "smollm2_1.7b", "qwen3_0.6b_base",
            "qwen3_1.7b_base", "llama3.2_3b"} <= set(options("model"))
    assert {"tiny_sft", "tiny_prefs", "tulu3_sft_mixture", "dolci_instruct_sft",
            "ultrafeedback_binarized", "local"} <= set(options("dataset"))


@pytest.mark.parametrize("group,option", ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_option_composes_and_validates(group, option):
    config = typed_config(TOGETHER.get((group, option), f"{group}={option}"),
                          *PARTNERS.get((group, option), []))
    chosen = getattr(config, group)
    assert getattr(chosen, "name", None) in (option, None) or group == "eval"


def test_each_option_file_opens_with_the_command_that_uses_it():
    for path in sorted(Path(CONF_DIR).rglob("*.yaml")):
        first = [l for l in path.read_text().splitlines() if l.strip()][0:2]
        assert any("python -m lmalign" in l for l in first), f"{path} lacks a usage comment"


def test_defaults_are_the_tiny_demo():
    config = typed_config()
    assert (config.model.name, config.dataset.name, config.method.name, config.hardware.name,
            config.eval.backends, config.logger.name, config.stage) == (
        "tiny", "tiny_sft", "sft", "cpu", ["harness"], "none", "train_eval")
    # The tiny specialisation applies to the tiny model only: real models keep sft.yaml's rate.
    assert config.method.learning_rate == pytest.approx(2e-3)
    assert typed_config("model=smollm2_135m").method.learning_rate == pytest.approx(2e-5)


def test_the_slurm_preset_asks_for_what_the_hardware_profile_runs():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from lmalign.config_tree import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        def launcher(*overrides: str) -> dict:
            cfg = compose("config", overrides=["hydra/launcher=slurm", *overrides],
                          return_hydra_config=True)
            assert cfg.hydra.mode.name == "MULTIRUN"  # a single run is submitted too
            return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)

        two_nodes = launcher("hardware=8gpu_fsdp", "hardware.num_nodes=2",
                             "hardware.world_size=16")
        assert (two_nodes["nodes"], two_nodes["tasks_per_node"], two_nodes["gpus_per_node"],
                two_nodes["cpus_per_task"], two_nodes["timeout_min"]) == (2, 1, 8, 64, 1440)
        assert two_nodes["_target_"] == "hydra_plugins.lmalign_slurm.launcher.SlurmLauncher"
        cpu = launcher("hardware=cpu_ddp", "hydra.launcher.partition=debug")
        assert (cpu["nodes"], cpu["gpus_per_node"], cpu["cpus_per_task"], cpu["partition"]) == (
            1, None, 2, "debug")
