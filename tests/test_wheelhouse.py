"""make wheelhouse (scripts/wheelhouse.py): lmalign for a machine without network.

The install test builds a wheelhouse for this machine with the target's torch left out, installs
it with --no-index into a fresh virtualenv that has only torch, and runs lmalign there. It costs
a few minutes of downloads and installs, so `make test` leaves it to `make test-wheelhouse`
(marker `wheelhouse`), which CI runs after it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "wheelhouse.py"


def wheelhouse(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=1200)


@pytest.mark.wheelhouse
def test_a_wheelhouse_installs_without_network_beside_the_targets_torch_and_runs(tmp_path):
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
    pip = [str(target / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", "-q", "torch==2.13.0"], check=True)  # this machine's disk
    freeze = tmp_path / "target.txt"
    listed = subprocess.run([*pip, "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout
    # filelock by name alone, as an image's list of names gives it: left out at any version
    freeze.write_text(re.sub(r"(?im)^filelock==.*$", "filelock", listed))
    assert "filelock\n" in freeze.read_text()

    made = wheelhouse("--exclude", str(freeze), "--out", str(tmp_path / "wheelhouse"),
                      cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    assert "checked: pip install --no-index --dry-run" in made.stdout
    wheels = {p.name.split("-")[0].lower() for p in (tmp_path / "wheelhouse").glob("*.whl")}
    assert "torch" not in wheels and "lmalign" in wheels  # the target's torch is left out
    assert "filelock" not in wheels and "assumed on the target at versions that suit" \
        " lmalign (EXCLUDE names them without a version; the install there names any that" \
        " does not): filelock" in made.stdout
    assert {"antlr4_python3_runtime", "sqlitedict"} <= wheels  # sdist-only: built here

    # --isolated: nothing from this machine's pip configuration (its local wheels, its indexes)
    installed = subprocess.run([*pip, "install", "-q", "--isolated", "--no-index",
                                "--find-links", str(tmp_path / "wheelhouse"), "lmalign"],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    plan = subprocess.run([str(target / "bin" / "python"), "-m", "lmalign", "dry_run=true"],
                          cwd=work, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "launch         in this process" in plan.stdout  # the plan, from the packaged conf/
    # The same command again: the wheels are there, nothing is fetched twice, the record holds.
    again = wheelhouse("--exclude", str(freeze), "--out", str(tmp_path / "wheelhouse"),
                       cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]


def test_a_target_list_that_is_not_a_freeze_is_one_line_per_bad_line(tmp_path):
    freeze = tmp_path / "target.txt"
    freeze.write_text("torch==2.11.0\nnumpy>=2\ntorchvision @ file:///opt/wheels/tv.whl\n"
                      "pandas\nscipy==\n")
    refused = wheelhouse("--exclude", str(freeze), "--out", str(tmp_path / "wh"), cwd=tmp_path)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 3 and all(l.startswith("error: EXCLUDE=") for l in lines), lines
    assert "line 2: 'numpy>=2' is neither name==version nor a bare name" in lines[0]
    assert "pip list --format=freeze" in lines[0]
    assert "line 3:" in lines[1] and "line 5: 'scipy=='" in lines[2]  # pandas alone is fine
    assert not (tmp_path / "wh").exists()  # refused before anything was made


def test_a_missing_target_list_and_a_wheelhouse_of_another_target_are_refused(tmp_path):
    refused = wheelhouse("--exclude", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "wh"),
                         cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: EXCLUDE=") and "no such file" in refused.stderr

    out = tmp_path / "wh"
    out.mkdir()
    (out / ".target.json").write_text(json.dumps({"python_version": "3.12"}))
    refused = wheelhouse("--python-version", "3.11", "--out", str(out), cwd=tmp_path)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "holds wheels for another target" in refused.stderr and "WHEELHOUSE=" in refused.stderr


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("wheelhouse_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _wheel(folder: Path, name: str, version: str, requires: str = "") -> Path:
    import zipfile

    dist = f"{name}-{version}"
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as built:
        built.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\n"
                       f"Version: {version}\n{requires}")
    return wheel


def test_a_bare_name_leaves_out_every_version_and_stands_in_at_the_one_resolved(tmp_path):
    """An image's list of package names (no versions): the target has them, whatever version."""
    import zipfile

    script = _load_script()
    freeze = tmp_path / "image.txt"
    freeze.write_text("# the GPU image\nTorch==2.11.0+cu130\npandas\nPyYAML  # a comment\n"
                      "numpy==2.5.2\n")
    exclude = script.read_exclude(freeze)
    assert exclude == {"torch": "2.11.0+cu130", "pandas": None, "pyyaml": None,
                       "numpy": "2.5.2"}
    out = tmp_path / "wh"
    out.mkdir()
    _wheel(out, "torch", "2.11.0")  # PyPI's build of the target's torch+cu130: left out
    _wheel(out, "numpy", "2.4.0")  # another version than the target's: it stays
    _wheel(out, "pandas", "2.2.0")
    _wheel(out, "pandas", "3.0.1", "Requires-Dist: numpy>=2\n")
    _wheel(out, "trl", "1.16.0")
    left = script.leave_out(out, exclude)
    assert sorted(p.name.split("-")[0] for p in out.glob("*.whl")) == ["numpy", "trl"]
    assert left["pandas"][0] == "3.0.1" and "numpy>=2" in left["pandas"][1]
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    script.stub_wheels(exclude, left, stubs)
    # pandas stands in at the version resolved, with its real dependencies; torch as the wheel
    # left out; numpy at the target's pin; pyyaml, which nothing here needed, not at all
    assert sorted(p.name for p in stubs.glob("*.whl")) == [
        "numpy-2.5.2-py3-none-any.whl", "pandas-3.0.1-py3-none-any.whl",
        "torch-2.11.0-py3-none-any.whl"]
    with zipfile.ZipFile(stubs / "pandas-3.0.1-py3-none-any.whl") as stub:
        assert "numpy>=2" in stub.read("pandas-3.0.1.dist-info/METADATA").decode()


