"""Command line: ``python -m model_core {generate,info,convert,demo}``.

``generate`` streams the answer to stdout as it is decoded; ``info`` describes a model folder;
``convert`` adapts a 2D multimodal checkpoint to 3D; ``demo`` is what ``make demo`` runs.

Exit status: 0 on success; 2 for every problem the user can fix (input, model folder, config,
option), reported as one line ``error: ...`` that names the file or field and the fix; 130 on
Ctrl-C; 1 for an unexpected error (a bug), with its traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import numpy as np

NON_CT_HINT = "pass --allow-non-ct"
"""How a command-line user accepts non-CT input (ends the refusal of a non-CT volume)."""
AUTO_TASK = "auto"
"""``--task`` value (the default) that lets the task router pick the expert from the prompt."""


class UsageError(ValueError):
    """An option value the command cannot use; the message names the option and the fix."""


def prompt_text(value: str | None) -> str | None:
    """``--prompt`` as text the tokenizer can take: bytes that are not UTF-8 (which Python keeps as
    lone surrogates) and an empty question are refused here, not deep in the tokenizer."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UsageError(
            f"--prompt holds bytes that are not UTF-8 text (from character {error.start}); type the question "
            "again or set your terminal to UTF-8"
        ) from None
    if not value.strip():
        raise UsageError("--prompt is empty: type a question, or leave --prompt out for a report")
    return value


def load_input_volume(
    preprocessing: dict, path: str, window: str | None, allow_non_ct: bool
) -> tuple[np.ndarray, str, list[str]]:
    """The model input ``(D, H, W)`` from a CT file/folder or an M3D ``.npy``, what was read, and warnings.

    ``preprocessing``: the model config's; CT goes through ``model_core.data.prepare_input``, the
    decision the batch and the panel share.
    """
    from model_core.data import load_m3d_npy, prepare_input, read_ct
    from model_core.data.errors import NotCTError

    if path.endswith(".npy"):
        volume = load_m3d_npy(path)
        return volume, f"{path}: M3D volume {'x'.join(map(str, volume.shape))} (D, H, W), used as stored", []
    try:
        prepared = prepare_input(
            read_ct(path, allow_non_ct=allow_non_ct), preprocessing, window=window, allow_non_ct=allow_non_ct
        )
    except NotCTError as error:
        raise error.with_hint(NON_CT_HINT) from None
    return prepared.volume, prepared.description, prepared.notices


SR_OPTIONS = {
    "patient_id": "--patient-id",
    "patient_name": "--patient-name",
    "study_instance_uid": "--study-instance-uid",
    "accession_number": "--accession-number",
}
"""The identifiers ``generate --sr`` takes for a volume that did not come from DICOM (or whose UIDs are blank)."""


def command_generate(args: argparse.Namespace) -> int:
    from model_core.config import CTMLLMConfig, check_max_new_tokens
    from model_core.generation import expert_note
    from model_core.hub import CONFIG_FILE, load_model, resolve_model_dir

    subject = None
    if args.sr:  # checked before the model loads: a missing identifier fails at once
        from model_core.dicom_sr import subject_for_input

        given = {name: getattr(args, name) for name in SR_OPTIONS}
        subject = subject_for_input(args.volume, given, how="pass " + ", ".join(SR_OPTIONS.values()))
        for notice in subject.notices:
            print(f"note: {notice}", file=sys.stderr)

    prompt = prompt_text(args.prompt)
    max_new_tokens = check_max_new_tokens(args.max_new_tokens, "--max-new-tokens")
    say = lambda text: print(text, file=sys.stderr)  # noqa: E731
    folder = resolve_model_dir(args.model, allow_download=args.allow_download, notice=say)
    config = CTMLLMConfig.load(folder / CONFIG_FILE)  # a bad config or input fails before the weights load
    volume, description, warnings = load_input_volume(
        config.preprocessing, args.volume, args.window, args.allow_non_ct
    )
    say(f"read: {description}")
    for warning in warnings:
        say(f"warning: {warning}")
    model = load_model(folder, device=args.device, dtype=args.precision, notice=say)
    task = None if args.task == AUTO_TASK else args.task
    result = model.generate(
        volume,
        prompt,
        task=task,
        max_new_tokens=max_new_tokens,
        on_text=lambda chunk: print(chunk, end="", flush=True),
    )
    print()
    print(
        f"[{expert_note(result.expert, '--task' if task else None)}; {result.new_tokens} tokens, "
        f"{result.tokens_per_second:.1f} tok/s, model {model.model_id}]",
        file=sys.stderr,
    )
    if subject is not None:
        from model_core.dicom_sr import ObserverDevice, ReportTurn, build_report_sr, write_report_sr

        turn = ReportTurn("report" if prompt is None else "vqa", prompt or "", result.text)
        sr = build_report_sr(subject, [turn], ObserverDevice.from_model(model))
        print(f"wrote DICOM SR {write_report_sr(sr, args.sr)}", file=sys.stderr)
    return 0


def command_info(args: argparse.Namespace) -> int:
    from model_core.hub import resolve_model_dir
    from model_core.model import CTMLLM

    model = CTMLLM.from_pretrained(
        resolve_model_dir(args.model, notice=lambda text: print(text, file=sys.stderr))
    )
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
    from model_core.hub import add_precision_option

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
    add_precision_option(generate)
    generate.add_argument("--allow-download", action="store_true", help="allow a Hub download of --model")
    generate.add_argument("--sr", metavar="FILE.dcm", help="also write the text as a DICOM Structured Report")
    for name, option in SR_OPTIONS.items():
        generate.add_argument(
            option, dest=name, default="", help=f"SR {name.replace('_', ' ')} (non-DICOM input)"
        )
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


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message names the problem and the fix: the user's to fix, not bugs."""
    from model_core.config import ConfigError
    from model_core.data.errors import CTInputError
    from model_core.hub import ModelNotFoundError
    from model_core.model import ModelLoadError, PromptTooLongError

    # ValueError: the library's refusal of a bad argument (device, precision, task) says what to pass
    return (
        CTInputError,
        ConfigError,
        ModelNotFoundError,
        ModelLoadError,
        PromptTooLongError,
        ValueError,
        OSError,
    )


def one_line(error: BaseException) -> str:
    """An error as one line: its message with line breaks folded; an OS error as file and reason."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if isinstance(error, _expected_errors()):
            print(f"error: {one_line(error)}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(
            f"error: unexpected {type(error).__name__}: {one_line(error)} (a bug: please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
