"""A copy of a wheel without the native libraries one machine never loads, so that the wheels a GPU host lacks fit
the device tool's 64 MiB carry (bitsandbytes 0.50.2 is 43 MB: a library for every CUDA, ROCm and XPU version).

    python -m bench.slim_wheel .whl/bitsandbytes-0.50.2-*.whl --keep 'libbitsandbytes_cuda130.so' --out .whl/

Every file of the package stays but the shared libraries (`*.so`) not matched by a --keep pattern; RECORD is rewritten
for what remains (pip checks it), and the copy keeps the original's file name (a wheel's name is its metadata), so
write it to another folder than the original.
"""

from __future__ import annotations

import argparse
import base64
import csv
import fnmatch
import hashlib
import io
import zipfile
from pathlib import Path, PurePosixPath


def record_line(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def slim(wheel: Path, keep: list[str], out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheel.name
    if target.resolve() == wheel.resolve():
        raise SystemExit(f"{target}: the slim copy would overwrite the original; pass another --out")
    dropped, record_name, rows = [], None, []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            name = PurePosixPath(info.filename).name
            if info.filename.endswith(".dist-info/RECORD"):
                record_name = info.filename
                continue
            if ".so" in name and not any(fnmatch.fnmatch(name, pattern) for pattern in keep):
                dropped.append(info.filename)
                continue
            data = src.read(info)
            dst.writestr(info, data)
            rows.append(record_line(info.filename, data))
        if record_name is None:
            raise SystemExit(f"{wheel}: no .dist-info/RECORD: not a wheel")
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows + [[record_name, "", ""]])
        dst.writestr(record_name, buffer.getvalue())
    return {"wheel": str(target), "bytes": target.stat().st_size, "original_bytes": wheel.stat().st_size,
            "dropped": dropped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--keep", action="append", default=[], help="a shared library to keep (glob; repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="the folder the slim copy goes to")
    args = parser.parse_args()
    result = slim(args.wheel, args.keep, args.out)
    print(f"{result['wheel']}: {result['bytes'] / 2**20:.1f} MiB (from {result['original_bytes'] / 2**20:.1f}), "
          f"{len(result['dropped'])} libraries dropped")


if __name__ == "__main__":
    main()
