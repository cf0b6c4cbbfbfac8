"""When Hydra cannot compose a command: every override that broke it, one problem each.

Compose again and again, each time dropping the override that broke composition, until the rest
composes; then validate what remains. A sweep's values are checked one at a time. A misspelt
key gets the closest key of its section, an old flat eval key its new place under the backend
(docs/design.md, Errors and exit codes).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmalign import adapters, config_tree
from lmalign.config_tree import CONF_DIR, CONFIG_NAME
from lmalign.errors import UserError
from lmalign.type_errors import close_names


def message(exc: BaseException) -> str:
    """An exception's message and its cause's, on one line."""
    parts = [str(exc)] + ([str(exc.__cause__)] if exc.__cause__ else [])
    return " ".join(p for p in parts if p) or type(exc).__name__


def broken_yaml(exc: Exception) -> str:
    """A config file that is not YAML (yours under --config-dir, or an edited conf/): one line
    naming the option that chose it, the file, and where the parser stopped."""
    from lmalign.errors import problem

    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is None:
        return problem("config file", "?", f"not valid YAML ({message(exc)})", "YAML",
                       "correct the file")
    path = Path(mark.name)
    opened = getattr(exc, "context_mark", None)  # where the unclosed [ or { began, if any
    what = str(getattr(exc, "problem", None) or message(exc))
    if getattr(exc, "context", None):
        began = f" at line {opened.line + 1}, column {opened.column + 1}" if opened else ""
        what = f"{exc.context}{began}: {what}"
    primary = path.name == f"{CONFIG_NAME}.yaml"
    return problem("config file" if primary else path.parent.name,
                   path.name if primary else path.stem,
                   f"{path} is not valid YAML at line {mark.line + 1}, column {mark.column + 1} "
                   f"({what})", "a YAML mapping of config keys, as in lmalign's conf/",
                   f"correct line {(opened or mark).line + 1} of {path}")


def diagnose(overrides: list[str], multirun: bool = False,
             config_dir: str | None = None) -> list[str]:
    """Every problem of a command line that Hydra could not compose, one line each.
    `config_dir`: the command's --config-dir (your own options and recipes beside ours)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmalign.validate import validate

    problems: list[str] = []
    candidates = _single_values(overrides, problems, multirun)
    # Sweep values of one key cannot be composed together: later values are tried separately.
    first = {}
    for index, (_, parsed) in enumerate(candidates):
        first.setdefault(parsed.key_or_group, index)
    kept = [c for i, c in enumerate(candidates) if first[c[1].key_or_group] == i]
    extra = [c for i, c in enumerate(candidates) if first[c[1].key_or_group] != i]

    yours = [Path(config_dir).resolve()] if config_dir else []
    search = [f"hydra.searchpath=[file://{yours[0]}]"] if yours else []

    def compose(name: str, overrides: list[str]) -> DictConfig:
        return hydra_compose(name, overrides=search + overrides)

    GlobalHydra.instance().clear()
    found = _Found(problems, yours + [Path(CONF_DIR)])
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="lmalign"):
        found.loader = GlobalHydra.instance().config_loader()
        kept = found.drop_unknown_keys(kept, compose)
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


def removed_required_keys(overrides: list[str]) -> list[str]:
    """`~key` on a key every run needs (a config group, stage, a field without a default):
    one problem each. Entries of a mapping (dataset.where.*) and optional blocks may go."""
    import dataclasses

    from lmalign.type_errors import _walk

    problems = []
    for text in overrides:
        try:
            parsed = adapters.parse_override(text)
        except Exception:
            continue  # reported by diagnose, with the grammar's own message
        if not parsed.is_delete():
            continue
        key = parsed.key_or_group.lstrip("/")
        parts, _, owner = _walk(tuple(key.split(".")))
        field = next((f for f in dataclasses.fields(owner) if f.name == parts[-1]), None) \
            if owner is not None and len(parts) == len(key.split(".")) else None
        if field is not None and field.default is dataclasses.MISSING:
            problems.append(f"{text}: removes {key}, which every run needs; allowed: another "
                            f"value for it; fix: drop {text}, or set {key}=<value>")
    return problems


