"""Command line: ``python -m model_core {generate,info,convert,demo}``.

``generate`` streams the answer to stdout as it is decoded; ``info`` describes a model folder;
``convert`` adapts a 2D multimodal checkpoint to 3D; ``demo`` is what ``make demo`` runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

AUTO_TASK = "auto"
"""``--task`` value (the default) that lets the task router pick the expert from the prompt."""


def load_input_volume(model, path: str, window: str | None, allow_non_ct: bool) -> np.ndarray:
    """A ``(D, H, W)`` volume prepared as ``model`` expects, from a CT file/folder or an M3D ``.npy``."""
    from model_core.data import load_m3d_npy, load_volume

    if path.endswith(".npy"):
        return load_m3d_npy(path)
    overrides = {"window": window} if window else {}
    volume, _ = load_volume(path, model.preprocess_config(**overrides, allow_non_ct=allow_non_ct))
    return volume


def command_generate(args: argparse.Namespace) -> int:
    from model_core.generation import expert_note
    from model_core.hub import load_model

    model = load_model(
        args.model,
        device=args.device,
        dtype=args.precision,
        allow_download=args.allow_download,
        notice=lambda text: print(text, file=sys.stderr),
    )
    volume = load_input_volume(model, args.volume, args.window, args.allow_non_ct)
    task = None if args.task == AUTO_TASK else args.task
    result = model.generate(
        volume,
        args.prompt,
        task=task,
        max_new_tokens=args.max_new_tokens,
        on_text=lambda chunk: print(chunk, end="", flush=True),
    )
    print()
    print(
        f"[{expert_note(result.expert, '--task' if task else None)}; {result.new_tokens} tokens, "
        f"{result.tokens_per_second:.1f} tok/s, model {model.model_id}]",
        file=sys.stderr,
    )
    return 0


def command_info(args: argparse.Namespace) -> int:
    from model_core.model import CTMLLM

    model = CTMLLM.from_pretrained(args.model)
    config = model.config
    vision = model.family.vision_config
    print(f"model:            {model.model_id} (from {config.source or '?'})")
    print(
        f"family:           {config.family} (vision {vision.model_type}, text {model.family.text_config.model_type})"
    )
    print(f"3D blocks (K):    {config.volume.num_3d_blocks} of {model.volume_adapter.num_blocks}")
    print(f"image size:       {model.volume_adapter.image_size} px, patch {model.family.patch_size}")
    print(f"visual tokens:    at most {config.volume.max_visual_tokens} per volume")
    print(f"MoE:              {config.moe.mode}")
    print(f"framing:          {config.visual_framing} (how slice groups sit in the prompt)")
    print(f"slices:           3 to {config.volume.max_slices} per volume")
    for part, count in model.parameter_counts().items():
        print(f"parameters {part + ':':<16}{count:,}")
    return 0


def command_convert(args: argparse.Namespace) -> int:
    from model_core.config import VolumeAdapterConfig
    from model_core.model import CTMLLM

    model = CTMLLM.from_2d_pretrained(
        args.source,
        volume=VolumeAdapterConfig(
            num_3d_blocks=args.num_3d_blocks, max_visual_tokens=args.max_visual_tokens
        ),
    )
    print(f"saved {model.save_pretrained(args.out)}")
    return 0


def command_demo(args: argparse.Namespace) -> int:
    from model_core.demo import run_demo

    return run_demo(Path(args.out), model_spec=args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_core", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="stream a report or an answer for a CT volume")
    generate.add_argument("--model", default="demo", help="'demo', a model folder, or a Hub repo id")
    generate.add_argument("--volume", required=True, help="NIfTI/NRRD/MHA file, DICOM folder, or M3D .npy")
    generate.add_argument("--prompt", default=None, help="the question (default: write a report)")
    generate.add_argument(
        "--task",
        choices=[AUTO_TASK, "report", "vqa"],
        default=AUTO_TASK,
        help="the task expert that reads the volume: auto (default) lets the model's task router pick it "
        "from the prompt; report or vqa force one",
    )
    generate.add_argument("--max-new-tokens", type=int, default=None)
    generate.add_argument("--window", default=None, help="window preset (default: the data pipeline's)")
    generate.add_argument(
        "--allow-non-ct", action="store_true", help="accept volumes that do not look like CT"
    )
    generate.add_argument("--device", default="auto", help="auto, cpu or gpu")
    generate.add_argument("--precision", default="auto", help="auto, float32, bfloat16")
    generate.add_argument("--allow-download", action="store_true", help="allow a Hub download of --model")
    generate.set_defaults(run=command_generate)

    info = commands.add_parser("info", help="describe a model folder")
    info.add_argument("model")
    info.set_defaults(run=command_info)

    convert = commands.add_parser("convert", help="adapt a 2D multimodal checkpoint to 3D CT")
    convert.add_argument("source", help="2D checkpoint folder or Hub repo id")
    convert.add_argument("--out", required=True)
    convert.add_argument("--num-3d-blocks", type=int, default=2)
    convert.add_argument("--max-visual-tokens", type=int, default=512)
    convert.set_defaults(run=command_convert)

    demo = commands.add_parser("demo", help="a phantom CT, the demo model's report and answers")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--model", default="demo")
    demo.set_defaults(run=command_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
