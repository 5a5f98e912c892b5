"""The benchmark's helpers that run off the GPU: the slimmed wheel (bench/slim_wheel.py) and the emulated card of
bench/train_throughput.py (what relaytune's host profile then resolves)."""

import base64
import csv
import hashlib
import io
import zipfile

import pytest

from bench.slim_wheel import slim


def make_wheel(path):
    files = {"pkg/__init__.py": b"x = 1\n", "pkg/libpkg_cuda118.so": b"\0" * 1000, "pkg/libpkg_cuda130.so": b"\1" * 10,
             "pkg-1.0.dist-info/METADATA": b"Name: pkg\nVersion: 1.0\n"}
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("pkg-1.0.dist-info/RECORD", "".join(f"{n},,\n" for n in files) + "pkg-1.0.dist-info/RECORD,,\n")
    return path


def test_a_slim_wheel_keeps_the_named_library_and_a_record_that_matches(tmp_path):
    result = slim(make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl"), ["*cuda130.so"], tmp_path / "slim")
    assert result["dropped"] == ["pkg/libpkg_cuda118.so"]
    with zipfile.ZipFile(result["wheel"]) as z:
        names = set(z.namelist())
        assert names == {"pkg/__init__.py", "pkg/libpkg_cuda130.so", "pkg-1.0.dist-info/METADATA",
                         "pkg-1.0.dist-info/RECORD"}
        record = list(csv.reader(io.StringIO(z.read("pkg-1.0.dist-info/RECORD").decode())))
        for name, digest, size in record:
            if name.endswith("RECORD"):
                assert (digest, size) == ("", "")
                continue
            data = z.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, int(size)) == (f"sha256={expected}", len(data))  # what pip checks on install
        assert {row[0] for row in record} == names


def test_a_slim_copy_never_overwrites_its_original(tmp_path):
    wheel = make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl")
    with pytest.raises(SystemExit, match="would overwrite the original"):
        slim(wheel, [], tmp_path)


def test_an_emulated_t4_resolves_the_t4_profile():
    """What --emulate t4 hands relaytune (capability 7.5, fp16 for dtype auto) gives the profile a T4 gets."""
    from bench.train_throughput import EMULATED
    from relaytune.host import HostProfile, effective_profile

    t4 = effective_profile(HostProfile(), "cuda", "float16", EMULATED["t4"]["capability"])
    assert (t4.attn_implementation, t4.compile, t4.frozen_weights_fp32, t4.micro_batch_tokens) == (
        None, False, True, None)
    assert EMULATED["p100"]["capability"] < (7, 0) and not EMULATED["p100"]["bf16"]
