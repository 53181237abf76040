"""The command line every console script shares: absl flags, `--verbose`, user errors in one line.

Each console script defines its flags with absl (its config with ml_collections'
config_flags) in the module of its `main`, which nothing else imports, so two scripts'
flags never meet; its entry point is `run(main, prog)`. absl logs warnings and errors
only, unless `--verbosity` says otherwise.

An error caused by the input ends the script with status 1 and ONE line on stderr,
`<prog>: error: <message>` (`--verbose`: the traceback instead). Those are `UserError`
(raised where an input is checked), absl's `app.UsageError`, FileNotFoundError,
NotADirectoryError and PermissionError (paths the user gave), and any error in parsing
the command line: a flag's value, the config file, its `--config.KEY=VALUE` overrides.
Any other exception is a bug and keeps its traceback. Without `--verbose`, the error logs
of Orbax's background threads are dropped: the error they log reaches the script, which
reports it in one line. Orbax's warnings that a read-only load ignores a writer's options
(each load of an export) are always dropped. `--help` (and `--helpfull`, ...) exits with
status 0.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags, logging

from sabr_jax.errors import UserError, one_line

VERBOSE = flags.DEFINE_bool("verbose", False, "On an error in the input, show its traceback instead of one line.")
USER_ERRORS = (UserError, app.UsageError, FileNotFoundError, NotADirectoryError, PermissionError)


def run(main: Callable[[list[str]], object], prog: str, args: Sequence[str] = ()) -> None:
    """Run `main(argv)` as the console script `prog`; `args` names the positional arguments it takes."""
    module = sys.modules[main.__module__]
    if module.__name__ != "__main__":  # a console script: absl's --help lists the flags of the module argv[0] names
        sys.argv[0] = module.__name__
        sys.modules["__main__"].__doc__ = module.__doc__  # and starts with __main__'s docstring
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[VERBOSE.name])

    def guarded(argv: list[str]):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # Orbax logs every save (and more) at INFO
        logging.get_absl_handler().addFilter(_drop_read_only_notices)
        if not VERBOSE.value:
            logging.get_absl_handler().addFilter(_drop_background_errors)
            sys.unraisablehook = _drop_closed_loop_errors(sys.unraisablehook)
        try:
            if len(argv) - 1 != len(args):
                raise app.UsageError(
                    f"expected the arguments {' '.join(args)}, got {argv[1:]}"
                    if args
                    else f"unexpected arguments: {argv[1:]}"
                )
            return main(argv)
        except USER_ERRORS as error:
            if VERBOSE.value:
                raise
            _exit(prog, one_line(error))

    app.run(guarded, flags_parser=lambda argv: _parse(argv, prog))


def existing_dir(holder: flags.FlagHolder) -> str:
    """The folder a flag names; UserError naming the flag and what its help expects if there is none."""
    if not os.path.isdir(holder.value):
        expected = flags.FLAGS[holder.name].help.rstrip(".")
        raise UserError(
            f"--{holder.name}={holder.value}: no such folder; expected {expected[:1].lower()}{expected[1:]}"
        )
    return holder.value


HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml")  # absl's; each prints and exits (with 1: made 0)


class SizeParser(flags.ArgumentParser):
    """absl parser of an image size `HxW` in pixels (e.g. 368x640) -> (H, W)."""

    def parse(self, argument) -> tuple[int, int]:
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(argument).lower())
        if not match or 0 in (int(match[1]), int(match[2])):
            raise ValueError(f"expected HxW in pixels, e.g. 368x640, got {argument!r}")
        return int(match[1]), int(match[2])

    def flag_type(self) -> str:
        return "HxW"


class SizeSerializer(flags.ArgumentSerializer):
    """(H, W) -> 'HxW', as SizeParser reads it (and --help shows the default)."""

    def serialize(self, value) -> str:
        return "x".join(str(int(v)) for v in value)


def define_size(name: str, default: tuple[int, int] | str, help_text: str) -> flags.FlagHolder:
    """An absl flag of an image size HxW in pixels (SizeParser), its default shown as typed: 368x640."""
    default = default if isinstance(default, str) else SizeSerializer().serialize(default)
    module = sys._getframe(1).f_globals["__name__"]  # the caller's: --help lists the flag with its script's
    return flags.DEFINE(SizeParser(), name, default, help_text, serializer=SizeSerializer(), module_name=module)


def sampler_flags() -> tuple[flags.FlagHolder, flags.FlagHolder, flags.FlagHolder]:
    """Define --steps, --method and --guidance, a command's overrides of an export's cfg.sample
    (sabr-eval, sabr-sample), and return their holders; --help lists them as the caller's."""
    from sabr_jax.diffusion.gaussian import SAMPLING_METHODS

    caller = sys._getframe(1).f_globals["__name__"]
    steps = flags.DEFINE_integer("steps", None, "Sampling steps (default: the export's sample.steps).", lower_bound=1)
    method = flags.DEFINE_enum("method", None, list(SAMPLING_METHODS), "Sampler (default: the export's sample.method).")
    guidance = flags.DEFINE_float(
        "guidance",
        None,
        "Classifier-free guidance scale (default: the export's sample.guidance_scale; 1 = none; > 1 needs a model "
        "trained with cond_drop_prob > 0).",
    )
    for holder in (steps, method, guidance):
        flags.FLAGS.register_key_flag_for_module(caller, flags.FLAGS[holder.name])
    return steps, method, guidance


