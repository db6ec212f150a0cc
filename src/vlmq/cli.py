"""`vlmq` command line: subcommands + Hydra-style overrides; every failure is one line + exit code."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM

log = logging.getLogger("vlmq")
log.addHandler(logging.NullHandler())  # errors reach the terminal once, through main()


def _user_errors() -> tuple[type[BaseException], ...]:
    from vlmq.calib import CalibDataError, ImageRejected
    from vlmq.config import ConfigError
    from vlmq.export.atomic import ExportError
    from vlmq.models.chat import ChatTemplateError
    from vlmq.models.families import UnsupportedModelError
    from vlmq.models.load import SnapshotError
    from vlmq.quantize.calibrate import CalibrationOOMError, QuantizationAuditError
    from vlmq.quantize.sensitivity import FallbackUnreachable
    from vlmq.runtime.loader import CheckpointError

    return (ConfigError, SnapshotError, CalibDataError, ExportError, UnsupportedModelError,
            CalibrationOOMError, QuantizationAuditError, CheckpointError, ImageRejected, FileNotFoundError,
            FallbackUnreachable, ChatTemplateError)


def cmd_quantize(args: argparse.Namespace) -> int:
    from vlmq.config import load_config
    from vlmq.console import console, make_run_dir, quantize_summary, setup_logging
    from vlmq.pipeline import run_quantize

    overrides = list(args.overrides) + (["force=true"] if args.force else [])
    cfg = load_config(overrides)
    run_dir = make_run_dir(cfg.log_root, cfg.run_name)
    args.log_file = setup_logging(run_dir, "quantize.log")
    manifest = run_quantize(cfg, run_dir)
    console.print(quantize_summary(manifest))
    if manifest.get("fidelity_warning"):
        print(f"vlmq: warning: {manifest['fidelity_warning']}", file=sys.stderr)
    print(manifest["export_dir"])
    return 0


def cmd_fetch_model(args: argparse.Namespace) -> int:
    from vlmq.config import ConfigError, load_config
    from vlmq.models.load import fetch_model, inspect_snapshot

    cfg = load_config(list(args.overrides))
    target = cfg.resolve_path(cfg.arch.snapshot)
    if cfg.arch.quantized:
        raise ConfigError(f"arch {cfg.arch.name} is a quantized checkpoint; fetch-model downloads bf16 snapshots")
    if (target / "config.json").exists():
        raise ConfigError(f"{target} already holds a model (config.json); remove it first to download again")
    repo_id = cfg.arch.hub_id if args.source == "hf" else cfg.arch.modelscope_id
    print(f"downloading {repo_id} from {args.source} into {target}", file=sys.stderr, flush=True)
    fetch_model(repo_id, target, args.source)
    inspect_snapshot(target)
    print(target)
    return 0


def quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace an existing export")


def fetch_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=("hf", "modelscope"), default="hf")


# Every subcommand: module, the function that runs it, the function that adds its options, help.
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "quantize": ("vlmq.cli", "cmd_quantize", "quantize_arguments",
                 "calibrate on image+text, quantize the LM to W8A8 INT8, export"),
    "fetch-model": ("vlmq.cli", "cmd_fetch_model", "fetch_model_arguments",
                    "download a snapshot into the models/ layout"),
    "verify": ("vlmq.commands", "cmd_verify", "verify_arguments",
               "check a checkpoint against its manifest and its own config"),
    "generate": ("vlmq.commands", "cmd_generate", "generate_arguments",
                 "generate from a W8A8 checkpoint (or bf16 snapshot) for a quick look"),
    "check": ("vlmq.evaluate.check", "cmd_check", "check_arguments",
              "bf16 vs W8A8 on text and image+text prompts: metrics, gates, HTML+JSON report"),
    "sensitivity": ("vlmq.quantize.sensitivity", "cmd_sensitivity", "sensitivity_arguments",
                    "rank the LM's linears by the KL each adds when quantized alone"),
    "bench": ("vlmq.bench", "cmd_bench", "bench_arguments",
              "prefill/decode speed and peak memory, bf16 vs W8A8, same run"),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmq", description="W8A8 INT8 SmoothQuant for vision-language models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, run, add_arguments, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=getattr(module, run))
        getattr(module, add_arguments)(p)
        p.add_argument("overrides", nargs="*", help="config overrides, e.g. calib.num_samples=512 quant.alpha=0.8")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or `kill`), unwound like Ctrl-C so exports clean up their staging."""


# The last signal received, so an exception that a library made out of the KeyboardInterrupt (pydantic-core
# building a schema turns it into SchemaError) is still reported as the interrupt it was.
_SIGNALLED: list[type[KeyboardInterrupt]] = []


def _raise_terminated(signum: int, frame: object) -> None:
    _SIGNALLED.append(Terminated)
    raise Terminated


def _raise_interrupted(signum: int, frame: object) -> None:
    _SIGNALLED.append(KeyboardInterrupt)
    raise KeyboardInterrupt


def _wrapped_interrupt(err: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (Ctrl-C, or SIGTERM as Terminated) that `err` wraps, if any."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting positionals at a flag, so overrides after `--force` come back here
    if any("=" not in e or e.startswith("-") for e in extra) or not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = list(getattr(args, "overrides", [])) + extra
    args.log_file = None
    _SIGNALLED.clear()
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        previous_int = signal.signal(signal.SIGINT, _raise_interrupted) \
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler else None
    except ValueError:  # not the main thread (embedded use): leave signals alone
        previous = previous_int = None
    try:
        try:
            return args.func(args)
        except Exception as err:
            # A signal that lands inside a library import can come back wrapped (Python re-raises an exception
            # from a class's __set_name__ as RuntimeError, e.g. while pydantic builds ModelOpt's configs).
            interrupt = _wrapped_interrupt(err)
            if interrupt is None and _SIGNALLED:
                interrupt = _SIGNALLED[-1]()
            if interrupt is not None:
                raise interrupt from err
            raise
    except KeyboardInterrupt as err:
        where = f"; logs in {Path(args.log_file).parent}" if args.log_file else ""
        what = "terminated" if isinstance(err, Terminated) else "interrupted"
        log.error("%s by signal", what)
        left = "; no partial export was left behind" if args.command == "quantize" else ""
        print(f"vlmq: {what}{left}{where}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED
    except _user_errors() as err:
        log.error("%s", err)
        print(f"vlmq: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as err:  # a bug, not bad input: one line here, the traceback in the log
        log.exception("unexpected failure")
        where = f" (traceback in {args.log_file})" if args.log_file else ""
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"vlmq: internal error: {type(err).__name__}: {first}{where}", file=sys.stderr)
        if os.environ.get("VLMQ_DEBUG"):
            raise
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)


def entry() -> None:
    """The console script: ``main()``; after a signal, a hard exit once output and logs are flushed.
    Native threads (torch, tokenizers, safetensors) stopped mid-work by the signal can otherwise abort
    the interpreter's shutdown ("terminate called without an active exception", SIGABRT instead of
    the documented exit code). The export's staging was already cleaned up while unwinding."""
    code = main()
    if code in (EXIT_TERMINATED, EXIT_INTERRUPTED):
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
