"""rlpipe.training.sft: the one supervised mini-batch loop (recipes, reward model, RL warm-up)."""

import numpy as np
import pytest

from rlpipe.datums import supervised_datum
from rlpipe.pipeline.config import RunConfig
from rlpipe.pipeline.warmup import sft_warm_up
from rlpipe.training.sft import minibatches, sft_steps
from rlpipe.types import AdamParams, Datum


def numbered(n: int) -> list[Datum]:
    """Data told apart by their first token."""
    return [supervised_datum([i], [1, 2]) for i in range(n)]


def firsts(batch: list[Datum]) -> list[int]:
    return [d.model_input.to_ints()[0] for d in batch]


def test_minibatches_draw_as_the_recipes_did():
    data = numbered(10)
    batches = [firsts(b) for b in minibatches(data, steps=3, batch_size=4, seed=5)]
    rng = np.random.default_rng(5)  # the draw every recipe's own loop made
    assert batches == [list(rng.choice(10, 4, replace=False)) for _ in range(3)]
    assert all(len(set(b)) == 4 for b in batches)
    assert [firsts(b) for b in minibatches(data, 3, 4, seed=6)] != batches
    assert sorted(firsts(next(minibatches(data, 1, batch_size=50, seed=0)))) == list(range(10))  # capped at the data


def test_minibatches_keep_groups_together():
    data = numbered(10)  # 5 pairs: (0, 1), (2, 3), ...
    for batch in minibatches(data, steps=4, batch_size=3, seed=1, group=2):
        ids = firsts(batch)
        assert len(ids) == 6 and all(a % 2 == 0 and b == a + 1 for a, b in zip(ids[0::2], ids[1::2]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(data=[], steps=1, batch_size=2, seed=0), "no data"),
    (dict(data=numbered(1), steps=1, batch_size=2, seed=0, group=2), "no data to train on: 1 data in runs of 2"),
    (dict(data=numbered(4), steps=1, batch_size=0, seed=0), "batch_size >= 1"),
])
def test_minibatches_refuse_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        next(minibatches(**kwargs))


class RecordingClient:
    """Stands in for a TrainingClient: records the calls and fails forward_backward on a
    batch holding `bad` (the client is not under test, the loop is)."""

    def __init__(self, bad: int | None = None):
        self.calls, self.bad = [], bad

    def forward_backward(self, batch, loss_fn, loss_fn_config=None):
        self.calls.append(("forward_backward", firsts(batch), loss_fn))
        return Done(error=ValueError("bad datum") if self.bad in firsts(batch) else None, metrics={"loss:sum": 1.0})

    def forward_backward_custom(self, batch, fn):
        self.calls.append(("forward_backward_custom", firsts(batch), fn))
        return Done(metrics={"loss:sum": 2.0})

    def optim_step(self, adam_params):
        self.calls.append(("optim_step", adam_params.learning_rate))
        return Done(metrics={"grad_norm:mean": 0.5})


class Done:
    def __init__(self, error=None, **fields):
        self.error, self.fields = error, fields

    def result(self):
        if self.error is not None:
            raise self.error
        return type("Response", (), self.fields)


def test_sft_steps_issue_both_calls_and_read_both():
    client = RecordingClient()
    metrics = sft_steps(client, numbered(6), steps=2, batch_size=3, adam_params=AdamParams(learning_rate=0.1), seed=0)
    assert metrics == [{"loss:sum": 1.0, "grad_norm:mean": 0.5}] * 2
    assert [c[0] for c in client.calls] == ["forward_backward", "optim_step"] * 2
    custom = lambda data, logprobs: None  # noqa: E731
    sft_steps(client, numbered(6), 1, 3, AdamParams(learning_rate=0.1), 0, loss_fn=custom)
    assert client.calls[-2][0] == "forward_backward_custom" and client.calls[-2][2] is custom
    with pytest.raises(ValueError, match="bad datum"):
        sft_steps(RecordingClient(bad=4), numbered(6), 5, 6, AdamParams(learning_rate=0.1), 0)


def test_a_bad_datum_in_the_warm_up_raises(tmp_path):
    """The warm-up never read its forward_backward future, so this error used to pass unseen
    and the run went on from a warm-up that had not trained."""
    good = supervised_datum([1, 2, 3], [4, 5])
    bad = Datum(good.model_input, {**good.loss_fn_inputs, "weights": np.ones(99, np.float32)})  # wrong length
    config = RunConfig(name="warm", runs_dir=str(tmp_path))
    with pytest.raises(ValueError, match="weights"):
        sft_warm_up(config, lambda tokenizer: [good, bad], steps=1, batch_size=2)
    path = sft_warm_up(config, lambda tokenizer: [good, good], steps=1, batch_size=2)
    assert (tmp_path / "warm" / "sft").is_dir() and path.startswith(str((tmp_path / "warm" / "sft").absolute()))
