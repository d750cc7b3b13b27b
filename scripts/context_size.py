"""List what `docker build .` sends (the .dockerignore rules, as Docker reads them) and fail when the code is big."""

from __future__ import annotations

import argparse
import os
import posixpath
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# Docker always sends these two, whatever .dockerignore says.
ALWAYS_SENT = ("Dockerfile", ".dockerignore")
# Wheels for an air-gapped build are large on purpose: counted apart from the code limit.
WHEELHOUSE = "wheelhouse"


@dataclass(frozen=True)
class Rule:
    """One .dockerignore line: a pattern, and whether it is an exception (`!pattern`)."""

    pattern: str
    exception: bool
    regex: re.Pattern[str]

    def matches(self, path: str) -> bool:
        """True when the pattern matches the path or one of its parent folders (Docker's rule)."""
        if self.regex.match(path):
            return True
        parts = path.split("/")[:-1]
        return any(self.regex.match("/".join(parts[: i + 1])) for i in range(len(parts)))


def _translate(pattern: str) -> str:
    """Docker's pattern syntax as a regex: `**` any folders, `*` and `?` within one name, `\\` escapes."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out.append("(.*/)?")
            else:
                out.append(".*")
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                out.append("[^" + body[1:] + "]" if body.startswith("^") else "[" + body + "]")
                i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return "^" + "".join(out) + "$"


def parse(text: str) -> list[Rule]:
    """Read .dockerignore lines: comments and blanks skipped, paths cleaned, a leading / dropped."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        if exception:
            line = line[1:].strip()
        pattern = posixpath.normpath(line).lstrip("/")
        if not pattern or pattern == ".":
            continue
        rules.append(Rule(pattern, exception, re.compile(_translate(pattern))))
    return rules


def excluded(path: str, rules: list[Rule]) -> bool:
    """Whether Docker leaves the path (relative, with /) out: the last rule that matches decides."""
    matched = False
    for rule in rules:
        # an exclusion cannot change an excluded path, an exception only an excluded one
        if rule.exception != matched:
            continue
        if rule.matches(path):
            matched = not rule.exception
    return matched


def _may_hold_exceptions(folder: str, rules: list[Rule]) -> bool:
    """Whether an exception rule names something under an excluded folder (Docker then walks into it)."""
    return any(rule.exception and (rule.pattern + "/").startswith(folder + "/") for rule in rules)


def context_files(root: Path, rules: list[Rule]) -> list[tuple[str, int]]:
    """Every file the build context holds, as (relative path, size), sorted by path."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(
            d for d in dirnames if not excluded(prefix + d, rules) or _may_hold_exceptions(prefix + d, rules)
        )
        for name in filenames:
            rel = prefix + name
            full = Path(dirpath) / name
            if (rel in ALWAYS_SENT or not excluded(rel, rules)) and not full.is_symlink():
                files.append((rel, full.stat().st_size))
    return sorted(files)


def split_sizes(files: list[tuple[str, int]]) -> tuple[int, int]:
    """(bytes of code and other files, bytes of the wheelhouse's wheels)."""
    wheels = sum(size for path, size in files if path.startswith(WHEELHOUSE + "/") and path.endswith(".whl"))
    return sum(size for _, size in files) - wheels, wheels


def main(argv: list[str] | None = None) -> int:
    """Print the context's size (and its largest files); exit 1 when the code passes --max-mb."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument(
        "--max-mb", type=float, default=5.0, help="limit for everything but wheelhouse wheels"
    )
    parser.add_argument("--list", action="store_true", help="print every file sent")
    args = parser.parse_args(argv)
    ignore = args.root / ".dockerignore"
    rules = parse(ignore.read_text(encoding="utf-8")) if ignore.exists() else []
    files = context_files(args.root, rules)
    code, wheels = split_sizes(files)
    code_files = [f for f in files if not (f[0].startswith(WHEELHOUSE + "/") and f[0].endswith(".whl"))]
    for path, size in files if args.list else sorted(code_files, key=lambda f: -f[1])[:5]:
        sys.stdout.write(f"{size:>12,}  {path}\n")
    sys.stdout.write(
        f"build context: {len(files)} files, {code / 1e6:.2f} MB of code and other files"
        f" (limit {args.max_mb} MB), {wheels / 1e9:.2f} GB of wheelhouse wheels\n"
    )
    if code > args.max_mb * 1e6:
        sys.stderr.write("the build context is too big: extend .dockerignore (an allow-list)\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
