"""Pure functions without sockets: script specs, result encoding, job execution, model helpers."""

from __future__ import annotations

import datetime as dt
import math
import sys
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmqrun.execute import encode_result, run_captured, run_job
from zmqrun.model import iso, parse_time, valid_job_id
from zmqrun.scripts import ScriptError, load_function, split_spec

# -- scripts.split_spec / load_function ---------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("pkg.mod:run", ("pkg.mod", "run", False)),
    ("mod", ("mod", "main", False)),
    ("a.b.c:_private", ("a.b.c", "_private", False)),
    ("jobs/fib.py", ("jobs/fib.py", "main", True)),
    ("fib.py:go", ("fib.py", "go", True)),
    ("/abs/dir/x.py:f", ("/abs/dir/x.py", "f", True)),
    ("dir/no_suffix:f", ("dir/no_suffix", "f", True)),
    ("  pkg.mod:run  ", ("pkg.mod", "run", False)),
])
def test_split_spec_valid(spec: str, expected: tuple[str, str, bool]) -> None:
    assert split_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "   ", ":main", "mod:", "mod:1abc", "mod:fn-name", "bad spec!",
                                  "a..b:c", "pkg.:f", "9mod:f", "mod:f:g"])
def test_split_spec_invalid(spec: str) -> None:
    with pytest.raises(ScriptError) as info:
        split_spec(spec)
    assert "\n" not in str(info.value) and str(info.value)


def test_load_function_from_module_and_file(tmp_path: Path) -> None:
    assert load_function("zmqrun.examples.demo:fibo")(n=10) == 55
    path = tmp_path / "job_file.py"
    path.write_text("def go(x):\n    return x * 3\n\ndef main():\n    return 'm'\n")
    assert load_function(f"{path}:go")(x=2) == 6
    assert load_function(str(path))() == "m"


def test_load_function_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ScriptError, match="no_such_module_qq"):
        load_function("no_such_module_qq:main")
    with pytest.raises(ScriptError, match="not found"):
        load_function(f"{tmp_path / 'missing.py'}:main")
    with pytest.raises(ScriptError, match="no function 'nope'"):
        load_function("zmqrun.examples.demo:nope")
    with pytest.raises(ScriptError, match="not callable"):
        load_function("zmqrun.examples.demo:annotations")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('import-time failure')\n")
    with pytest.raises(ScriptError, match="RuntimeError: import-time failure"):
        load_function(f"{broken}:main")
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def f(:\n")
    with pytest.raises(ScriptError, match="SyntaxError"):
        load_function(f"{syntax}:f")


# -- execute.encode_result ----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5),
    max_leaves=30,
)


@given(json_values)
@settings(max_examples=300, deadline=None)
def test_encode_result_round_trips_json_values(value: object) -> None:
    data = encode_result(value)
    assert data == orjson.dumps(value)
    assert orjson.loads(data) == value


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, [1.0, math.nan], {"a": {"b": [math.inf]}},
                                   (1, -math.inf), {"x": None, "y": math.nan}])
def test_encode_result_rejects_nan_and_infinity(value: object) -> None:
    with pytest.raises(TypeError, match="NaN or infinity"):
        encode_result(value)


@pytest.mark.parametrize("value", [{1, 2}, object(), {1: "a"}, {"k": {2: 3}}, [b"raw bytes"], 2**70, complex(1, 2)])
def test_encode_result_rejects_non_json(value: object) -> None:
    with pytest.raises(TypeError, match="not JSON-serializable"):
        encode_result(value)


def test_encode_result_keeps_null_and_the_string_nan() -> None:
    assert encode_result([None, "null", "NaN"]) == b'[null,"null","NaN"]'


def test_encode_result_message_is_bounded() -> None:
    with pytest.raises(TypeError) as info:
        encode_result({"big": {i for i in range(10_000)}})
    assert len(str(info.value)) < 1_000


