"""The ``mixcompile`` command: inspect, convert, plugins, bench, demo.

Exit codes: 0 success, 1 failure (the model or a file is the problem), 2 usage (an argument is).
Errors are one line on stderr; ``MIXCOMPILE_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mixcompile.compiler.recipe import MAX_EXPERTS, MAX_GROUP_SIZE, STRATEGY_OPTIONS
from mixcompile.errors import ConfigError, LoadError, MixcompileError
from mixcompile.io.files import (
    OutputDirectory,
    check_not_overlapping,
    check_output,
    describe_os_error,
    input_paths,
    output_directory,
    path_problem,
    read_json_object,
)
from mixcompile.io.reading import read_model
from mixcompile.runtime.routing import top_k_above_experts
from mixcompile.startup import Terminated, end_import_guard

EPILOG = """examples:
  mixcompile demo
  mixcompile inspect ./my-llama
  mixcompile convert ./my-llama -o ./my-llama-moe --strategy moe --experts 8 --top-k 2
  mixcompile convert ./gpt2 -o ./gpt2-mot --strategy mot --experts 8 --group-size 8 --layers last-half
  mixcompile convert model.pt -o out --strategy moe --trust-pickle
  mixcompile plugins --json
  mixcompile bench ./my-llama-moe --batch 8 --seq 256