def _single_values(overrides: list[str], problems: list[str],
                   multirun: bool) -> list[tuple[str, Any]]:
    """(text, parsed) for each override, a sweep's values one by one; what does not parse, and
    a sweep without -m, is a problem."""
    texts: list[str] = []
    for text in overrides:
        try:
            parsed = adapters.parse_override(text)
        except Exception as exc:  # the parser's own message says where it stopped
            problems.append(_unparsable(text, exc))
            continue
        if parsed.is_sweep_override() and not multirun:
            key, _, value = text.partition("=")
            problems.append(
                f"{text}: several values, which only a sweep takes; allowed: one value, a list "
                f"in brackets, or -m to run one job per value; fix: -m {text} (a sweep), "
                f"{key}=[{value}] (a list), or {key}='{value}' (a text with commas)")
            continue
        if parsed.is_sweep_override():
            key = parsed.get_key_element()
            texts += [f"{key}={value}" for value in parsed.sweep_string_iterator()]
        else:
            texts.append(text)
    return [(text, adapters.parse_override(text)) for text in texts]



def _unparsable(text: str, exc: Exception) -> str:
    """Hydra's grammar error in one line, with the override quoted as the grammar needs:
    characters such as = + ( ) or spaces inside a value must be in quotes."""
    cause = " ".join(line for line in str(exc).splitlines()
                     if line.strip() and not line.startswith(("Error parsing override", "See ")))
    key, _, value = text.partition("=")
    if value.startswith("[") and value.endswith("]"):
        items = [item.strip().strip("'\"") for item in value[1:-1].split(",")]
        quoted = f"{key}=[{','.join(repr(item) for item in items)}]"
    else:
        quoted = f"{key}={value.strip(chr(39) + chr(34))!r}"
    return (f"could not parse override {text!r}: {cause}; fix: quote the value, {quoted} "
            "(in a shell, put the whole override in double quotes); the grammar: "
            "https://hydra.cc/docs/advanced/override_grammar/basic/")


class _Found:
    """The problems found so far, and the unknown keys among them (for spelling hints)."""

    def __init__(self, problems: list[str], config_dirs: list[Path]) -> None:
        self.problems, self.unknown_keys, self.loader = problems, [], None
        self.config_dirs = config_dirs  # where options live: yours first, then lmalign's

    def _names(self, parsed: Any, option: str) -> bool:
        """Whether the option file a group override chooses mentions `option`."""
        group, value = parsed.key_or_group.lstrip("/"), parsed.value()
        if not isinstance(value, str):
            return False
        for folder in self.config_dirs:
            chosen = folder / group / f"{value}.yaml"
            if chosen.is_file():
                return option in chosen.read_text()
        return False

    def drop_unknown_keys(self, among: list[tuple[str, Any]], compose) -> list[tuple[str, Any]]:
        """The overrides left once those setting a key the config does not have are recorded
        as problems: all found in one composition of the group choices, where one composition
        per key would take a second for every ten."""
        def is_group(parsed) -> bool:
            return config_tree.is_group(parsed.key_or_group)

        try:
            base = compose(CONFIG_NAME, overrides=[t for t, parsed in among if is_group(parsed)])
        except Exception:
            return among  # a group choice is wrong: the one-by-one search finds it
        absent = object()
        kept = []
        for text, parsed in among:
            key = parsed.key_or_group
            if is_group(parsed) or parsed.is_delete() or parsed.is_add() \
                    or parsed.is_force_add() or key.startswith("hydra."):
                kept.append((text, parsed))
            elif OmegaConf.select(base, key, default=absent,
                                  throw_on_resolution_failure=False) is absent:
                self.unknown_keys.append(key)
                self.problems.append(f"{text}: no such key")
            else:
                kept.append((text, parsed))
        return kept

    def culprit(self, exc: Exception, among: list[tuple[str, Any]]) -> int | None:
        """Index in `among` (the overrides just composed) of the one that broke composition,
        its problem recorded; None when no override is to blame."""
        from hydra.errors import MissingConfigException

        if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
            group, _, wanted = exc.missing_cfg_file.rpartition("/")
            options = exc.options or self.loader.get_group_options(group)
            visible = ", ".join(o for o in options if not o.startswith("_"))
            for i, (_, parsed) in enumerate(among):
                if parsed.key_or_group.lstrip("/") == group:
                    value = parsed.value()
                    self.problems.append(
                        f"{parsed.key_or_group}={value}: no such option in group '{group}'; "
                        f"allowed: {visible}; fix: {parsed.key_or_group}="
                        f"{_closest(str(value), options) or '<one of them>'}")
                    return i
            # Not on the command line: a defaults list chose it, in a recipe the command adds.
            for i, (text, parsed) in enumerate(among):
                if group and not parsed.is_delete() and self._names(parsed, wanted):
                    self.problems.append(
                        f"{group}={wanted}: no such option in group '{group}', chosen by the "
                        f"defaults list of {text}; allowed: {visible}; fix: override /{group}: "
                        f"{_closest(wanted, options) or '<one of them>'} in that file")
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
                value = line.split("=", 1)[1].split(": no such key")[0]
                problems[i] = (f"{line}; "
                               f"{_eval_key_hint(key, value, cfg) or _key_hint(key, value, cfg)}")


