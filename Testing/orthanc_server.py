"""A real PACS for tests: Debian's Orthanc with its DICOMweb plugin, on a free loopback port.

``OrthancServer`` writes a JSON configuration (HTTP on 127.0.0.1 only, DICOM port off, basic
authentication, storage in a temporary folder), starts ``Orthanc`` as a plain process, waits
until its REST API answers, and stops it afterwards. ``make venv`` installs it where apt exists;
elsewhere ``orthanc_or_skip`` skips the tests with a notice saying how to install it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "batch", "pacs-secret-7f3a"
"""Basic-authentication credentials of the test server (the tests check they never reach a log)."""


def orthanc_or_skip() -> str:
    """The Orthanc executable, or a skip with how to install it."""
    executable = shutil.which("Orthanc")
    if executable is None or not PLUGIN.is_file():
        pytest.skip(
            "Orthanc with its DICOMweb plugin is not installed (Debian packages orthanc and orthanc-dicomweb; "
            "make venv installs them as root where apt-get exists): the PACS round-trip tests did not run"
        )
    return executable


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class OrthancServer:
    """One Orthanc process; ``url`` is its REST root, ``dicomweb`` its DICOMweb root."""

    def __init__(self, folder: Path) -> None:
        self.executable = orthanc_or_skip()
        self.folder = folder
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, attempts: int = 3) -> OrthancServer:
        """Start on a free port (another process may take the port in between: try again)."""
        for _ in range(attempts):
            self.port = _free_port()
            storage = self.folder / f"storage-{self.port}"
            storage.mkdir(parents=True)
            config = self.folder / f"orthanc-{self.port}.json"
            config.write_text(json.dumps(self._config(storage)), encoding="utf-8")
            log = open(self.folder / f"orthanc-{self.port}.log", "wb")
            self.process = subprocess.Popen(
                [self.executable, str(config)], stdout=log, stderr=subprocess.STDOUT
            )
            log.close()
            if self._wait_until_ready():
                return self
            self.stop()
        raise RuntimeError(f"Orthanc did not start; see the logs in {self.folder}")

    def _config(self, storage: Path) -> dict:
        return {
            "Name": "ctmllm-test-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "DicomServerEnabled": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpCompressionEnabled": False,
        }

    def _wait_until_ready(self, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if requests.get(f"{self.url}/system", auth=(USER, PASSWORD), timeout=2).ok:
                    return True
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        self.process = None

    # -- what the tests ask the PACS directly (its REST API, not the code under test) ------------
    def get(self, path: str) -> object:
        response = requests.get(f"{self.url}{path}", auth=(USER, PASSWORD), timeout=30)
        response.raise_for_status()
        return response.json()

    def upload(self, file: Path) -> requests.Response:
        """POST one DICOM file to ``/instances``, as a modality's gateway would."""
        return requests.post(
            f"{self.url}/instances", data=file.read_bytes(), auth=(USER, PASSWORD), timeout=60
        )

    def series_of_study(self, study_uid: str) -> list[dict]:
        """Every series of the study with its main DICOM tags (Modality, SeriesInstanceUID...)."""
        found = requests.post(
            f"{self.url}/tools/find",
            json={"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
            auth=(USER, PASSWORD),
            timeout=30,
        )
        found.raise_for_status()
        return found.json()

    def sr_instances(self, study_uid: str) -> list[str]:
        """Orthanc ids of the SR instances in a study."""
        return [
            i
            for s in self.series_of_study(study_uid)
            if s["MainDicomTags"].get("Modality") == "SR"
            for i in s["Instances"]
        ]

    def instance_file(self, orthanc_id: str) -> bytes:
        response = requests.get(f"{self.url}/instances/{orthanc_id}/file", auth=(USER, PASSWORD), timeout=30)
        response.raise_for_status()
        return response.content
