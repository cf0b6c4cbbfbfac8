"""synth.md, the data card: counts after every step, score histograms, examples, and the
generator's and reward model's names and licences."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lmalign import rundir
from lmalign.schema import SynthConfig

HISTOGRAM = "synth-scores.png"


def licence(model: str) -> str:
    """The licence a model's card declares (its README's front matter), read from disk or the
    hub cache, never fetched; a run of ours names the run its weights came from."""
    for directory in (Path(model), *Path(model).parents[:1]):
        card = directory / "README.md"
        if card.exists():
            return _front_matter_licence(card.read_text()) or "not stated in its README.md"
    if Path(model).exists():
        return f"not stated (a local model: see {model})"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "README.md")
    except Exception:  # not a repo id
        cached = None
    if isinstance(cached, str):
        return _front_matter_licence(Path(cached).read_text()) or "not stated in its model card"
    return "unknown here (its model card is not in the hub cache)"


def _front_matter_licence(text: str) -> str | None:
    found = re.search(r"^---\n(.*?)\n---", text, re.DOTALL)
    match = re.search(r"^license:\s*(.+)$", found.group(1), re.MULTILINE) if found else None
    return match.group(1).strip() if match else None


def write(path: Path, synth: SynthConfig, counts: dict[str, Any], sft: list[dict],
          preferences: list[dict], answers: list[dict], generator: str, reward_model) -> None:
    """reward_model: where the reward model was loaded from (synth.scorer=reward_model)."""
    if synth.scorer == "judge":
        judge = synth.judge
        scorer = f"- judge: `{judge.model}`, {judge.rubric} rubric (licence: " + (
            f"{licence(judge.model)})" if judge.server else f"the terms of {judge.base_url})")
    else:
        reward_name = str(reward_model.adapter or reward_model.path)
        scorer = f"- reward model: `{reward_name}` (licence: {licence(reward_name)})"
    lines = ["# Synthetic data", "",
             f"- generator: `{generator}` (licence: {licence(generator)})", scorer,
             f"- {synth.num_instructions} instruction(s) asked for, "
             f"{synth.responses_per_instruction} response(s) each at temperatures "
             f"{synth.temperatures}; seed {synth.seed}",
             "- decontaminated against: " + (", ".join(synth.filters.decontaminate) + (
                 f" (a shared word {synth.filters.decontamination_ngram}-gram, then at least "
                 f"{synth.filters.decontamination_min_overlap:g} of the prompt's words in order)")
                 if synth.filters.decontaminate else "nothing (synth.filters.decontaminate=[])"),
             "",
             "## Counts", "", "| step | count |", "|---|---|"]
    for step, value in counts.items():
        if isinstance(value, dict):
            lines += [f"| {step}: {reason} | {n} |" for reason, n in sorted(value.items())] \
                or [f"| {step} | 0 |"]
        else:
            lines.append(f"| {step} | {value} |")
    if answers:
        _histogram(path.parent / HISTOGRAM, answers, preferences, _unit(synth))
        lines += ["", "## Scores", "", f"![{_unit(synth)}]({HISTOGRAM})"]
    lines += ["", "## Examples", ""]
    for pair in preferences[:3]:
        lines += [f"**{pair['id']}** {_short(pair['prompt'][0]['content'])}", "",
                  f"- chosen ({pair['chosen_score']:.3f}): {_short(pair['chosen'][0]['content'])}",
                  f"- rejected ({pair['rejected_score']:.3f}): "
                  f"{_short(pair['rejected'][0]['content'])}", ""]
    if not preferences:
        lines += ["(no preference pairs)", ""]
    rundir.atomic_write_text(path, "\n".join(lines) + "\n")


def _short(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def _unit(synth: SynthConfig) -> str:
    return "judge grade" if synth.scorer == "judge" else "reward score"


def _histogram(path: Path, answers: list[dict], preferences: list[dict], unit: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].hist([a["score"] for a in answers], bins=30)
    axes[0].set_title("every kept response")
    axes[1].hist([p["chosen_score"] for p in preferences], bins=30, alpha=0.6, label="chosen")
    axes[1].hist([p["rejected_score"] for p in preferences], bins=30, alpha=0.6,
                 label="rejected")
    axes[1].set_title("preference pairs")
    axes[1].legend()
    for axis in axes:
        axis.set_xlabel(unit)
    figure.tight_layout()
    staging = path.with_suffix(".partial.png")
    figure.savefig(staging)
    plt.close(figure)
    staging.replace(path)
