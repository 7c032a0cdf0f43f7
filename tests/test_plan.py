"""`python -m posae plan`: its token, byte and FLOP figures against hand computations, and the smoke
plan's store size against the smoke capture's actual files."""

import dataclasses
from pathlib import Path

import pytest

from posae.__main__ import main
from posae.checks import load_config
from posae.config import Config, CorpusConfig, SAEConfig, TrainConfig
from posae.pipeline import cost as P
from posae.saes import REGISTRY, variant_config

# numpy's .npy format 1.0: 6 magic bytes, 2 version bytes, a 2-byte length, then the header dict
# padded with spaces to a multiple of 64 bytes in all; every dict here is under 118 characters.
HEADER = 128


@pytest.fixture(scope="module")
def smoke_plan():
    return P.make_plan("smoke")


@pytest.fixture(scope="module")
def paper_plan():
    return P.make_plan("paper")  # offline: gemma-2-2b's shapes come from posae.data.models.KNOWN_CONFIGS unless cached


def test_smoke_tokens_and_store_bytes_by_hand(smoke_plan):
    # params/smoke.yaml: 48 train + 32 val sequences of 32 tokens, BOS excluded, d = 64, layers 1 and 2.
    p = smoke_plan
    assert p.forward_tokens == (48 + 32) * 32 == 2560
    assert p.stored_tokens == {"train": 48 * 31, "val": 32 * 31} == {"train": 1488, "val": 992}
    train, val = p.stores["train"], p.stores["val"]
    assert train.acts == HEADER + 1488 * 64 * 2 == 190_592
    assert train.index == 3 * (HEADER + 1488 * 4) == 18_240
    assert train.mean == val.mean == HEADER + 64 * 4 == 384
    assert val.acts == HEADER + 992 * 64 * 2 == 127_104
    assert val.index == 3 * (HEADER + 992 * 4) == 12_288
    assert p.store_bytes == 2 * (190_592 + 18_240 + 384 + 127_104 + 12_288 + 384) + 4 * P.META_JSON_BYTES


def test_smoke_plan_matches_the_smoke_capture_on_disk(smoke_plan, smoke_capture):
    for (layer, split), folder in smoke_capture.items():
        files = {f.name: f.stat().st_size for f in Path(folder).iterdir()}
        want = smoke_plan.stores[split]
        assert files["acts.npy"] == want.acts, (layer, split)
        assert files["tokens.npy"] + files["pos.npy"] + files["seq.npy"] == want.index
        assert files["mean.npy"] == want.mean
        assert sum(v for k, v in files.items() if k.endswith(".npy")) == want.npy
        assert set(files) == {"acts.npy", "tokens.npy", "pos.npy", "seq.npy", "mean.npy", "meta.json"}
        assert files["meta.json"] <= 2 * P.META_JSON_BYTES  # the one estimated figure: the right size class


def test_smoke_model_and_capture_flops_by_hand(smoke_plan):
    # The random Gemma-3 block at d = 64, 4 heads and 1 KV head of width 16, MLP 128: q 64x64, k and v
    # 64x16, o 64x64, q/k norms 16 each, gate/up/down 3 x 64x128, four RMS norms of 64.
    block = 64 * 64 + 2 * 64 * 16 + 64 * 64 + 2 * 16 + 3 * 64 * 128 + 4 * 64
    assert block == 35_104
    vocab = 3 + 256  # the byte-level tokenizer: pad, eos, bos and 256 bytes
    assert smoke_plan.params_total == vocab * 64 + 4 * block + 64  # tied embedding, 4 blocks, final norm
    assert smoke_plan.params_run == 3 * block  # blocks 0..2: the deepest captured layer is 2
    assert smoke_plan.capture_flops == 2 * 3 * block * 2560


def test_paper_tokens_steps_and_store_bytes_by_hand(paper_plan):
    # params/paper.yaml: gemma-2-2b (d = 2304), layers 5/12/19, 1,000 + 10,000 sequences of 128 tokens,
    # BOS excluded; 100,000 steps of 256 tokens x 8 micro-batches; 11 variants x 3 layers x 2 seeds.
    p = paper_plan
    assert p.d_model == 2304 and p.n_layers == 26 and p.layers == (5, 12, 19)
    assert p.forward_tokens == 11_000 * 128 == 1_408_000
    assert p.stored_tokens == {"train": 1000 * 127, "val": 10_000 * 127}
    train, val = p.stores["train"], p.stores["val"]
    assert train.acts == HEADER + 127_000 * 2304 * 2 == 585_216_128
    assert val.acts == HEADER + 1_270_000 * 2304 * 2 == 5_852_160_128
    assert train.index == 3 * (HEADER + 127_000 * 4) and val.index == 3 * (HEADER + 1_270_000 * 4)
    assert train.mean == HEADER + 2304 * 4
    npy = 3 * (585_216_128 + 1_524_384 + 9_344 + 5_852_160_128 + 15_240_384 + 9_344)
    assert npy == 19_362_479_136
    assert p.store_bytes == npy + 6 * P.META_JSON_BYTES
    assert len(p.variants) == len(REGISTRY) and p.runs == len(REGISTRY) * 3 * 2
    for v in p.variants:
        assert v.tokens_per_run == 100_000 * 256 * 8 == 204_800_000
    assert round(p.variants[0].tokens_per_run / p.train_tokens_per_layer) == 1613  # docs/decisions.md §9: ≈ 1,600 epochs
    assert [s for s in p.stages if not s.startswith("train:")] == ["ground_truth", "capture", "structure", "probe",
                                                                   "ablations", "inspect", "figures"]