def _parse(argv: list[str], prog: str) -> list[str]:
    """app.run's flags_parser: absl's, with every error in the command line a user error."""
    try:
        remaining = flags.FLAGS(argv)
        for name in flags.FLAGS:  # config_flags defers a config file's load error to the first use: make it now
            getattr(flags.FLAGS[name].value, "lock", None)
    except BrokenPipeError:  # `--help | head` closed stdout: stop quietly, as absl means to
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0 if _help_in(argv) else 1)
    except SystemExit as stop:  # absl's help flags print the help, then exit with status 1
        if stop.code == 1 and _help_in(argv):
            sys.exit(0)
        raise
    except Exception as error:  # a flag value, the config file or an override: all of them input
        if _verbose_in(argv):
            raise
        if isinstance(error, flags.Error):
            message = one_line(error)
        elif isinstance(error, OSError):  # config_flags: the config file cannot be read
            message = f"cannot load the config file: {str(error).strip().splitlines()[-1].strip()}"
        elif isinstance(error, (AttributeError, KeyError)) and error.args:  # mostly: an override of a key it lacks
            text = str(error.args[0])  # ml_collections: the key, quoted, and maybe "Did you mean ...?"
            key = (re.search(r"\w+", text) or re.search(r".*", text))[0]
            hint = re.search(r"Did you mean [^?]*\?", text)
            flag = next(
                (a.split("=")[0] for a in argv if a.startswith("--config.") and key in a.split("=")[0].split(".")),
                f"a --config.KEY override (key {key!r})",
            )
            message = (
                f"{flag}: the config has no such key{'; ' + hint[0] if hint else ''} "
                "(sabr_jax/config.py documents every key)"
            )
        else:  # raised by the config file's own code
            message = f"in the config file or its --config.KEY overrides: {type(error).__name__}: {one_line(error)}"
        _exit(prog, message)
    return remaining


def _drop_background_errors(record: std_logging.LogRecord) -> bool:
    """A log filter: False for the error logs of Orbax's background save threads and of
    asyncio (its futures' errors, at exit). They repeat, with tracebacks, an error that the
    caller is handed and reports in one line (a failed save: sabr_jax.training.checkpoint)."""
    return not (
        record.levelno >= std_logging.ERROR
        and (f"{os.sep}orbax{os.sep}" in record.pathname or record.name == "asyncio")
    )


# What Orbax's CheckpointManager logs as warnings on every read-only load (an export, by sabr-sample,
# sabr-eval, ...): that it ignores options only a writer uses. Nothing is wrong; the load is ours.
_READ_ONLY_NOTICES = re.compile(r"CheckpointManagerOptions\.read_only=True, setting |Given directory is read only=")


def _drop_read_only_notices(record: std_logging.LogRecord) -> bool:
    """A log filter: False for Orbax's `_READ_ONLY_NOTICES` (its other warnings pass)."""
    return not (
        record.levelno == std_logging.WARNING
        and os.path.basename(record.pathname) == "checkpoint_manager.py"
        and _READ_ONLY_NOTICES.match(record.getMessage())
    )


def _drop_closed_loop_errors(unraisablehook):
    """sys.unraisablehook without the "Event loop is closed" errors that tensorstore's write
    callbacks report after a failed Orbax save has closed its event loop: up to hundreds of
    tracebacks, all about an error the script reports in one line."""

    def hook(unraisable):
        if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
            unraisablehook(unraisable)

    return hook


def _help_in(argv: list[str]) -> bool:
    """Whether argv asks for help (one of absl's HELP_FLAGS, or -?)."""
    probe = flags.FlagValues()
    for name in HELP_FLAGS:
        flags.DEFINE_bool(name, False, "", flag_values=probe, short_name="?" if name == "help" else None)
    try:
        probe(argv, known_only=True)
    except flags.Error:
        return False
    return any(probe[name].value for name in HELP_FLAGS)


def _verbose_in(argv: list[str]) -> bool:
    """--verbose as argv gives it, whether or not its other flags parse."""
    probe = flags.FlagValues()
    flags.DEFINE_bool(VERBOSE.name, False, "", flag_values=probe)
    try:
        probe(argv, known_only=True)
    except flags.Error:  # --verbose=<not a bool>
        return False
    return probe[VERBOSE.name].value


def _exit(prog: str, message: str) -> None:
    sys.stdout.flush()
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(1)
