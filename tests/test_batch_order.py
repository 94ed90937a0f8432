"""SignRound's batch order: one seeded stream through the whole model, so blocks see different orders.

The reference draws every block's batches from one globally seeded `random` state; a fresh
`Random(seed)` per block would give every block the same order (and the same "easy" batches would win
the best-iteration pick everywhere). Recorded by wrapping `IndexSampler.next`.
"""

import random

import pytest

from auto_round import AutoRound
from auto_round.algorithms import signround
from tiny_models import random_ids, tiny_model


@pytest.fixture
def recorded_orders(monkeypatch):
    """List of per-sampler batch sequences, one entry per block tuned."""
    orders: list[list[list[int]]] = []
    original_init, original_next = signround.IndexSampler.__init__, signround.IndexSampler.next

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        orders.append([])
        self._record = orders[-1]

    def next_batch(self):
        batch = original_next(self)
        self._record.append(batch)
        return batch

    monkeypatch.setattr(signround.IndexSampler, "__init__", init)
    monkeypatch.setattr(signround.IndexSampler, "next", next_batch)
    return orders


def _quantize(seed: int) -> None:
    ar = AutoRound(tiny_model("llama"), dataset=random_ids(8, 16), nsamples=8, seqlen=16, batch_size=2,
                   iters=6, group_size=32, seed=seed, amp=False)
    ar.quantize()


def test_blocks_get_different_batch_orders(recorded_orders):
    _quantize(seed=42)
    assert len(recorded_orders) == 2  # tiny llama: two blocks
    first, second = recorded_orders
    assert len(first) == len(second) == 6
    assert first != second
    # the two blocks continue one stream seeded with the run's seed
    # hand-rolled: each block starts a new shuffle of 0..7 from the shared stream, takes batches of 2 and
    # reshuffles when they are used up
    rng = random.Random(42)
    stream = []
    for it in range(12):
        if it % 6 == 0:
            order: list[int] = []
        if len(order) < 2:
            order = list(range(8))
            rng.shuffle(order)
        stream.append(order[:2])
        order = order[2:]
    assert first + second == stream


def test_batch_order_is_deterministic_per_seed(recorded_orders):
    _quantize(seed=7)
    _quantize(seed=7)
    _quantize(seed=8)
    assert recorded_orders[0:2] == recorded_orders[2:4]
    assert recorded_orders[0:2] != recorded_orders[4:6]
