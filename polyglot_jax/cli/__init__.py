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
import pathlib
import pkgutil
import sys

from absl import flags, logging

from polyglot_jax.errors import PolyglotError

PROG = "polyglot-jax"


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
        field = lines[0] if lines else e
        return f"no such config field {field!r} (check the --config.* overrides)"
    return lines[0] if lines else type(e).__name__


def _load_config_flags() -> None:
    """config_flags loads files lazily; load them now so that a bad file or override fails here."""
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if "." not in name and type(flag).__module__.startswith("ml_collections.config_flags"):
            value = getattr(flags.FLAGS, name)
            if value is not None:
                value.keys()  # a failed load raises here


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return
    sub, rest = argv[1], argv[2:]
    table = subcommands()
    if sub not in table:
        _fail(sub, f"unknown subcommand {sub!r}; choose one of: {', '.join(table)}")
    module = importlib.import_module(table[sub])
    if any(a in ("-h", "--help", "--helpshort") for a in rest):
        print(f"{PROG} {sub}: {(module.__doc__ or '').strip()}\n")
        print(flags.FLAGS.module_help(module.__name__))
        return
    try:
        remaining = flags.FLAGS([f"{PROG} {sub}", *rest])
        _load_config_flags()
    except (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError) as e:
        if "--verbosity=1" in rest or "-v=1" in rest:
            raise
        _fail(sub, _one_line(e))
    logging.use_absl_handler()
    logging.get_absl_handler().addFilter(_quiet_libraries)
    try:
        code = module.main(remaining)
    except (PolyglotError, flags.Error) as e:
        if flags.FLAGS.verbosity >= 1:
            raise
        _fail(sub, str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        print(f"{PROG} {sub}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
