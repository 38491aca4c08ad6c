"""FleetConfig: good configs load, bad ones are refused naming the field."""

from pathlib import Path

import pytest

from orchestrator.config import ConfigError, load_config, parse_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def minimal(**overrides):
    config = {
        "models": [{"name": "m", "arch": "llama-2-7b"}],
        "pools": [{"name": "h100", "gpu_type": "H100", "model": "m"}],
    }
    config.update(overrides)
    return config


def test_minimal_config_gets_defaults():
    config = parse_config(minimal())
    assert config.pools[0].engine == "sim"
    assert config.pools[0].price_per_hour > 0  # from the GPU catalog
    assert config.default_slo_class == "interactive"
    assert config.model("m").transformer_spec().layers == 32


def test_examples_load():
    config = load_config(EXAMPLES / "local.yaml")
    assert {p.gpu_type for p in config.pools} == {"CPU", "H100", "L4"}
    assert config.model("tiny-llama").tokenizer_spec.endswith(".flotilla/models/tiny-llama")


def test_fleet_key_is_accepted(tmp_path):
    path = tmp_path / "values.yaml"
    path.write_text("fleet:\n  models: [{name: m, arch: llama-2-7b}]\n  pools: [{name: p, gpu_type: L4, model: m}]\n")
    assert load_config(path).pools[0].gpu_type == "L4"


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"pools": [{"name": "p", "gpu_type": "H900", "model": "m"}]}, "pools[0].gpu_type", "unknown GPU type"),
        ({"pools": [{"name": "p", "gpu_type": "H100", "model": "x"}]}, "pools[0].model", "unknown model"),
        ({"pools": [{"name": "p", "gpu_type": "H100", "model": "m", "replicas": -1}]}, "pools[0].replicas",
         "greater than or equal"),
        ({"pools": [{"name": "p", "gpu_type": "H100", "model": "m", "replicas": 5, "max_replicas": 2}]},
         "pools[0]", "max_replicas"),
        ({"pools": [{"name": "P_1", "gpu_type": "H100", "model": "m"}]}, "pools[0].name", "pattern"),
        ({"pools": [{"name": "p", "gpu_type": "H100", "model": "m", "engine": "vllm"}]}, "pools[0].engine",
         "needs"),
        ({"pools": [{"name": "p", "gpu_type": "H100", "model": "m", "replica": 2}]}, "pools[0].replica",
         "Extra inputs"),
        ({"models": [{"name": "m", "arch": "gpt-9"}]}, "models[0].arch", "unknown arch preset"),
        ({"models": [{"name": "m"}]}, "models[0]", "set `arch`"),
        ({"routing": {"weights": {"prefix": 1, "vibes": 2}}}, "routing.weights", "unknown scorer"),
        ({"routing": {"load_guard": 1.5}}, "routing.load_guard", "less than or equal"),
        ({"default_slo_class": "gold"}, "default_slo_class", "no SLO class"),
        ({"server": {"port": "eighty"}}, "server.port", "integer"),
    ],
)
def test_bad_config_names_the_field(overrides, field, words):
    with pytest.raises(ConfigError) as e:
        parse_config(minimal(**overrides))
    assert field in str(e.value)
    assert words in str(e.value)


def test_duplicate_names_refused():
    with pytest.raises(ConfigError, match="pools: duplicate"):
        parse_config(minimal(pools=[{"name": "p", "gpu_type": "H100", "model": "m"}] * 2))


def test_vllm_model_shape_comes_from_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 688, '
        '"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096, '
        '"max_position_embeddings": 1024, "torch_dtype": "float32", "tie_word_embeddings": false}'
    )
    config = parse_config(minimal(models=[{"name": "m", "path": str(tmp_path)}],
                                  pools=[{"name": "cpu", "gpu_type": "CPU", "model": "m", "engine": "vllm",
                                          "gpus_per_replica": 0}]))
    spec = config.model("m").transformer_spec()
    assert (spec.layers, spec.num_kv_heads, spec.hidden_size) == (2, 2, 256)
