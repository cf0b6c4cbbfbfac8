"""docs/design.md and the README stay true to the code: cited sections exist, the config-group
table lists conf/, and the layers import only what docs/design.md (Architecture) allows."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

DESIGN = REPO / "docs" / "design.md"


def _sources() -> list[Path]:
    return [p for folder in ("lmalign", "hydra_plugins", "conf", "launch", "benchmarks")
            for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".yaml", ".json")]


def test_every_design_citation_names_a_section_of_docs_design_md():
    headings = {line.lstrip("#").strip() for line in DESIGN.read_text().splitlines()
                if line.startswith("#")}
    cited = {}
    for path in _sources() + [REPO / "README.md"]:
        text = " ".join(path.read_text().split())  # citations may wrap across lines
        for section in re.findall(r"docs/design\.md, ([A-Z][a-z]+(?: [a-z]+)*)", text):
            cited.setdefault(section, path)
        # The founders' sketch is not in the repository: nothing may cite it.
        assert not re.search(r"\bDESIGN\b(?!_)", text), f"{path} cites DESIGN"
    assert cited
    missing = {section: str(path) for section, path in cited.items() if section not in headings}
    assert not missing, f"cited but not in docs/design.md: {missing}"


def _readme_groups() -> dict[str, list[str]]:
    text = (REPO / "README.md").read_text()
    table = text.split("## Config groups (`conf/`)", 1)[1].split("\n\n", 2)[1]
    rows = [line.split("|")[1:3] for line in table.splitlines()[2:] if line.startswith("|")]
    return {group.strip(): [o.strip() for o in options.split(",")] for group, options in rows}


def test_the_readme_config_group_table_lists_every_option_in_conf():
    conf = REPO / "conf"
    found = {group.name: sorted(p.stem for p in group.glob("*.yaml") if not p.stem.startswith("_"))
             for group in conf.iterdir() if group.is_dir() and group.name not in (
                 "hydra", "arm", "model_method")}
    listed = _readme_groups()
    assert {g: sorted(o) for g, o in listed.items()} == found


LIBRARY = ("models", "data", "training", "methods", "evaluation", "launch", "worker", "memory",
           "loggers", "embedded", "tinytask", "machine", "schema", "validate", "type_errors",
           "rundir", "errors", "secrets", "tables", "adapters", "processes", "rewards")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_library_modules_take_typed_config_and_never_import_the_entry_or_the_stages():
    for path in (REPO / "lmalign").rglob("*.py"):
        module = path.relative_to(REPO / "lmalign").with_suffix("").parts[0]
        if module not in LIBRARY:
            continue
        imports = _imports(path)
        assert "omegaconf.DictConfig" not in imports, f"{path} takes a DictConfig"
        assert not imports & {"lmalign.cli", "lmalign.run", "lmalign.callbacks",
                              "lmalign.cli.main"}, f"{path} imports the entry or the stages"


def test_the_slurm_plugin_imports_no_entrypoint_module():
    for path in (REPO / "hydra_plugins").rglob("*.py"):
        imports = _imports(path)
        assert not {i for i in imports if i.startswith(("lmalign.cli", "lmalign.run"))}, path


_MUTATORS = {"append", "extend", "insert", "clear", "update", "add", "pop", "popitem", "remove",
             "discard", "setdefault", "__setitem__"}
_CONTAINERS = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)


def _module_state_writes(path: Path) -> list[str]:
    """`global`, a mutable container bound at module level to a name that is not a constant,
    a constant's container changed, or another module's attribute assigned."""
    tree = ast.parse(path.read_text())
    modules = {a.asname or a.name for node in ast.walk(tree)
               if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
    found = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) and node.value else []
        value = getattr(node, "value", None)
        mutable = isinstance(value, _CONTAINERS) or (
            isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
            and value.func.id in ("list", "dict", "set", "defaultdict"))
        for target in targets:
            if mutable and isinstance(target, ast.Name) and not target.id.isupper():
                found.append(f"line {node.lineno}: module-level {target.id} is mutable state")
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.append(f"line {node.lineno}: global {', '.join(node.names)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in _MUTATORS and isinstance(node.func.value, ast.Name) \
                and node.func.value.id.isupper():
            found.append(f"line {node.lineno}: {node.func.value.id}.{node.func.attr}()")
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) \
                        and target.value.id.isupper():
                    found.append(f"line {node.lineno}: {target.value.id}[...] assigned")
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                        and target.value.id in modules:
                    found.append(f"line {node.lineno}: {target.value.id}.{target.attr} assigned")
    return found


def test_no_module_state_is_written_at_run_time():
    """How a job went travels through its own outcome file (lmalign.outcome), never through
    module state (docs/design.md, Architecture); read-only memoised look-ups are fine."""
    found = {str(path.relative_to(REPO)): lines
             for folder in ("lmalign", "hydra_plugins") for path in (REPO / folder).rglob("*.py")
             if (lines := _module_state_writes(path))}
    assert not found, found


def test_the_module_state_check_finds_what_it_forbids(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import other\nerrors = []\nSEEN = {}\n\ndef f():\n    global errors\n"
                      "    SEEN['a'] = 1\n    SEEN.update(b=2)\n    other.flag = True\n")
    assert len(_module_state_writes(sample)) == 5
