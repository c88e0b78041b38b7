"""CT reading, checks, preprocessing and the datasets (filled by the data pipeline)."""

from model_core.data.sample import Sample

__all__ = ["Sample"]
