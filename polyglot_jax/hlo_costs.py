"""Costs read from a compiled XLA program's text (`compiled.as_text()`): collective bytes by kind
and matmul FLOPs, each op weighted by how often its computation runs.

XLA's own cost analysis counts a while loop's body once whatever its trip count; here each
computation's count comes from the `known_trip_count` of the loops that call it (a loop without
one counts once; every branch of a conditional counts as run), so scanned layers, gradient
accumulation and loss chunks are counted in full. The conventions of the numbers are those of
`mesh_bench` (its module docstring).
"""

from __future__ import annotations

import functools
import math
import re

COLLECTIVE_KINDS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2}
_DTYPE_BYTES |= {"bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_DTYPE_BYTES |= {"c64": 8, "c128": 16}
_COMMENT = re.compile(r"/\*.*?\*/")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")
# `%name = TYPE opcode(operands), attributes`; TYPE may be a (nested) tuple.
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")
_LAYOUT = re.compile(r"\]\{[^{}]*\}")
_CALLEE = re.compile(
    r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"\b(?:branch|called)_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_COLLECTIVE = re.compile(r"^(" + "|".join(COLLECTIVE_KINDS) + r")(-start)?$")


def _split_top(text: str) -> list[str]:
    """The top-level elements of a tuple type `(a, (b, c))` -> [`a`, `(b, c)`]; an array -> [it]."""
    text = text.strip()
    if not text.startswith("("):
        return [text]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 1:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:-1])
    return [p.strip() for p in parts if p.strip()]


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in a type string (layouts stripped, `<=` bounds read as sizes)."""
    out = []
    for dtype, dims in _ARRAY.findall(text):
        sizes = tuple(int(d.strip().lstrip("<=")) for d in dims.split(",") if d.strip())
        out.append((dtype, sizes))
    return out


def _nbytes(text: str) -> float:
    """Bytes of all arrays in a type string (tokens and unknown types count 0)."""
    return sum(_DTYPE_BYTES.get(t, 0) * math.prod(d) for t, d in _arrays(text))


def _group_size(attributes: str, num_partitions: int) -> int:
    """Devices per replica group: explicit `{{0,1},{2,3}}`, iota `[2,4]<=[8]`, or mesh axes
    `mesh['axis_0'=2,'axis_1'=4] {'axis_1'}` (sub-axes `'axis_1':(2)2`); none or `{}`: all."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attributes)
    if m:
        sizes = dict(re.findall(r"'?([\w.]+)'?\s*=\s*(\d+)", m.group(1)))
        n = 1
        for name, sub in re.findall(r"'?([\w.]+)'?(?::\(\d+\)(\d+))?", m.group(2)):
            if name:
                n *= int(sub) if sub else int(sizes.get(name, 1))
        return n
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", attributes)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([^}]*)\}", attributes)
    if m:
        return len([x for x in m.group(1).split(",") if x.strip()])
    return num_partitions


class _Hlo:
    """The parts of a compiled module's text that the measures need: the instructions of each
    computation, how often each computation runs per call of the entry, the partition count."""

    def __init__(self, text: str):
        m = re.search(r"num_partitions=(\d+)", text)
        self.num_partitions = int(m.group(1)) if m else 1
        self.instructions: dict[str, list[tuple[str, str, str, str]]] = {}
        self.shapes: dict[str, str] = {}  # instruction name -> its type
        callers: dict[str, list[tuple[str, int]]] = {}
        entry, current = None, None
        for line in _COMMENT.sub("", text).splitlines():
            header = _HEADER.match(line)
            if header and not line.startswith(" "):
                current = header.group(2)
                entry = current if header.group(1) else entry
                self.instructions[current] = []
                continue
            found = _INSTRUCTION.match(line) if current else None
            if not found:
                continue
            name, type_, opcode, rest = found.groups()
            type_ = _LAYOUT.sub("]", type_)
            self.instructions[current].append((name, type_, opcode, rest))
            self.shapes[name] = type_
            if opcode in ("async-update", "async-done"):
                continue  # they name the computation that their async-start runs, once
            trip = _TRIP_COUNT.search(rest)
            for role, callee in _CALLEE.findall(rest):
                times = int(trip.group(1)) if role == "body" and trip else 1
                callers.setdefault(callee, []).append((current, times))
            for branches in _BRANCHES.findall(rest):
                for callee in re.findall(r"%?([\w.\-]+)", branches):
                    callers.setdefault(callee, []).append((current, 1))
        self.entry = entry

        @functools.cache
        def runs(computation: str) -> int:
            if computation == entry:
                return 1
            return sum(runs(c) * t for c, t in callers.get(computation, ()))

        self.runs = runs

    def each(self):
        """(instruction, times it runs per step) over every computation that runs."""
        for computation, instructions in self.instructions.items():
            times = self.runs(computation)
            if times:
                for instruction in instructions:
                    yield instruction, times


def collective_bytes(hlo_text: str) -> dict[str, float]:
    """Bytes per device per step by collective kind in a compiled module's text (`as_text()`),
    by the convention of this module's docstring; every kind of `COLLECTIVE_KINDS` is a key."""
    hlo = _Hlo(hlo_text)
    out = dict.fromkeys(COLLECTIVE_KINDS, 0.0)
    for (_, type_, opcode, rest), times in hlo.each():
        m = _COLLECTIVE.match(opcode)
        if not m:
            continue
        kind, start = m.group(1), bool(m.group(2))
        result = type_
        if start and kind in ("all-gather", "collective-permute"):
            # The start's type is (operands, results[, context]): the results are element 1.
            result = _split_top(type_)[1]
        size = _nbytes(result)
        if kind == "collective-permute":
            out[kind] += size * times
            continue
        n = _group_size(rest, hlo.num_partitions)
        whole = size * n if kind == "reduce-scatter" else size
        out[kind] += whole * (n - 1) / n * times
    return out


def matmul_flops(hlo_text: str) -> tuple[float, float]:
    """(FLOPs of every dot per step, FLOPs of the dots beyond each loop body's first run): a dot is
    2 x output elements x contracted size, weighted by how often its computation runs."""
    hlo = _Hlo(hlo_text)
    total = extra = 0.0
    for (_, type_, opcode, rest), times in hlo.each():
        if opcode != "dot":
            continue
        lhs = rest.split(",", 1)[0].strip()
        lhs_type = lhs if "[" in lhs else hlo.shapes.get(lhs.lstrip("%"), "")
        lhs_dims = _arrays(lhs_type)[0][1] if _arrays(lhs_type) else ()
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        index = [int(i) for i in contracting.group(1).split(",") if i] if contracting else []
        contracted = math.prod(lhs_dims[i] for i in index if i < len(lhs_dims))
        flops = 2.0 * sum(math.prod(d) for _, d in _arrays(type_)) * contracted
        total += flops * times
        extra += flops * (times - 1)
    return total, extra
