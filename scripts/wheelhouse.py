"""`make wheelhouse`: lmalign and every dependency as wheels, for a machine without network.

    python scripts/wheelhouse.py [--python-version 3.12] [--platform manylinux_2_28_x86_64]
        [--extras deepspeed,serving] [--exclude target-freeze.txt] [--out wheelhouse]

The target may differ from this machine (another Python, another platform). pip resolves for
it (`pip download --only-binary=:all:` with the target's tags). A package PyPI has only as an
sdist (antlr4-python3-runtime, sqlitedict, ...) has no wheel to download, so its wheel is built
here first, found by a resolution for this machine (pip's JSON report says which packages came
as sdists); for another target it must come out pure Python (`none-any`).

`--exclude` takes the target's `pip list --format=freeze`: its versions constrain the resolution
(lmalign is installed beside them, not over them) and the wheels of those exact versions are
left out. A bare name (no version) says the target has the package at a version not known here,
as an image's list of names does: any version of it is left out, and nothing constrains it. At
the end, `pip install --no-index --dry-run` for the target checks that the wheelhouse installs
with nothing else at hand, the excluded packages stood in for by empty wheels of the same name
and version (a bare name's at the version resolved here: the check then holds as far as the
target's version suits, and the install there names one that does not).

`--bitsandbytes-cuda 130` (with `--extras qlora`) trims bitsandbytes' wheel to the native library
the target loads: it ships one per CUDA, ROCm and XPU version (43 MB for 0.50.2), and a target
whose torch is built for CUDA 13.0 loads only libbitsandbytes_cuda130.so (4 MB) and the CPU one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
TARGET_FILE = ".target.json"  # which target a wheelhouse was made for


class Refused(Exception):
    """A problem the user fixes; one `error:` line, exit 2."""


def canonical(name: str, version: str) -> tuple[str, str]:
    """(name, version) as pip compares them: torch_geometric is torch-geometric, 1.0 is 1.0.0."""
    return canonicalize_name(name), str(Version(version))


def public(version: str | None) -> str | None:
    """A version without its local label: a GPU machine's `torch==2.11.0+cu130` is PyPI's
    torch 2.11.0 (built for CUDA 13.0), and PyPI has no release named with the label."""
    return Version(version).public if version else None


def in_wheel(wheel: Path) -> tuple[str, str]:
    """A wheel file's (canonical name, version)."""
    name, version, *_ = parse_wheel_filename(wheel.name)
    return name, str(version)


def read_exclude(path: Path) -> dict[str, str | None]:
    """The target's packages {canonical name: version} from `pip list --format=freeze`; a bare
    name (the target has it, version unknown here) maps to None."""
    if not path.is_file():
        raise Refused(f"EXCLUDE={path}: no such file; write it on the target with: python -m "
                      "pip list --format=freeze > target.txt")
    pins: dict[str, str | None] = {}
    problems = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = (part.strip() for part in line.partition("=="))
        try:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or (sep and not version):
                raise InvalidVersion
            pins[canonicalize_name(name)] = canonical(name, version)[1] if sep else None
        except InvalidVersion:
            problems.append(f"EXCLUDE={path} line {number}: {raw.strip()!r} is neither "
                            "name==version nor a bare name; write the list with: python -m pip "
                            "list --format=freeze")
    if problems:
        raise Refused("\n".join(problems))
    pins.pop("lmalign", None)  # the wheelhouse brings its own
    return pins


LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


