"""experiments: the launchers (main job, simulator, sweeps, paper report) and the benchmarks."""

import contextlib
import errno
import re
import time

from dualpath_jax import clock
from dualpath_jax.interrupts import catch_lost_ctrl_c

_STARTED = clock.now()  # (about when the launcher began: its package is imported first; a benchmark's run.json)


def config_or_exit(config_flag):
    """The config that an ml_collections `--config` flag loaded, or SystemExit with one "bad config" message when the
    file is missing or its `get_config` failed (an unknown variant, an error in the file), instead of the
    library's two chained tracebacks on first use."""
    config = config_flag.value
    if config is None:
        raise SystemExit(f"bad config: --{config_flag.name} is required (a config file, e.g. configs/sim_tiny.py)")
    try:
        config.to_dict  # noqa: B018 - a failed load is a placeholder that raises its load error on any attribute
    except Exception as e:  # noqa: BLE001
        raise SystemExit(_load_failure(e)) from None
    return config


def _load_failure(e: BaseException) -> str:
    """The one "bad config" line for a config file that failed to load: the first error in the chain (the
    library wraps it in "Configuration is not available ...")."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip()
    if isinstance(e, OSError) and text.startswith("Failed loading config file"):
        # a missing file: the library's message is 4 lines naming its module (config_config) and, last, the error
        # with the path ("[Errno 2] No such file or directory: 'x.py'"): one line of that
        text = f"Failed loading config file: {text.splitlines()[-1].strip()}"
    return f"bad config: {type(e).__name__}: {text}"


def pyplot_or_none(what: str):
    """`matplotlib.pyplot` on the Agg backend (files only), or None, logged as `what` skipped, where matplotlib
    (the `plot` extra) is not installed: the launchers' plots are optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from absl import logging

        logging.info("matplotlib is not installed: skipping %s (pip install -e '.[plot]')", what)
        return None
    return plt


def _bad_override(argv, e: BaseException) -> str:
    """One line for ml_collections' error on an override of a field the config does not have (a KeyError, or an
    AttributeError wrapping one, whose message is the quoted key and a did-you-mean line)."""
    inner = e.args[0] if e.args else e
    if isinstance(inner, KeyError) and inner.args:  # its message, not its repr
        inner = inner.args[0]
    key, _, hint = str(inner).partition("\n")  # "'snic_gbs'" and 'Did you mean "snic_gbps" ...?'
    key = key.strip("\"'")
    flag = next((a for a in argv[1:] if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")), None)
    where = f" {flag}" if flag else ""
    name = flag.split("=", 1)[0] if flag else ""
    for section, item in (("scheduler", "policy"), ("batcher", "batcher")):  # (the simulator's kwargs are a dict)
        if name.startswith(f"--config.{section}.kwargs.") and not hint:
            hint = (
                f"A {item}'s own field is the variant item {item}.{key}=VALUE after the config file "
                f"(--config=FILE:MODE,{item}.{key}=VALUE), or --config.{section}.kwargs=\"{{'{key}': VALUE}}\""
            )
    # (the simulator's launchers write under config.output_dir, the runtime's under config.results_dir)
    for given, other in (("output_dir", "results_dir"), ("results_dir", "output_dir")):
        if name == f"--config.{given}" and not hint:
            hint = (
                f"Did you mean \"--config.{other}\"? (the simulator's launchers: output_dir; the runtime's: "
                "results_dir)"
            )
    for options in ("store_options", "transport_options"):  # (the runtime's option dicts: one flag for the dict)
        if f".runtime.{options}." in name and not hint:
            hint = (
                f"An option of config.runtime.{options} is given with the whole dict: "
                f"--config.runtime.{options}=\"{{'{key}': VALUE}}\""
            )
    return f"bad override{where}: the config has no field {key!r}. {hint}".rstrip()


class _ConfigFileFailed(Exception):
    """A --config file that did not load, or whose get_config raised: its one "bad config" line (not a ValueError,
    which absl would wrap in a flag error)."""


class _ConfigFileParser:
    """ml_collections' --config parser (`inner`), with an error of the file itself (not Python, a syntax error, a
    failing import, no get_config, an error of get_config) raised as _ConfigFileFailed naming the file. A missing
    file stays the library's lazy OSError placeholder (`config_or_exit`)."""

    def __init__(self, inner):
        self._inner = inner
        self.keys = None  # the loaded config's key tree (`_key_tree`), before any override: parse_flags_or_exit's

    def parse(self, path):
        path = installed_config_file(path)
        try:
            config = self._inner.parse(path)
        except Exception as e:  # noqa: BLE001 - the file's own error, whatever its type
            from dualpath_jax.sim.configs_io import describe_config_file_error

            if isinstance(e, (TypeError, ValueError)) and str(e).startswith("Error whilst parsing config file"):
                e = e.__context__ or e  # the library re-raises get_config's error with its traceback as text
            raise _ConfigFileFailed(describe_config_file_error(str(path).split(":", 1)[0], e)) from None
        from ml_collections import ConfigDict

        # (not the library's placeholder of a file that failed to load, whose error comes on first use)
        if not isinstance(config, ConfigDict) and not type(config).__module__.startswith("ml_collections."):
            # None: simulate said "--config is required", run / bench_runtime gave absl's traceback; a dict: "'dict'
            # object has no attribute 'to_dict'", or with an override "bad override ... the config has no field"
            import reprlib

            what = (
                "None (its get_config has no `return`?)"
                if config is None
                else f"{reprlib.repr(config)} ({type(config).__name__})"
            )
            raise _ConfigFileFailed(
                f"config file {str(path).split(':', 1)[0]!r}: get_config returned {what}, not an ml_collections "
                "ConfigDict"
            )
        self.keys = _key_tree(config)
        return config

    def __getattr__(self, attr):  # flag_type() and the rest: the library's parser
        return getattr(self._inner, attr)


def installed_config_file(path, flag: str = "--config"):
    """`path` (`FILE[:variant]`), or where FILE is missing here and is `configs/NAME.py` (as README writes them), this
    package's own configs/NAME.py: installed as a wheel and run from another directory, README's
    `--config=configs/sim_tiny.py` (and sweep's / capacity's `--setups=configs/...`) was a missing file (the configs
    are in site-packages/configs/). `flag`: the flag the path came from, for the log line."""
    import os

    file, sep, variant = str(path).partition(":")
    parts = os.path.normpath(file).split(os.sep)
    if os.path.exists(file) or len(parts) != 2 or parts[0] != "configs":
        return path
    import configs

    own = os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), parts[1])
    if not os.path.isfile(own):
        return path
    from absl import logging

    logging.info("%s %s: not in %s; this package's %s", flag, file, os.getcwd(), own)
    return own + sep + variant


def non_utf8_locale_line() -> str | None:
    """A line naming the fix where the locale's file system encoding is not UTF-8 (LANG=en_US.ISO-8859-1; LC_ALL=C
    alone is UTF-8 mode) and this package or jax is under a non-ASCII path: jax's first compile raised
    `RuntimeError: std::bad_cast` (the source file names it hands XLA), naming neither. None: fine."""
    import importlib.util
    import os
    import sys

    encoding = sys.getfilesystemencoding()
    if encoding.lower().replace("-", "").replace("_", "") == "utf8":
        return None
    jax = importlib.util.find_spec("jax")
    paths = [os.path.dirname(os.path.abspath(__file__))]  # (a non-ASCII working directory alone is fine)
    paths += [os.path.dirname(jax.origin)] if jax is not None and jax.origin else []
    odd = [p for p in paths if not p.isascii()]
    if not odd:
        return None
    return (
        f"bad environment: the locale's file system encoding is {encoding}, not UTF-8, and {odd[0]!r} is not "
        "ASCII: jax fails on it (RuntimeError: std::bad_cast at the first compile); run with PYTHONUTF8=1 (or "
        "LANG=C.UTF-8)"
    )


# what `--config.FIELD=None` gives None for (ml_collections' field parsers read it as text: "could not convert string
# to float: 'None'")
_NONE_WORDS = ("None", "none")
_KIND_OF = {"float": "a number", "int": "an integer", "bool": "true or false"}


class _NoneOrParser:
    """The parser of a `--config.FIELD` override whose field may hold None (an ml_collections placeholder,
    `config_dict.placeholder(float)`: `cluster.store_capacity_gb`, None = an unbounded store): None for the word
    None, else the field type's parser (`inner`)."""

    def __init__(self, inner):
        self._inner = inner

    def parse(self, argument):
        if isinstance(argument, str) and argument.strip() in _NONE_WORDS:
            return None
        return self._inner.parse(argument)

    def __getattr__(self, attr):  # flag_type() and the rest: the library's parser
        return getattr(self._inner, attr)


class _NotNoneParser(_NoneOrParser):
    """The parser of a `--config.FIELD` override of a number or bool that may not hold None: the word None is a
    ValueError saying so (absl names the flag before it), not "could not convert string to float: 'None'"."""

    def parse(self, argument):
        if isinstance(argument, str) and argument.strip() in _NONE_WORDS:
            kind = _KIND_OF.get(self._inner.flag_type(), self._inner.flag_type())
            raise ValueError(
                f"None is not allowed for this field: it takes {kind} (None goes only to a field whose default is "
                "None, an ml_collections placeholder)"
            )
        return self._inner.parse(argument)


