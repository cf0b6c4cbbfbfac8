"""When Hydra cannot compose a command: every override that broke it, one problem each.

Compose again and again, each time dropping the override that broke composition, until the rest
composes; then validate what remains. A sweep's values are checked one at a time. A misspelt
key gets the closest key of its section, an old flat eval key its new place under the backend
(docs/design.md, Errors and exit codes).
"""

from __future__ import annotations

import difflib
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmalign import adapters
from lmalign.config_tree import CONF_DIR, CONFIG_NAME
from lmalign.errors import UserError


def message(exc: BaseException) -> str:
    """An exception's message and its cause's, on one line."""
    parts = [str(exc)] + ([str(exc.__cause__)] if exc.__cause__ else [])
    return " ".join(p for p in parts if p) or type(exc).__name__


def diagnose(overrides: list[str]) -> list[str]:
    """Every problem of a command line that Hydra could not compose, one line each."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmalign.validate import validate

    problems: list[str] = []
    candidates = _single_values(overrides, problems)
    # Sweep values of one key cannot be composed together: later values are tried separately.
    first = {}
    for index, (_, parsed) in enumerate(candidates):
        first.setdefault(parsed.key_or_group, index)
    kept = [c for i, c in enumerate(candidates) if first[c[1].key_or_group] == i]
    extra = [c for i, c in enumerate(candidates) if first[c[1].key_or_group] != i]

    GlobalHydra.instance().clear()
    found = _Found(problems)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="lmalign"):
        found.loader = GlobalHydra.instance().config_loader()
        while True:  # drop the override that broke composition until the rest composes
            try:
                cfg = compose(CONFIG_NAME, overrides=[t for t, _ in kept])
                break
            except Exception as exc:
                index = found.culprit(exc, kept)
                if index is None:
                    return problems + [message(exc)]
                kept.pop(index)
        for text, parsed in extra:
            trial = [c for c in kept if c[1].key_or_group != parsed.key_or_group] + [(text, parsed)]
            try:
                compose(CONFIG_NAME, overrides=[t for t, _ in trial])
            except Exception as exc:
                if found.culprit(exc, trial) is None:
                    problems.append(message(exc))
        _suggest_keys(problems, found.unknown_keys, cfg)
        try:
            validate(OmegaConf.to_container(cfg, resolve=True))
        except UserError as exc:
            problems += exc.problems
    return problems


def _single_values(overrides: list[str], problems: list[str]) -> list[tuple[str, Any]]:
    """(text, parsed) for each override, a sweep's values one by one; what does not parse is a
    problem."""
    texts: list[str] = []
    for text in overrides:
        try:
            parsed = adapters.parse_override(text)
        except Exception as exc:  # the parser's own message says what is wrong
            problems.append(f"could not parse override {text!r}: {exc}")
            continue
        if parsed.is_sweep_override():
            key = parsed.get_key_element()
            texts += [f"{key}={value}" for value in parsed.sweep_string_iterator()]
        else:
            texts.append(text)
    return [(text, adapters.parse_override(text)) for text in texts]


class _Found:
    """The problems found so far, and the unknown keys among them (for spelling hints)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems, self.unknown_keys, self.loader = problems, [], None

    def culprit(self, exc: Exception, among: list[tuple[str, Any]]) -> int | None:
        """Index in `among` (the overrides just composed) of the one that broke composition,
        its problem recorded; None when no override is to blame."""
        from hydra.errors import MissingConfigException

        if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
            group = exc.missing_cfg_file.rsplit("/", 1)[0]
            for i, (_, parsed) in enumerate(among):
                if parsed.key_or_group.lstrip("/") == group:
                    options = exc.options or self.loader.get_group_options(group)
                    visible = ", ".join(o for o in options if not o.startswith("_"))
                    value = parsed.value()
                    self.problems.append(
                        f"{parsed.key_or_group}={value}: no such option in group '{group}'; "
                        f"allowed: {visible}; fix: {parsed.key_or_group}="
                        f"{_closest(str(value), options) or '<one of them>'}")
                    return i
        full_key = getattr(exc.__cause__, "full_key", None) or getattr(exc, "full_key", None)
        for i, (text, parsed) in enumerate(among):
            key = parsed.key_or_group
            if (full_key and key == full_key) or f"'{key}'" in str(exc):
                self.unknown_keys.append(key)
                self.problems.append(f"{text}: no such key")
                return i
        return None


def _closest(word: str, options: list[str]) -> str | None:
    match = difflib.get_close_matches(word, [o for o in options if not o.startswith("_")], n=1)
    return match[0] if match else None


def _suggest_keys(problems: list[str], keys: list[str], cfg: DictConfig | None) -> None:
    if cfg is None:
        return
    for key in keys:
        for i, line in enumerate(problems):
            if line.startswith(f"{key}=") or line.startswith(f"+{key}="):
                problems[i] = f"{line}; {_eval_key_hint(line, key, cfg) or _key_hint(key, cfg)}"


def _key_hint(key: str, cfg: DictConfig) -> str:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return "allowed: the keys of the config; fix: check the key's spelling"
    known = [str(k) for k in node.keys() if not str(k).startswith("_")]
    match = difflib.get_close_matches(leaf, known, n=1)
    hint = f"did you mean {parent + '.' if parent else ''}{match[0]}?" if match \
        else f"use one of {', '.join(known)}"
    return f"allowed: the keys of {parent or 'the config'}; fix: {hint}"


def _eval_key_hint(line: str, key: str, cfg: DictConfig) -> str | None:
    """Evaluation settings live under their backend (eval.harness.tasks, eval.nemo.benchmarks):
    an old flat key, or a key of a backend the command did not select."""
    import dataclasses

    from lmalign.schema import BACKENDS, HarnessConfig, NemoConfig

    parts = key.split(".")
    if parts[0] != "eval" or len(parts) < 2:
        return None
    value = line.split("=", 1)[1].split(": no such key")[0]
    selected = [b for b in BACKENDS if b in cfg.eval]
    if parts[1] in BACKENDS:  # a backend that is not selected
        backend = parts[1]
        wanted = "[" + ",".join(selected + [backend]) + "]"
        return (f"allowed: eval.{backend}.* once eval selects {backend} (selected: "
                f"{', '.join(selected) or 'none'}); fix: 'eval={wanted}', or eval={backend}")
    for backend, schema in (("harness", HarnessConfig), ("nemo", NemoConfig)):
        if parts[1] in {f.name for f in dataclasses.fields(schema)}:
            moved = ".".join(["eval", backend, *parts[1:]])
            select = "" if backend in selected else f"eval={backend} "
            return (f"allowed: evaluation settings under their backend (eval.{backend}.*); "
                    f"fix: {select}{moved}={value}")
    return None