"""


MAX_BATCH = 1 << 16
MAX_SEQ = 1 << 20
MAX_STEPS = 100_000


class UsageError(MixcompileError):
    """The command line itself is wrong (exit code 2)."""


class Parser(argparse.ArgumentParser):
    """argparse with mixcompile's one-line errors (``mixcompile: error: ...``, exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message == "argument --layers: expected one argument":  # "-2,-1" was taken for an option
            message += " (negative indices need '=': --layers=-2,-1)"
        print(f"mixcompile: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def bounded_int(low: int, high: int) -> Any:
    """An argparse type: an integer in ``[low, high]``; the error names the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer from {low} to {high}, got {text!r}"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def key_value(text: str) -> tuple[str, Any]:
    """An argparse type: ``KEY=VALUE``, the value read as JSON when it parses (``1.25``, ``true``, ``null``)
    and as a string otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a name, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def device_name(text: str) -> str:
    """An argparse type: a torch device that exists on this machine."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available here; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices"
            )
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: the bench runs on cpu or cuda")
    return text


def _output_path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: give the directory to write the model to")
    return Path(text)


def _path_of(what: str) -> Any:
    """An argparse type: a path, never an empty one (``Path("")`` is the current directory)."""

    def parse(text: str) -> Path:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"an empty path: give the {what}")
        return Path(text)

    parse.__name__ = "path"
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    stdout = sys.stdout
    sys.stdout = _Stdout(stdout)
    try:
        with _one_line_warnings():
            return _main(argv)
    finally:
        sys.stdout = stdout


class _StdoutFailed(Exception):
    """Printing to standard output failed (a full disk under a redirect): not the command's own files."""


class _Stdout:
    """``sys.stdout``, with its write errors told apart from the files a command writes, so that a full
    disk under ``> report.txt`` is not reported as the model output's."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> Any:  # what the stream returns (a count, or None for some wrappers)
        with self._told_apart():
            return self._stream.write(text)

    def flush(self) -> None:
        with self._told_apart():
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    @staticmethod
    @contextlib.contextmanager
    def _told_apart() -> Iterator[None]:
        try:
            yield
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _StdoutFailed(_in_words(exc)) from exc


def _main(argv: Sequence[str] | None) -> int:
    args = argparse.Namespace()
    try:
        end_import_guard()
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1") if not sys.stderr.isatty() else None
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if isinstance(getattr(args, "path", None), Path):
            _check_path(args.path, f"the input {args.path}")
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # a closed pipe fails here, where it is handled, not at the interpreter's exit
        return code
    except (UsageError, ConfigError) as exc:
        return _fail(_as_typed(exc, args), 2)
    except _StdoutFailed as exc:
        return _fail(RuntimeError(_stdout_failed(exc, args)), 1)
    except BrokenPipeError:  # `mixcompile inspect ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 128 + signal.SIGPIPE
    except OSError as exc:
        return _fail(_in_words(exc), 1)
    except (MixcompileError, TypeError, ValueError) as exc:
        return _fail(exc, 1)
    except KeyboardInterrupt:
        return _fail(KeyboardInterrupt(_interrupted("interrupted", args)), 130)
    except Terminated as exc:
        return _fail(RuntimeError(_interrupted(str(exc), args)), 128 + exc.signum)
    except Exception as exc:  # an unexpected failure still gets one line, not a wall of torch internals
        return _fail(RuntimeError(f"unexpected {type(exc).__name__}: {exc}"), 1)


def _as_typed(exc: Exception, args: argparse.Namespace) -> Exception:
    """``exc`` naming the flag the user typed: the recipe's ``sites`` are ``--layers`` here."""
    from mixcompile.compiler.choose import SitesOutOfRange

    layers = getattr(args, "layers", None)
    if layers is not None and isinstance(exc, SitesOutOfRange):
        return UsageError(f"--layers {layers}: {exc.reason}")
    return exc


def _interrupted(what: str, args: argparse.Namespace) -> str:
    """What an interrupt left: nothing written, or (after a convert's commit) the complete new output."""
    out: OutputDirectory | None = getattr(args, "out", None)
    if out is None or not out.committed:
        kept = f": {out.target} is as it was" if out is not None and out.target.exists() else ""
        return f"{what}; nothing was written{kept}"
    if out.replaced:
        return f"{what} after {out.target} was replaced by the complete new model (the old one is gone)"
    return f"{what} after the complete new model was written to {out.target}"


def _stdout_failed(exc: _StdoutFailed, args: argparse.Namespace) -> str:
    text = f"could not print to the standard output ({exc})"
    out: OutputDirectory | None = getattr(args, "out", None)
    if out is not None and out.committed:
        return f"{text}; the complete new model was written to {out.target} before that"
    return text


def _in_words(exc: OSError) -> BaseException:
    """An OS error without its ``[Errno N]``: the file it names and the problem in words."""
    if exc.errno is None or not exc.strerror:
        return exc  # a message of our own
    words = describe_os_error(exc.errno, exc.strerror)
    return type(exc)(f"{exc.filename}: {words}" if exc.filename is not None else words)


def _check_path(path: Path, lead: str) -> None:
    """Refuse up front a path that cannot name a file (a file where a folder should be, a name too long),
    naming the argument (in ``lead``), rather than with the raw OS error of the first call that trips on
    it."""
    problem = path_problem(path)
    if problem is not None:
        raise LoadError(f"{lead}: {problem}.")


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """The library's warnings as the command's other messages: ``mixcompile: warning: ...``, one line,
    without the source line of the library that raised it (which tells a user nothing)."""
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        yield
    finally:
        warnings.showwarning = previous


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    with contextlib.suppress(OSError, ValueError):  # like the standard one: a closed stderr is no error
        print(f"mixcompile: warning: {' '.join(str(message).split())}", file=file or sys.stderr)


def _fail(exc: BaseException, code: int) -> int:
    if os.environ.get("MIXCOMPILE_DEBUG"):
        traceback.print_exception(exc)
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"mixcompile: error: {message}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mixcompile",
        description="Compile dense PyTorch models into Mixture-of-Experts / Mixture-of-Tokens.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser("demo", help="build a small GPT, convert it to MoE and MoT, show what changed")
    demo.set_defaults(handler=_run_demo)

    inspect = commands.add_parser("inspect", help="show the FFN sites a conversion would rewrite")
    _add_input(inspect)
    _add_recipe_options(inspect)
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(handler=_run_inspect)

    convert = commands.add_parser(
        "convert",
        help="rewrite a saved model's FFNs and save the result",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_input(convert)
    convert.add_argument(
        "-o", "--output", required=True, type=_output_path, help="output directory (never the input)"
    )
    convert.add_argument(
        "--force",
        action="store_true",
        help="replace OUTPUT if it is a model directory, holding nothing but a model's files (the old one "
        "goes once the new one is complete)",
    )
    _add_recipe_options(convert)
    convert.set_defaults(handler=_run_convert)

    plugins = commands.add_parser("plugins", help="list routers, mixers, kernels, initializers and patterns")
    plugins.add_argument("--json", action="store_true", help="print as JSON")
    plugins.set_defaults(handler=_run_plugins)

    bench = commands.add_parser("bench", help="time a converted model's forward/backward against its base")
    _add_input(bench)
    _add_recipe_options(bench)
    bench.add_argument("--batch", type=bounded_int(1, MAX_BATCH), default=8, help="sequences per step")
    bench.add_argument(
        "--seq",
        type=bounded_int(1, MAX_SEQ),
        help=f"tokens per sequence (default {DEFAULT_SEQ}, or the model's limit if shorter)",
    )
    bench.add_argument(
        "--steps",
        type=bounded_int(1, MAX_STEPS),
        default=10,
        help="timed iterations (after 2 warm-up ones)",
    )
    bench.add_argument(
        "--device",
        type=device_name,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to time the models: cpu, cuda or cuda:N (default: cuda if there is one, else cpu)",
    )
    bench.set_defaults(handler=_run_bench)
    return parser


def _add_input(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        type=_path_of("model to read"),
        help="a mixcompile directory, a Hugging Face model directory, "
        "a torch.save'd module (.pt, needs --trust-pickle) or a torch.export .pt2 file",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow unpickling a torch.save'd module (unpickling runs code from the file)",
    )
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="allow a manifest to import the function that rebuilds its base model",
    )


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("recipe (flags override --recipe)")
    group.add_argument(
        "--recipe",
        type=_path_of("recipe file"),
        help="a recipe JSON file (like an entry of 'recipes' in mixcompile.json)",
    )
    group.add_argument("--strategy", help="moe or mot (inspect describes moe when not given)")
    group.add_argument(
        "--experts", type=bounded_int(1, MAX_EXPERTS), dest="num_experts", help="experts per block"
    )
    group.add_argument(
        "--top-k", type=bounded_int(1, MAX_EXPERTS), dest="top_k", help="MoE: experts per token"
    )
    group.add_argument(
        "--group-size",
        type=bounded_int(1, MAX_GROUP_SIZE),
        dest="group_size",
        help="MoT: sequences per group",
    )
    group.add_argument(
        "--seed", type=bounded_int(0, 2**63 - 1), help="seed of every random choice of the conversion"
    )
    group.add_argument("--router", help="MoE router plugin (see 'mixcompile plugins')")
    group.add_argument("--mixer", help="MoT mixer plugin")
    group.add_argument("--kernel", help="kernel plugin, or auto")
    group.add_argument("--init", help="initializer plugin: upcycle, split, random, ...")
    group.add_argument(
        "--sizing",
        help="expert hidden size: auto (the default: split for the split initializer, else same), same, "
        "split or flop (flop-matched)",
    )
    group.add_argument(
        "--layers",
        help="which FFNs: all, last-half, every:N, or indices like 0,2,5; negative ones count from the end "
        "(-1 is the last; write them as --layers=-2,-1)",
    )
    group.add_argument(
        "--shared-experts",
        type=bounded_int(0, MAX_EXPERTS),
        dest="num_shared_experts",
        help="MoE: always-on experts (DeepSeekMoE)",
    )
    group.add_argument("--mode", help="MoT: soft (the paper) or sparse (each expert keeps its top member)")
    group.add_argument(
        "--small-batch", dest="small_batch", help="MoT with fewer than G sequences: group or sparse"
    )
    group.add_argument(
        "--layout",
        help="MoT: the FFN inputs' token layout, auto (from the model), batch_first, seq_first or flat",
    )
    for kind, example in (
        ("router", "capacity_factor=1.25"),
        ("mixer", "temperature=0.5"),
        ("init", "noise=0.1"),
    ):
        group.add_argument(
            f"--{kind}-option",
            dest=f"{kind}_options",
            action="append",
            type=key_value,
            metavar="KEY=VALUE",
            help=f"an option of the {kind} plugin, repeatable (e.g. {example}; VALUE read as JSON if it can)",
        )


DEFAULT_SEQ = 128  # bench's tokens per sequence, where the model allows as many

RECIPE_FLAGS = (
    "strategy",
    "num_experts",
    "top_k",
    "group_size",
    "router",
    "mixer",
    "kernel",
    "init",
    "sizing",
    "seed",
    "num_shared_experts",
    "mode",
    "small_batch",
    "layout",
)


def recipe_from_args(args: argparse.Namespace, *, required: bool, default_strategy: str | None = None) -> Any:
    """The recipe file (if any) with the flags laid over it; ``None`` when nothing was asked. Without a
    strategy, ``default_strategy`` (inspect's: what its report of no flags describes) or a usage error."""
    data, from_file = recipe_options(args)
    if not data:
        if required:
            raise UsageError("say what to convert to: --strategy moe|mot (or --recipe FILE).")
        return None
    stated = (
        f"--strategy {args.strategy}"
        if args.strategy is not None
        else f"the strategy {data['strategy']!r} of {args.recipe}"
        if "strategy" in data
        else ""
    )
    if not stated and default_strategy is not None:
        data["strategy"] = default_strategy
    if "strategy" not in data:
        raise UsageError("--strategy moe|mot is required (or a recipe file that has one).")
    _refuse_other_strategys_flags(args, data["strategy"], stated=stated)
    recipe = _recipe(data, from_file, args.recipe)
    if recipe.strategy == "moe" and recipe.top_k > recipe.num_experts:  # refused before loading the model
        top_k = _named(args, from_file, "top_k", "--top-k", recipe.top_k)
        experts = _named(args, from_file, "num_experts", "--experts", recipe.num_experts)
        raise UsageError(top_k_above_experts(top_k, experts))
    return recipe


# The flag of each option only one strategy takes (the recipe's STRATEGY_OPTIONS).
_STRATEGY_OPTION_FLAGS = {
    "top_k": "--top-k",
    "router": "--router",
    "router_options": "--router-option",
    "num_shared_experts": "--shared-experts",
    "group_size": "--group-size",
    "mixer": "--mixer",
    "mixer_options": "--mixer-option",
    "mode": "--mode",
    "small_batch": "--small-batch",
    "layout": "--layout",
}
# Flags of one strategy: typed with the other, they would do nothing (the recipe refuses values other than
# the defaults, but cannot tell a default typed, `--strategy mot --top-k 2`, from one left alone).
STRATEGY_FLAGS = {
    strategy: {name: _STRATEGY_OPTION_FLAGS[name] for name in names}
    for strategy, names in STRATEGY_OPTIONS.items()
}


def _refuse_other_strategys_flags(args: argparse.Namespace, strategy: object, *, stated: str) -> None:
    """``stated``: where the strategy came from, in words ("--strategy mot", "the recipe file's strategy
    'mot'"), or "" when it is the command's default."""
    for other, flags in STRATEGY_FLAGS.items():
        typed = [flag for name, flag in flags.items() if getattr(args, name) not in (None, [])]
        if other == strategy or strategy not in STRATEGY_FLAGS or not typed:
            continue
        one = len(typed) == 1
        them = "it" if one else "them"
        fix = f"drop {them} for {stated}" if stated else f"add --strategy {other}"
        verb = "applies" if one else "apply"
        raise UsageError(f"{', '.join(typed)} {verb} to --strategy {other} only; {fix}.")


def recipe_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The recipe options asked for, the flags laid over the recipe file's; and the file's alone."""
    data: dict[str, Any] = {}
    if args.recipe is not None:
        try:
            data = read_json_object(args.recipe, "recipe file")
        except LoadError as exc:
            raise UsageError(f"--recipe: {exc}") from None
        if "recipes" in data:
            raise UsageError(
                f"--recipe {args.recipe} is a saved model's manifest; pass one recipe, an object like "
                '{"strategy": "moe", "num_experts": 8} (one of the manifest\'s "recipes", say).'
            )
    from_file = dict(data)
    for flag in RECIPE_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            data[flag] = value
    if args.layers is not None:
        data["sites"] = parse_layers(args.layers)
    for kind in ("router", "mixer", "init"):
        pairs = getattr(args, f"{kind}_options")
        if pairs:
            options = data.get(f"{kind}_options")
            data[f"{kind}_options"] = {**(options if isinstance(options, dict) else {}), **dict(pairs)}
    return data, from_file


def _recipe(data: dict[str, Any], from_file: dict[str, Any], file: Path | None) -> Any:
    """The recipe of ``data``. An error the recipe file's options give on their own too (with the strategy
    in force, where that one is valid) names the file; one only the flags over it give does not."""
    from mixcompile.compiler import Recipe
    from mixcompile.compiler.recipe import STRATEGIES

    try:
        return Recipe.from_dict(data)
    except ConfigError as error:
        if file is None:
            raise
        alone = {**from_file, "strategy": data["strategy"]} if data["strategy"] in STRATEGIES else from_file
        try:
            Recipe.from_dict(alone)
        except ConfigError as exc:
            if str(exc) == str(error):  # the file's own error, not one a flag over it hides or causes
                raise exc.prefixed(f"--recipe {file}") from None
        raise


def _named(args: argparse.Namespace, from_file: dict[str, Any], name: str, flag: str, value: int) -> str:
    """An option as a message names it: the flag typed, the recipe file's field, or the default."""
    if getattr(args, name) is not None:
        return f"{flag} {value}"
    if name in from_file:
        return f"{name} {value} (from {args.recipe})"
    return f"{flag} (default {value})"