def _may_hold_none(config, path: str) -> bool:
    """Whether the field `path` (dotted) of `config` is an ml_collections FieldReference (a placeholder: typed, may
    hold None), whatever it holds now (a variant item may have set a placeholder to 500). A plain field is its value:
    ml_collections would take None there too, and the run failed later or ran with it."""
    from ml_collections import config_dict

    *parents, field = path.split(".")
    holder = config
    try:
        for p in parents:
            holder = holder[p]
        if not isinstance(holder, config_dict.ConfigDict):
            return False
        return isinstance(dict(holder.items(preserve_field_references=True)).get(field), config_dict.FieldReference)
    except Exception:  # noqa: BLE001 - no such field (the override's own error names it), a failed load
        return False


def _none_aware_overrides(flag_values, name: str, config) -> None:
    """Each `--NAME.FIELD` override flag ml_collections defined for `config` takes the word None where its field may
    hold None (`_NoneOrParser`), and a number / bool field refuses it in one line (`_NotNoneParser`)."""
    from absl import flags

    prefix = f"{name}."
    for flag_name in [f for f in flag_values if f.startswith(prefix)]:
        flag = flag_values[flag_name]
        if isinstance(flag.parser, _NoneOrParser) or isinstance(flag, flags.MultiFlag):  # (a tuple's: left alone)
            continue
        if _may_hold_none(config, flag_name[len(prefix) :]):
            flag.parser = _NoneOrParser(flag.parser)
        elif isinstance(flag.parser, (flags.FloatParser, flags.IntegerParser, flags.BooleanParser)):
            flag.parser = _NotNoneParser(flag.parser)


def _with_none_aware_overrides(flag, flag_values) -> None:
    """ml_collections defines the `--config.FIELD` override flags when `flag` (its config-file flag) parses a file:
    at its definition for a default file (done here), on the command line for a given one (its `_parse`, wrapped
    here: its override flags are parsed after it). Once per flag object."""
    if "_parse" in vars(flag):
        return
    parse = flag._parse  # noqa: SLF001 - the library defines the override flags in it, and offers no hook

    def parse_then_wrap(argument):
        config = parse(argument)
        _none_aware_overrides(flag_values, flag.name, config)
        return config

    flag._parse = parse_then_wrap  # noqa: SLF001
    try:
        config = flag.value
    except Exception:  # noqa: BLE001 - a default file that failed to load: its error comes on first use
        return
    if config is not None:
        _none_aware_overrides(flag_values, flag.name, config)


def own_flags(*holders) -> tuple:
    """The Flag objects behind a launcher's FlagHolders, with the module that defined each, taken right after its
    DEFINEs: `reclaim_flags` puts them back."""
    from absl import flags

    fv = flags.FLAGS
    return tuple((fv.find_module_defining_flag(h.name), fv[h.name]) for h in holders)


def reclaim_flags(own) -> None:
    """Put back a launcher's own flags (`own_flags`) that a launcher imported later into this process replaced: names
    such as --modes, --workers and --seeds are defined by several launchers with `allow_override`, each with its own
    default, help and validators, so `sweep.parse_flags` after an import of capacity parsed with capacity's --modes
    (an empty item passed). A launcher run as a program defines its flags last and needs none of this. (Where a flag of
    the name was parsed and not unparsed when the launcher was imported, absl kept that one instead of the launcher's:
    that one is what `own_flags` took.)"""
    from absl import flags

    fv = flags.FLAGS
    for module, flag in own:
        if fv[flag.name] is not flag:
            delattr(fv, flag.name)  # (the other launcher's: out of the flags and its module's help)
            fv[flag.name] = flag
            fv.register_flag_by_module(module, flag)


def define_config_file(name: str, default: str | None, help_string: str):
    """`config_flags.DEFINE_config_file`, with an override of a field the config does not have reported as one line.
    With a default file, ml_collections applies the `--config.*` overrides of sys.argv when the flag is defined
    (at the launcher's import), before `app.run` and its flags parser. run, bench_runtime and simulate define
    `--config`, each with its own default and help: `allow_override` (which the library passes to absl's Flag) lets
    them be imported into one process (absl raised DuplicateFlagError); the one imported last defines it there, and
    a launcher that is run defines it last."""
    import sys

    from absl import flags
    from ml_collections import config_flags

    # Another launcher's --config, which this one replaces: its `--config.*` override flags (those of sys.argv, bound to
    # its config) go, as this one defines its own (absl raised DuplicateFlagError on them).
    if name in flags.FLAGS and flags.FLAGS[name].using_default_value:
        for field in [f for f in flags.FLAGS if f.startswith(f"{name}.")]:
            delattr(flags.FLAGS, field)
    try:
        holder = config_flags.DEFINE_config_file(name, default, help_string, allow_override=True)
    except (AttributeError, KeyError) as e:
        raise SystemExit(_bad_override(sys.argv, e)) from None
    # A --config file given on the command line is loaded by this parser (the default above already loaded):
    # whatever it raises is one "bad config" line, not a traceback or a "bad override".
    # (Not twice: absl keeps an earlier --config that was set, instead of this one, when this one overrides it.)
    if not isinstance(flags.FLAGS[name].parser, _ConfigFileParser):
        flags.FLAGS[name].parser = _ConfigFileParser(flags.FLAGS[name].parser)
    # `--config.cluster.store_capacity_gb=None` (a placeholder field: back to unbounded) gives None
    _with_none_aware_overrides(flags.FLAGS[name], flags.FLAGS)
    # A key flag of the launcher that defines it, so `--helpshort` lists it (absl files it under this module).
    flags.FLAGS.register_key_flag_for_module(_flags_module_of_caller(), flags.FLAGS[name])
    return holder


def _flags_module_of_caller() -> str:
    """The module absl files the flags defined by the caller of the function calling this under (the launcher that
    defines them: its `--helpshort` lists them): its name, or for `__main__` (a launcher run as `python -m`) absl's
    name for it, sys.argv[0]."""
    import sys

    caller = sys._getframe(2).f_globals.get("__name__", "")
    return sys.argv[0] if caller == "__main__" else caller


def parse_flags_checking_locale(argv):
    """absl's own flag parser (`app.run(main, flags_parser=parse_flags_checking_locale)`) for the launchers that
    compile jax steps and take no `--config` (bench_prefill, bench_invariant, bench_gpu, bench_io, demo), after the
    check `parse_flags_or_exit` makes: a non-UTF-8 locale with a non-ASCII package path is one line naming the fix
    (`non_utf8_locale_line`), not `RuntimeError: std::bad_cast` from jax's first compile; and, as it, a Ctrl-C that
    lands in JAX's gc callback is raised again (`interrupts.catch_lost_ctrl_c`)."""
    from absl import app

    if line := non_utf8_locale_line():
        raise SystemExit(line)
    catch_lost_ctrl_c()
    parsed = app.parse_flags_with_usage(argv)
    rerun_of_or_exit()
    return parsed


def parse_flags_checking_rerun(argv):
    """absl's own flag parser, then `rerun_of_or_exit` (`app.run(main, flags_parser=parse_flags_checking_rerun)`),
    for a launcher that writes run.json and takes neither a `--config` nor jax steps (capacity, reproduce_paper,
    bench_store, tcp_completion_model)."""
    from absl import app

    parsed = app.parse_flags_with_usage(argv)
    rerun_of_or_exit()
    return parsed


def define_rerun_of() -> None:
    """--rerun_of and --rerun_of_allow_changes, for a launcher that writes run.json (its `rerun` line passes
    --rerun_of=<that run.json>): its flag parser (`parse_flags_or_exit`, `parse_flags_checking_locale`,
    `parse_flags_checking_rerun`) checks, before anything runs, that the run's inputs are as they were
    (`rerun_of_or_exit`). Each launcher defines them as its own (`allow_override`, as --out: the one defined last, the
    launcher run, files them in its --helpshort)."""
    from absl import flags

    from dualpath_jax.metrics import RERUN_ANYWAY, RERUN_OF

    module = _flags_module_of_caller()
    flags.DEFINE_string(
        RERUN_OF,
        None,
        "The run.json of the run this reruns (run.json's `rerun` line passes it): before running, stop with a line "
        "per input changed since that run (its git commit, the package's sources, config / setup / policy files, "
        "traces, versions, the python, the environment variables it recorded).",
        module_name=module,
        allow_override=True,
    )
    flags.DEFINE_bool(
        RERUN_ANYWAY,
        False,
        "With --rerun_of: run even though inputs changed since that run (each is named), e.g. on purpose on newer "
        "code; its numbers may differ from that run's.",
        module_name=module,
        allow_override=True,
    )


