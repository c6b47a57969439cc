"""README.md and HISTORY.md command blocks copied as written must not stop on an earlier line's results."""

import os
import pathlib
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, name) for name in ("README.md", "HISTORY.md")]  # (HISTORY.md: README's moved histories)

# launchers that refuse an --output_dir holding an earlier run's results unless --overwrite
# (experiments.no_earlier_results_or_exit)
REFUSING = ("experiments.sweep", "experiments.reproduce_paper")


def _default_output_dir(module):
    src = pathlib.Path(ROOT, *module.split(".")).with_suffix(".py").read_text()
    return re.search(r'DEFINE_string\(\s*"output_dir",\s*"([^"]+)"', src).group(1)


def _fenced_blocks(text):
    blocks, cur = [], None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if cur is None:
                cur = []
            else:
                blocks.append(cur)
                cur = None
        elif cur is not None:
            cur.append(line)
    return blocks


def _commands(lines):
    cmd = ""
    for line in lines:
        line = line.split("  #")[0].rstrip()
        if line.endswith("\\"):
            cmd += line[:-1] + " "
            continue
        yield cmd + line
        cmd = ""


def test_readme_blocks_give_each_refusing_launcher_run_its_own_output_dir():
    blocks = [(os.path.basename(doc), b) for doc in DOCS for b in _fenced_blocks(pathlib.Path(doc).read_text())]
    assert sum(doc == "README.md" for doc, _ in blocks) >= 10  # (HISTORY.md has none today: its commands are inline)
    for doc, block in blocks:
        seen = {}
        for cmd in _commands(block):
            if not any(f"-m {m}" in cmd for m in REFUSING):
                continue
            words = shlex.split(re.sub(r"\[[^\]]*\]", "", cmd))  # optional [--flag] parts left out
            if "-m" not in words or words[words.index("-m") + 1] not in REFUSING or "--overwrite" in words:
                continue
            module = words[words.index("-m") + 1]
            out = _default_output_dir(module)
            for w in words:
                if w.startswith("--output_dir="):
                    out = w.split("=", 1)[1]
            assert out not in seen, (
                f"{doc} block: {cmd.strip()!r} writes into {out!r} as {seen[out]!r} before it: refused as written "
                "(give it an --output_dir of its own)"
            )
            seen[out] = cmd.strip()
