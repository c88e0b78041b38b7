"""Two-stage training: ``python -m model_core.train --config CONFIG.yaml --stage 1|2``.

Stage 1 learns what report generation and question answering share: the token-level MoE, the
projector and the language model's LoRA adapters, on a mixture of report and question data.
Stage 2 (``--init STAGE1_DIR``) copies the token-level MoE into one expert per task and trains
only those and the task router, with the language model frozen. See docs/TRAINING.md.

The same command runs on a CPU, one GPU, or many GPUs and machines: ``accelerate launch -m
model_core.train ...`` with an accelerate config choosing DDP, FSDP or DeepSpeed ZeRO. Reads top
to bottom: config -> devices and precision -> data -> model -> optimizer -> resume -> loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from model_core.model import CTMLLM
from model_core.training.checkpoint import (
    MERGED_DIR,
    TrainProgress,
    latest_checkpoint,
    load_adapters,
    prune_checkpoints,
    publish,
    save_adapters,
    staging_dir,
)
from model_core.training.config import TrainingConfig, resolved_config
from model_core.training.data import build_dataset, make_loader
from model_core.training.report import LOSS_PLOT, METRICS_FILE, MetricsLog, plot_loss_curve
from model_core.training.stages import (
    FINAL_DIR,
    build_stage_model,
    enable_gradient_checkpointing,
    export_merged,
    resolve_init,
    set_trainable,
    stage_moe_config,
)

RESOLVED_CONFIG = "config.yaml"


class LossStep(nn.Module):
    """The training computation as a ``forward``, so DDP/FSDP hooks and autocast see it."""

    def __init__(self, model: CTMLLM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, volumes: torch.Tensor, prompts: list[str], answers: list[str], tasks: list[str]
    ) -> dict[str, torch.Tensor]:
        out = self.model.compute_loss(volumes, prompts, answers, tasks)
        return {"loss": out.loss, "lm_loss": out.lm_loss, **out.aux_losses}


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_dir: Path | None  # the merged model; None when stopped before max_steps (--until-step)
    last_record: dict[str, Any]


def prepare_run_dir(
    run_dir: Path, resolved: dict[str, Any], resume: bool | str, is_main: bool
) -> Path | None:
    """Write the resolved config of a new run, or check it against the run being resumed; returns
    the checkpoint to resume from."""
    config_path = run_dir / RESOLVED_CONFIG
    if resume:
        if not config_path.is_file():
            raise FileNotFoundError(f"--resume: {run_dir} has no {RESOLVED_CONFIG}; it is not a run folder")
        saved = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        changed = sorted(key for key in set(saved) | set(resolved) if saved.get(key) != resolved.get(key))
        if changed:
            raise ValueError(
                f"--resume: the config differs from the one {run_dir} was started with in {changed}; an exact "
                f"resume needs the same config (start a new out_dir to change it)"
            )
        return latest_checkpoint(run_dir) if resume is True else Path(resume)
    if (run_dir / METRICS_FILE).exists():
        raise FileExistsError(
            f"{run_dir} already holds a run: pass --resume to continue it, or choose another out_dir"
        )
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    return None


def train(
    config: TrainingConfig,
    stage: int,
    init: str | Path | None = None,
    resume: bool | str = False,
    until_step: int | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Run one stage; ``resume`` is True (latest checkpoint) or a checkpoint folder; ``until_step``
    stops early at that step with a checkpoint, without changing the schedule."""
    # -- config ---------------------------------------------------------------------------------
    settings = config.stage_settings(stage)
    stage_moe_config(config.moe, stage)  # refuses stage 2 without a task-level MoE, before any work
    run_dir = Path(config.out_dir) / f"stage{stage}"
    init_dir = resolve_init(init or Path(config.out_dir) / "stage1") if stage == 2 else None
    resolved = resolved_config(config, stage, str(init_dir) if init_dir else None)

    # -- devices and precision: accelerate reads its launch config (CPU, GPU, DDP, FSDP, ZeRO) ------
    accelerator = Accelerator(
        cpu=config.device == "cpu",
        mixed_precision=settings.mixed_precision,
        gradient_accumulation_steps=settings.grad_accum_steps,
        # stage 2 in hard mode leaves the task experts of absent tasks without gradient
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    checkpoint = prepare_run_dir(run_dir, resolved, resume, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    set_seed(config.seed)  # the model's new modules start the same in every run

    # -- data -----------------------------------------------------------------------------------
    data = config.data
    train_loader = make_loader(
        build_dataset(data.train), settings.batch_size, config.seed, data.volume_shape, data.num_workers
    )
    eval_loader = None
    if data.eval and settings.eval_every:
        eval_set = build_dataset(data.eval)
        eval_loader = make_loader(
            eval_set, min(settings.batch_size, len(eval_set)), config.seed, data.volume_shape, shuffle=False
        )

    # -- model: only what the stage trains has requires_grad ----------------------------------------
    model = build_stage_model(config, stage, init_dir)
    trained = set_trainable(model, stage, config, settings)
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()

    # -- optimizer and schedule (accelerate steps a prepared scheduler once per process) --------------
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    processes = accelerator.num_processes
    scheduler = get_scheduler(
        settings.schedule,
        optimizer,
        num_warmup_steps=settings.warmup_steps * processes,
        num_training_steps=settings.max_steps * processes,
    )
    step_module, optimizer, train_loader, scheduler = accelerator.prepare(
        LossStep(model), optimizer, train_loader, scheduler
    )
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    progress = TrainProgress()
    accelerator.register_for_checkpointing(progress)
    # accelerate keeps the optimizer, scheduler, RNG and progress; the trained tensors are written
    # alone (adapters.safetensors) and the frozen ones rebuilt from the source, so its model file is skipped
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())

    # -- resume ---------------------------------------------------------------------------------
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        load_adapters(model, checkpoint, trained)
    metrics = (
        MetricsLog(run_dir, progress.step if checkpoint is not None else None)
        if accelerator.is_main_process
        else None
    )

    def save_checkpoint() -> None:
        staging = staging_dir(run_dir, progress.step)
        accelerator.save_state(str(staging))
        state = accelerator.get_state_dict(step_module)  # gathers sharded weights (FSDP, ZeRO-3)
        accelerator.wait_for_everyone()  # every process's random states are in before the rename
        if accelerator.is_main_process:
            state = {name.removeprefix("model."): value for name, value in state.items()}
            save_adapters(
                state,
                trained,
                staging,
                {"stage": stage, "step": progress.step, "lm": dataclasses.asdict(config.lm)},
            )
            export_merged(model, staging / MERGED_DIR)
            publish(staging)
            prune_checkpoints(run_dir, settings.keep_last)
            plot_loss_curve(run_dir / METRICS_FILE, run_dir / LOSS_PLOT, f"stage {stage}")
        accelerator.wait_for_everyone()

    # -- loop -----------------------------------------------------------------------------------
    stop_at = min(settings.max_steps, until_step or settings.max_steps)
    samples_per_step = settings.batch_size * settings.grad_accum_steps * processes
    batches_per_epoch = len(train_loader)
    bar = tqdm(
        total=settings.max_steps,
        initial=progress.step,
        desc=f"stage {stage}",
        unit="step",
        disable=not (show_progress and accelerator.is_main_process),
    )
    sums: dict[str, float] = defaultdict(float)
    micro_in_step = 0
    record: dict[str, Any] = {}
    step_started = time.perf_counter()
    while progress.step < stop_at:
        epoch, offset = divmod(progress.micro_batches, batches_per_epoch)
        batches = accelerator.skip_first_batches(train_loader, offset) if offset else train_loader
        batches.set_epoch(epoch)  # the permutation of this epoch (EpochShuffleSampler)
        for batch in batches:
            with accelerator.accumulate(step_module):
                losses = step_module(**batch)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and settings.max_grad_norm:
                    accelerator.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            progress.micro_batches += 1
            micro_in_step += 1
            for name, value in losses.items():
                sums[name] += float(accelerator.reduce(value.detach(), reduction="mean"))
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            seconds = time.perf_counter() - step_started
            record = {"step": progress.step, "epoch": epoch, "lr": scheduler.get_last_lr()[0]}
            record.update({name: total / micro_in_step for name, total in sums.items()})
            record["samples_per_second"] = samples_per_step / max(seconds, 1e-9)
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(
                    f"loss is {record['loss']} at step {progress.step}: lower train.lr or use mixed_precision 'no'"
                )
            if eval_loader is not None and progress.step % settings.eval_every == 0:
                record["eval_loss"] = evaluate_loss(step_module, eval_loader, accelerator)
            if metrics is not None and (progress.step % settings.log_every == 0 or "eval_loss" in record):
                metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            sums.clear()
            micro_in_step = 0
            if (settings.save_every and progress.step % settings.save_every == 0) or progress.step == stop_at:
                save_checkpoint()
            step_started = time.perf_counter()
            if progress.step >= stop_at:
                break
    bar.close()

    # -- the merged model of the stage -------------------------------------------------------------
    final_dir = None
    if progress.step >= settings.max_steps:
        final_dir = run_dir / FINAL_DIR
        if accelerator.is_main_process:
            export_merged(model, final_dir)
            latest = latest_checkpoint(run_dir)
            for name in ("adapters.safetensors", "adapters.json"):
                (final_dir / name).write_bytes((latest / name).read_bytes())
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(run_dir=run_dir, step=progress.step, final_dir=final_dir, last_record=record)


def export_checkpoint(
    config: TrainingConfig, stage: int, checkpoint: str | Path, init: str | Path | None = None
) -> Path:
    """Rebuild a stage's model in this process, load a checkpoint's trained tensors and write its
    merged export to ``checkpoint/model`` (for runs whose processes held only shards)."""
    checkpoint = Path(checkpoint)
    init_dir = resolve_init(init or Path(config.out_dir) / "stage1") if stage == 2 else None
    model = build_stage_model(config, stage, init_dir)
    trained = set_trainable(model, stage, config, config.stage_settings(stage))
    load_adapters(model, checkpoint, trained)
    return export_merged(model.eval(), checkpoint / MERGED_DIR)


@torch.no_grad()
def evaluate_loss(step_module: nn.Module, loader: Any, accelerator: Accelerator) -> float:
    """Mean loss over the eval set (teacher forcing), in eval mode, then back to training mode."""
    step_module.eval()
    total, count = 0.0, 0
    for batch in loader:
        total += float(accelerator.reduce(step_module(**batch)["loss"], reduction="mean"))
        count += 1
    step_module.train()
    return total / max(count, 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_core.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training config YAML (see configs/)")
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True)
    parser.add_argument(
        "--init", default=None, help="stage 2: the stage-1 run folder (default {out_dir}/stage1)"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        help="continue the run in {out_dir}/stage{n} from its latest checkpoint (or the one given)",
    )
    parser.add_argument("--until-step", type=int, default=None, help="stop (with a checkpoint) at this step")
    parser.add_argument("--out-dir", default=None, help="override the config's out_dir")
    parser.add_argument(
        "--export", default=None, metavar="CHECKPOINT", help="only write CHECKPOINT/model, the merged export"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = TrainingConfig.load(args.config)
        if args.out_dir:
            config.out_dir = args.out_dir
        if args.export:
            print(f"wrote {export_checkpoint(config, args.stage, args.export, args.init)}")
            return 0
        result = train(
            config,
            args.stage,
            init=args.init,
            resume=args.resume,
            until_step=args.until_step,
            show_progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not PartialState().is_main_process:
        return 0
    where = result.final_dir or result.run_dir
    print(
        f"stage {args.stage}: {result.step} steps, loss {result.last_record.get('loss', float('nan')):.4f}; {where}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