def rerun_of_or_exit() -> None:
    """--rerun_of=RUN_JSON (`define_rerun_of`): SystemExit with a line per input of that run that changed since
    (`metrics.changes_since`), unless --rerun_of_allow_changes (then they are printed and the run goes on). A file that
    is missing, unreadable, not a run.json or another launcher's is one line naming it. Nothing without the flag."""
    import json
    import os
    import shlex
    import sys

    from absl import flags

    from dualpath_jax.metrics import RERUN_ANYWAY, RERUN_OF, changes_since

    fv = flags.FLAGS
    if RERUN_OF not in fv:  # (a launcher that writes no run.json)
        return
    path = fv[RERUN_OF].value
    if path is None:
        if fv[RERUN_ANYWAY].value:
            raise SystemExit(f"bad flags: --{RERUN_ANYWAY} without --{RERUN_OF}=<the run.json of the run to rerun>")
        return
    bad = f"bad --{RERUN_OF} {path!r}"
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"{bad}: no such file") from None
    except IsADirectoryError:
        raise SystemExit(f"{bad}: a directory; give the run.json in it") from None
    except OSError as e:
        raise SystemExit(f"{bad}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:  # (not JSON, not UTF-8)
        raise SystemExit(f"{bad}: not a run.json (not JSON: {e})") from None
    try:
        ran = shlex.split(info["command"])
        ran = ran[2] if len(ran) > 2 and ran[1] == "-m" else None
    except (TypeError, KeyError, ValueError, AttributeError):
        ran = None
    if ran is None or not isinstance(info.get("rerun"), str):
        raise SystemExit(f"{bad}: not a run.json (no `command` of `python -m LAUNCHER` and `rerun` line)")
    if ran != (this := launcher_module()):
        raise SystemExit(f"{bad}: the run.json of {ran}, not of {this}; paste its own `rerun` line")
    changed = changes_since(info)
    where = os.path.abspath(path)
    if changed and not fv[RERUN_ANYWAY].value:
        raise SystemExit(
            f"--{RERUN_OF}={where}: {len(changed)} input(s) changed since that run, so this would not rerun it "
            f"(--{RERUN_ANYWAY} runs it anyway):\n" + "\n".join(f"  {c}" for c in changed)
        )
    if changed:
        sys.stderr.write(
            f"--{RERUN_OF}={where}: running anyway (--{RERUN_ANYWAY}) with {len(changed)} input(s) changed since "
            "that run:\n" + "".join(f"  {c}\n" for c in changed)
        )
    else:
        sys.stderr.write(f"--{RERUN_OF}={where}: its inputs are as they were (code, sources, traces, versions)\n")


def launcher_module() -> str:
    """The module of the launcher this process runs (`experiments.bench_store`), as `python -m` names it; a script run
    as a file, experiments/<name>.py, is `experiments.<name>` (`-m <name>` failed)."""
    import os
    import sys

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = getattr(spec, "name", None)
    return module or f"{__name__}.{os.path.splitext(os.path.basename(sys.argv[0]))[0]}"


def parse_flags_or_exit(argv):
    """absl's flag parser (`app.run(main, flags_parser=parse_flags_or_exit)`) for launchers with an ml_collections
    `--config`: an override of a field the config does not have (`--config.cluster.snic_gbs=1`) is one "bad
    override" line with the library's did-you-mean, and an override on a config file that failed to load is one
    "bad config" line, instead of chained tracebacks. Other flag errors stay absl's own one-line messages; an unknown
    --output_dir / --results_dir (the other launchers' name for where results go) gets a hint naming this one's."""
    import sys

    from absl import flags

    if line := non_utf8_locale_line():
        raise SystemExit(line)
    catch_lost_ctrl_c()  # (a Ctrl-C in JAX's gc callback was lost: the run went on to the end)
    # the key trees of config files loaded before the command line (a launcher's default file): its overrides apply
    # during the parse below (a --config on the command line records its own, `_ConfigFileParser.parse`)
    before = {}
    for flag in _config_file_flags():
        flag.parser.keys = None
        with contextlib.suppress(Exception):  # (a default file that failed to load: its error comes on first use)
            before[flag.name] = _key_tree(flag.value)
    try:
        parsed = flags.FLAGS(argv)
    except _ConfigFileFailed as e:  # the --config file itself: not Python, no get_config, an error in it
        raise SystemExit(f"bad config: {e}") from None
    except (AttributeError, KeyError) as e:  # ml_collections: no such field (the file's own errors are above)
        raise SystemExit(_bad_override(argv, e)) from None
    except OSError as e:  # the --config file itself failed to load (the override touched its placeholder)
        raise SystemExit(_load_failure(e)) from None
    except flags.Error as e:  # as absl's parse_flags_with_usage, except for a config file's own error
        text = str(e)
        if "Error whilst parsing config file" in text:  # ml_collections embeds the whole traceback: its last line
            raise SystemExit(f"bad config: {[t for t in text.splitlines() if t.strip()][-1].strip()}") from None
        hint = _results_flag_hint(e)
        sys.stderr.write(
            f"FATAL Flags parsing error: {text}\n{hint}Pass --helpshort or --helpfull to see help on flags.\n"
        )
        sys.exit(1)
    for flag in _config_file_flags():
        _refuse_whole_section_overrides(argv, flag, flag.parser.keys or before.get(flag.name))
    rerun_of_or_exit()
    return parsed


def _config_file_flags() -> list:
    """The config-file flags (`define_config_file`) of absl's FLAGS."""
    from absl import flags

    return [f for f in set(flags.FLAGS._flags().values()) if isinstance(f.parser, _ConfigFileParser)]  # noqa: SLF001


def _key_tree(config) -> dict | None:
    """{key: its own key tree, or None for a value} of a ConfigDict (None for anything else)."""
    from ml_collections import ConfigDict

    if not isinstance(config, ConfigDict):
        return None
    return {k: _key_tree(v) for k, v in config.items()}


def _dropped_keys(had: dict, given, prefix: str = "") -> list[str]:
    """The keys of the key tree `had` that the dict `given` (an override's value) lacks, nested ones dotted."""
    from ml_collections import ConfigDict

    out = []
    for k, sub in had.items():
        if k not in given:
            if sub != {}:  # (an option dict empty in the file, scheduler.kwargs: nothing of the file's is lost)
                out.append(f"{prefix}{k}")
        elif sub and isinstance(given[k], (dict, ConfigDict)):
            out += _dropped_keys(sub, given[k], f"{prefix}{k}.")
    return out


def _refuse_whole_section_overrides(argv, flag, keys: dict | None) -> None:
    """SystemExit with one "bad override" line for an override that replaces a whole section of the config file with
    a dict lacking keys the file set (`--config.workload="{'n_agents': 4}"`): ml_collections replaces the section,
    so the run went on with the dataclass defaults for the rest (the simulator's calibrated cluster, the runtime's
    workload kind: a traceback). Open option dicts, `{}` in the files (store_options, policy_kwargs), take any."""
    from ml_collections import ConfigDict

    if not keys:
        return
    for path, value in (getattr(flag, "override_values", None) or {}).items():
        if not isinstance(value, (dict, ConfigDict)):
            continue
        had = keys
        for part in path.split("."):
            had = had.get(part) if isinstance(had, dict) else None
        dropped = _dropped_keys(had, value) if had else []
        if not dropped:
            continue
        name = f"--{flag.name}.{path}"
        given = next((a for a in argv[1:] if a.split("=", 1)[0] == name and "=" in a), f"{name}=...")
        shown = ", ".join(dropped[:6]) + (f", ... ({len(dropped)} in all)" if len(dropped) > 6 else "")
        first = next(iter(value.items()), None)
        one = f"{name}.{first[0]}={first[1]!r}" if first else f"{name}.FIELD=VALUE"
        raise SystemExit(
            f"bad override {given}: it replaces the whole section {path} and drops the config file's {shown}; set "
            f"fields one by one ({one})"
        )


def _results_flag_hint(e: BaseException) -> str:
    """A line for absl's unknown-flag error on --output_dir or --results_dir, naming where this launcher's results go:
    the simulator's launchers take --output_dir, the runtime's (run, bench_runtime) --config.results_dir, and
    `run --output_dir=...` said only "Unknown command line flag 'output_dir'". '' for another error."""
    from absl import flags

    given = getattr(e, "flagname", None)
    if not isinstance(e, flags.UnrecognizedFlagError) or given not in ("output_dir", "results_dir"):
        return ""
    if "output_dir" in flags.FLAGS:  # (simulate: --output_dir, over its config's output_dir)
        use = "--output_dir"
    else:
        try:
            use = "--config.results_dir" if "results_dir" in flags.FLAGS["config"].value else ""
        except Exception:  # noqa: BLE001 - no --config, or a config file that did not load
            use = ""
    if not use:
        return ""
    value = str(e.flagvalue).partition("=")[2] if "=" in str(e.flagvalue) else "DIR"
    return (
        f"Hint: this launcher writes its results under {use} (e.g. {use}={value}); --output_dir is the simulator "
        "launchers' flag (simulate, sweep, capacity, reproduce_paper), --config.results_dir the runtime's (run, "
        "bench_runtime)\n"
    )


# The flags naming a KV store's directory. A KV store is a cache: a full disk there (no space or no inodes left) costs
# the runs their hits, not the job (LocalDirStore opens with its metadata pending and makes itself once there is
# room), so those checks warn where the others (results directories) refuse.
KV_STORE_DIR_FLAGS = frozenset({"--config.runtime.store_dir"})
_FULL_STORE_DIRS_SAID: set[str] = set()  # (warned once per directory: every policy's fresh store checks it again)
_CHECK_BYTES = 4096  # written by the check: a disk full of bytes still takes an empty file (tmpfs; ext4's inodes)


def _is_full_disk(e: OSError) -> bool:
    import errno

    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def _write_error(directory: str) -> OSError | None:
    """The error of making `directory` (if missing) and writing a small file in it (removed), or None."""
    import os
    import tempfile

    path = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=directory, prefix=".write-check-")
        try:
            left = memoryview(bytes(_CHECK_BYTES))
            while left:  # (a short write, then ENOSPC)
                left = left[os.write(fd, left) :]
        finally:
            os.close(fd)
    except OSError as e:
        return e
    finally:  # (not a buffered file: its close raised ENOSPC again, before its unlink, and left the file behind)
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return None


