"""orjson in and out of the app: same answers as the standard library, and what orjson refuses still works."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flask import Flask

from serving.errors import BadRequest
from serving.http.jsonio import FastJSONProvider, loads
from serving.results.regions import new_id


def test_loads_takes_what_the_standard_library_takes() -> None:
    assert loads(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    nan = loads('{"v": NaN}')["v"]
    assert nan != nan
    with pytest.raises(ValueError):
        loads(b"{not json")


def test_the_provider_answers_compact_unsorted_json_with_numpy_values() -> None:
    app = Flask(__name__)
    app.json = FastJSONProvider(app)
    with app.app_context():
        response = app.json.response({"z": np.float32(0.5), "a": [np.int64(3)], "n": 2**70})
    assert response.get_data() == b'{"z":0.5,"a":[3],"n":1180591620717411303424}\n'
    assert response.mimetype == "application/json"
    assert json.loads(app.json.dumps({"b": 1, "a": 2})) == {"b": 1, "a": 2}
    assert app.json.dumps({"b": 1, "a": 2}) == '{"b":1,"a":2}'


def test_a_bad_request_body_is_still_a_400(tmp_path: object) -> None:
    from serving.http.body import json_body

    app = Flask(__name__)
    with app.test_request_context("/", data=b"[1, 2]"), pytest.raises(BadRequest, match="JSON object"):
        json_body()
    with app.test_request_context("/", data=b"{oops"), pytest.raises(BadRequest, match="not valid JSON"):
        json_body()


def test_region_ids_are_ten_hex_digits_and_never_repeat() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 10 and int(i, 16) >= 0 for i in ids)
