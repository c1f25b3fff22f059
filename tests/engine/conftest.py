from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pensieve.paths import bundled_model_path
from pensieved.engine.llama import Vocab


@pytest.fixture(scope="session")
def vocab_model() -> Iterator[Any]:
    """The bundled model's vocabulary only (no weights): enough for llama.cpp's grammars."""
    import llama_cpp

    path = bundled_model_path()
    if path is None:
        pytest.skip("the bundled model is not installed")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def vocab(vocab_model: Any) -> Vocab:
    return Vocab(vocab_model._model.vocab)