def _why(directory: str, e: OSError) -> str:
    """Why `directory` cannot be written, as a flag's error says it: a full disk is named with its errno."""
    import errno

    from dualpath_jax.checks import file_in_the_way

    why = file_in_the_way(directory) or e.strerror or str(e)
    if _is_full_disk(e):
        why += f": {errno.errorcode[e.errno]}, the disk is full"
    elif e.errno in (errno.EACCES, errno.EPERM):
        why += _owned_by_another_user(directory)
    return why


def _owned_by_another_user(directory: str) -> str:
    """`, 'PATH' is owned by USER` where `directory` (or its nearest existing parent, PATH) belongs to another user than
    this process's (a results/ made by a root run, `sudo -E` for the netns section, in one's own checkout), else ""."""
    import os
    import pwd

    path = os.path.abspath(directory)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        uid = os.stat(path).st_uid
    except OSError:
        return ""
    if uid == os.geteuid():
        return ""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid {uid}"
    return f", {path!r} is owned by {name}"


def _cannot_write(directory: str) -> str | None:
    """Why files cannot be written in `directory` (made if missing), or None when a test file went in and out."""
    e = _write_error(directory)
    return None if e is None else _why(directory, e)


def _store_on_full_disk(path: str, what: str, e: OSError) -> bool:
    """True (warned) where `path`, the KV store directory `what` names, cannot be made or written for a full disk:
    the run goes on and its store opens there with its metadata pending."""
    from absl import logging

    from dualpath_jax.checks import file_in_the_way

    if what not in KV_STORE_DIR_FLAGS or not _is_full_disk(e) or file_in_the_way(path):
        return False
    said = path in _FULL_STORE_DIRS_SAID
    _FULL_STORE_DIRS_SAID.add(path)
    (logging.debug if said else logging.warning)(
        "%s %r: cannot write there (%s): the KV store opens without blocks (its metadata pending): the runs miss in "
        "it until the disk has room", what, path, _why(path, e),
    )  # fmt: skip
    return True


def writable_dir_or_exit(path: str, what: str) -> str:
    """Make the results directory `path` now and prove it takes a file, or SystemExit with one line naming
    `what` (e.g. "--output_dir"): a launcher checks this before it runs, so no run's results are lost at the end
    to a directory that cannot be written. A KV store's directory (`KV_STORE_DIR_FLAGS`) on a full disk is a
    warning: the store is a cache."""
    e = _write_error(path)
    if e is not None and not _store_on_full_disk(path, what, e):
        raise SystemExit(f"bad {what} {path!r}: cannot write there ({_why(path, e)})")
    return path


def dirs_made_for(path: str) -> str | None:
    """The topmost directory of `path` that does not exist yet, which making `path` makes (None: it exists); for
    `drop_empty_dirs` after a run that wrote nothing."""
    import os

    path, top = os.path.abspath(path), None
    while not os.path.exists(path) and os.path.dirname(path) != path:
        top, path = path, os.path.dirname(path)
    return top


def drop_empty_dirs(path: str, top: str | None) -> None:
    """Remove `path` and its parents up to `top` (`dirs_made_for`: the ones this launcher made) while they are empty:
    a run that stopped on a bad config left an empty results directory behind."""
    import os

    if top is None:
        return
    path = os.path.abspath(path)
    while True:
        try:
            os.rmdir(path)  # (only an empty directory)
        except OSError:
            return
        if path == top:
            return
        path = os.path.dirname(path)


def fresh_dir_or_exit(parent: str, name: str, what: str) -> str:
    """Make a new directory `parent/name` (`name-2`, `name-3`, ... when that exists) and return its path, or
    SystemExit naming `what` when `parent` cannot take it. Two runs started in the same second (a sweep of
    launches) each get their own results (and kept-store) directory instead of writing into one. A KV store's
    (`KV_STORE_DIR_FLAGS`) that a full disk cannot make is returned unmade: its store makes it once there is room."""
    import os

    writable_dir_or_exit(parent, what)
    for i in range(1, 10_000):
        path = os.path.join(parent, name if i == 1 else f"{name}-{i}")
        try:
            os.mkdir(path)  # exclusive: of two runs making the same name, one gets FileExistsError
            return path
        except FileExistsError:
            continue
        except OSError as e:
            if what in KV_STORE_DIR_FLAGS and _is_full_disk(e):  # (warned by the check above: the store makes it)
                return path
            raise SystemExit(f"bad {what} {parent!r}: cannot make {path!r} ({_why(path, e)})") from None
    raise SystemExit(f"bad {what} {parent!r}: {name!r} and 9,998 numbered variants of it already exist")


_HELD_DIRS: dict[str, int] = {}  # directory -> the descriptor whose lock this process holds (until it exits)


def hold_dir_or_exit(directory: str, what: str) -> None:
    """Lock `directory` (made already: `writable_dir_or_exit`) for this process's life, or SystemExit naming `what`
    when another job holds it: two sweeps (capacity searches, simulations, reports) writing one --output_dir at once
    each passed the earlier-results check (their files come at the end) and the last one's replaced the other's, or
    mixed with them. An flock of the directory itself (no file in it), released when the process ends however it ends
    (kill -9 too)."""
    import os

    from dualpath_jax import flocks

    directory = os.path.abspath(directory)
    if directory in _HELD_DIRS:
        return
    try:
        fd = flocks.open_dir(directory)
    except OSError as e:
        raise SystemExit(f"bad {what} {directory!r}: cannot open it ({e.strerror or e})") from None
    taken = flocks.take(fd)
    if taken is False:
        os.close(fd)
        raise SystemExit(
            f"bad {what} {directory!r}: another job writes there now (a sweep, capacity search, simulation or report "
            f"of this repository holds it: its results would replace or mix with this one's); wait for it to end, or "
            f"give another {what}"
        )
    if taken is None:  # (a file system without flock: not held, as before)
        os.close(fd)
        return
    _HELD_DIRS[directory] = fd


def no_earlier_results_or_exit(
    directory: str, names: tuple[str, ...], what: str, overwrite: bool, launcher: str | None = None
) -> None:
    """SystemExit naming `what` (e.g. "--output_dir") when `directory` already holds an earlier run's result files
    (any of `names`), or a run.json of another launcher, and `overwrite` is not set: a second sweep (or a failed one,
    with its partial rows) into the same --output_dir replaced a finished run's results, and a sweep (capacity
    search, report) into a directory another launcher wrote replaced its run.json (the results stayed, with no record
    of what made them). `launcher`: this launcher's module (`experiments.sweep`; None: run.json not checked). Checked
    before anything runs."""
    import os

    if overwrite:
        return
    held = [n for n in names if os.path.exists(os.path.join(directory, n))]
    if held:
        raise SystemExit(
            f"bad {what} {directory!r}: it holds an earlier run's results ({', '.join(held)}); give another {what}, "
            "or --overwrite to replace them"
        )
    other = run_file_launcher(directory)
    if launcher and other and other != launcher:
        raise SystemExit(
            f"bad {what} {directory!r}: its run.json is another launcher's ({other}): this run's run.json would "
            f"replace it, and that launcher's results there would have no record of what made them; give another "
            f"{what}, or --overwrite to replace it"
        )


def run_file_launcher(directory: str) -> str | None:
    """The launcher module (`experiments.reproduce_paper`) whose run.json `directory` holds: its `command`'s
    `python -m MODULE`; None when there is none or it names no module."""
    import json
    import os
    import shlex

    try:
        with open(os.path.join(directory, "run.json")) as f:
            command = json.load(f).get("command")
        argv = shlex.split(command)
    except (OSError, ValueError, AttributeError, TypeError):  # none there, not a run.json, no command
        return None
    return argv[2] if len(argv) > 2 and argv[1] == "-m" else None


def setup_names(setups) -> dict[str, str]:
    """Each setup file (in order, once) -> its name in a launcher's rows: its file name, or its path where two setups
    share one (a/x.py, b/x.py: their rows and plot lines were one setup's). `sweep`, `capacity`."""
    import os

    names = {s: os.path.basename(s) for s in dict.fromkeys(setups)}
    if len(set(names.values())) < len(names):
        names = {s: s for s in names}
    return names


