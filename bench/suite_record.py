"""The device suite's record: `summary.json` from its `steps.jsonl`, and, packed, all of it in two
files.

    python bench/suite_record.py OUT REHEARSE [--pack DEST] [--final]

The device tool brings back at most 8 files (16 MiB each, 64 MiB in all) from its output folder,
and the suite writes some twenty (a log per step, a JSON per result): with `--pack DEST`, DEST
gets `summary.json` and `suite.tar.gz` (OUT whole, logs over `LOG_TAIL` bytes cut to their last
`LOG_TAIL`; profiler traces left out, largest first, if it would pass `PACK_LIMIT`), each
replaced atomically, so a suite killed between two steps still leaves every finished step's
record there. The suite calls this after every step. `--final` prints the goals and exits 1
unless every step passed or was skipped for a stated reason.

Unpack with `tar xzf DEST/suite.tar.gz -C bench/results/device-<stamp>`.
"""

from __future__ import annotations

import importlib.util
import io
import json
import pathlib
import sys
import tarfile

LOG_TAIL = 1 << 20  # bytes of a log kept in the pack (a step's failure is at its end)
PACK_LIMIT = 15 << 20  # under the tool's 16 MiB a file
MARKER = b"[suite_record: the first %d bytes of this log were left out of the pack]\n"


def _sibling(name: str):
    """bench/NAME.py, loaded from beside this file (this runs as a script or in a test)."""
    spec = importlib.util.spec_from_file_location(
        name, pathlib.Path(__file__).with_name(f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


goals = _sibling("goals")


def _goals(out: pathlib.Path) -> list[dict]:
    """The goals, or why they could not be read: the summary is written whatever the results."""
    try:
        return goals.evaluate(out)
    except (KeyError, TypeError, ValueError) as e:  # a result record without a field it needs
        return [{"error": f"bench/goals.py could not read the results: {type(e).__name__}: {e}"}]


def summarize(out: pathlib.Path, rehearse: bool) -> dict:
    """summary.json's content: the device, every step's record, the result files, passed, and
    issue #18's goals (bench/goals.py: met, missed, or why unknown)."""
    lines = (out / "steps.jsonl").read_text().splitlines() if (out / "steps.jsonl").exists() else []
    steps = [json.loads(line) for line in lines if line.strip()]
    device_json = out / "device.json"
    device = json.loads(device_json.read_text()) if device_json.exists() else {}
    return {
        "rehearsal": rehearse,
        "device": device,
        "steps": steps,
        "results": sorted(p.name for p in out.glob("*.json") if p.name != "summary.json"),
        "passed": all(s["status"] in ("passed", "skipped") for s in steps),
        "goals": _goals(out),
    }


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _tar(out: pathlib.Path, files: list[pathlib.Path], left_out: list[str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:

        def add(name: str, data: bytes, mtime: float) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
            tar.addfile(info, io.BytesIO(data))

        for path in files:
            data = path.read_bytes()
            if path.suffix == ".log" and len(data) > LOG_TAIL:
                data = MARKER % (len(data) - LOG_TAIL) + data[-LOG_TAIL:]
            add(str(path.relative_to(out)), data, path.stat().st_mtime)
        if left_out:
            add("left_out.txt", "".join(f"{x}\n" for x in left_out).encode(), 0)
    return buffer.getvalue()


def pack(out: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """OUT as DEST/suite.tar.gz (paths relative to OUT; `*.log` over LOG_TAIL bytes keep their
    tail after a marker line). Over PACK_LIMIT, profiler traces (`*.trace.json.gz`) are left out,
    largest first, and named in `left_out.txt`; raises ValueError when even that is not enough."""
    files = sorted(p for p in out.rglob("*") if p.is_file())
    traces = sorted(
        (p for p in files if p.name.endswith(".trace.json.gz")), key=lambda p: -p.stat().st_size
    )
    left_out: list[str] = []
    data = _tar(out, files, left_out)
    while len(data) > PACK_LIMIT and traces:
        dropped = traces.pop(0)
        files.remove(dropped)
        left_out.append(f"{dropped.relative_to(out)} ({dropped.stat().st_size} bytes)")
        data = _tar(out, files, left_out)
    if len(data) > PACK_LIMIT:
        raise ValueError(f"the packed suite is {len(data)} bytes, over {PACK_LIMIT}")
    target = dest / "suite.tar.gz"
    _write_atomically(target, data)
    return target


def main(argv: list[str]) -> int:
    out, rehearse = pathlib.Path(argv[0]), argv[1] == "1"
    dest = pathlib.Path(argv[argv.index("--pack") + 1]) if "--pack" in argv else None
    summary = summarize(out, rehearse)
    text = (json.dumps(summary, indent=1) + "\n").encode()
    _write_atomically(out / "summary.json", text)
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
        _write_atomically(dest / "summary.json", text)
        try:
            pack(out, dest)
        except ValueError as e:  # the summary is there; say why the rest is not
            print(f"device_suite: {e}: {dest / 'suite.tar.gz'} not updated", file=sys.stderr)
    if "--final" not in argv:
        return 0
    for goal in summary["goals"]:
        print(f"device_suite: goal {goal['error'] if 'error' in goal else goals.line(goal)}")
    passed = sum(s["status"] == "passed" for s in summary["steps"])
    where = dest / "suite.tar.gz" if dest is not None else out / "summary.json"
    print(f"device_suite: {passed}/{len(summary['steps'])} steps passed; {where}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
