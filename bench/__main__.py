"""Run the benchmark suites and write bench/RESULTS.md.

    python -m bench [--quick] [--only SUITE ...]

Each suite is a module ``bench/suite_<name>.py`` with ``run(quick: bool) -> str`` returning a
Markdown section. Sections of suites not run this time are kept from the previous RESULTS.md,
so one suite can be refreshed without re-running the rest. Every comparison inside a section is
measured side by side in one run; figures are medians over repeats.
"""
from __future__ import annotations

import argparse
import fcntl
import importlib
import pkgutil
import platform
import re
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
MARK = "<!-- suite:{} -->"


def suites() -> list[str]:
    return sorted(m.name[len("suite_"):] for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("suite_"))


def previous_sections() -> dict[str, str]:
    if not RESULTS.exists():
        return {}
    text = RESULTS.read_text()
    found = {}
    for match in re.finditer(r"<!-- suite:(\w+) -->\n(.*?)(?=<!-- suite:|\Z)", text, re.S):
        found[match.group(1)] = match.group(2).rstrip() + "\n"
    return found


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gxx = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    return f"{cpu}; {platform.python_implementation()} {platform.python_version()}; {' '.join(gxx)}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--only", nargs="*", default=None, help=f"suites to run (of {', '.join(suites())})")
    args = parser.parse_args()
    chosen = args.only or suites()
    fresh = {}
    for name in chosen:
        module = importlib.import_module(f"bench.suite_{name}")
        start = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        fresh[name] = module.run(quick=args.quick).rstrip() + "\n"
        print(f"[bench] {name} done in {time.perf_counter() - start:.0f} s", flush=True)
    # re-read under a lock just before writing: another run may have rewritten other sections meanwhile
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sections = {**previous_sections(), **fresh}
        write_results(sections)
    print(f"[bench] wrote {RESULTS}")


def write_results(sections: dict[str, str]) -> None:
    parts = [
        "# nncompile benchmark results\n",
        "Written by `python -m bench`. Medians over repeated runs; every ratio compares figures "
        "measured side by side in the same run on the same machine.\n",
        f"Last run on: {machine_line()} ({time.strftime('%Y-%m-%d')}).\n",
    ]
    for name in sorted(sections):
        parts.append(MARK.format(name) + "\n" + sections[name])
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(RESULTS)


if __name__ == "__main__":
    main()
