"""The real Gemma 3 270M, offline: GGUF -> safetensors cache round trip, and a small capture.

Slow (about a minute, more on the first run, which converts the GGUF): `pytest -m real`.
"""

import dataclasses

import numpy as np
import pytest
import torch

from posae.checks import load_config
from posae.config import ModelConfig
from posae.data import capture as cap
from posae.data import models
from posae.data.store import ActivationStore

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def gemma():
    return models.load_model(ModelConfig(name="gemma3-270m", dtype="float32", device="cpu"))


def test_cache_loads_the_same_weights_and_tokenizer_as_the_gguf(gemma, capfd):
    assert models.describe(ModelConfig(name="gemma3-270m")) == gemma.info
    assert gemma.info.num_layers == 18 and gemma.info.hidden_size == 640
    assert getattr(gemma.model, "hf_quantizer", None) is None  # a plain model, saveable again
    capfd.readouterr()
    from_gguf, gguf_tok = models.load_gemma3_gguf()
    assert "it/s]" not in capfd.readouterr().err  # no tqdm bar (their refreshes would be saved into a notebook)
    cached = gemma.model.state_dict()
    for name, w in from_gguf.state_dict().items():
        assert torch.equal(w, cached[name]), name
    text = "Fellow-Citizens of the Senate and House of Representatives: I embrace with great satisfaction"
    assert gguf_tok(text)["input_ids"] == gemma.tokenizer(text)["input_ids"]
    ids = torch.tensor([gemma.tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(from_gguf(input_ids=ids).logits, gemma.model(input_ids=ids).logits)


def test_hooks_match_hidden_states_on_gemma(gemma):
    ids = torch.tensor([gemma.tokenizer("The state of the Union is strong.")["input_ids"]])
    with torch.inference_mode():
        hs = gemma.model(input_ids=ids, output_hidden_states=True).hidden_states
        with cap.layer_outputs(gemma.model, [3, 8, 13]) as acts:
            cap.run_to(gemma.model, ids)
    for layer in (3, 8, 13):
        torch.testing.assert_close(acts[layer], hs[layer + 1])


def test_capture_a_few_sequences_offline():
    base = load_config("default")
    cfg = dataclasses.replace(
        base, name="real-test",
        corpus=dataclasses.replace(base.corpus, seq_len=32, n_train=8, n_val=4, exclude_bos=False),
        capture=dataclasses.replace(base.capture, batch_size=4),
    )
    paths = cap.capture(cfg, progress=False)
    for (layer, split), path in paths.items():
        store = ActivationStore.open(path)
        x_ND = store.raw(np.arange(len(store))).numpy()
        assert store.d_model == 640 and len(store) == (8 if split == "train" else 4) * 32
        assert np.isfinite(x_ND).all()
        norm_N = np.linalg.norm(x_ND, axis=1)
        bos, rest = norm_N[store.pos_N == 0].mean(), norm_N[store.pos_N > 0].mean()
        assert bos > 4 * rest, (layer, bos, rest)  # why BOS is excluded by default
        assert store.meta["forward_dtype"] == str(models.resolve_dtype("auto", torch.device("cpu"))).split(".")[1]
