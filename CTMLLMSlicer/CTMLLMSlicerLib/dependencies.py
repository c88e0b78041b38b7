"""The model's Python packages in Slicer: checked at first use, installed the Slicer way with consent.

- Slicer 5.10 (Python 3.12) or newer is needed: torch 2.6+ and transformers 5 do not exist for
  Slicer 5.8's Python 3.9. An older Slicer gets a message naming the version, before anything is
  installed (``checkSlicerVersion``).
- torch comes from the PyTorch extension (PyTorchUtils, a dependency of this extension), which
  picks the CPU or CUDA build for the computer's driver; a pinned PyPI torch would pull several GB
  of CUDA packages on Linux and be CPU-only on Windows.
- The other packages are installed with pip, as version ranges (other extensions share them),
  with a constraints file that pins every package Slicer ships to its installed version, so pip
  cannot replace them as a side effect.
- A failed install says why: no internet connection, or pip's last error line and where pip's
  full log is.

Versions are read from package metadata: nothing is imported, so the check is instant.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata

from CTMLLMSlicerLib.errors import InstallFailedError, MissingDependenciesError, UnsupportedSlicerError

MINIMUM_SLICER = (5, 10)
"""The first Slicer whose Python (3.12) has torch 2.6+ and transformers 5; Slicer 5.8 runs 3.9."""
MINIMUM_PYTHON = (3, 11)
"""What transformers 5 requires (a self-built Slicer may run another Python than its release)."""
TORCH = "torch"
TORCH_REQUIREMENT = ">=2.6"
"""What transformers 5 needs; the PyTorch extension installs the newest build for the computer."""
REQUIREMENTS: dict[str, str] = {
    "transformers": ">=5.23,<6",
    "safetensors": ">=0.6,<1",
    "huggingface-hub": ">=2.4,<3",
}
"""pip requirements besides torch: ranges checked with this module, not pins (shared packages)."""

SLICER_OWNED: frozenset[str] = frozenset(
    {
        "numpy",
        "simpleitk",
        "vtk",
        "pip",
        "setuptools",
        "wheel",
        "requests",
        "urllib3",
        "certifi",
        "charset-normalizer",
        "idna",
        "packaging",
        "pydicom",
        "scipy",
        "pillow",
        "six",
    }
)
"""Packages Slicer's Python ships (normalised names): never installed or upgraded by this module."""

_OFFLINE_MARKERS = (
    "failed to establish a new connection",
    "temporary failure in name resolution",
    "name or service not known",
    "nodename nor servname provided",
    "network is unreachable",
    "getaddrinfo failed",
    "no route to host",
    "connection refused",
    "read timed out",
)

VersionLookup = Callable[[str], "str | None"]


def normaliseName(name: str) -> str:
    """PEP 503 style: ``Huggingface_Hub`` and ``huggingface-hub`` are the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installedVersion(name: str) -> str | None:
    """The installed version of distribution ``name``, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def checkSlicerVersion(slicerVersion: tuple[int, ...], pythonVersion: tuple[int, ...] | None = None) -> None:
    """Refuse a Slicer older than 5.10 or a Python older than 3.12, naming what is needed."""
    python = tuple(pythonVersion or sys.version_info[:3])
    if tuple(slicerVersion[:2]) >= MINIMUM_SLICER and python[:2] >= MINIMUM_PYTHON:
        return
    have = ".".join(map(str, slicerVersion))
    raise UnsupportedSlicerError(
        f"CT-MLLM needs 3D Slicer {'.'.join(map(str, MINIMUM_SLICER))} or newer (with Python "
        f"{'.'.join(map(str, MINIMUM_PYTHON))} or newer; Slicer 5.10 runs 3.12); this is Slicer {have} with Python "
        f"{'.'.join(map(str, python))}, "
        "for which the model's packages (torch 2.6+, transformers 5) do not exist. Install Slicer 5.10 or newer "
        "from https://download.slicer.org; nothing was installed."
    )


@dataclass(frozen=True)
class DependencyStatus:
    """One required package: what is needed (a version range), what is there, whether it will do."""

    name: str
    specifier: str
    installed: str | None

    @property
    def usable(self) -> bool:
        if self.installed is None:
            return False
        from packaging.specifiers import SpecifierSet

        return SpecifierSet(self.specifier).contains(self.installed, prereleases=True)

    @property
    def requirement(self) -> str:
        return f"{self.name}{self.specifier}"

    def describe(self) -> str:
        found = f"found {self.installed}" if self.installed else "not installed"
        return f"{self.requirement} ({found})"


def checkDependencies(versionOf: VersionLookup | None = None) -> list[DependencyStatus]:
    """torch first, then the pip requirements (``versionOf`` defaults to ``installedVersion``)."""
    versionOf = versionOf or installedVersion
    wanted = {TORCH: TORCH_REQUIREMENT, **REQUIREMENTS}
    return [DependencyStatus(name, spec, versionOf(name)) for name, spec in wanted.items()]


