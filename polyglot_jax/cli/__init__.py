"""One CLI, `polyglot-jax SUBCOMMAND [--flags]`, with absl flags.

Every module in this package except this one is a subcommand: `train_tokenizer.py` is
`polyglot-jax train-tokenizer`. A subcommand module defines its flags at import time (so each
subcommand sees only its own flags) and a `main(argv: list[str]) -> int | None`.

Bad usage, config or input (`absl.flags.Error`, `PolyglotError`) is reported as one line on stderr
with exit code 2; `--verbosity=1` (or higher) shows the traceback as well.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import pathlib
import pkgutil
import sys
import traceback

import ml_collections
from absl import flags, logging

from polyglot_jax.errors import PolyglotError

PROG = "polyglot-jax"
# What bad flags and overrides raise while absl parses them (config files aside).
_USAGE_ERRORS = (
    flags.Error,
    OSError,
    AttributeError,
    KeyError,
    TypeError,
    ValueError,
    PolyglotError,
)


def subcommands() -> dict[str, str]:
    """Maps subcommand name -> module name, discovered from this package."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            found[info.name.replace("_", "-")] = f"{__name__}.{info.name}"
    return dict(sorted(found.items()))


def _usage() -> str:
    lines = [f"usage: {PROG} SUBCOMMAND [--flags]   ({PROG} SUBCOMMAND --help for its flags)", ""]
    for name, module in subcommands().items():
        # Read the docstring without importing: every subcommand defines its own global flags.
        source = pathlib.Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8")
        doc = (ast.get_docstring(ast.parse(source)) or "").splitlines()
        lines.append(f"  {name:<18}{doc[0] if doc else ''}")
    return "\n".join(lines)


def os_error_line(e: OSError) -> str:
    """`PATH: cause` of an I/O error (e.g. `out/x.jsonl: No space left on device`)."""
    cause = e.strerror or (str(e).splitlines() or [type(e).__name__])[0]
    paths = [p for p in (e.filename, e.filename2) if p]
    return f"{' -> '.join(map(str, paths))}: {cause}" if paths else f"I/O error: {cause}"


def _fail(sub: str, message: str) -> None:
    print(f"{PROG} {sub}: error: {message}".rstrip(), file=sys.stderr)
    sys.exit(2)


def _quiet_libraries(record) -> bool:
    """Keeps orbax's and grain's per-save INFO chatter out of the console; their warnings stay."""
    noisy = ("/orbax/", "/grain/", "/absl/")
    return record.levelno >= logging.converter.STANDARD_WARNING or not any(
        n in record.pathname for n in noisy
    )


def _unquote(s: str) -> str:
    return s[1:-1] if len(s) > 1 and s[0] == s[-1] and s[0] in "'\"" else s


def _one_line(e: BaseException) -> str:
    """The first informative line of an exception (config_flags wraps load errors in several)."""
    lines = [_unquote(ln.strip()) for ln in str(e).splitlines() if ln.strip()]
    if isinstance(e, OSError) and "Failed loading config file" in str(e):
        return f"cannot load the config: {lines[-1]}"
    if isinstance(e, AttributeError | KeyError):
        # KeyError's str() is the repr of its message: read the message itself.
        text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        for _ in range(3):  # config_dict nests reprs of its messages: unwrap them
            try:
                value = ast.literal_eval(text.strip())
            except (ValueError, SyntaxError):
                break
            if not isinstance(value, str):
                break
            text = value
        parts = [_unquote(ln.strip()) for ln in text.splitlines() if ln.strip()]
        field = parts[0] if parts else type(e).__name__
        hint = f"; {parts[1][0].lower()}{parts[1][1:]}" if len(parts) > 1 else ""
        return f"no such config field {field!r}{hint} (check the --config.* overrides)"
    return lines[0] if lines else type(e).__name__


def _exception_chain(e: BaseException) -> list[BaseException]:
    """`e`, then what it was raised from or during, down to the original error."""
    chain: list[BaseException] = []
    link: BaseException | None = e
    while link is not None and all(link is not c for c in chain):
        chain.append(link)
        link = link.__cause__ or link.__context__
    return chain