# -- execute.run_job / run_captured ------------------------------------------------------


def _outcome(frag: bytes) -> dict:
    return orjson.loads(b"{" + frag + b"}")


def test_run_job_success_failure_and_async() -> None:
    def ok(x):
        return {"x": x}

    def bad():
        raise KeyError("missing")

    async def coro(x):
        return x + 1

    frag, started, finished = run_job(ok, {"x": 1})
    assert _outcome(frag) == {"status": "success", "result": {"x": 1}}
    assert started <= finished
    out = _outcome(run_job(bad, {})[0])
    assert out["status"] == "failure" and out["error"]["type"] == "KeyError"
    assert 'raise KeyError("missing")' in out["error"]["traceback"]
    assert _outcome(run_job(coro, {"x": 41})[0]) == {"status": "success", "result": 42}
    out = _outcome(run_job(ok, {"y": 1})[0])  # wrong keyword
    assert out["status"] == "failure" and out["error"]["type"] == "TypeError"
    out = _outcome(run_job(lambda: {1, 2}, {})[0])
    assert out["status"] == "failure" and "not JSON-serializable" in out["error"]["message"]


def test_run_captured_collects_this_jobs_output_in_order() -> None:
    from zmqrun.execute import install_capture

    real_out, real_err = sys.stdout, sys.stderr
    try:
        install_capture()

        def noisy():
            print("one")
            print("two", file=sys.stderr)
            sys.stdout.write("three\n")
            return 1

        frag, _, _, logs = run_captured(noisy, {})
        assert _outcome(frag)["result"] == 1
        assert logs == "one\ntwo\nthree\n"
    finally:
        sys.stdout, sys.stderr = real_out, real_err
        import zmqrun.execute as ex

        ex._installed = False


# -- model --------------------------------------------------------------------------------


def test_iso_and_parse_time() -> None:
    assert iso(None) is None
    assert iso(0) == "1970-01-01T00:00:00.000000Z"
    ts = 1_700_000_000.123456
    text = iso(ts)
    assert text.endswith("Z") and parse_time(text) == pytest.approx(ts, abs=1e-6)
    # A naive datetime is local time (Python's convention): now + 30 s is 30 s ahead in any time zone.
    soon = dt.datetime.now() + dt.timedelta(seconds=30)
    assert parse_time(soon) == pytest.approx(time.time() + 30, abs=2)
    assert parse_time("2024-01-01T00:00:00") == dt.datetime(2024, 1, 1).timestamp()
    assert parse_time("2024-01-01T01:00:00+01:00") == parse_time("2024-01-01T00:00:00Z")
    for bad in (True, "yesterday", [1], None):
        with pytest.raises(ValueError):
            parse_time(bad)


@pytest.mark.parametrize("value, ok", [("abc", True), ("a-b_c.d:e", True), ("x" * 64, True), ("x" * 65, False),
                                        ("", False), ("has space", False), ("é", False), (5, False),
                                        (None, False), ("0192f1c2-0000-7000-8000-000000000000", True)])
def test_valid_job_id(value: object, ok: bool) -> None:
    assert valid_job_id(value) is ok


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:99999", "tcp://127.0.0.1:0", "tcp://127.0.0.1:5591x",
                                     "tcp://127.0.0.1", "nonsense", "http://127.0.0.1:5555", 5591])
def test_a_bad_router_address_is_refused_at_once(address: object) -> None:
    """(A new-user session waited out a whole timeout for port 99999: libzmq took it as 34463.)"""
    from zmqrun import Client

    t0 = time.monotonic()
    with pytest.raises(ValueError, match="invalid router address"):
        Client(address, timeout=5)
    assert time.monotonic() - t0 < 2


def test_good_router_addresses_pass_the_check() -> None:
    from zmqrun.protocol import check_endpoint

    for address in ("tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:65535", "ipc:///tmp/x.sock"):
        check_endpoint(address)