def platform_tags(platform: str) -> list[str]:
    """The tags a platform takes wheels of. pip takes `--platform manylinux_2_28_x86_64` to
    mean that tag alone, but a glibc 2.28 system runs every older manylinux wheel too
    (tokenizers ships manylinux_2_17 ones): the older tags are named as well, newest first."""
    found = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not found:
        return [platform]
    glibc, arch = int(found.group(1)), found.group(2)
    tags = []
    for minor in range(glibc, 4, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in LEGACY_MANYLINUX:
            tags.append(f"{LEGACY_MANYLINUX[minor]}_{arch}")
    return tags


def target_flags(python_version: str | None, platform: str | None) -> list[str]:
    flags = ["--only-binary=:all:"]
    if python_version:
        flags += ["--python-version", python_version, "--implementation", "cp"]
    for tag in platform_tags(platform) if platform else []:
        flags += ["--platform", tag]
    return flags


def pip(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          env=env)


def with_find_links(*folders: Path) -> dict[str, str]:
    """pip's environment with our folders added to the find-links it already has (a command-line
    --find-links would replace those, e.g. a machine's local wheels)."""
    env = dict(os.environ)
    env["PIP_FIND_LINKS"] = " ".join(filter(None, [env.get("PIP_FIND_LINKS", ""),
                                                   *map(str, folders)]))
    return env


def build_own_wheel(out: Path) -> Path:
    for old in out.glob("lmalign-*.whl"):
        old.unlink()  # this checkout's wheel replaces an older one of the same version
    built = pip("wheel", "--no-deps", "-q", "-w", str(out), str(ROOT))
    if built.returncode:
        raise SystemExit(f"error: building lmalign's wheel failed:\n{tail(built.stderr)}")
    return next(out.glob("lmalign-*.whl"))


def sdist_only(requirement: str, constraints: Path) -> list[str]:
    """`name==version` of each package in the requirement's tree that PyPI has only as an
    sdist, from a resolution for this machine that prefers wheels (pip's JSON report). The
    target's versions constrain it where this machine can take them; a target on a newer Python
    may pin releases this one cannot install (numpy 2.5 needs 3.12), and then it goes without."""
    for given in ([str(constraints)], []):
        with tempfile.TemporaryDirectory() as folder:
            report = Path(folder) / "report.json"
            found = pip("install", "--dry-run", "--ignore-installed", "--prefer-binary",
                        "--report", str(report), *(["-c", given[0]] if given else []),
                        requirement)
            if found.returncode == 0:
                return [f"{item['metadata']['name']}=={item['metadata']['version']}"
                        for item in json.loads(report.read_text())["install"]
                        if not item["download_info"]["url"].endswith(".whl")]
    raise SystemExit(f"error: pip could not resolve {requirement} here:\n{tail(found.stderr)}")


def tail(pip_output: str) -> str:
    """pip's last lines, where it says what failed."""
    return "\n".join(pip_output.strip().splitlines()[-40:])


def download(requirement: str, out: Path, flags: list[str], constraints: Path) -> list[str]:
    """Every wheel the requirement needs on the target, into `out`; the packages whose wheels
    were built here."""
    print(f"resolving {requirement.split(' @ ')[0]} ...", flush=True)
    built = sdist_only(requirement, constraints)
    for wanted in built:
        print(f"  {wanted}: PyPI has no wheel of it; building one here", flush=True)
        made = pip("wheel", "--no-deps", "-q", "-w", str(out), "-c", str(constraints), wanted)
        if made.returncode:
            raise SystemExit(f"error: building a wheel of {wanted} failed:\n{tail(made.stderr)}")
    print("downloading the wheels for the target ...", flush=True)
    found = pip("download", "-d", str(out), "-c", str(constraints), *flags, requirement,
                env=with_find_links(out))
    if found.returncode:
        raise SystemExit(f"error: pip could not resolve {requirement} for the target:\n"
                         f"{tail(found.stderr)}")
    return built


def refuse_platform_wheels(out: Path, built: list[str], foreign: bool) -> None:
    """A wheel built here for this machine's platform is of no use on another."""
    if not foreign:
        return
    names = {canonicalize_name(wanted.partition("==")[0]) for wanted in built}
    for wheel in out.glob("*.whl"):
        if in_wheel(wheel)[0] in names and not wheel.name.endswith("-none-any.whl"):
            wheel.unlink()
            raise Refused(f"{wheel.name}: PyPI has no wheel of it for the target and the one "
                          "built here is for this machine's platform; build it on a machine "
                          "like the target (pip wheel --no-deps <name>) and put it in the "
                          "wheelhouse")


def leave_out(out: Path, exclude: dict[str, str | None]) -> dict[str, tuple[str, str]]:
    """Remove the wheels of what the target has (its version, or any for a bare name):
    {name: (version, its METADATA)}, whose dependencies (extras included: datasets asks for
    fsspec[http]) the check needs. A bare name keeps the newest version resolved here."""
    left: dict[str, tuple[str, str]] = {}
    for wheel in sorted(out.glob("*.whl"), key=lambda w: Version(in_wheel(w)[1])):
        name, version = in_wheel(wheel)
        if name not in exclude or exclude[name] and public(exclude[name]) != version:
            continue
        with zipfile.ZipFile(wheel) as archive:
            metadata = next(n for n in archive.namelist()
                            if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
            left[name] = (version, archive.read(metadata).decode())
        wheel.unlink()
    return left


def stub_wheels(exclude: dict[str, str | None], left: dict[str, tuple[str, str]],
                folder: Path) -> None:
    """Wheels standing in for what the target has, for the dry-run check only: no files, but
    the real wheel's METADATA where it was downloaded, so its dependencies count. A bare name
    nothing here needed has no stand-in: nothing asks for it."""
    for name, pinned in exclude.items():
        version, metadata = left.get(name, (pinned, None))
        if version is None:
            continue
        dist = f"{name.replace('-', '_')}-{version}"
        with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{dist}.dist-info/METADATA", metadata or
                           f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            wheel.writestr(f"{dist}.dist-info/WHEEL",
                           "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            wheel.writestr(f"{dist}.dist-info/RECORD", "")


def check(requirement: str, out: Path, flags: list[str], exclude: dict[str, str | None],
          left: dict[str, tuple[str, str]]) -> set[tuple[str, str]]:
    """What the target installs from the wheelhouse: (canonical name, version) each."""
    with tempfile.TemporaryDirectory() as stubs:
        stub_wheels(exclude, left, Path(stubs))
        report = Path(stubs) / "report.json"
        found = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
             "--no-index", "--isolated", "--find-links", str(out), "--find-links", stubs, *flags,
             "--report", str(report), requirement], capture_output=True, text=True)
        if found.returncode:
            raise SystemExit("error: the wheelhouse does not install with --no-index for the "
                             f"target:\n{tail(found.stderr)}")
        installs = {canonical(item["metadata"]["name"], item["metadata"]["version"])
                    for item in json.loads(report.read_text())["install"]}
    from_wheelhouse = {(name, version) for name, version in installs if name not in exclude}
    print(f"checked: pip install --no-index --dry-run for the target installs "
          f"{len(from_wheelhouse)} packages from the wheelhouse, with "
          f"{len(installs) - len(from_wheelhouse)} of EXCLUDE's as present")
    return from_wheelhouse


def drop_unneeded(out: Path, needed: set[tuple[str, str]]) -> list[Path]:
    """Wheels the target does not install: what only a left-out package needed (torch's CUDA
    libraries beside the target's own torch), or an older version from an earlier run."""
    dropped = []
    for wheel in sorted(out.glob("*.whl")):
        if in_wheel(wheel) not in needed:
            dropped.append(wheel)
    return dropped


def trim_bitsandbytes(out: Path, cuda: str) -> tuple[float, float]:
    """Rewrite bitsandbytes' wheel keeping only its CPU library and the one for CUDA `cuda`
    (e.g. 130), RECORD to match; (MiB before, MiB after). Written aside, then moved over."""
    wheels = [w for w in out.glob("*.whl") if in_wheel(w)[0] == "bitsandbytes"]
    if not wheels:
        raise Refused("--bitsandbytes-cuda: no bitsandbytes wheel in the wheelhouse; allowed: "
                      "with the extra that brings it; fix: --extras qlora (make: EXTRAS=qlora)")
    wheel = wheels[0]
    native = re.compile(r"bitsandbytes/libbitsandbytes_(\w+)\.(so|dll|dylib)$")
    with zipfile.ZipFile(wheel) as source:
        names = source.namelist()
        kinds = sorted({m[1] for n in names if (m := native.search(n))})
        keep = {"cpu", f"cuda{cuda}"}
        if f"cuda{cuda}" not in kinds and any(k.startswith("cuda") for k in kinds):
            raise Refused(f"--bitsandbytes-cuda={cuda}: {wheel.name} has no library for it; "
                          "allowed: " + ", ".join(k[4:] for k in kinds if k.startswith("cuda"))
                          + "; fix: the target torch's CUDA without the dot "
                          "(python -c 'import torch; print(torch.version.cuda)')")
        dropped = {n for n in names if (m := native.search(n)) and m[1] not in keep}
        if not dropped:
            size = wheel.stat().st_size / 2**20
            return size, size
        before = wheel.stat().st_size / 2**20
        partial = wheel.with_suffix(".partial")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as trimmed:
            for info in source.infolist():
                if info.filename in dropped:
                    continue
                data = source.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = "".join(line for line in data.decode().splitlines(keepends=True)
                                   if line.split(",")[0] not in dropped).encode()
                trimmed.writestr(info, data)
    partial.replace(wheel)
    return before, wheel.stat().st_size / 2**20


def record_target(out: Path, target: dict) -> None:
    """One wheelhouse, one target: wheels for another would resolve wrongly there."""
    recorded = out / TARGET_FILE
    if recorded.exists():
        before = json.loads(recorded.read_text())
        if before != target:
            raise Refused(f"{out} holds wheels for another target ({before}); remove it or set "
                          "WHEELHOUSE=<another folder>")
    out.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(target, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="",
                        help="the target's Python, e.g. 3.12 (default: this one)")
    parser.add_argument("--platform", default="",
                        help="the target's platform tag, e.g. manylinux_2_28_x86_64 "
                             "(default: this machine's)")
    parser.add_argument("--extras", default="", help="lmalign's extras, e.g. deepspeed,serving")
    parser.add_argument("--exclude", default="",
                        help="the target's `pip list --format=freeze`: constraints, left out")
    parser.add_argument("--out", default=str(ROOT / "wheelhouse"))
    parser.add_argument("--bitsandbytes-cuda", default="",
                        help="keep only bitsandbytes' library for this CUDA, e.g. 130 (13.0)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    extras = ",".join(e.strip() for e in args.extras.split(",") if e.strip())
    try:
        if args.bitsandbytes_cuda and not {"qlora", "dev"} & set(extras.split(",")):
            raise Refused(f"--bitsandbytes-cuda={args.bitsandbytes_cuda}: trims bitsandbytes, "
                          "which only the qlora extra brings; allowed: with --extras qlora; "
                          "fix: --extras qlora (make: EXTRAS=qlora)")
        exclude = read_exclude(Path(args.exclude)) if args.exclude else {}
        record_target(out, {"python_version": args.python_version or "this machine's",
                            "platform": args.platform or "this machine's", "extras": extras,
                            "exclude": sorted(f"{n}=={v}" if v else n
                                              for n, v in exclude.items())})
    except Refused as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    flags = target_flags(args.python_version, args.platform)
    own = build_own_wheel(out)
    requirement = f"lmalign[{extras}]" if extras else "lmalign"
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write("".join(f"{n}=={public(v)}\n" for n, v in exclude.items() if v))
        constraints.flush()
        built = download(f"{requirement} @ {own.as_uri()}", out, flags, Path(constraints.name))
    try:
        refuse_platform_wheels(out, built, bool(args.python_version or args.platform))
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.bitsandbytes_cuda:
        try:
            before, after = trim_bitsandbytes(out, args.bitsandbytes_cuda.replace(".", ""))
        except Refused as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"bitsandbytes trimmed to CUDA {args.bitsandbytes_cuda}'s library: "
              f"{before:.1f} -> {after:.1f} MiB")
    left = leave_out(out, exclude)
    dropped = drop_unneeded(out, check(requirement, out, flags, exclude, left))
    if dropped:
        print(f"dropped {len(dropped)} wheels the target would not install "
              f"({sum(w.stat().st_size for w in dropped) / 2**20:.1f} MiB): "
              + ", ".join(in_wheel(w)[0] for w in dropped))
        for wheel in dropped:
            wheel.unlink()
    wheels = sorted(out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{out}: {len(wheels)} wheels, {size:.1f} MiB"
          + (f"; built here: {', '.join(built)}" if built else "")
          + (f"; left out ({len(left)}, the target has them): "
             + ", ".join(f"{name} {exclude[name]}" for name in sorted(left) if exclude[name])
             if left else ""))
    unversioned = sorted(name for name in left if exclude[name] is None)
    if unversioned:
        print(f"assumed on the target at versions that suit lmalign (EXCLUDE names them without "
              f"a version; the install there names any that does not): {', '.join(unversioned)}")
    print(f"on the target: python -m pip install --no-index --find-links {out.name} "
          f"'{requirement}'")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("stopped: interrupted (Ctrl-C); the wheels already in the wheelhouse are kept, and "
              "the same command again fetches only the rest", file=sys.stderr)
        sys.exit(130)
