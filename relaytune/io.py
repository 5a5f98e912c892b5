"""File I/O at the edges of every stage: atomic writes of files and whole folders (temp, fsync, rename: readers never
see half of one), and reads that name the file and line of anything malformed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import RelaytuneError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_write_csv(path: str | Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


@contextlib.contextmanager
def atomic_folder(target: str | Path, replace: bool = True) -> Iterator[Path]:
    """A temp folder beside `target` to write into; when the block ends it becomes `target` by renames only. With
    `replace`, an existing `target` is swapped out; without, an existing `target` wins (another process made the same
    folder first) and ours is dropped. A block that raises (SIGTERM's `Stopped` included) leaves no temp folder and
    `target` as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; outputs get the usual permissions
    try:
        yield tmp
        if replace:
            replace_folder(tmp, target)
        else:
            try:
                os.rename(tmp, target)
            except OSError:  # another process won the race; its copy is identical
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(new: Path, target: Path) -> None:
    """Swap `new` in for `target` with renames only."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_text(path: str | Path, missing: str = "file not found") -> str:
    """A text file's content, decoded as UTF-8 strictly: a file in another encoding is one line naming the file,
    the line and the byte offset of the first byte that is not UTF-8."""
    path = Path(path)
    if not path.exists():
        raise RelaytuneError(f"{path}: {missing}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RelaytuneError(f"{path}:{line}: not UTF-8 (byte {e.start} is 0x{data[e.start]:02x}); save the file as "
                             "UTF-8") from None


def read_yaml(path: str | Path, missing: str = "file not found") -> Any:
    """A YAML file's content; a missing file, another encoding or a syntax error is one line naming the file (and
    line)."""
    import yaml

    text = read_text(path, missing)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise RelaytuneError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', None) or 'syntax error'})") from None


def read_json(path: str | Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RelaytuneError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def read_jsonl_lines(path: str | Path) -> list[tuple[int, dict | None, str | None]]:
    """Each non-blank line as (line_number, object or None, problem or None); never raises on a bad line."""
    out: list[tuple[int, dict | None, str | None]] = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            out.append((lineno, None, f"invalid JSON ({e.msg})"))
            continue
        if not isinstance(obj, dict):
            out.append((lineno, None, "not a JSON object"))
            continue
        out.append((lineno, obj, None))
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    """All rows of a file this pipeline wrote itself; any bad line is an error naming it."""
    rows = []
    for lineno, obj, problem in read_jsonl_lines(path):
        if problem:
            raise RelaytuneError(f"{path}:{lineno}: {problem}")
        rows.append(obj)
    return rows
