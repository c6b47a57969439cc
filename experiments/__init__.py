"""experiments: the launchers (main job, simulator, sweeps, paper report) and the benchmarks."""


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
        cause = e.__cause__ or e
        raise SystemExit(f"bad config: {type(cause).__name__}: {cause}".rstrip()) from None
    return config