def _key_hint(key: str, value: str, cfg: DictConfig) -> str:
    parent, _, leaf = key.rpartition(".")
    if not parent and config_tree.is_group(leaf):  # a group the defaults do not select
        return (f"allowed: {leaf} is a config group the defaults do not include; fix: "
                f"+{leaf}={value} adds it")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return "allowed: the keys of the config; fix: check the key's spelling"
    known = [str(k) for k in node.keys() if not str(k).startswith("_")]
    # A nested key written flat (method.lora_r for method.lora.r) is matched as well.
    nested = {f"{k}.{inner}": f"{k}_{inner}" for k in known
              if isinstance(node.get(k), DictConfig) for inner in node[k].keys()}
    flat = {**{k: k for k in known}, **{spelt: dotted for dotted, spelt in nested.items()}}
    match = close_names(leaf, list(flat))
    hint = ("did you mean " + " or ".join(f"{parent + '.' if parent else ''}{flat[m]}"
                                          for m in match) + "?") if match \
        else f"use one of {', '.join(known)}"
    return f"allowed: the keys of {parent or 'the config'}; fix: {hint}"


def _eval_key_hint(key: str, value: str, cfg: DictConfig) -> str | None:
    """Evaluation settings live under their backend (eval.harness.tasks, eval.nemo.benchmarks):
    an old flat key, or a key of a backend the command did not select."""
    import dataclasses

    from lmalign.schema import BACKENDS, GenerateConfig, HarnessConfig, NemoConfig

    parts = key.split(".")
    if parts[0] != "eval" or len(parts) < 2:
        return None
    selected = [b for b in BACKENDS if b in cfg.eval]
    if parts[1] in BACKENDS:  # a backend that is not selected (a selected one: a misspelt key)
        backend = parts[1]
        if backend in selected:
            return None
        wanted = "[" + ",".join(selected + [backend]) + "]"
        return (f"allowed: eval.{backend}.* once eval selects {backend} (selected: "
                f"{', '.join(selected) or 'none'}); fix: 'eval={wanted}', or eval={backend}")
    for backend, schema in (("harness", HarnessConfig), ("nemo", NemoConfig),
                            ("generate", GenerateConfig)):
        if parts[1] in {f.name for f in dataclasses.fields(schema)}:
            moved = ".".join(["eval", backend, *parts[1:]])
            select = "" if backend in selected else f"eval={backend} "
            return (f"allowed: evaluation settings under their backend (eval.{backend}.*); "
                    f"fix: {select}{moved}={value}")
    return None
