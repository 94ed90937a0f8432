"""eval/llama_cpp.load_llama's repack switch, against a stand-in llama_cpp package (the real one compiles
llama.cpp at install time and is not in CI): the Llama is built while the model-params default has
use_extra_bufts=False, and the default is restored afterwards, also when loading fails."""

import ctypes
import sys
import types

import pytest

from auto_round.eval.llama_cpp import load_llama
from auto_round.eval.perplexity import EvalError


class Params(ctypes.Structure):
    _fields_ = [("use_mmap", ctypes.c_bool), ("use_extra_bufts", ctypes.c_bool)]


def fake_llama_cpp(monkeypatch, fields=Params, fail=False):
    low = types.ModuleType("llama_cpp.llama_cpp")

    def default_params():
        return fields(True, True) if fields is Params else fields(True)

    low.llama_model_default_params = default_params
    seen = []

    class Llama:
        def __init__(self, model_path, **kw):
            seen.append((model_path, low.llama_model_default_params(), kw))  # what Llama() reads while loading
            if fail:
                raise ValueError("Failed to load model from file")

    top = types.ModuleType("llama_cpp")
    top.Llama, top.llama_cpp, top.__version__ = Llama, low, "0.0-test"
    monkeypatch.setitem(sys.modules, "llama_cpp", top)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_cpp", low)
    return low, default_params, seen


@pytest.mark.parametrize("repack", [True, False])
def test_repack_switch_is_set_while_loading_and_restored(monkeypatch, repack):
    low, default_params, seen = fake_llama_cpp(monkeypatch)
    load_llama("m.gguf", n_ctx=64, n_threads=1, repack=repack)
    (path, params, kw), = seen
    assert path == "m.gguf" and kw["n_ctx"] == 64 and kw["logits_all"] is True
    assert params.use_extra_bufts is repack
    assert low.llama_model_default_params is default_params


def test_restored_when_loading_fails_and_refused_without_the_field(monkeypatch):
    low, default_params, _ = fake_llama_cpp(monkeypatch, fail=True)
    with pytest.raises(ValueError, match="Failed to load"):
        load_llama("m.gguf", n_ctx=64, repack=False)
    assert low.llama_model_default_params is default_params

    class Old(ctypes.Structure):
        _fields_ = [("use_mmap", ctypes.c_bool)]

    fake_llama_cpp(monkeypatch, fields=Old)
    with pytest.raises(EvalError, match="no repack switch"):
        load_llama("m.gguf", n_ctx=64, repack=False)
