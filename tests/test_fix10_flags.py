"""Fix wave 10, the launchers' absl flags (each test failed before its fix, unless it says otherwise).

absl flags are process-global. Wave 9 made experiments.sweep, reproduce_paper and simulate importable into one
process (`allow_override=True` on the flags they share); the other launchers still clashed: run / bench_runtime /
simulate on `--config` (an ml_collections config-file flag), and the benchmarks among themselves on --repeats, --out,
--layers, --models, --peak_tflops, --no_persistent_cache, --agents, --seed, --block_size. Importing two of them into one
process (a notebook, a test, a script that reuses their functions) raised absl's DuplicateFlagError.

Contract: every launcher module in experiments/ imports together with every other, in any order. A flag name is one
flag in a process: the launcher imported (defined) last gives it its default, help and validators. A launcher that is
RUN (`python -m experiments.X`, or its module run as `__main__` after others were imported) defines its flags last,
so its command line is its own: its --helpfull and the values its flags read are as when it is run alone."""

import glob
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_launch_hunt import _launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "experiments", "*.py")) if "__init__" not in p
)


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


# ---- 1. every launcher imports with every other ------------------------------------------------------------------
_IMPORT_ALL = """
import importlib, sys
from absl import flags
for m in sys.argv[1].split(","):
    importlib.import_module("experiments." + m)
flags.FLAGS(["x"])  # and the flags parse (every validator of the defined flags passes on the defaults)
print("ok")
"""


@pytest.mark.parametrize("order", ["sorted", "reversed", "mixed"])
def test_every_launcher_imports_with_every_other(order):
    """Importing a second launcher that defines a flag of the same name raised DuplicateFlagError (e.g. bench_gpu
    then bench_prefill on --repeats, run then simulate on --config). Contract: all of them import into one process,
    in any order."""
    mods = {"sorted": LAUNCHERS, "reversed": LAUNCHERS[::-1], "mixed": LAUNCHERS[1::2] + LAUNCHERS[0::2]}[order]
    assert len(mods) >= 13 and {"run", "simulate", "bench_runtime", "bench_gpu", "bench_prefill"} <= set(mods)
    out = _python(_IMPORT_ALL, ",".join(mods))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# ---- 2. a launcher run after the others were imported has its own command line --------------------------------------
# Runs experiments.<argv[1]> as __main__ (as `python -m` does: the package first, then the module) after importing the
# launchers named in argv[2]. app.run is wrapped: first it prints the values the launcher's flags read with no
# argument (its FlagHolders, and its flags read by name as `FLAGS.x`), then it runs as itself with --helpfull.
_RUN_AFTER = """
import importlib, json, runpy, sys
from absl import app, flags
name, others = sys.argv[1], [m for m in sys.argv[2].split(",") if m]
for m in others:
    importlib.import_module("experiments." + m)
real_run = app.run

def run(main, argv=None, flags_parser=None, **kwargs):
    module = sys._getframe(1).f_globals
    (flags_parser or flags.FLAGS)([sys.argv[0]])
    holders = {k: repr(v.value) for k, v in module.items() if isinstance(v, flags.FlagHolder)}
    own = flags.FLAGS.flags_by_module_dict().get(sys.argv[0], [])
    by_name = {f.name: repr(flags.FLAGS[f.name].value) for f in own}
    print(json.dumps({"holders": holders, "flags": by_name}))
    sys.stdout.flush()
    flags.FLAGS.unparse_flags()
    real_run(main, argv=[sys.argv[0], "--helpfull"], flags_parser=flags_parser or app.parse_flags_with_usage, **kwargs)

app.run = run
sys.argv = ["-m"]
runpy.run_module("experiments." + name, run_name="__main__", alter_sys=True)
"""


def _sections(helpfull: str) -> tuple[str, dict[str, str]]:
    """--helpfull as (the text before the flags: the usage, the module's docstring; {section header: its text})."""
    head, _, rest = helpfull.partition("\nflags:\n")
    sections: dict[str, str] = {}
    header = None
    for line in rest.splitlines(keepends=True):
        if line.strip() and not line.startswith(" "):
            header = line.rstrip("\n")
            sections[header] = ""
        elif header is not None:
            sections[header] += line
    return head, sections


def _run_after(name: str, others: list[str]) -> tuple[dict, str, str]:
    out = _python(_RUN_AFTER, name, ",".join(others))
    assert out.returncode == 1 and out.stdout.startswith("{"), (name, others, out.stderr[-3000:])  # 1: --helpfull
    values, _, helpfull = out.stdout.partition("\n")
    return json.loads(values), helpfull, out.stderr


