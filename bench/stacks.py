"""Summarise py-spy collapsed stacks (`py-spy record -f raw`): the functions with the most samples.

    python -m bench.stacks profile.txt [--top 25] [--match proxy/]
Self = samples where the function is the innermost frame; total = samples where it is on the stack.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter


def load(path: str) -> list[tuple[list[str], int]]:
    stacks = []
    for line in open(path):
        line = line.rstrip("\n")
        if not line:
            continue
        frames, _, count = line.rpartition(" ")
        stacks.append(([_short(f) for f in frames.split(";")], int(count)))
    return stacks


def _short(frame: str) -> str:
    # "func (/long/path/site-packages/pkg/mod.py:123)" -> "func (pkg/mod.py)"
    m = re.match(r"^(.*) \((.*?):?(\d*)\)$", frame)
    if not m:
        return frame
    name, path = m.group(1), m.group(2)
    path = re.sub(r"^.*/(site-packages|lib/python3\.\d+|bench-wt|main)/", "", path)
    return f"{name} ({path})"


def summarise(stacks, top: int, match: str | None) -> str:
    total = sum(c for _, c in stacks)
    self_c, incl = Counter(), Counter()
    for frames, count in stacks:
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    out = [f"{total} samples"]
    for title, counter in (("self", self_c), ("total (inclusive)", incl)):
        out.append(f"\n-- top by {title} --")
        shown = 0
        for frame, count in counter.most_common():
            if match and match not in frame:
                continue
            out.append(f"{100 * count / total:6.1f}%  {frame}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match")
    args = parser.parse_args()
    print(summarise(load(args.path), args.top, args.match))


if __name__ == "__main__":
    main()
