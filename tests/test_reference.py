"""Nothing a user sees changes: short seeded runs of train, recons (SimuDy fast and paper, the memory-flat
pass, both baselines) and metrics give bit-identical outputs to the reference recorded on main before the
package redesign (tests/reference_runs.py wrote tests/reference/outputs.json)."""
import json

import pytest

from tests.conftest import make_idx_root
from tests.reference_runs import REFERENCE, reference_outputs


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    data_root = make_idx_root(tmp_path_factory.mktemp("fashion")).root
    return reference_outputs(tmp_path_factory.mktemp("work"), data_root)


@pytest.mark.parametrize("name", sorted(json.loads(REFERENCE.read_text())))
def test_outputs_bit_identical_to_reference(outputs, name):
    expected = json.loads(REFERENCE.read_text())[name]
    assert outputs[name] == expected