def parse_layers(text: str) -> str | list[int]:
    word = text.strip().lower().replace("_", "-")
    if word in ("all", "last-half"):
        return word.replace("-", "_")
    if word.startswith("every:"):
        every = text.strip()[len("every:") :]
        if not (every.isascii() and every.isdigit()) or int(every) < 1:
            raise UsageError(
                f"--layers {text!r}: every:N takes a whole N >= 1 (every:2 converts every second FFN)."
            )
        return f"every:{int(every)}"
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--layers {text!r}: use all, last-half, every:N or a list like 0,2,5.") from None


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, disable=None, leave=False, file=sys.stderr)


def _run_inspect(args: argparse.Namespace) -> int:
    from mixcompile.compiler import inspect

    recipe = recipe_from_args(args, required=False, default_strategy="moe")
    loaded = read_model(args.path, trust_pickle=args.trust_pickle, trust_code=args.trust_code)
    report = inspect(loaded.model, recipe) if recipe is not None else inspect(loaded.model)
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report)
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from mixcompile.compiler import convert_with_report, find_sites
    from mixcompile.io.saving import write_model
    from mixcompile.io.tokenizer_files import copy_tokenizer_files

    recipe = recipe_from_args(args, required=True)
    if not (args.path.exists() or args.path.is_symlink()):
        raise LoadError(f"{args.path} does not exist.")
    _check_path(args.output, f"-o: cannot write {args.output}")
    try:
        check_not_overlapping(args.output, input_paths(args.path), flag="the output")
        check_output(args.output, overwrite=args.force, flag="--force")
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
    # Reserved before any work: a second writer fails now, and an existing output is judged up front.
    with contextlib.ExitStack() as stack:
        out = _reserve_output(stack, args)
        bar = stack.enter_context(_progress(4, "convert"))
        loaded = read_model(args.path, trust_pickle=args.trust_pickle, trust_code=args.trust_code)
        bar.update()
        # Looked for without the recipe: --layers picks among the dense FFNs, so where none is left it is the
        # same nothing to convert as without it (not an index out of range of none); and no MoT layout is
        # decided (and warned about) twice.
        if not find_sites(loaded.model).sites:
            print(f"nothing to convert: no dense FFN found in {args.path}; no output written.")
            return 0
        started = time.perf_counter()
        model, report = convert_with_report(loaded.model, recipe, inplace=True)
        bar.update(2)
        write_model(model, out.path, loaded.base)
        # a drop-in replacement for a Hugging Face directory: its tokenizer too
        copied, skipped = copy_tokenizer_files(args.path, out.path) if args.path.is_dir() else ([], [])
        out.commit()
        bar.update()
    print(f"converted {args.path} -> {args.output} in {time.perf_counter() - started:.1f}s")
    if copied:
        print(f"copied tokenizer files: {', '.join(copied)}")
    for reason in skipped:
        print(f"mixcompile: warning: tokenizer file not copied: {reason}", file=sys.stderr)
    print(report)
    return 0


