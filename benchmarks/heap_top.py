"""What is live at the top of a compiled program's temp heap, read from an XLA dump.

    XLA_FLAGS=--xla_dump_to=DUMP python benchmarks/aot.py --target tpu:v5e --size 160 --what train
    python benchmarks/heap_top.py DUMP [--module jit_train_step] [--top 15]

XLA packs a program's temporaries into one preallocated heap; its size (what a TPU's memory check
compares with the chip) is the highest address any buffer reaches, which is more than the bytes
live at any one time when buffers of different lifetimes leave gaps. The dump's own
``*live-range.txt`` "peak" covers only part of the values, so this script replays them all: each
value of the largest ``preallocated-temp`` allocation (offset and size from
``*buffer-assignment.txt``) over its lifetime (``*live-range.txt``), values that share an offset
counted once. It prints the heap's size, the time its top is reached, the bytes live then, and
the largest of those buffers with their shapes (layout and tiling included: a ``T(8,128)`` tile
over a minor dimension of 16 is 8x the data).

Works on any XLA dump that has the two files (XLA:TPU through libtpu, XLA:CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import sys

_ALLOC = re.compile(r"allocation (\d+): size (\d+)")
_VALUE = re.compile(r"\s*value: <\d+ (\S+) @\S+> \(size=(\d+),offset=(\d+)\): (.*)")
_RANGE = re.compile(r"\s*(\S+?)\{[^}]*\}:(\d+)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class Buffer:
    name: str
    size: int
    offset: int
    start: int
    end: int
    shape: str


@dataclasses.dataclass(frozen=True)
class HeapTop:
    heap_bytes: int        # the allocation's size
    top_bytes: int         # the highest offset + size any value reaches
    time: int              # a time at which it is reached
    live_bytes: int        # bytes live then (shared offsets once)
    live: tuple            # those buffers, largest first


def _base(name: str) -> str:
    return re.sub(r"\{.*\}$", "", name)


def read_temp_values(buffer_assignment: str) -> tuple[int, list[tuple]]:
    """``(heap bytes, [(name, size, offset, shape), ...])`` of the largest preallocated temp."""
    blocks, current = {}, None
    for line in buffer_assignment.splitlines():
        if line.startswith("allocation "):
            m = _ALLOC.match(line)
            current = (int(m.group(1)), int(m.group(2))) if "preallocated-temp" in line else None
            if current:
                blocks[current] = []
        elif current:
            m = _VALUE.match(line)
            if m:
                blocks[current].append((_base(m.group(1)), int(m.group(2)), int(m.group(3)),
                                        m.group(4)))
    if not blocks:
        raise ValueError("no preallocated-temp allocation in the buffer assignment")
    key = max(blocks, key=lambda k: k[1])
    return key[1], blocks[key]


def read_live_ranges(live_range: str) -> dict[str, tuple[int, int]]:
    """``{value name: (first, last)}`` over the BufferLiveRange section (tuple parts merged)."""
    out, inside = {}, False
    for line in live_range.splitlines():
        if line.strip() == "BufferLiveRange:":
            inside = True
        elif inside and "Live ranges at" in line:
            break
        elif inside:
            m = _RANGE.match(line)
            if m:
                a, b = int(m.group(2)), int(m.group(3))
                lo, hi = out.get(m.group(1), (a, b))
                out[m.group(1)] = (min(lo, a), max(hi, b))
    return out


def heap_top(buffer_assignment: str, live_range: str) -> HeapTop:
    heap, values = read_temp_values(buffer_assignment)
    ranges = read_live_ranges(live_range)
    buffers = [Buffer(n, s, o, *ranges[n], sh) for n, s, o, sh in values if n in ranges]
    if not buffers:
        raise ValueError("no value of the temp allocation has a live range")
    # The top is reached when some buffer starts: check each start.
    events = sorted({b.start for b in buffers})
    best = max(events, key=lambda t: max((b.offset + b.size for b in buffers
                                          if b.start <= t <= b.end), default=0))
    live = {}
    for b in buffers:
        if b.start <= best <= b.end:
            live.setdefault((b.offset, b.size), b)
    top = max(b.offset + b.size for b in live.values())
    return HeapTop(heap, top, best, sum(size for _, size in live),
                   tuple(sorted(live.values(), key=lambda b: -b.size)))


def find_files(dump: pathlib.Path, module: str) -> tuple[pathlib.Path, pathlib.Path]:
    found = sorted(dump.glob(f"*{module}*after_optimizations-buffer-assignment.txt"))
    if not found:
        raise FileNotFoundError(f"{dump}: no *{module}*after_optimizations-buffer-assignment.txt "
                                f"(compile with XLA_FLAGS=--xla_dump_to={dump})")
    ba = found[-1]
    lr = ba.with_name(ba.name.replace("-buffer-assignment.txt", "-live-range.txt"))
    if not lr.exists():
        raise FileNotFoundError(f"{lr}: missing beside {ba.name}")
    return ba, lr


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dump", type=pathlib.Path, help="the --xla_dump_to folder")
    p.add_argument("--module", default="jit_train_step", help="part of the module's file name")
    p.add_argument("--top", type=int, default=15, help="buffers to list")
    args = p.parse_args(argv)
    try:
        ba, lr = find_files(args.dump, args.module)
        r = heap_top(ba.read_text(), lr.read_text())
    except (OSError, ValueError) as e:
        print(f"heap_top: {e}", file=sys.stderr)
        return 2
    gib = 2 ** 30
    print(f"{ba.name}: temp heap {r.heap_bytes / gib:.2f} GiB, top reached "
          f"{r.top_bytes / gib:.2f} GiB at time {r.time}, {r.live_bytes / gib:.2f} GiB live then")
    for b in r.live[:args.top]:
        print(f"  {b.size / gib:6.2f} GiB at {b.offset / gib:6.2f} [{b.start}-{b.end}] "
              f"{b.name} {b.shape[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