def _config_file_error(e: BaseException) -> str | None:
    """`file:line: Type: message` when `e` came out of loading a config file, else None.

    config_flags runs the file inside absl's flag parsing, which wraps TypeError/ValueError in
    messages holding a whole traceback and lets everything else (NameError, SyntaxError,
    ImportError) escape raw; the file and its variant are the `path` of its parser's frame."""
    from ml_collections.config_flags import config_flags as cf

    parse = getattr(getattr(cf, "ConfigFileFlagParser", None), "parse", None)
    chain = _exception_chain(e)
    spec = None
    for exc in chain:
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            if parse is not None and frame.f_code is parse.__code__:
                spec = frame.f_locals.get("path")
    if not isinstance(spec, str):
        return None
    if any(isinstance(x, OSError) and "Failed loading config file" in str(x) for x in chain):
        return None  # a missing file: _one_line says so
    path, _, variant = spec.partition(":")
    original = chain[-1]
    if isinstance(original, AttributeError) and getattr(original, "name", None) == "get_config":
        return f"{path}: defines no get_config()"
    from polyglot_jax.config import describe_load_error

    return describe_load_error(e, path, variant or None)


def _not_none_warning(record) -> bool:
    """Drops config_flags' own warning for a get_config() that returns None: that is one error
    line of ours (a second stderr line would break the one-line contract)."""
    return "did you forget a return statement" not in record.getMessage()


def _load_config_flags() -> None:
    """config_flags loads files lazily; load them now so that a bad file or override fails here."""
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if "." not in name and type(flag).__module__.startswith("ml_collections.config_flags"):
            value = getattr(flags.FLAGS, name)
            if value is None and not flag.present:
                continue  # not given: the subcommand decides whether it needs one
            if not isinstance(value, ml_collections.ConfigDict):
                # A failed load is an object that raises its error on any attribute: raise it.
                getattr(value, "keys", None)
                from polyglot_jax.config import check_loaded

                check_loaded(value, flag.config_filename)
            value.keys()  # a failed load raises here


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    # Without torch (the package needs none), importing transformers prints "PyTorch was not
    # found..." to stderr: advice for model users, noise before our one-line errors.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return
    sub, rest = argv[1], argv[2:]
    table = subcommands()
    if sub not in table:
        _fail(sub, f"unknown subcommand {sub!r}; choose one of: {', '.join(table)}")
    try:
        module = importlib.import_module(table[sub])
    except (KeyError, AttributeError) as e:
        # A DEFINE_config_dict flag applies `--config.x.y=v` overrides while its module is
        # imported: an unknown field fails there, not in the parse below.
        if not any(a.startswith("--config.") for a in rest) or "--verbosity=1" in rest:
            raise
        _fail(sub, _one_line(e))
    if any(a in ("-h", "--help", "--helpshort") for a in rest):
        print(f"{PROG} {sub}: {(module.__doc__ or '').strip()}\n")
        print(flags.FLAGS.module_help(module.__name__))
        shared = f"{__name__}._inputs"  # flags that generate and eval share
        if shared in sys.modules and shared in flags.FLAGS.flags_by_module_dict():
            print(flags.FLAGS.module_help(shared))
        return
    absl_logger = logging.get_absl_logger()
    absl_logger.addFilter(_not_none_warning)
    try:
        remaining = flags.FLAGS([f"{PROG} {sub}", *rest])
        _load_config_flags()
    except Exception as e:  # noqa: BLE001 - a config file may raise anything; bugs re-raise below
        if "--verbosity=1" in rest or "-v=1" in rest:
            raise
        message = _config_file_error(e)
        if message is None:
            if not isinstance(e, _USAGE_ERRORS):
                raise
            message = _one_line(e)
        _fail(sub, message)
    finally:
        absl_logger.removeFilter(_not_none_warning)
    if len(remaining) > 1 and not getattr(module, "TAKES_WORDS", False):
        _fail(sub, f"unexpected arguments {remaining[1:]}; flags look like --name=value")
    logging.use_absl_handler()
    logging.get_absl_handler().addFilter(_quiet_libraries)
    try:
        code = module.main(remaining)
    except (PolyglotError, flags.Error) as e:
        if flags.FLAGS.verbosity >= 1:
            raise
        _fail(sub, str(e).splitlines()[0] if str(e) else type(e).__name__)
    except OSError as e:  # permission denied, disk full, ...: the outputs clean up after themselves
        if flags.FLAGS.verbosity >= 1:
            raise
        print(f"{PROG} {sub}: error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{PROG} {sub}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
