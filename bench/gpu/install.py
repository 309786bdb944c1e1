"""Offline install of the carried wheels into a target folder (the node's environment, torch
above all, is never touched): ``pip install --no-index --no-deps --target DIR WHEEL...``.
The check then puts DIR and the repository root on PYTHONPATH for every step it starts.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path


def wheel_files(wheel_dir: Path) -> list[Path]:
    return sorted(wheel_dir.glob("*.whl"))


def install_command(wheels: list[Path], target: Path, python: str = sys.executable) -> list[str]:
    return [python, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check",
            "--no-warn-script-location", "--upgrade", "--target", str(target), *map(str, wheels)]


def install(wheel_dir: Path, target: Path, python: str = sys.executable) -> tuple[bool, str]:
    """Install every wheel of `wheel_dir` into `target`; (ok, one summary line)."""
    wheels = wheel_files(wheel_dir)
    if not wheels:
        return False, f"no wheels in {wheel_dir}: run bench/gpu_wheels.sh where there is network and carry the folder"
    has_pip = subprocess.run([python, "-c", "import pip"], capture_output=True).returncode == 0
    if not has_pip:
        for w in wheels:
            unpack(w, target)
        return True, f"{len(wheels)} wheels from {wheel_dir} unpacked into {target} (no pip here)"
    res = subprocess.run(install_command(wheels, target, python), capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        return False, f"pip install from {wheel_dir} failed: {last[0][:200]}"
    return True, f"{len(wheels)} wheels from {wheel_dir} installed offline into {target}"


def unpack(wheel: Path, target: Path) -> None:
    """Install without pip: a wheel's root is site-packages; its .data/purelib and platlib too
    (scripts and headers are not needed by the check)."""
    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            parts = member.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                dest = target.joinpath(*parts[2:])
            else:
                dest = target / member
            if member.endswith("/"):
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(member))


def check_for_node(wheel_dir: Path, python_version: str, platforms: tuple[str, ...]) -> tuple[bool, str]:
    """Without installing: pip's resolver accepts every wheel for the node's Python and platform."""
    wheels = wheel_files(wheel_dir)
    if not wheels:
        return False, f"no wheels in {wheel_dir}"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--ignore-installed", "--target", str(wheel_dir / ".dry-run-target"),
           "--python-version", python_version, "--implementation", "cp"]
    for p in platforms + ("any",):
        cmd += ["--platform", p]
    res = subprocess.run(cmd + [str(w) for w in wheels], capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        return False, f"{wheel_dir}: a wheel does not suit Python {python_version} {platforms[-1]}: {last[0][:200]}"
    return True, f"{len(wheels)} wheels in {wheel_dir} suit Python {python_version} manylinux x86-64"


def make_wheel(dest: Path, name: str = "hetsp_gpu_check_probe", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel (one module whose VALUE is 42), for the dry run's install test."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hetsp\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{p},,\n" for p in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
        z.writestr(f"{info}/RECORD", record)
    return path