def _check_run_after_others(name: str, orders: list[list[str]], against_python_m: bool) -> None:
    """`name` run after importing each order of the other launchers has the --helpfull and flag values it has run
    after none (and, `against_python_m`, that --helpfull is byte-identical to `python -m experiments.<name>`'s)."""
    values_alone, helpfull_alone, _ = _run_after(name, [])
    if against_python_m:
        alone = _launch("-m", f"experiments.{name}", "--helpfull")
        assert alone.returncode == 1, alone.stderr[-3000:]
        assert helpfull_alone == alone.stdout  # (the runpy harness is `python -m`)
    head_alone, sections_alone = _sections(helpfull_alone)
    # (its own flags: run has only --config, filed under `experiments`)
    assert any(h.endswith(f"experiments/{name}.py:") or h == "experiments:" for h in sections_alone), name
    for order in orders:
        values, helpfull, stderr = _run_after(name, order)
        assert values == values_alone, (name, order[:3])
        head, sections = _sections(helpfull)
        assert head == head_alone
        for header, text in sections_alone.items():
            assert sections.get(header) == text, (name, order[:3], header, sections.get(header), text)
        extra = set(sections) - set(sections_alone)  # the other launchers' own flags, nothing else
        assert all(h.startswith("experiments") for h in extra), extra


# The default run checks this explicit subset (the slow test below: every launcher). Together they define every flag
# name that two or more launchers define (test_the_default_subset_defines_every_shared_flag_name checks it):
# bench_io (--layers --out --repeats), bench_prefill (--models --peak_tflops --no_persistent_cache --out --repeats),
# demo (--agents --block_size --seed --no_persistent_cache), sweep (capacity's / reproduce_paper's / simulate's
# --setups --modes --seeds --extra --workers --output_dir --overwrite --plot), run (--config: a config file, and no
# flag of its own) and pd_bounds (--config: a plain string flag).
DEFAULT_LAUNCHERS = ["bench_io", "bench_prefill", "demo", "pd_bounds", "run", "sweep"]


def _flag_names(name: str) -> set[str]:
    """The flag names experiments/<name>.py defines (read from its source: `DEFINE_*("x"` and `define_config_file`)."""
    with open(os.path.join(REPO, "experiments", f"{name}.py")) as f:
        src = f.read()
    return set(re.findall(r"(?:DEFINE_\w+|define_config_file)\(\s*[\"'](\w+)[\"']", src))


def test_the_default_subset_defines_every_shared_flag_name():
    """A flag name defined by two launchers that no launcher of DEFAULT_LAUNCHERS defines would be checked only by
    the slow test: add a launcher that defines it to DEFAULT_LAUNCHERS."""
    assert set(DEFAULT_LAUNCHERS) <= set(LAUNCHERS)
    names = {m: _flag_names(m) for m in LAUNCHERS}
    shared = {n for m in LAUNCHERS for n in names[m] if sum(n in v for v in names.values()) > 1}
    assert {"config", "repeats", "out", "output_dir", "seed"} <= shared  # (the scan finds the definitions)
    uncovered = shared - set().union(*(names[m] for m in DEFAULT_LAUNCHERS))
    assert not uncovered, f"add a launcher that defines {sorted(uncovered)} to DEFAULT_LAUNCHERS"


def test_a_launcher_run_after_the_others_keeps_its_own_flags():
    """The launcher being run defines its flags last, so the shared names have its default, help and validators:
    its --helpfull (every section it has alone: its own flags, --config under `experiments`, absl's) is the one it
    has alone, and its flags read its own defaults, with the others imported first (failed before: the imports
    raised DuplicateFlagError). Each launcher of DEFAULT_LAUNCHERS, the others (all launchers) in one order (forward
    and reversed in turn); the harness against `python -m` for every fourth (~7 s; every launcher, both orders and
    `python -m` for each: the slow test below)."""

    def check(i: int) -> None:
        name = DEFAULT_LAUNCHERS[i]
        others = [m for m in LAUNCHERS if m != name]
        _check_run_after_others(name, [others if i % 2 == 0 else others[::-1]], i % 4 == 0)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(check, range(len(DEFAULT_LAUNCHERS))))


