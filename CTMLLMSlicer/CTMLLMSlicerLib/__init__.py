"""Helpers of the CTMLLMSlicer module that need neither Qt nor the Slicer application.

``logic.CTMLLMLogicCore`` is the one implementation of the module's logic: the Slicer module
wraps it and the batch script runs it on the slicer-core wheel.
"""
