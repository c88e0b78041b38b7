"""From dataset specs to batches: the one data interface training reads through.

A spec is a dict with ``kind`` and the dataset's own arguments, e.g. ``{"kind": "synthetic",
"num_samples": 64}`` or ``{"kind": "m3d_vqa", "csv_path": "M3D_VQA/train.csv", "mode": "both"}``.
Every dataset yields ``model_core.data.Sample``; a list of specs is concatenated (a mixture of
report and question data). Batches come in a fixed order per epoch (a permutation seeded by the run
seed and the epoch), so a resumed run sees exactly the batches the interrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from importlib import import_module
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from model_core.config import TASKS
from model_core.data.sample import Sample

DATASET_KINDS: dict[str, str] = {
    "synthetic": "model_core.data.synthetic:SyntheticCTDataset",
    "m3d_cap": "model_core.data.datasets:M3DCapDataset",
    "m3d_vqa": "model_core.data.datasets:M3DVQADataset",
    "ct_rate": "model_core.data.datasets:CTRateDataset",
    "jsonl": "model_core.data.datasets:JsonlDataset",
}
"""Spec ``kind`` -> ``module:class``; a new format is one line here."""


def build_dataset(specs: dict[str, Any] | Sequence[dict[str, Any]]) -> Dataset:
    """One dataset of ``Sample`` from a spec or a list of specs (concatenated)."""
    if isinstance(specs, dict):
        specs = [specs]
    parts = []
    for spec in specs:
        spec = dict(spec)
        kind = spec.pop("kind", None)
        if kind not in DATASET_KINDS:
            raise ValueError(f"dataset spec {spec}: kind={kind!r}; choose one of {', '.join(DATASET_KINDS)}")
        module, name = DATASET_KINDS[kind].split(":")
        try:
            parts.append(getattr(import_module(module), name)(**spec))
        except TypeError as error:
            raise ValueError(
                f"dataset kind {kind!r} does not take these arguments {sorted(spec)}: {error}"
            ) from None
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(size)`` drawn from ``(seed, epoch)``: the same in every process and
    every run, and independent of the global random state."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng((self.seed, self.epoch)).permutation(self.size).tolist())

    def __len__(self) -> int:
        return self.size


class SampleCollator:
    """``list[Sample]`` -> ``{"volumes": (B, D, H, W) float32, "prompts", "answers", "tasks"}``.

    With ``volume_shape`` every volume is resampled (trilinear) to it; without, the volumes of a
    batch must share a shape.
    """

    def __init__(self, volume_shape: tuple[int, int, int] | None = None) -> None:
        self.volume_shape = volume_shape

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        volumes = [torch.as_tensor(np.asarray(s.load_volume(), dtype=np.float32)) for s in samples]
        for sample, volume in zip(samples, volumes, strict=True):
            if volume.dim() != 3:
                raise ValueError(
                    f"sample {sample.meta.get('sample_id', '?')}: volume shape {tuple(volume.shape)}, expected (D, H, W)"
                )
            if sample.task not in TASKS:
                raise ValueError(
                    f"sample {sample.meta.get('sample_id', '?')}: task {sample.task!r} is not in {TASKS}"
                )
        if self.volume_shape is not None:
            volumes = [
                F.interpolate(v[None, None], size=self.volume_shape, mode="trilinear", align_corners=False)[
                    0, 0
                ]
                for v in volumes
            ]
        shapes = {tuple(v.shape) for v in volumes}
        if len(shapes) > 1:
            raise ValueError(
                f"a batch holds volumes of shapes {sorted(shapes)}: set data.volume_shape to resample them "
                f"to one shape, or use batch_size 1"
            )
        return {
            "volumes": torch.stack(volumes),
            "prompts": [s.prompt for s in samples],
            "answers": [s.answer for s in samples],
            "tasks": [s.task for s in samples],
        }


def make_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    volume_shape: tuple[int, int, int] | None = None,
    num_workers: int = 0,
    shuffle: bool = True,
) -> DataLoader:
    """A loader in a reproducible order; its own generator keeps the global RNG untouched."""
    if len(dataset) < batch_size:
        raise ValueError(f"the dataset has {len(dataset)} samples, fewer than batch_size={batch_size}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed) if shuffle else None,
        collate_fn=SampleCollator(volume_shape),
        num_workers=num_workers,
        drop_last=shuffle,
        generator=torch.Generator().manual_seed(seed),
    )