def _reserve_output(stack: contextlib.ExitStack, args: argparse.Namespace) -> OutputDirectory:
    """:func:`output_directory` for ``-o``, kept in ``args.out`` (an interrupt's message says whether it was
    written); a failure to claim it names the flag."""
    try:
        out = stack.enter_context(output_directory(args.output, overwrite=args.force, flag="--force"))
    except FileExistsError:  # another writer holds it, or one appeared: the message says which
        raise
    except OSError as exc:
        raise LoadError(f"-o: {exc}") from None
    args.out = out
    return out


def _run_plugins(args: argparse.Namespace) -> int:
    """Everything the loaded plugins register, and the package providing each (what to upgrade or
    uninstall). A plugin that fails to load fails the command with the manager's one-line error, naming its
    package and the MIXCOMPILE_PLUGINS value that leaves it out: a listing without it would look complete."""
    from mixcompile.plugins.manager import registry
    from mixcompile.plugins.providers import installed_providers

    registrations = registry().all()
    providers = installed_providers({f"{r.kind}:{r.name}": (r.kind, r.name) for r in registrations})
    found = [providers.get(f"{r.kind}:{r.name}", {}) for r in registrations]  # {} for an in-process plugin
    if args.json:
        entries = [
            {
                "kind": r.kind,
                "name": r.name,
                "plugin": r.plugin,
                "package": provider.get("package"),
                "version": provider.get("version"),
                "description": r.description,
            }
            for r, provider in zip(registrations, found, strict=True)
        ]
        print(json.dumps(entries, indent=2))
        return 0
    rows = [("KIND", "NAME", "PLUGIN", "PACKAGE")] + [
        (r.kind, r.name, r.plugin, f"{p['package']} {p.get('version', '')}".rstrip() if p else "-")
        for r, p in zip(registrations, found, strict=True)
    ]
    descriptions = ["DESCRIPTION"] + [r.description for r in registrations]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row, description in zip(rows, descriptions, strict=True):
        print("  ".join([cell.ljust(width) for cell, width in zip(row, widths, strict=True)] + [description]))
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from mixcompile.cli.bench import bench_models
    from mixcompile.cli.probe import max_sequence_length
    from mixcompile.io.manifest import is_saved_model

    # refused as such before a recipe option is checked (which would ask for the --strategy it lacks)
    if args.path.is_dir() and is_saved_model(args.path) and recipe_options(args)[0]:
        raise ConfigError("this model is converted already; bench it without recipe options.")
    recipe = recipe_from_args(args, required=False)
    loaded = read_model(args.path, trust_pickle=args.trust_pickle, trust_code=args.trust_code)
    limit = max_sequence_length(loaded.model)
    seq = args.seq if args.seq is not None else min(DEFAULT_SEQ, limit or DEFAULT_SEQ)
    if limit is not None and seq > limit:
        raise UsageError(f"--seq {seq} is longer than {type(loaded.model).__name__} allows ({limit}).")
    table = bench_models(
        loaded,
        recipe,
        batch=args.batch,
        seq=seq,
        steps=args.steps,
        device=args.device,
        trust_pickle=args.trust_pickle,
        trust_code=args.trust_code,
    )
    print(table)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from mixcompile.cli.demo import run_demo

    run_demo()
    return 0


def entry_point() -> None:
    """The console script. Once the command is done, Ctrl-C, SIGTERM and SIGHUP are ignored while Python
    shuts down (which takes torch a moment): the command's exit status stands, instead of a death by the
    signal."""
    try:
        code = main()
    except KeyboardInterrupt:  # the instant between main's own handling and this
        code = 130
    except Terminated as exc:
        code = 128 + exc.signum
    with contextlib.suppress(ValueError):  # not the main thread
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
    sys.exit(code)
