"""Session 43, the lead's fixes."""

from types import SimpleNamespace

import pytest
from absl import flags


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--modes=basic,"], "--modes item 2 of 2 is empty"),
        (["--loads=agents=2,,agents=3"], "--loads item 2 of 3 is empty"),
    ],
)
def test_sweep_parses_with_its_own_flags_after_another_launcher_replaced_them(args, said, capsys):
    # capacity and reproduce_paper define --modes, --workers, ... too (allow_override): imported after sweep into one
    # process (an xdist worker, a notebook), theirs replaced sweep's, validators and defaults with them
    from experiments import own_flags, reclaim_flags, sweep

    shared = ("modes", "loads", "workers", "output_dir")
    before = own_flags(*(SimpleNamespace(name=n) for n in shared))  # (this worker's, put back after)
    try:
        for n in shared:  # as a launcher imported later defines them
            flags.DEFINE_string(n, "other", "another launcher's", allow_override=True)
        with pytest.raises(SystemExit):
            try:
                sweep.parse_flags(["sweep", *args])
            finally:
                flags.FLAGS.unparse_flags()
        assert said in capsys.readouterr().err
        sweep.parse_flags(["sweep"])
        try:
            assert flags.FLAGS.output_dir == "results/sweep" and flags.FLAGS.workers == 1  # sweep's defaults
            assert "modes" in {f.name for f in flags.FLAGS.flags_by_module_dict()[sweep.__name__]}  # and its help
        finally:
            flags.FLAGS.unparse_flags()
    finally:
        reclaim_flags(before)