def setup_files_or_exit(setups, items_go_in: str) -> list[str]:
    """The --setups items as the run reads them (`installed_config_file`: README's `configs/NAME.py` from another
    directory is this package's), or one line naming an item that is no config file (a UsageError printed the whole
    --help above it); `items_go_in`: the flags a setup's variant items belong in."""
    import os

    files = []
    for s in setups:
        s = installed_config_file(s, "--setups") if ":" not in s else s
        if not os.path.isfile(s):
            why = "is a directory, not a config file" if os.path.isdir(s) else "does not exist"
            hint = f" (a setup is a file; variant items go in {items_go_in})" if ":" in s else ""
            raise SystemExit(f"bad --setups: config file {s!r} {why}{hint}")
        files.append(s)
    return files


def register_seeds(name: str = "seeds") -> None:
    """A --seeds list flag takes distinct integers (0 and 00 are one)."""
    from absl import flags

    flags.register_validator(
        name,
        lambda v: all(x.strip().lstrip("-").isdigit() for x in v) and len({int(x) for x in v}) == len(v),
        message=f"--{name} takes distinct integers, e.g. 0,1,2",
    )


# a '+' that joins a --modes item's own variant items (dualpath+policy.alpha_tokens=5), not one inside a value
# (cluster.x=1e+6) nor a value's sign (policy.x=+inf)
_MODE_JOIN = re.compile(r"(?<!=)\+(?=[A-Za-z_])")


def mode_items(mode: str) -> list[str]:
    """A --modes item's variant items (sweep, capacity): its mode or policy name, then its own items joined by '+'
    (`dualpath+policy.alpha_tokens=5` -> ['dualpath', 'policy.alpha_tokens=5'])."""
    return [x.strip() for x in _MODE_JOIN.split(mode) if x.strip()]


def variant_item_key(item: str):
    """A variant item as its config sees it: agents=2 and agents=02, aps=0.5 and aps=.5 are one item (a list flag
    naming both ran one config twice). A bool is told from a number (true from 1)."""
    from dualpath_jax.checks import variant_value

    key, eq, text = item.strip().partition("=")
    if not eq:
        return item.strip()
    value = variant_value(text.strip())
    return key.strip(), isinstance(value, bool), value


def register_distinct(name: str, key=str) -> None:
    """A validator of the list flag `name`: an item given twice (as `key` sees it: `int` for numbers, a real path
    for files) is a flag error naming it. It ran twice: duplicate rows, and a sweep plot averaged them as seeds."""
    from absl import flags

    def distinct(items) -> bool:
        seen: dict = {}
        for x in items:
            try:
                k = key(x)
            except (TypeError, ValueError):  # not this flag's kind of item: its own validator says so
                continue
            if k in seen:
                raise flags.ValidationError(f"--{name} names {seen[k]!r} twice" + (f" ({x!r})" if x != seen[k] else ""))
            seen[k] = x
        return True

    flags.register_validator(name, distinct)


def run_parts(names, run_part, keep) -> None:
    """`run_part(name)` for each of `names`, in order. When one raises (an error, Ctrl-C), `keep(done)` first gets the
    names that finished, if any, so their results are written (a later part's failure lost them); then the error goes
    on, except Ctrl-C: a SystemExit with one line naming the part it stopped and those kept (it was a traceback). The
    benchmarks run their sections / layouts / models this way."""
    done: list = []
    name = None
    try:
        for name in names:
            run_part(name)
            done.append(name)
    except KeyboardInterrupt as e:  # (SIGTERM too, under SigtermAsInterrupt: its line says which)
        if done:
            keep(done)
        kept = f"the finished ones ({', '.join(map(str, done))}) are kept" if done else "none had finished"
        raise SystemExit(f"interrupted ({interrupted_by(e)}) during {name!r}; {kept}") from None
    except BaseException:
        if done:
            keep(done)
        raise


def run_parts_then_write(job: str, part: str, names, run_part, write, what: str = "rows") -> None:
    """A benchmark's parts (sections / layouts / models) through `run_parts`, SIGTERM stopping them as Ctrl-C does,
    then `write(what)` its table and `--out`, `what` saying which results they are ("all rows", or "the rows of a, b
    only (a later layout failed or was interrupted)" when one failed or was stopped). A SIGTERM while they are written
    is only noted (they stay whole), and the exit status then says the job was stopped. (bench_prefill,
    bench_invariant and bench_io each held a copy of this block; bench_store lacked it: SIGTERM ended it at once, its
    finished layouts' rows lost.)"""
    term = SigtermAsInterrupt()

    def keep(done: list) -> None:
        term.raising = False  # (a second SIGTERM while they are written is only noted)
        write(f"the {what} of {', '.join(map(str, done))} only (a later {part} failed or was interrupted)")

    with term:
        run_parts(names, run_part, keep)
        term.raising = False
        write(f"all {what}")
    if term.got:  # it came while the results were written: they are whole
        raise SystemExit(f"{job}: stopped by SIGTERM after the last {part}; all {what} are written")


def write_rows_json(path: str, rows, what: str) -> None:
    """A benchmark's rows as JSON at `path` (`--out`), logged with `what` they are."""
    import json

    from absl import logging

    from dualpath_jax.metrics import json_safe

    # beside it, then renamed over it: a Ctrl-C or a full disk mid-dump left half a JSON where an earlier run's file
    # was (NaN, as null: strict JSON)
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(json_safe(rows), f, indent=1, allow_nan=False)

    write_atomically(path, write)
    logging.info("wrote %s to %s", what, path)
    _write_run_info_beside(path)


def _write_run_info_beside(path: str) -> None:
    """What ran, beside a benchmark's `--out` rows (`X.json` -> `X.run.json`, as the other launchers' run.json: the
    command, the line that runs it again, versions, host, git; the rows held none of it)."""
    import json
    import os

    from dualpath_jax.metrics import json_safe, run_file_beside, run_info

    info = run_info(launcher_module(), _STARTED, out_file=path, rows=os.path.abspath(path))
    beside = run_file_beside(path)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(json_safe(info), f, indent=1)

    write_atomically(beside, write)


def writable_file_or_exit(path: str, what: str) -> str:
    """`writable_dir_or_exit` for an output file (`--out`): its directory must take files; the file is written
    later, when there are results."""
    import os

    if os.path.isdir(path) or path.endswith(os.sep):  # (a missing dir/: IsADirectoryError after the benchmark)
        raise SystemExit(f"bad {what} {path!r}: it is a directory, not a file")
    if os.path.islink(path) and not os.path.exists(path):  # (a FileNotFoundError after the benchmark)
        raise SystemExit(f"bad {what} {path!r}: a symbolic link to {os.readlink(path)!r}, which does not exist")
    parent = os.path.dirname(os.path.abspath(path))
    why = _cannot_write(parent)
    if why:
        raise SystemExit(f"bad {what} {path!r}: cannot write in {parent!r} ({why})")
    return path


def stopped_by(term) -> str:
    """What stopped a launcher whose results were written under `term.hold()`: "SIGTERM", "Ctrl-C" or ""."""
    return "SIGTERM" if term.got else "Ctrl-C" if term.got_int else ""


def error_line(e: BaseException) -> str:
    """One line for a job's error; a `sys.exit(code)` is named as such (its message alone may be empty or 0)."""
    if isinstance(e, SystemExit):
        return f"SystemExit: sys.exit({e.code!r}) called"
    return f"{type(e).__name__}: {e}"


def runtime_config_line(e: BaseException) -> str:
    """The "bad config" line of a runtime `ConfigError` (experiments.run, bench_runtime), its field paths named as
    the flags give them: `RuntimeConfig`'s own, `config.workload.aps`, sit under `runtime` in the launcher's config
    (`--config.runtime.workload.aps`). The launcher's own fields (`config.policies`), paths already under
    `config.runtime.` and a flag's `--config.` stay as they are."""
    import dataclasses

    from dualpath_jax.runtime.config import RuntimeConfig

    names = "|".join(sorted((f.name for f in dataclasses.fields(RuntimeConfig)), key=len, reverse=True))
    # (a field of it, or its own "config: unknown field(s) ..." of `_build`)
    path = rf"(?<![\w./-])config(?=\.(?:{names})\b|: unknown field)"
    return "bad config: " + re.sub(path, "config.runtime", str(e))


def flag_line(line: str) -> str:
    """A `run failed` line with `RuntimeConfig`'s field paths named as the flags give them
    (config.run_timeout_s -> config.runtime.run_timeout_s), as `runtime_config_line` names a ConfigError's."""
    return runtime_config_line(Exception(line)).removeprefix("bad config: ")


