"""Model description without weights, the offline random model and tokenizer, dtype and device choice."""

import os

import pytest
import torch

from posae.config import ConfigError, ModelConfig, RandomModelConfig
from posae.data import models


def test_describe_knows_the_offline_alias_and_the_papers_model_without_loading():
    assert models.describe(ModelConfig(name="gemma3-270m")) == (18, 640, 32768)
    assert models.describe(ModelConfig(name="google/gemma-2-2b")) == (26, 2304, 8192)


def test_describe_random_reads_its_config():
    r = RandomModelConfig(hidden_size=32, num_layers=3, max_position=64)
    assert models.describe(ModelConfig(name="random", random=r)) == (3, 32, 64)


def test_describe_local_folder_reads_config_json(tmp_path):
    from transformers import Gemma3TextConfig

    Gemma3TextConfig(num_hidden_layers=5, hidden_size=48, max_position_embeddings=256).save_pretrained(tmp_path)
    assert models.describe(ModelConfig(name=str(tmp_path))) == (5, 48, 256)


@pytest.mark.parametrize("name, problem", [
    ("google/gemma-2-2bb", "unknown model"),
    ("gemma3-27m", "unknown model"),
    ("/no/such/model/folder", "no folder"),
])
def test_unknown_model_names_file_key_and_fix(name, problem):
    with pytest.raises(ConfigError) as e:
        models.describe(ModelConfig(name=name), "params/x.yaml")
    msg = str(e.value)
    assert msg.startswith("params/x.yaml: model.name") and problem in msg and "Fix:" in msg


def test_folder_without_config_json_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no config.json.*Fix"):
        models.describe(ModelConfig(name=str(tmp_path)), "x.yaml")


def test_random_heads_must_divide():
    with pytest.raises(ConfigError, match="num_kv_heads.*Fix"):
        models.describe(ModelConfig(name="random", random=RandomModelConfig(num_heads=4, num_kv_heads=3)), "x.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_device_is_refused():
    with pytest.raises(ConfigError, match="model.device.*Fix"):
        models.describe(ModelConfig(name="random", device="cuda"), "x.yaml")


def test_random_tokenizer_is_byte_level_with_gemmas_special_ids():
    tok = models.random_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    text = "Fellow-Citizens: naïve — 1790"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode()) and min(ids) > 2  # one token per byte, no specials
    assert tok(text)["input_ids"] == [2, *ids]  # like Gemma: BOS with special tokens on
    assert tok.decode(ids) == text


def test_random_model_is_seeded_and_leaves_the_global_rng_alone():
    r = RandomModelConfig()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = models.random_model(r, 259)
    assert torch.equal(torch.rand(1), before)
    b = models.random_model(r, 259)
    c = models.random_model(RandomModelConfig(seed=1), 259)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_load_model_random_for_inference():
    loaded = models.load_model(ModelConfig(name="random", dtype="float32", device="cpu"))
    assert loaded.info == (4, 64, 512) and loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.config.vocab_size == len(loaded.tokenizer)
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"


def test_auto_dtype_is_bf16_only_with_native_support(monkeypatch, capsys):
    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert models.resolve_dtype("auto", cpu) == torch.float32
    assert "no native bf16" in capsys.readouterr().err
    assert models.resolve_dtype("float32", cpu) == torch.float32


def test_dropping_the_quantizer_marker_lets_a_dequantised_model_save(tmp_path):
    """What the GGUF cache relies on; the real GGUF round trip is in test_real_model.py."""
    model = models.random_model(RandomModelConfig(), 259)

    class FakeGguf:  # what transformers leaves on a GGUF-loaded model
        quantization_config = type("QC", (), {"quant_method": "gguf"})()

        def is_serializable(self):
            return False

    model.hf_quantizer, model.is_quantized = FakeGguf(), True
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    with pytest.raises(Exception):
        model.save_pretrained(tmp_path / "refused")
    models.drop_quantizer(model)
    model.save_pretrained(tmp_path / "ok")
    assert "quantization_config" not in (tmp_path / "ok" / "config.json").read_text()
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ok", local_files_only=True)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_hub_offline_sets_and_restores_the_switches(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as hc

    before = hc.HF_HUB_OFFLINE
    with models.hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and hc.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and hc.HF_HUB_OFFLINE == before


