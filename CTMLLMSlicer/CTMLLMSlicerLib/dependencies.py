"""The heavy Python packages the model needs, checked at first use and installed only with consent.

Slicer ships its own Python with numpy, SimpleITK, vtk, requests and friends; replacing any of
them can break Slicer or other extensions. So the plan installs only the model's packages at
versions checked together (``PINNED``), and pins every Slicer-owned package that is present to
its installed version through a pip constraints file, so that pip cannot upgrade it as a side
effect. Versions are read from package metadata: nothing is imported, so the check is instant.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata

from CTMLLMSlicerLib.errors import MissingDependenciesError

PINNED: dict[str, str] = {
    "torch": "2.13.0",
    "transformers": "5.23.0",
    "peft": "0.21.2",
    "safetensors": "0.8.0",
    "huggingface-hub": "2.4.0",
}
"""Distribution name -> the version this module was tested with (same pins as pyproject.toml)."""

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

VersionLookup = Callable[[str], "str | None"]


def normaliseName(name: str) -> str:
    """PEP 503 style: ``Huggingface_Hub`` and ``huggingface-hub`` are the same package."""
    return name.lower().replace("_", "-").replace(".", "-")


def installedVersion(name: str) -> str | None:
    """The installed version of distribution ``name``, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _major(version: str) -> str:
    return version.split(".", 1)[0]


@dataclass(frozen=True)
class DependencyStatus:
    """One required package: what is needed, what is there, and whether it will do.

    A package with the same major version as the pin is accepted (another extension may have
    installed a close version and we do not replace it); a missing package or another major
    version is not.
    """

    name: str
    required: str
    installed: str | None

    @property
    def usable(self) -> bool:
        return self.installed is not None and _major(self.installed) == _major(self.required)

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.required}"


def checkDependencies(versionOf: VersionLookup = installedVersion) -> list[DependencyStatus]:
    """The status of every pinned package, in install order (torch first)."""
    return [DependencyStatus(name, required, versionOf(name)) for name, required in PINNED.items()]


def planInstall(statuses: Iterable[DependencyStatus]) -> list[str]:
    """Pinned requirements (``name==version``) for the packages that are missing or unusable."""
    plan = [status.requirement for status in statuses if not status.usable]
    owned = [req for req in plan if normaliseName(req.split("==")[0]) in SLICER_OWNED]
    if owned:
        raise ValueError(f"refusing to install Slicer-owned packages {owned}: remove them from PINNED")
    return plan


def slicerConstraints(versionOf: VersionLookup = installedVersion) -> list[str]:
    """``name==installed`` for each Slicer-owned package present, so pip keeps them as they are."""
    lines = []
    for name in sorted(SLICER_OWNED):
        version = versionOf(name)
        if version is not None:
            lines.append(f"{name}=={version}")
    return lines


def describePlan(statuses: Iterable[DependencyStatus]) -> str:
    """The question shown before installing: what is missing or replaced, and what stays untouched."""
    lines = ["The CT-MLLM model needs Python packages that this Slicer does not have yet:", ""]
    for status in statuses:
        if status.usable:
            continue
        found = f"found {status.installed}" if status.installed else "not installed"
        lines.append(f"  - {status.requirement} ({found})")
    lines += [
        "",
        "They are installed into Slicer's Python with pip (about 1 GB; a few minutes).",
        "Packages that Slicer ships (numpy, SimpleITK, vtk, ...) are kept as they are.",
        "Install now?",
    ]
    return "\n".join(lines)


def ensureDependencies(
    confirm: Callable[[str], bool],
    install: Callable[[list[str]], None],
    versionOf: VersionLookup = installedVersion,
    constraintsFolder: str | None = None,
) -> list[str]:
    """Install the missing packages after ``confirm(question)`` agrees; return what was installed.

    ``install`` receives pip arguments as a list (``slicer.util.pip_install`` in Slicer, which
    takes a list so paths with spaces need no quoting): the pinned requirements, then
    ``--constraint FILE`` holding the Slicer-owned packages' versions.
    Raises ``MissingDependenciesError`` when the user declines or the install leaves a gap.
    """
    statuses = checkDependencies(versionOf)
    plan = planInstall(statuses)
    if not plan:
        return []
    if not confirm(describePlan(statuses)):
        raise MissingDependenciesError(
            "the model's Python packages are not installed ("
            + ", ".join(plan)
            + "): click Generate again and accept the install, or install them with slicer.util.pip_install"
        )
    folder = constraintsFolder or tempfile.mkdtemp(prefix="ctmllm-pip-")
    constraintsPath = os.path.join(folder, "slicer-constraints.txt")
    with open(constraintsPath, "w", encoding="utf-8") as stream:
        stream.write("\n".join(slicerConstraints(versionOf)) + "\n")
    install([*plan, "--constraint", constraintsPath])
    stillMissing = planInstall(checkDependencies(versionOf))
    if stillMissing:
        raise MissingDependenciesError(
            f"pip finished but {', '.join(stillMissing)} are still missing: see the Python console for pip's output"
        )
    return plan