def _native_wheel(folder: Path) -> Path:
    """A wheel laid out as bitsandbytes 0.50's: one native library per CUDA/ROCm version."""
    import zipfile

    wheel = folder / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    files = {"bitsandbytes/__init__.py": b"", **{
        f"bitsandbytes/libbitsandbytes_{kind}.so": b"\0" * 1000
        for kind in ("cpu", "cuda126", "cuda128", "cuda130", "rocm70")}}
    record = "".join(f"{name},sha256=x,{len(data)}\n" for name, data in files.items())
    with zipfile.ZipFile(wheel, "w") as built:
        for name, data in files.items():
            built.writestr(name, data)
        built.writestr("bitsandbytes-0.50.2.dist-info/RECORD",
                       record + "bitsandbytes-0.50.2.dist-info/RECORD,,\n")
    return wheel


def test_bitsandbytes_is_trimmed_to_the_targets_cuda_library_and_its_record_matches(tmp_path):
    import zipfile

    script = _load_script()
    wheel = _native_wheel(tmp_path)
    with pytest.raises(script.Refused, match=r"--bitsandbytes-cuda=125: .* has no library for "
                       r"it; allowed: 126, 128, 130"):
        script.trim_bitsandbytes(tmp_path, "125")
    script.trim_bitsandbytes(tmp_path, "130")
    with zipfile.ZipFile(wheel) as trimmed:
        names = set(trimmed.namelist())
        record = {line.split(",")[0] for line in trimmed.read(
            "bitsandbytes-0.50.2.dist-info/RECORD").decode().splitlines()}
    assert {n for n in names if n.endswith(".so")} == {
        "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"}
    assert record == names  # pip's install reads RECORD: nothing listed that is not there
    assert script.trim_bitsandbytes(tmp_path, "130")[0] == wheel.stat().st_size / 2**20
    wheel.unlink()
    with pytest.raises(script.Refused, match=r"no bitsandbytes wheel .* --extras qlora"):
        script.trim_bitsandbytes(tmp_path, "130")
    refused = wheelhouse("--bitsandbytes-cuda", "130", "--out", str(tmp_path / "wh"),
                         cwd=tmp_path)  # asked without the extra: refused before any download
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "only the qlora extra brings" in refused.stderr and not (tmp_path / "wh").exists()
