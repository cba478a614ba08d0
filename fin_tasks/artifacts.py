"""Writing outputs atomically and recording what made them."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fin_tasks.errors import OutputError

PROVENANCE_PACKAGES = (
    "fin-tasks", "torch", "transformers", "peft", "bitsandbytes", "datasets",
    "pandas", "pandera", "scikit-learn", "rouge-score",
)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a scratch folder that replaces `final` only if the block succeeds.

    A failure leaves `final` as it was (absent or the previous complete output),
    so no stage ever leaves a half-written artifact behind.
    """
    final = Path(final)
    check_writable(final)
    _remove_stale_scratch(final)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-",
                                    dir=final.parent))
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    _readable(scratch)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    scratch.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def check_writable(final: str | Path) -> None:
    """Fail now, with the place and the fix, if `final` cannot be written (a read-only or
    foreign folder), rather than after the work that would fill it."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{final.name}.probe-", dir=final.parent)
        os.rmdir(probe)
    except OSError as error:
        raise OutputError(f"{final.parent}: cannot write the output {final.name} here "
                          f"({error.strerror or error}); choose another --out-dir or make the "
                          "folder writable") from None


def _remove_stale_scratch(final: Path) -> None:
    """Remove what a killed earlier run left beside `final` (scratch and displaced folders
    named after a process that no longer exists)."""
    for kind in ("tmp", "old"):
        for leftover in final.parent.glob(f".{final.name}.{kind}-*"):
            pid = leftover.name.removeprefix(f".{final.name}.{kind}-").split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _readable(folder: Path) -> None:
    """Give an output the usual modes (mkdtemp makes 0700, some writers 0600), so other
    users of a shared machine or DVC cache can read it; the umask still applies."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_json(path: str | Path, payload: Any) -> None:
    """Write `payload` as indented UTF-8 JSON, atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, sort_keys=False) + "\n",
                   encoding="utf-8")
    tmp.replace(path)


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text, atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line (UTF-8), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]],
              fields: Sequence[str]) -> None:
    """Write `rows` as a UTF-8 CSV with a header of `fields` (keys beyond them ignored)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file written by a stage (one JSON object per line)."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def sha256_file(path: str | Path) -> str:
    """Content hash of a file (hex sha256)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(path: str | Path) -> dict[str, str]:
    """Content hashes of a file, or of every file under a folder, keyed by path."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): sha256_file(p) for p in files}


def sha256_folder(path: str | Path, exclude: Iterable[str] = ()) -> str:
    """One content hash of every file under a folder (relative paths included, files read in
    blocks): the folder's identity. Files named in `exclude` are left out."""
    path, skipped = Path(path), set(exclude)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name not in skipped):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(bytes.fromhex(sha256_file(file)))
    return digest.hexdigest()


def package_versions(names: Iterable[str] = PROVENANCE_PACKAGES) -> dict[str, str | None]:
    """Installed versions of the packages that shape an output (None when absent)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
