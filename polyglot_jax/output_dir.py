"""Output directories that appear only when complete and never touch an input.

Every subcommand that writes a directory (`clean`, `train-tokenizer`, `convert`) goes through here:

    check_output(out, inputs, overwrite=...)   # before any work: refuse what would lose data
    with staged(out) as tmp:                    # write everything into tmp ...
        ...                                     # ... renamed to `out` only when complete

The staging directory is a hidden sibling `.NAME.partial-HOST-PID-XXXX`: a run killed half-way
leaves it behind, and the next run of the same output removes those of dead processes on this
host (and says so). A failure inside the block removes it at once.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator

from absl import logging

from polyglot_jax.errors import InputError, PolyglotError

_PARTIAL = ".partial-"
_REPLACED = "-replaced"


def _resolved(path: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(path).expanduser().resolve()


def check_output(
    out: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, overwrite: bool
) -> pathlib.Path:
    """Refuses an `out` that is, contains or lies inside an input, or that cannot be replaced.

    Paths are compared after resolving symlinks. Returns `out` resolved. Raises InputError.
    """
    target = _resolved(out)
    for source in inputs:
        src = _resolved(source)
        if target == src or target in src.parents:
            raise InputError(f"output {out} would replace the input {source}; choose another path")
        if src in target.parents:
            raise InputError(
                f"output {out} lies inside the input {source}; choose a path outside it"
            )
    if target.exists() and not target.is_dir():
        raise InputError(f"output {out} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise InputError(f"output directory {out} is not empty (pass --overwrite to replace it)")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"output {out}: {parent} is a file, not a directory")
            break
    return target


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a staging directory's or temp file's owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(out: pathlib.Path) -> list[pathlib.Path]:
    """Removes staging directories of `out` left by dead processes on this host; returns them."""
    host = socket.gethostname()
    removed = []
    if not out.parent.is_dir():
        return removed
    for tmp in sorted(out.parent.glob(f".{out.name}{_PARTIAL}*")):
        rest = tmp.name[len(f".{out.name}{_PARTIAL}") :]
        replaced = rest.endswith(_REPLACED)
        owner = rest.removesuffix(_REPLACED).rsplit("-", 2)
        if (
            len(owner) != 3
            or owner[0] != host
            or not owner[1].isdigit()
            or process_alive(int(owner[1]))
        ):
            continue  # another host's, a live run's, or not ours
        if replaced and not out.exists():
            # Killed between its two renames: this is the previous output; put it back.
            os.rename(tmp, out)
            logging.warning("restored %s from %s, left by an interrupted run", out, tmp)
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        logging.warning("removed %s, left by an interrupted run (process %s)", tmp, owner[1])
        removed.append(tmp)
    return removed


@contextlib.contextmanager
def staged(out: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A hidden directory beside `out`, renamed to `out` (replacing it) when the block succeeds.

    On any exception (a signal, a full disk) the staging directory is removed and `out` is left
    as it was. Call `check_output` first: this replaces an existing `out` unconditionally.
    """
    out = pathlib.Path(out).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        prefix = f".{out.name}{_PARTIAL}{socket.gethostname()}-{os.getpid()}-"
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(out)) from e
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary directory
    try:
        yield tmp
        old = None
        if out.exists():
            old = tmp.with_name(tmp.name + _REPLACED)
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        plain = isinstance(e, Exception) and not isinstance(e, PolyglotError)
        error = as_os_error(e) if plain else None
        if error is None:
            raise
        # Name what the user asked for, not the hidden staging directory.
        where = str(error.filename or "").replace(str(tmp), str(out)) or str(out)
        raise OSError(error.errno, error.strerror, where) from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# How libraries without OSErrors of their own report one: tokenizers' "(os error 28)",
# TensorStore's "[os_error_code='28']".
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)|os_error_code='(\d+)'")


def as_os_error(error: BaseException) -> OSError | None:
    """The OSError in `error`'s chain, or one made from an errno a library wrote in its message."""
    link, seen = error, []
    while link is not None and all(link is not s for s in seen):
        if isinstance(link, OSError) and link.errno is not None:
            return link
        match = _OS_ERROR_CODE.search(str(link))
        if match:
            code = int(match.group(1) or match.group(2))
            return OSError(code, os.strerror(code))
        seen.append(link)
        link = link.__cause__ or link.__context__
    return None