def check_cell_or_exit(what: str, check, *args):
    """`check(*args)` (a simulator cell's config load and build, before a grid runs), its errors one line each: the
    setup file that does not load (not Python, no get_config, ...) as a bad config, a bad value as a bad `what`
    (e.g. "sweep cell 'x.py:basic'"), the setup's own sys.exit too (0 ended a sweep "successfully", with nothing
    run). Returns what `check` returns. `sweep`, `capacity`."""
    from dualpath_jax.sim.configs_io import ConfigFileError

    try:
        return check(*args)
    except ConfigFileError as e:
        raise SystemExit(f"bad config: {e}") from None
    except (ValueError, KeyError) as e:
        raise SystemExit(f"bad {what}: {e.args[0] if e.args else e}") from None
    except OSError as e:  # a trace file that is not there (a traceback in a sweep; simulate said one line)
        raise SystemExit(f"bad {what}: {e}") from None
    except SystemExit as e:
        raise SystemExit(f"bad {what}: {error_line(e)}") from None


def policy_mistake(e: BaseException, policy: str, batcher: str | None = None, log=None) -> str | None:
    """One line for an error the policy (or batcher) made, as the simulator names it (`sim.runner.PolicyError`:
    schedule() raised or changed the snapshot; a RuntimeError / TypeError starting "policy '<name>' ": a bad placement,
    an unknown engine or request, none placed on an idle cluster, not a list returned; "batcher '<name>' ": a bad
    batch), with the file and line in the policy where it raised (its traceback logged); None for any other error.
    Each was a traceback through the event loop, the policy's mistake on its last line. `log`: how the traceback is
    logged (absl's logging.info; a sweep's worker process, whose flags are not parsed, shows warnings only)."""
    from dualpath_jax.sim.runner import PolicyError

    names = (f"policy {policy!r} ",) + ((f"batcher {batcher!r} ",) if batcher is not None else ())
    if not isinstance(e, PolicyError) and not str(e).startswith(names):
        return None
    cause = e.__cause__
    if isinstance(e, PolicyError) and cause is not None and cause.__traceback__ is not None:
        import traceback

        from absl import logging

        from dualpath_jax.sim.configs_io import users_frame

        (log or logging.info)("the policy's traceback:\n%s", "".join(traceback.format_exception(cause)))
        at = users_frame(cause)  # the policy's own line (not the Assignment check it called)
        if at is not None:
            return f"{e} (at {at.filename}:{at.lineno} in {at.name})"
    return str(e)


def exit_if_stopped_or_failed(
    who: str, noun: str, total: int, failed: list[str], results: str, sigterm: bool | str, then: str = ""
) -> None:
    """After a grid's results are written: a failing exit with one line per failed job (`failed`: "spec: error"), or
    one saying that SIGTERM stopped it (`sigterm`: True, or the signal's name, "Ctrl-C" for one noted while the
    results were written: `stopped_by`) and where the finished ones are (`results`); `then`, after the failed lines,
    says how to go on. `who`: the launcher ("sweep"); `noun`: its jobs ("cells")."""
    by = sigterm if isinstance(sigterm, str) else "SIGTERM" if sigterm else ""
    stopped = (
        f"{who}: stopped by {by}; the {total - len(failed)} finished {noun} of {total} are in {results}\n" if by else ""
    )
    if failed:
        # a job the stop left unrun did not fail (it said "6 of 6 cells failed" after a Ctrl-C)
        cut = sum(line.endswith((INTERRUPTED, "interrupted (SIGTERM) before this finished")) for line in failed)
        why = "failed (their rows say so)"
        if cut == len(failed):
            why = "not run (interrupted; their rows say so)"
        elif cut:
            why = f"did not finish: {len(failed) - cut} failed, {cut} not run (interrupted); their rows say so"
        raise SystemExit(
            f"{stopped}{who}: {len(failed)} of {total} {noun} {why}:\n"
            + "\n".join(f"  {line}" for line in failed)
            + then
        )
    if sigterm:  # (it came after the last job finished: every result is written)
        raise SystemExit(stopped.rstrip())


def stopped_early(e: BaseException, run_failed: type, kept: bool, prefix: str = "run failed", name=None) -> str:
    """Called in `except BaseException as e` around a job's runs: the line naming why they stopped part-way, when
    finished results are `kept` (the caller writes them, then exits with the line). A `run_failed` (its timeout,
    no live engine left) or Ctrl-C is that line alone; a one-line SystemExit (`exit_line`: e.g. `fresh_dir_or_exit`'s
    for a store directory turned read-only) is its line after `prefix` (it went on as itself: the finished results
    were lost); another error (a bug, a full disk) is logged with its traceback and named after `prefix`. Without
    kept results a `run_failed` or a one-line SystemExit ends the job with its line and "; nothing written", a Ctrl-C
    with its line (no traceback), and any other error goes on as itself. `name` (None: as they are) names the lines'
    field paths as the launcher's flags do (the runtime launchers: `flag_line`)."""
    name = name or (lambda line: line)
    if isinstance(e, (run_failed, KeyboardInterrupt)):
        line = f"run failed: {e}" if isinstance(e, run_failed) else "interrupted"
        if isinstance(e, Terminated):  # (SigtermAsInterrupt)
            line = "interrupted (SIGTERM)"
        if not kept:
            raise SystemExit(name(line) + ("; nothing written" if isinstance(e, run_failed) else "")) from None
        return name(line)
    if exit_line(e) is not None:  # a launcher's own one-line exit (a store directory it cannot make)
        if not kept:
            raise SystemExit(f"{name(exit_line(e))}; nothing written") from None
        return name(f"{prefix}: {exit_line(e)}")
    if not kept or not isinstance(e, Exception):
        raise  # noqa: PLE0704 - the caller's exception, being handled
    from absl import logging

    line = f"{prefix}: {type(e).__name__}: {e}"
    logging.exception("%s (writing the finished results next)", line)
    return name(line)


def exit_line(e: BaseException) -> str | None:
    """The line of a SystemExit raised with one (`raise SystemExit("bad ...")`: the launchers' one-line errors), or
    None (another exception, or an exit status: sys.exit(1))."""
    return e.code if isinstance(e, SystemExit) and isinstance(e.code, str) else None


def remove_if_empty(path: str) -> None:
    """Remove a job's results directory when nothing was written into it (stopped before any run finished: a Ctrl-C
    in the warm-up left an empty `results/<timestamp>/` behind)."""
    import os

    try:
        os.rmdir(path)
    except OSError:  # (not empty: the finished runs' files stay)
        pass


INTERRUPTED = "interrupted (Ctrl-C) before this finished"  # run_jobs's error line of a job it stopped


class Terminated(KeyboardInterrupt):
    """SIGTERM while jobs run, raised where Ctrl-C raises KeyboardInterrupt: `run_jobs` stops the jobs and keeps
    the finished ones (SIGTERM's default action ended the process at once and wrote nothing)."""


def interrupted_by(e: BaseException) -> str:
    """What stopped a job, for its one line: "SIGTERM" (`Terminated`, under `SigtermAsInterrupt`) or "Ctrl-C"."""
    return "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"


class SigtermAsInterrupt:
    """`with SigtermAsInterrupt() as term:` SIGTERM raises Terminated while `term.raising`, else (while the results
    are written) it is only noted; `term.got` says whether one came. `term.hold()`: from then on Ctrl-C (SIGINT) is
    only noted too (`term.got_int`; a second Ctrl-C while the results were written was a traceback and lost the rest
    of them); `term.interruptible()`: both raise again inside it. The previous handlers are back on exit."""

    def __init__(self):
        self.got = False
        self.got_int = False
        self.raising = True
        self._held = False  # SIGINT only noted (`hold`); its handler before: `_previous_int`
        self._previous_int = None

    def __call__(self, signum, frame):
        self.got = True
        if self.raising:
            raise Terminated

    def _note_int(self, signum, frame):
        self.got_int = True

    def hold(self) -> None:
        """SIGTERM and Ctrl-C from here on are only noted (`got`, `got_int`): the results are being written."""
        import signal

        self.raising = False
        if not self._held:
            self._previous_int = signal.signal(signal.SIGINT, self._note_int)
            self._held = True

    def _release(self) -> None:
        import signal

        if self._held:  # (None: a handler not set from Python, e.g. SIG_DFL in a process embedding Python)
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous_int is None else self._previous_int)
            self._held = False

    @contextlib.contextmanager
    def interruptible(self):
        """Inside, after `hold`: SIGTERM raises Terminated and Ctrl-C KeyboardInterrupt again (a step the results can
        do without, e.g. --config.reference's computation); held again after it."""
        held, raising = self._held, self.raising
        self._release()
        self.raising = True
        try:
            yield
        finally:
            self.raising = raising
            if held:
                self.hold()

    def error_line(self, error: str | None) -> str | None:
        """A job's `run_jobs` error line, naming SIGTERM when that is what stopped it (run_jobs says Ctrl-C)."""
        return "interrupted (SIGTERM) before this finished" if self.got and error == INTERRUPTED else error

    def __enter__(self):
        import signal

        self._previous = signal.signal(signal.SIGTERM, self)
        return self

    def __exit__(self, *exc):
        import signal

        signal.signal(signal.SIGTERM, self._previous)
        self._release()