def test_paper_model_size_by_hand(paper_plan):
    # gemma-2-2b: vocab 256,000 (tied), 26 blocks of q 2304x2048 (8 heads x 256), k and v 2304x1024
    # (4 KV heads), o 2048x2304, MLP 3 x 2304x9216, four RMS norms; a final norm.
    block = 2304 * (2048 + 1024 + 1024 + 2048) + 3 * 2304 * 9216 + 4 * 2304
    assert paper_plan.params_total == 256_000 * 2304 + 26 * block + 2304 == 2_614_341_888
    assert paper_plan.params_run == 20 * block  # blocks 0..19
    assert paper_plan.capture_flops == 2 * 20 * block * 1_408_000
    assert paper_plan.capture_memory["weights"] == 2_614_341_888 * 2  # bfloat16


def test_baseline_flops_by_hand():
    # d = 8, k = 16, B = 4 tokens. Forward: x W_enc and f W_dec, 2·B·d·k each; backward: W_dec's gradient
    # and f's (2·B·d·k each) and W_enc's (2·B·d·k; the input needs no gradient): 10·B·d·k. The one-row
    # b_dec W_enc (2·d·k) and b_dec's gradient through it (2·d·k) add 4·d·k; W_enc's share of it is an
    # in-place rank-1 update (addr_, SAE.pre_acts), which the counter does not count as a matmul.
    cfg = Config(corpus=CorpusConfig(seq_len=8), sae=SAEConfig(expansion=2.0), train=TrainConfig(batch_size=4, steps=10))
    vcfg = variant_config(cfg, "baseline")
    params, flops = P.sae_cost("baseline", 8, vcfg)
    assert flops == (10 * 4 + 4) * 8 * 16 == 5632
    assert params == 8 * 16 + 16 * 8 + 16 + 8  # W_enc, W_dec, b_enc, b_dec
    assert P._count("baseline", 8, vcfg) == (params, flops)  # fake tensors count what real ones do


def test_time_is_flops_over_peak_with_floors(paper_plan):
    p = paper_plan
    a100 = P.GPUS["A100"]
    assert p.capture_seconds["forward"] == pytest.approx(p.capture_flops / (a100.bf16_tflops * 1e12 * P.UTILISATION))
    base = next(v for v in p.variants if v.variant == "baseline")
    t = p.variant_seconds(base)
    micro = 6 * 100_000 * 8
    assert t["host"] == pytest.approx(micro * 256 * 2304 * P.HOST_SECONDS_PER_VALUE)
    assert t["device"] == pytest.approx(micro * max(base.flops_per_micro_batch / (312e12 * P.UTILISATION),
                                                     P.LAUNCH_SECONDS_PER_MICRO_BATCH))


def test_plan_command_prints_offline_and_refuses_unknown_gpus(capsys):
    assert main(["plan", "--config", "smoke", "--gpu", "h100", "--device", "cuda"]) == 0  # no GPU needed to plan
    out = capsys.readouterr().out
    assert "1,488 train + 992 val tokens" in out and "H100" in out and "--device (POSAE_DEVICE) cuda" in out
    assert main(["plan", "--config", "smoke", "--gpu", "V100"]) == 2
    assert "V100" in capsys.readouterr().err


def test_known_architectures_agree_with_the_offline_validation_table():
    from transformers import AutoConfig

    from posae.data.models import KNOWN_CONFIGS, KNOWN_MODELS

    for name, info in KNOWN_MODELS.items():
        if name not in KNOWN_CONFIGS:
            continue
        text = AutoConfig.for_model(**KNOWN_CONFIGS[name]).get_text_config()
        assert (text.num_hidden_layers, text.hidden_size) == (info.num_layers, info.hidden_size), name
        assert getattr(text, "max_position_embeddings", None) in (info.max_position, None), name


def test_plan_checks_layers_against_the_model(tmp_path):
    import yaml

    from posae.config import ConfigError

    path = tmp_path / "deep.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "google/gemma-2-2b"}, "capture": {"layers": [26]},
                                    "corpus": {"name": "monology/pile-uncopyrighted"}}))
    with pytest.raises(ConfigError, match="capture.layers has 26.*Fix"):
        P.make_plan(path)