# --------------------------------------------------------------------------- posae.data.kernels


def _gemma3(dtype: torch.dtype, hidden: int = 64, mlp: int = 256):
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP, Gemma3RMSNorm

    cfg = Gemma3TextConfig(hidden_size=hidden, intermediate_size=mlp, hidden_activation="gelu_pytorch_tanh")
    torch.manual_seed(0)
    norm, mlp_module = Gemma3RMSNorm(hidden), Gemma3MLP(cfg)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
    return norm.to(dtype), mlp_module.to(dtype)


def _swapped(module):
    from posae.data import kernels

    clone = type(module).__new__(type(module))
    clone.__dict__ = dict(module.__dict__)
    assert kernels.speed_up(clone) == {type(module).__name__: 1}
    return clone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_rms_norm_gives_the_stock_bits_and_leaves_its_input_alone(dtype):
    norm, _ = _gemma3(dtype)
    fast = _swapped(norm)
    x = torch.randn(8, 16, 64).mul_(3).to(dtype)
    before = x.clone()
    with torch.no_grad():
        assert torch.equal(fast(x), norm(x))
    assert torch.equal(x, before)  # float32: x.float() is x itself, so an in-place norm without a copy would write it
    assert type(fast).__module__ == "posae.data.kernels" and fast.state_dict().keys() == norm.state_dict().keys()


def test_in_place_rms_norm_falls_back_to_the_stock_forward_under_autograd():
    norm, _ = _gemma3(torch.float32)
    fast = _swapped(norm)
    x = torch.randn(4, 64, requires_grad=True)
    fast(x).square().sum().backward()
    g_fast = x.grad.clone()
    x.grad = None
    norm(x).square().sum().backward()
    assert torch.equal(g_fast, x.grad)


def test_fused_gelu_mlp_is_the_stock_mlp_within_bf16_rounding():
    """The fused GELU sees the gate product before rounding, so it may differ from the stock bf16 MLP by
    about one bf16 rounding, and its error against the float32 MLP is no larger than the stock one's. A
    control shows the check can fail: the same fused matmul without its GELU is far outside it."""
    from posae.data import kernels

    _, mlp32 = _gemma3(torch.float32)
    mlp16 = _gemma3(torch.bfloat16)[1]
    fast = _swapped(mlp16)
    x32 = torch.randn(4, 32, 64)
    x16 = x32.to(torch.bfloat16)
    with torch.no_grad():
        ref, stock, fused = mlp32(x16.float()), mlp16(x16).float(), fast(x16).float()
        broken = mlp16.down_proj(torch.ops.mkldnn._linear_pointwise(x16, mlp16.gate_proj.weight, None, "none", [], "")
                                 * mlp16.up_proj(x16)).float()
    if not kernels.HAS_FUSED_LINEAR:
        pytest.skip("this torch has no oneDNN fused linear: the stock forward runs")

    def rel(a):
        return float((a - ref).norm() / ref.norm())

    assert not torch.equal(fused, stock)  # the fused path ran
    assert rel(fused) <= 1.25 * rel(stock) and rel(stock) < 0.02
    assert rel(broken) > 10 * rel(stock)


def test_fused_gelu_mlp_runs_the_stock_forward_in_float32():
    _, mlp = _gemma3(torch.float32)
    fast = _swapped(mlp)
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        assert torch.equal(fast(x), mlp(x))


def test_load_model_swaps_the_gemma_modules():
    loaded = models.load_model(ModelConfig(name="random", dtype="float32", device="cpu"))
    names = {type(m).__name__: type(m).__module__ for m in loaded.model.modules()}
    assert names["Gemma3RMSNorm"] == names["Gemma3MLP"] == "posae.data.kernels"