@pytest.mark.slow
def test_a_launcher_run_after_the_others_in_either_order_keeps_its_own_flags():
    """The test above with both orders and the `python -m` comparison for every launcher (~32 s)."""

    def check(name: str) -> None:
        others = [m for m in LAUNCHERS if m != name]
        _check_run_after_others(name, [others, others[::-1]], True)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(check, LAUNCHERS))


# ---- 3. --config: ml_collections' config-file flag -----------------------------------------------------------------
_CONFIG = """
import importlib, sys
from absl import flags
for m in sys.argv[1].split(","):
    importlib.import_module("experiments." + m)
flags.FLAGS(["x"])
config = flags.FLAGS["config"]
print(config.help, "|", config.default_as_str, "|", type(config.parser).__name__)
"""


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        ("run,simulate", "A simulator config file (configs/paper_*.py). | 'None' | _ConfigFileParser"),
        ("simulate,run", "Run configuration. | '{tiny}' | _ConfigFileParser"),
        ("simulate,run,bench_runtime", "Runtime configuration. | '{tiny}' | _ConfigFileParser"),
    ],
)
def test_config_is_the_config_flag_of_the_launcher_imported_last(order, expected):
    """`config_flags.DEFINE_config_file` takes absl's `allow_override` (its **kwargs go to the Flag): a second
    definition raised DuplicateFlagError. Contract: as the other shared flags, the launcher imported last defines
    --config (its help and default file), with the launchers' one-line config errors (`_ConfigFileParser`)."""
    out = _python(_CONFIG, order)
    assert out.returncode == 0, out.stderr[-3000:]
    tiny = os.path.join(REPO, "experiments", "..", "configs", "tiny_runtime.py")
    assert out.stdout.strip() == expected.format(tiny=tiny)


# ---- 4. in one process a flag name is one flag --------------------------------------------------------------------
_ONE_FLAG = """
import sys
from absl import flags
import experiments.bench_gpu as gpu, experiments.bench_invariant as inv, experiments.bench_prefill as pre
for argv in (["x"], ["x", "--repeats=4"], ["x", "--models=tiny_qwen2"]):
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(argv)
        print(argv[1:], gpu._REPEATS.value, inv._REPEATS.value, pre._REPEATS.value, flags.FLAGS.repeats)
    except flags.Error as e:
        print(argv[1:], "refused:", e)
"""


def test_in_one_process_the_launcher_imported_last_defines_a_shared_flag():
    """(The contract of wave 9's sweep / reproduce_paper, now for every launcher; failed before: DuplicateFlagError.)
    A module's FlagHolder reads the flag by name: in a process that imported several launchers, every launcher reads
    the one --repeats, with the default, help and validators of the launcher imported last (bench_prefill: 7, and its
    --models takes dense / moe only); a value given on the command line reaches every launcher. A launcher that is
    run (`python -m`) defines its flags last, so there its own default applies (test 2)."""
    out = _python(_ONE_FLAG)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "[] 7 7 7 7"
    assert lines[1] == "['--repeats=4'] 4 4 4 4"
    assert lines[2].startswith("['--models=tiny_qwen2'] refused:") and "one or more of dense, moe" in lines[2]


@pytest.mark.parametrize(
    ("order", "argv"),
    [
        ("run,bench_runtime", []),
        ("bench_runtime,run", []),
        ("run,simulate,bench_runtime", []),
        ("run,bench_runtime", ["--config=configs/tiny_runtime.py:test"]),
        ("bench_runtime,simulate", ["--config=configs/tiny_runtime.py:test"]),  # (simulate: no default file)
    ],
)
def test_config_overrides_on_the_command_line_with_several_config_launchers(order, argv):
    """With a default file and no --config on the command line, ml_collections defines a flag per `--config.*`
    override of sys.argv when --config is defined, bound to that config: a second launcher's --config defined them
    again (DuplicateFlagError, even with `allow_override` on --config). Contract: the replaced --config's override
    flags go with it; the overrides of the command line reach the --config that is registered, which every
    launcher reads."""
    code = (
        "import importlib, sys\nfrom absl import flags\norder = sys.argv[1].split(',')\n"
        "sys.argv = ['x', *sys.argv[2:], '--config.runtime.workload.agents=4']\n"
        "mods = [importlib.import_module('experiments.' + m) for m in order]\nflags.FLAGS(sys.argv)\n"
        "print([m._CONFIG.value.runtime.workload.agents for m in mods])\n"
    )
    out = _python(code, order, *argv)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == str([4] * len(order.split(",")))
