"""quartic.harness.checkpoint: orbax round trip, legacy .npz, mismatches named, incomplete saves invisible."""

import numpy as np
import pytest

from quartic.core.errors import QuarticError
from quartic.harness import checkpoint

PARAMS = {"blocks": {0: {"kernel": np.arange(6.0).reshape(2, 3)}}, "scale": np.ones(2, np.float32)}


def test_round_trip_keeps_values_dtypes_and_structure(tmp_path):
    checkpoint.save(tmp_path / "c", PARAMS, {"note": "x"})
    got, meta = checkpoint.load(tmp_path / "c", PARAMS)
    assert meta == {"note": "x"}
    np.testing.assert_array_equal(got["blocks"][0]["kernel"], PARAMS["blocks"][0]["kernel"])
    assert got["scale"].dtype == np.float32
    checkpoint.save(tmp_path / "c", {**PARAMS, "scale": 2 * PARAMS["scale"]}, {})  # overwrite
    assert float(checkpoint.load(tmp_path / "c", PARAMS)[0]["scale"][0]) == 2.0


def test_legacy_npz_directories_are_read(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    np.savez(
        d / "params.npz",
        **{"blocks/0/kernel": PARAMS["blocks"][0]["kernel"], "scale": PARAMS["scale"]},
    )
    (d / "meta.json").write_text("{}")
    got, _ = checkpoint.load(d, PARAMS)
    np.testing.assert_array_equal(got["blocks"][0]["kernel"], PARAMS["blocks"][0]["kernel"])


def test_mismatches_and_missing_or_incomplete_checkpoints_are_named(tmp_path):
    checkpoint.save(tmp_path / "c", PARAMS, {})
    other = {**PARAMS, "scale": np.ones(3, np.float32)}
    with pytest.raises(QuarticError, match="'scale' has shape"):
        checkpoint.load(tmp_path / "c", other)
    with pytest.raises(QuarticError, match="no parameter 'bias'"):
        checkpoint.load(tmp_path / "c", {**PARAMS, "bias": np.zeros(1)})
    (tmp_path / "c" / "meta.json").unlink()  # what a crash between the two writes leaves
    assert not checkpoint.exists(tmp_path / "c")
    with pytest.raises(QuarticError, match="no checkpoint"):
        checkpoint.load(tmp_path / "c", PARAMS)


def test_lock_makes_a_second_holder_wait_and_says_so(tmp_path, capsys):
    import threading

    order = []

    def second():
        with checkpoint.lock(tmp_path / "c"):
            order.append("second")

    with checkpoint.lock(tmp_path / "c") as path:
        assert path == tmp_path / "c.lock"
        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive()  # blocked on the first holder
        order.append("first")
    waiter.join(10)
    assert order == ["first", "second"]
    assert f"waiting for another process to finish {tmp_path / 'c'}" in capsys.readouterr().err
