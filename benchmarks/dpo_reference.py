"""DPO step throughput with and without precomputed reference log-probs.

    python benchmarks/dpo_reference.py [--steps 40] [--repeats 2]

Both runs train the embedded tiny model with lmalign's DPO (TRL's DPOTrainer) on the same
tiny_prefs rows for the same steps and batch. Without precomputation every step runs the frozen
reference model forward on the batch; with method.dpo.precompute_ref_log_probs=true TRL scores
every pair under the reference once, before training. Printed: training steps per second of each,
their ratio, the one-off precompute time, and the end-to-end ratio (precompute included). All
figures are ratios measured in this one process; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import typed_config  # noqa: E402  (composes the real config tree)

PER_DEVICE, ACCUMULATION = 16, 2


def measure(steps: int, precompute: bool, cache: Path) -> tuple[float, float]:
    """(seconds building the trainer, seconds training `steps` steps)."""
    from lmalign import models
    from lmalign.methods import dpo

    rows = steps * PER_DEVICE * ACCUMULATION  # precompute scores exactly the rows trained on
    config = typed_config(
        "method=dpo", "dataset=tiny_prefs", "eval=none", f"cache.build_dir={cache}",
        f"method.max_steps={steps}", f"dataset.max_samples={rows}", "dataset.eval_split=null",
        f"hardware.per_device_batch_size={PER_DEVICE}",
        f"method.global_batch_size={PER_DEVICE * ACCUMULATION}", "method.eval_steps=null",
        f"method.save_steps={steps * 10}", f"method.logging_steps={steps}",
        f"method.dpo.precompute_ref_log_probs={str(precompute).lower()}")
    with tempfile.TemporaryDirectory() as run_dir:
        began = time.perf_counter()
        trainer = dpo.build(config, Path(run_dir), models.starting_point(config))
        built = time.perf_counter()
        trainer.train()
        return built - began, time.perf_counter() - built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    options = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="lmalign-bench-"))
    measure(2, False, cache)  # warm up: build the tiny model, load the libraries
    best: dict[bool, tuple[float, float]] = {}
    for _ in range(options.repeats):
        for precompute in (False, True):
            build_s, train_s = measure(options.steps, precompute, cache)
            if precompute not in best or train_s < best[precompute][1]:
                best[precompute] = (build_s, train_s)
    (plain_build, plain_train), (pre_build, pre_train) = best[False], best[True]
    print(f"DPO, tiny model, {options.steps} steps of {PER_DEVICE * ACCUMULATION} pairs "
          f"(best of {options.repeats})")
    print(f"  reference forward every step: {options.steps / plain_train:6.2f} steps/s")
    print(f"  precomputed reference:        {options.steps / pre_train:6.2f} steps/s "
          f"(+{pre_build - plain_build:.1f} s one-off precompute)")
    print(f"  step throughput ratio (precomputed / every step): {plain_train / pre_train:.2f}")
    print(f"  end-to-end ratio incl. precompute:                "
          f"{(plain_build + plain_train) / (pre_build + pre_train):.2f}")


if __name__ == "__main__":
    main()
