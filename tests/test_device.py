"""The reference's device spellings map to one torch device string."""

import pytest
import torch

from auto_round.runtime import resolve_device

GPU = "cuda:0" if torch.cuda.is_available() else "cpu"
DEFAULT = "cuda" if torch.cuda.is_available() else "cpu"


def test_unavailable_devices_are_named():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"cuda:{count}"):
        resolve_device(f"cuda:{count}", None)
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu7", None)


@pytest.mark.parametrize("device, device_map, expected", [
    ("cpu", None, "cpu"), (None, "cpu", "cpu"), (None, 0, GPU), ("0", None, GPU), (None, "0,1", GPU),
    (None, "auto", DEFAULT), (None, None, DEFAULT), ("cpu", "0", "cpu"),
])
def test_device_spellings(device, device_map, expected):
    assert resolve_device(device, device_map) == expected
