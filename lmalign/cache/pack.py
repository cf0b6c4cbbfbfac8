"""cache.pack=true: the cache as one .tar.gz, or parts of a size a transfer allows."""

from __future__ import annotations

import tarfile
from pathlib import Path


def pack(cache_dir: Path, part_gib: float | None) -> list[Path]:
    """<cache.dir>.tar.gz (or its parts), written under temporary names and renamed at the end."""
    from tqdm import tqdm

    base = cache_dir.with_name(cache_dir.name + ".tar.gz")
    for old in base.parent.glob(base.name + "*"):
        old.unlink()
    entries = sorted(p for p in cache_dir.rglob("*") if p.name != ".manifest.lock")
    total = sum(p.stat().st_size for p in entries if p.is_file() and not p.is_symlink())
    part_bytes = int(part_gib * 2**30) if part_gib else None
    with _Parts(base, part_bytes) as out, tarfile.open(fileobj=out, mode="w|gz") as tar, \
            tqdm(total=total, unit="B", unit_scale=True, desc="packing") as bar:
        for path in entries:
            tar.add(path, arcname=str(Path(cache_dir.name) / path.relative_to(cache_dir)),
                    recursive=False)
            if path.is_file() and not path.is_symlink():
                bar.update(path.stat().st_size)
    return out.finish()


class _Parts:
    """A write-only file that starts a new part every `limit` bytes."""

    def __init__(self, base: Path, limit: int | None):
        self.base, self.limit, self.paths, self.handle, self.written = base, limit, [], None, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.handle:
            self.handle.close()
        if exc_info[0] is not None:
            for path in self.paths:
                path.unlink(missing_ok=True)

    def _next(self) -> None:
        if self.handle:
            self.handle.close()
        name = self.base.name + (f".part-{len(self.paths):03d}" if self.limit else "")
        self.paths.append(self.base.with_name(name + ".partial"))
        self.handle, self.written = open(self.paths[-1], "wb"), 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self.handle is None or (self.limit and self.written >= self.limit):
                self._next()
            room = len(view) if not self.limit else self.limit - self.written
            self.handle.write(view[:room])
            self.written += min(room, len(view))
            view = view[room:]
        return len(data)

    def flush(self) -> None:
        if self.handle:
            self.handle.flush()

    def finish(self) -> list[Path]:
        if self.handle:
            self.handle.close()
            self.handle = None
        done = [path.with_name(path.name.removesuffix(".partial")) for path in self.paths]
        for partial, final in zip(self.paths, done):
            partial.rename(final)
        return done
