"""tools/device_wheels.py: the recipe that carries ortools to the GPU machine (offline parts)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "device_wheels.py"

_spec = importlib.util.spec_from_file_location("device_wheels", SCRIPT)
device_wheels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(device_wheels)


def _wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (), size: int = 0) -> Path:
    """A minimal pure-Python wheel that pip can resolve (and ``size`` bytes of padding)."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", metadata)
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
        if size:
            z.writestr("pad.bin", bytes(size), compress_type=zipfile.ZIP_STORED)
    return path


def test_help_runs():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--dest" in r.stdout and "--offline" in r.stdout


def test_check_resolves_a_complete_set_offline(tmp_path):
    _wheel(tmp_path, "demo-app", "1.0", ("demo-lib>=2",))
    _wheel(tmp_path, "demo-lib", "2.1")
    assert device_wheels.check(tmp_path, "demo-app==1.0") == ["demo-app-1.0", "demo-lib-2.1"]


def test_check_names_what_is_missing(tmp_path, capsys):
    _wheel(tmp_path, "demo-app", "1.0", ("demo-lib>=2",))
    _wheel(tmp_path, "demo-lib", "1.5")  # too old
    with pytest.raises(SystemExit) as e:
        device_wheels.check(tmp_path, "demo-app==1.0")
    assert "complete install set" in str(e.value) and "demo-lib>=2" in str(e.value)


def test_fill_leaves_out_what_the_machine_has(tmp_path):
    cache, dest = tmp_path / "cache", tmp_path / "dest"
    cache.mkdir()
    for name in ("ortools", "protobuf", "immutabledict", "numpy", "pandas", "python-dateutil"):
        _wheel(cache, name, "1.0")
    (dest).mkdir()
    (dest / "stale-0.1-py3-none-any.whl").write_bytes(b"")  # emptied first
    carried = device_wheels.fill(cache, dest, max_mib=1)
    assert sorted(w.name.split("-")[0] for w in carried) == ["immutabledict", "ortools", "protobuf"]
    assert sorted(p.name for p in dest.iterdir()) == sorted(w.name for w in carried)


def test_fill_refuses_two_versions_and_a_folder_too_large(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    _wheel(cache, "ortools", "1.0", size=2 * 2**20)
    with pytest.raises(SystemExit, match="over --max-mib 1"):
        device_wheels.fill(cache, tmp_path / "dest", max_mib=1)
    _wheel(cache, "ortools", "1.1")
    with pytest.raises(SystemExit, match="several versions of ortools"):
        device_wheels.fill(cache, tmp_path / "dest", max_mib=10)


def test_device_command_installs_offline_and_runs_from_source():
    cmd = device_wheels.device_command(".whl", "ortools==9.15.6755")
    assert "--no-index --find-links .whl 'ortools==9.15.6755'" in cmd
    assert "PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT/gpu_check" in cmd
    assert len(cmd) <= 2000  # the device tool's limit on a command


@pytest.mark.skipif(not (ROOT / ".whl-cache").is_dir(), reason="run tools/device_wheels.py first")
def test_downloaded_cache_is_complete_for_the_machine():
    version = importlib.metadata.version("ortools")
    resolved = device_wheels.check(ROOT / ".whl-cache", f"ortools=={version}")
    assert f"ortools-{version}" in resolved and any(w.startswith("protobuf-") for w in resolved)
