"""utils.py: run_main, how every script turns a UserError into one line on stderr and exit code 2."""
import pytest

import utils
from simudy.errors import UserError


def test_run_main_prints_one_line_and_exits_2(capsys):
    def main(args):
        raise UserError("something is wrong; do this instead")
    with pytest.raises(SystemExit) as excinfo:
        utils.run_main(main, lambda: None)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: something is wrong; do this instead\n"