def dependenciesInstalled(versionOf: VersionLookup | None = None) -> bool:
    """True when every package the model needs is installed at a usable version."""
    return all(status.usable for status in checkDependencies(versionOf))


def planInstall(statuses: Iterable[DependencyStatus]) -> list[str]:
    """pip requirements (version ranges) for the missing or unusable packages other than torch."""
    plan = [status.requirement for status in statuses if not status.usable and status.name != TORCH]
    owned = [req for req in plan if normaliseName(re.split(r"[<>=!~ ]", req, maxsplit=1)[0]) in SLICER_OWNED]
    if owned:
        raise ValueError(f"refusing to install Slicer-owned packages {owned}: remove them from REQUIREMENTS")
    return plan


def slicerConstraints(versionOf: VersionLookup | None = None) -> list[str]:
    """``name==installed`` for each Slicer-owned package present, so pip keeps them as they are."""
    versionOf = versionOf or installedVersion
    return [f"{name}=={version}" for name in sorted(SLICER_OWNED) if (version := versionOf(name)) is not None]


def describePlan(statuses: Iterable[DependencyStatus]) -> str:
    """The question shown before installing: what is missing, how it comes, and what stays untouched."""
    statuses = list(statuses)
    lines = ["The CT-MLLM model needs Python packages that this Slicer does not have yet:", ""]
    lines += [f"  - {status.describe()}" for status in statuses if not status.usable]
    lines += [""]
    if any(status.name == TORCH and not status.usable for status in statuses):
        lines.append("PyTorch comes from the PyTorch extension (the CPU or CUDA build for this computer).")
    lines += [
        "The others are installed into Slicer's Python with pip (a few minutes; internet needed).",
        "Packages that Slicer ships (numpy, SimpleITK, vtk, ...) are kept as they are.",
        "Install now?",
    ]
    return "\n".join(lines)


def pipFailure(logPath: str, error: BaseException) -> InstallFailedError:
    """The error to show when pip failed: offline, or its last error line, and where its log is."""
    try:
        with open(logPath, encoding="utf-8", errors="replace") as stream:
            log = stream.read()
    except OSError:
        log = ""
    if any(marker in log.lower() for marker in _OFFLINE_MARKERS):
        return InstallFailedError(
            "could not install the model's packages: no internet connection (pip could not reach the package "
            f"index). Connect to the internet and click again. pip's full log: {logPath}"
        )
    errors = [line.split("ERROR:", 1)[1].strip() for line in log.splitlines() if "ERROR:" in line]
    last = errors[-1] if errors else f"{type(error).__name__}: {error}"
    return InstallFailedError(
        f"pip could not install the model's packages: {last}. pip's full log: {logPath}"
    )


def ensureDependencies(
    confirm: Callable[[str], bool],
    pipInstall: Callable[[list[str]], None],
    installTorch: Callable[[str], bool],
    versionOf: VersionLookup | None = None,
    workFolder: str | None = None,
) -> list[str]:
    """Install the missing packages after ``confirm(question)`` agrees; return what was installed.

    ``installTorch(requirement)`` installs torch the Slicer way (the PyTorch extension) and returns
    False when the user declined there. ``pipInstall`` receives pip arguments as a list
    (``slicer.util.pip_install``): the requirements, ``--constraint FILE`` holding the
    Slicer-owned packages' versions, and ``--log FILE``. Raises ``MissingDependenciesError``
    when the user declines, ``InstallFailedError`` when an install fails or leaves a gap.
    """
    statuses = checkDependencies(versionOf)
    missing = [status for status in statuses if not status.usable]
    if not missing:
        return []
    names = ", ".join(status.requirement for status in missing)
    if not confirm(describePlan(statuses)):
        raise MissingDependenciesError(
            f"the model's Python packages are not installed ({names}): click again and accept the install"
        )
    installed = []
    torch = next((status for status in missing if status.name == TORCH), None)
    if torch is not None:
        if not installTorch(TORCH_REQUIREMENT):
            raise MissingDependenciesError(
                f"PyTorch ({TORCH}{TORCH_REQUIREMENT}) was not installed: click again and accept the PyTorch install"
            )
        installed.append(torch.requirement)
    plan = planInstall(statuses)
    if plan:
        folder = workFolder or tempfile.mkdtemp(prefix="ctmllm-pip-")
        constraintsPath = os.path.join(folder, "slicer-constraints.txt")
        logPath = os.path.join(folder, "pip-install.log")
        with open(constraintsPath, "w", encoding="utf-8") as stream:
            stream.write("\n".join(slicerConstraints(versionOf)) + "\n")
        try:
            pipInstall([*plan, "--constraint", constraintsPath, "--log", logPath])
        except Exception as error:
            raise pipFailure(logPath, error) from error
        installed += plan
    stillMissing = [status.describe() for status in checkDependencies(versionOf) if not status.usable]
    if stillMissing:
        raise InstallFailedError(
            f"the install finished but {', '.join(stillMissing)} are still not usable: see the Python console; "
            "restart Slicer if a package was in use"
        )
    return installed
