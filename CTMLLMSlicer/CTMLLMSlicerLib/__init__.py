"""Helpers of the CTMLLMSlicer module that need neither Qt nor the Slicer application.

``logic.CTMLLMLogicCore`` is the one implementation of the module's logic: the Slicer module
wraps it and the batch script runs it on the slicer-core wheel; ``session.ModelSession`` is the
model side, run in the worker process (``worker``, ``worker_client``) or in-process.

``model_core`` ships next to this package in the built extension. In a source checkout it sits
at the repository root, two folders up; Slicer's additional module path (``CTMLLMSlicer/``)
does not reach it, so it is made importable here when nothing else provides it.
"""

import importlib.util
import os
import sys


def _findModelCore() -> None:
    if importlib.util.find_spec("model_core") is not None:
        return
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isfile(os.path.join(root, "model_core", "__init__.py")):
        sys.path.append(root)


_findModelCore()
