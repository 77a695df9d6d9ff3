"""rlpipe serve's record of sampled sequences for stable_reinforce (no server: the store alone)."""

import numpy as np
import pytest

from rlpipe.serve.futures import UserError
from rlpipe.serve.stability import StabilityStore


def store_with(**kw):
    store = StabilityStore(**kw)
    store.record("r1:0", "s", "s:train:0", 3, [7, 8, 9], [-0.5, -1.0, -2.0])
    return store


def test_resolve_takes_recorded_logprobs_on_sampled_runs_only():
    store = store_with()
    spans = [("prompt", "r1:0", 1, 2), ("sampled", "r1:0", 0, 3)]
    res = store.resolve(spans, np.array([0, 0, 7, 8, 9]), np.array([0, 0, 1.0, 1.0, 1.0]), "s", "datum 0")
    np.testing.assert_allclose(res.sampling_logprobs, [0, 0, -0.5, -1.0, -2.0])
    np.testing.assert_array_equal(res.sampled, [0, 0, 1, 1, 1])
    assert [r.version for r in res.records] == [3]


@pytest.mark.parametrize("spans,targets,advantages,match", [
    ([], [7], [0.0], "needs provenance"),
    ([("sampled", "r1:0", 0, 2)], [7, 8, 9], [0, 0, 0], "tile"),
    ([("sampled", "r1:0", 1, 3)], [8, 9, 0], [0, 0, 0], "runs past"),
    ([("sampled", "r1:0", 0, 3)], [7, 8, 1], [0, 0, 0], "not the tokens sequence"),
    ([("prompt", "r1:0", 0, 1), ("sampled", "r1:0", 0, 3)], [5, 7, 8, 9], [1.0, 0, 0, 0], "sampled tokens only"),
    ([("sampled", "nope", 0, 1)], [7], [0.0], "no stability info"),
])
def test_bad_provenance_is_a_user_error(spans, targets, advantages, match):
    with pytest.raises(UserError, match=match):
        store_with().resolve(spans, np.array(targets), np.array(advantages, dtype=np.float32), "s", "datum 0")


def test_records_are_per_session_expire_and_are_bounded():
    store = store_with()
    with pytest.raises(UserError, match="another session"):
        store.get("r1:0", "other")
    store.get("r1:0", "s")
    expired = store_with(keep_s=-1.0)
    with pytest.raises(UserError, match="no stability info"):
        expired.get("r1:0", "s")
    small = store_with(max_tokens=4)
    small.record("r2:0", "s", None, -1, [1, 2], [-1.0, -1.0])  # 5 tokens > 4: the oldest record goes
    assert list(small.records) == ["r2:0"] and small.tokens == 2
    with pytest.raises(RuntimeError, match="logprobs"):
        small.record("r3:0", "s", None, -1, [1, 2], [-1.0])