def _exit_with_parent(parent: int) -> None:
    """In a `run_jobs` worker: exit when the process that started it is gone (killed hard: kill -9, the OOM killer),
    instead of finishing a job whose result nobody reads and then waiting for the next one forever, holding its
    memory."""
    import os
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _no_worker_line(workers: int, e: OSError) -> str:
    """The one line for a worker process that could not start (EAGAIN from fork / clone): the per-user process limit."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    return (
        f"cannot start a worker process of --workers={workers}: {e.strerror or e} (the per-user process limit "
        f"RLIMIT_NPROC, `ulimit -u`, is {limit}; every worker also starts threads): use fewer --workers or raise it"
    )


def run_jobs(
    fn, jobs: list, workers: int, desc: str, on_done=None, unit: str = "job", steps: int = 1
) -> list[tuple[object, str | None]]:
    """`fn` over `jobs` with a progress bar, in spawned worker processes when `workers` > 1: one (result, None)
    or (None, error line) per job, in the order of `jobs`. A job that raises, or whose worker process dies (e.g.
    killed for memory), is its error line and the others still report: a dead worker hung
    `multiprocessing.Pool` forever and an exception lost every finished job's result. Ctrl-C stops the jobs at
    once, and the ones not finished are error lines too (it lost every finished job's result, hours of a sweep).
    `on_done(index, result, error)`, when given, is called in this process as each job finishes (or fails),
    before the progress bar moves on (a sweep keeps each cell on disk); a job that Ctrl-C stopped gets no call.
    The bar counts `unit`s, `steps` per job: a job moves it a step with `job_step(line)` (a capacity search, one
    per probe; the line is written above the bar, also from a worker process) and the rest when it ends. Log
    lines go above the bar too (they were glued to it)."""
    import concurrent.futures as cf
    import multiprocessing as mp
    import os
    import sys
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    from dualpath_jax import progress

    out: list = [None] * len(jobs)
    interrupted = (None, INTERRUPTED)
    moved = [0] * len(jobs)  # the bar steps each job made

    def step(i: int, line: str | None) -> None:
        if line:
            tqdm.write(line, file=sys.stderr)
        if moved[i] < steps:
            moved[i] += 1
            bar.update()

    def finish(i: int) -> None:
        bar.update(steps - moved[i])
        moved[i] = steps  # (a worker's late step line is still written, the bar not moved past the job)

    with progress.bar(total=len(jobs) * steps, desc=desc, unit=unit) as bar, logs_above_bars():
        if workers <= 1:
            for i, job in enumerate(jobs):
                try:
                    try:
                        with _job_steps_to(lambda line, i=i: step(i, line)):
                            out[i] = (fn(job), None)
                    # a job's sys.exit (e.g. in a setup file) is its error too: it ended the sweep with no results
                    except (Exception, SystemExit) as e:  # noqa: BLE001 - reported with the job, after the others ran
                        out[i] = (None, error_line(e))
                    if on_done is not None:
                        on_done(i, *out[i])
                    finish(i)
                except KeyboardInterrupt:  # the finished jobs are kept (this one, if in on_done); the rest do not run
                    out[i:] = [done or interrupted for done in out[i:]]
                    break
            return out
        # (a worker whose driver was killed hard went on with its job, then waited for the next one forever)
        ctx = mp.get_context("spawn")
        steps_queue = ctx.Queue()  # (job index, line) of each worker's job_step, drawn here
        pool = cf.ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_job_worker_init, initargs=(os.getpid(), steps_queue)
        )
        try:
            futures = {pool.submit(_run_job, fn, i, job): i for i, job in enumerate(jobs)}
            pending = set(futures)
            while pending:
                done, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                _drain_steps(steps_queue, step)
                for f in done:
                    try:
                        out[futures[f]] = (f.result(), None)
                    except BrokenProcessPool:
                        out[futures[f]] = (
                            None,
                            "a worker process died (killed, e.g. out of memory) before this finished",
                        )
                    except (Exception, SystemExit) as e:  # noqa: BLE001 - a worker's sys.exit comes back as its result
                        out[futures[f]] = (None, error_line(e))
                    if on_done is not None:
                        on_done(futures[f], *out[futures[f]])
                    finish(futures[f])
            _drain_steps(steps_queue, step)
        except BaseException as e:  # Ctrl-C: stop now, as Pool did (the executor would finish the running jobs first)
            for p in list((pool._processes or {}).values()):  # noqa: SLF001 - no public way before Python 3.14
                p.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            if isinstance(e, OSError) and e.errno == errno.EAGAIN:  # (a raw BlockingIOError traceback, no cell ran)
                raise SystemExit(_no_worker_line(workers, e)) from None
            if not isinstance(e, KeyboardInterrupt):
                raise
            return [done or interrupted for done in out]  # the finished jobs are kept
        pool.shutdown()
        _drain_steps(steps_queue, step)  # (a line the queue brought after its job's result)
        steps_queue.close()
    return out


def token_agreement(results: dict, batch_invariant: bool) -> tuple[str, dict]:
    """Whether every policy generated the same greedy tokens for every turn (DESIGN.md: the path moves KV, it
    never changes it). `results`: policy -> runtime result (`.tokens`). Returns a line for the main job's table
    and its JSON summary. Here, not in experiments/run.py, so it imports without defining run's flags."""
    policies = list(results)
    first = results[policies[0]].tokens
    # every policy's turns (a turn only a later policy has differs: it was compared over the first one's alone)
    turns = set().union(*(results[p].tokens for p in policies))
    differ = sorted(
        {key for p in policies[1:] for key in turns if not _same_tokens(first.get(key), results[p].tokens.get(key))}
    )
    info = {"turns": len(turns), "turns_differing": len(differ), "first_differing": differ[:1]}
    if len(policies) < 2:
        return "", info
    names = " / ".join(policies)
    if not differ:
        return f"greedy tokens: identical under {names} for all {len(turns)} turns", info
    hint = (
        ""
        if batch_invariant
        else "; with the default numerics a float32 near-tie can do this (README, Known limits), "
        "--config.runtime.batch_invariant=True makes the tokens bit-identical"
    )
    return f"greedy tokens: {len(differ)} of {len(turns)} turns differ between {names} (first: {differ[0]}){hint}", info


def reference_agreement(results: dict, reference: dict, batch_invariant: bool) -> tuple[str, dict]:
    """Each policy's greedy tokens against the single-process reference's (`reference`: (trajectory, turn) ->
    tokens, `model_ops.reference_conversations`): `token_agreement` compares the policies with each other only, so
    a store or transport that changed KV the same way under every policy passed it. Returns the table's line and
    results.json's entry (policy -> turns compared, turns differing, the first of them)."""
    info, parts = {}, []
    for p, r in results.items():
        keys = set(reference) | set(r.tokens)  # (a turn missing on either side differs)
        differ = sorted(key for key in keys if not _same_tokens(reference.get(key), r.tokens.get(key)))
        info[p] = {"turns": len(keys), "turns_differing": len(differ), "first_differing": differ[:1]}
        parts.append(f"{p} equal" if not differ else f"{p} {len(differ)} of {len(keys)} differ (first: {differ[0]})")
    bad = any(v["turns_differing"] for v in info.values())
    hint = (
        "; with the default numerics a float32 near-tie can do this (README, Known limits), "
        "--config.runtime.batch_invariant=True makes the tokens bit-identical"
        if bad and not batch_invariant
        else ""
    )
    return f"greedy tokens vs the single-process reference ({len(reference)} turns): {', '.join(parts)}{hint}", info


def _same_tokens(a, b) -> bool:
    """Two runs' tokens of one turn (None: the run has no such turn) are the same."""
    import numpy as np

    return a is not None and b is not None and np.array_equal(a, b)


def mode_styles(modes, largest: float) -> dict[str, dict]:
    """Each mode's plot style, the same in every panel: a colour, a marker and its size, each marker smaller than the
    one before from `largest` (equal values, e.g. SLO attainment 1.0 for every mode, showed only the last mode's)."""
    return {
        m: dict(color=f"C{i % 10}", marker="osD^v"[i % 5], ms=max(largest - 1.5 * i, 3)) for i, m in enumerate(modes)
    }


def mean_within(values) -> float:
    """The mean of `values` (not empty) kept within [min, max]: float rounding put the mean of equal values 1 ulp
    outside them (`[0.1] * 3`: 0.10000000000000002), and matplotlib refused the negative error bar that made (a sweep
    of 3+ seeds with one value ended with a traceback and no run.json)."""
    return min(max(sum(values) / len(values), min(values)), max(values))


def table_cell(v) -> str:
    """A value as a printed table's cell (sweep's, capacity's): None (no figure: an offline cell's SLO, oracle's
    storage-NIC max/avg) as "-", a float to 4 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_atomically(path: str, write) -> None:
    """`dualpath_jax.metrics.write_atomically` (imported when first used: this package's import stays light)."""
    from dualpath_jax.metrics import write_atomically as write_beside_then_rename

    write_beside_then_rename(path, write)


def refuse_flags_of_parts_not_run(parts) -> None:
    """SystemExit with one "bad --flag" line when a flag of a part of the run that does not run was given: each part
    is `(its flag names, what it is, why it does not run or None when it runs)`. Such a flag was dropped without a
    word (`reproduce_paper --pd_agents=16` without --pd_ratios, `bench_io --sections=small --tcp_total_mb=8`,
    `bench_runtime --skip_overhead --overhead_turns=4`)."""
    from absl import flags

    for names, what, not_run in parts:
        for name in names:
            if not_run is not None and flags.FLAGS[name].present:
                raise SystemExit(f"bad --{name}: it applies to {what}, which {not_run}")


def refuse_unused_workload_overrides(config_flag) -> None:
    """SystemExit with one "bad config" line when a `--config.runtime.workload.*` override names a field the run's
    workload does not read (run, bench_runtime): `trace=` with kind='tiny' ran the tiny workload, `aps=` offline ran
    offline, `dataset=` of a tiny or trace workload was ignored, all silently (the simulator refuses the same by
    name). A config file's own values are not overrides and are not judged."""
    from absl import flags

    given = flags.FLAGS[config_flag.name].override_values or {}
    if "runtime" not in config_flag.value:  # (an AttributeError traceback from the first use)
        raise SystemExit(
            f"bad config: {flags.FLAGS[config_flag.name].config_filename} has no 'runtime' section (a runtime config, as "
            "configs/tiny_runtime.py; the simulator's configs run with experiments.simulate)"
        )
    try:
        w = config_flag.value.runtime.workload
    except (AttributeError, KeyError):  # no workload section: RuntimeConfig's own check names what is missing
        return
    from dualpath_jax.runtime.config import WorkloadConfig

    # (a section without kind / arrival runs WorkloadConfig's: w.kind was an AttributeError traceback here)
    kind, arrival = w.get("kind", WorkloadConfig.kind), w.get("arrival", WorkloadConfig.arrival)
    rules = [
        ("trace", kind != "trace", f"config.runtime.workload.kind={kind!r} (give kind=trace)"),
        ("dataset", kind != "synthetic", f"config.runtime.workload.kind={kind!r} (give kind=synthetic)"),
        ("aps", arrival != "online", f"config.runtime.workload.arrival={arrival!r} (give arrival=online)"),
    ]
    tiny_only = f"config.runtime.workload.kind={kind!r} (it shapes tiny agents only; give kind=tiny)"
    rules += [(f, kind != "tiny", tiny_only) for f in ("append_tokens", "gen_tokens", "first_append_tokens", "gap_s")]
    for field, unused, why in rules:
        key = f"runtime.workload.{field}"
        if key in given and unused:
            raise SystemExit(f"bad config: --config.{key}={given[key]} is not used by this run: {why}")
    if "runtime.workload.agents" in given and kind == "trace" and w.agents > 0 and w.get("trace") is not None:
        # a given agent count past the trace ran the fewer sessions it holds (the loader warns; a config file's own
        # count, as configs/tiny_runtime.py's 32 on a small trace, stays a warning)
        from dualpath_jax.workloads.traces import load_trace

        try:
            have = len(load_trace(w.trace, max_agents=w.agents, warn_fewer=False))
        except Exception:  # noqa: BLE001 - a trace that does not load: the run's own check names what is wrong
            return
        if have < w.agents:
            raise SystemExit(
                f"bad config: --config.runtime.workload.agents={w.agents}, but the trace {w.trace} holds {have} "
                f"trajectories (sessions): give agents <= {have}, or 0 for all of them"
            )


def _check_environment() -> None:
    """A DUALPATH_PURE_PYTHON value it does not take (`maybe`) is one line naming it: every launcher imports this
    package first (`python -m experiments.X`), and the ValueError came as a traceback from wherever
    dualpath_jax.compiled was first imported (a launcher's imports, a sweep's first cell, a benchmark's store)."""
    try:
        import dualpath_jax.compiled  # noqa: F401 - it reads the variable when imported
    except ValueError as e:
        raise SystemExit(f"bad environment: {e}") from None


_check_environment()


# --- progress and start lines (helpers of run_jobs and the launchers) ---

_JOB_STEP = None  # where `job_step` goes: run_jobs' bar (in this process) or its queue (in a worker process)
_JOB_INDEX = -1  # the job a worker process runs now


def job_step(line: str | None = None) -> None:
    """One step of the running `run_jobs` job: `line` written above the progress bar and the bar moved one step
    (from a worker process too: through a queue to the bar in the parent; a worker's own stderr line was glued to
    the bar). Outside run_jobs: `line` to stderr."""
    import sys

    if _JOB_STEP is not None:
        _JOB_STEP(line)
    elif line:
        print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _job_steps_to(step):
    global _JOB_STEP
    before, _JOB_STEP = _JOB_STEP, step
    try:
        yield
    finally:
        _JOB_STEP = before


def _job_worker_init(parent: int, steps_queue) -> None:
    """A run_jobs worker process: exits with its parent; its job_step lines go to `steps_queue`."""
    global _JOB_STEP
    _exit_with_parent(parent)
    _JOB_STEP = lambda line: steps_queue.put((_JOB_INDEX, line))  # noqa: E731


def _run_job(fn, i: int, job):
    global _JOB_INDEX
    _JOB_INDEX = i
    return fn(job)


def _drain_steps(steps_queue, step) -> None:
    import queue

    while True:
        try:
            i, line = steps_queue.get_nowait()
        except queue.Empty:
            return
        step(i, line)


@contextlib.contextmanager
def logs_above_bars():
    """While a tqdm bar is drawn on stderr: each log record (absl's handler, on the root logger) is written with
    the bars cleared first and drawn again after, so a log line is a line of its own above the bar (it was glued
    to the bar: `capacity:   0%| | 0/2 [...]I1206 ... runner.py:144] ...`)."""
    import logging as std_logging
    import sys

    from tqdm import tqdm

    class AboveBars(std_logging.Handler):
        def __init__(self, inner):
            super().__init__(inner.level)
            self.inner = inner

        def emit(self, record):
            with tqdm.external_write_mode(file=sys.stderr):
                self.inner.handle(record)

    root = std_logging.getLogger()
    before = list(root.handlers)
    root.handlers = _made_uninterrupted(lambda: [AboveBars(h) for h in before])
    try:
        yield
    finally:
        root.handlers = before


def _made_uninterrupted(make):
    """`make()` with SIGINT and SIGTERM held back (in the main thread; delivered once it returns): a Ctrl-C landing
    inside `logging.Handler.__init__` (after it registered the handler, before its lock: the moment a run's progress
    bar appears) left a handler without a lock, and the interpreter's exit printed a traceback from logging.shutdown
    ("has no attribute 'lock'") under the one-line "interrupted" message."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return make()
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        return make()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextlib.contextmanager
def turn_progress(label: str, trajectories):
    """A progress bar of a runtime run's finished turns (experiments.run, bench_runtime), log lines kept above it;
    yields `driver.run`'s `on_progress`."""
    from dualpath_jax import progress

    total = sum(len(t.turns) for t in trajectories)
    with progress.bar(total=total, desc=f"{label:>12}", unit="turn") as bar, logs_above_bars():
        yield lambda done, total: bar.update(done - bar.n)


def runtime_run(cfg, trajectories, label: str, ops, prefill_tokens_per_s, session):
    """`driver.run` of `cfg` on `trajectories` with `ops`' model (experiments.run, bench_runtime) under a progress bar
    labelled `label` (`turn_progress`), on `session`'s node processes (a `LocalCluster`; None: `cfg`'s launcher)."""
    from dualpath_jax.runtime import driver

    with turn_progress(label, trajectories) as progress:
        return driver.run(
            cfg,
            trajectories,
            model_ops=ops,
            on_progress=progress,
            prefill_tokens_per_s=prefill_tokens_per_s,
            launcher=session.launcher(cfg) if session else None,
        )


def prefill_tokens_per_s_or_exit(ops, cfg, out_dir: str) -> float:
    """`driver.measure_prefill_tokens_per_s` of `ops` on `cfg` (DualPath's beta) before any run (experiments.run,
    bench_runtime); Ctrl-C: one line (it was a traceback), and the new results directory `out_dir`, still empty,
    removed."""
    from dualpath_jax.runtime import driver

    try:
        return driver.measure_prefill_tokens_per_s(ops, cfg)
    except KeyboardInterrupt as e:
        remove_if_empty(out_dir)
        raise SystemExit(
            f"interrupted ({interrupted_by(e)}) while measuring the prefill throughput; nothing ran"
        ) from None


def log_start(module: str, **more) -> None:
    """A launcher's start line, the same in each: the versions (as run.json holds them), the platform, every flag
    it runs with (its `--config` file and overrides as given), then each of `more` (a resolved config, the results
    directory) on a line of its own (some launchers logged versions but no flags, some flags but no versions)."""
    import platform

    from absl import logging

    from dualpath_jax.metrics import _launcher_flags, _versions

    named = {k.replace("_", "-"): v for k, v in _versions().items() if v}  # (dualpath_jax, dualpath-jax: one)
    versions = ", ".join(f"{k} {v}" for k, v in named.items())
    logging.info("%s: python %s, %s, %s", module, platform.python_version(), versions, platform.platform())
    logging.info("flags: %s", _launcher_flags(module))
    for what, value in more.items():
        text = str(value)
        logging.info("%s:%s%s", what.replace("_", " "), "" if text.startswith("\n") else " ", text)
