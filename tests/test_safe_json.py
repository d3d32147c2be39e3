"""core.safe_json: the limits raise the caller's error type, and the default type works too."""

from __future__ import annotations

import pytest

from core import safe_json
from core.errors import DefectPruneError
from core.safe_json import InvalidJSONError, JSONLimitError


class OwnError(DefectPruneError):
    pass


@pytest.mark.parametrize("error", [InvalidJSONError, DefectPruneError, JSONLimitError, OwnError])
def test_a_limit_is_the_callers_error_and_a_limit_error(error):
    deep = "[" * (safe_json.MAX_DEPTH + 1) + "]" * (safe_json.MAX_DEPTH + 1)
    with pytest.raises(error, match="nests deeper") as caught:
        safe_json.loads(deep, "f.json", error)
    assert isinstance(caught.value, JSONLimitError)
    with pytest.raises(error, match="not valid JSON"):
        safe_json.loads("{", "f.json", error)


def test_the_default_error_reads_good_json_and_refuses_huge_numbers(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"a": [1, 2.5]}')
    assert safe_json.read(path) == {"a": [1, 2.5]}
    with pytest.raises(JSONLimitError, match="not usable JSON"):
        safe_json.loads("1e999", "f.json")
