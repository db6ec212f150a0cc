"""Config composition (real Hydra over conf/), overrides, and one-line ConfigError for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmq.config import Config, ConfigError, load_config


def test_defaults_compose():
    cfg = load_config([])
    assert isinstance(cfg, Config)
    assert cfg.arch.family == "qwen2_5_vl" and cfg.arch.quantized is False
    assert cfg.arch.snapshot == "models/qwen2_5_vl_3b_instruct/checkpoints/Qwen2.5-VL-3B-Instruct"
    assert cfg.export.dir == "models/qwen2_5_vl_3b_instruct/quantized/w8a8_int8_sq"
    assert cfg.quant.name == "w8a8_int8_sq" and cfg.calib.source == "coco2017"
    assert cfg.overrides == [] and not cfg.overridden("quant.alpha")


def test_overrides_apply():
    cfg = load_config(["calib.num_samples=512", "quant.alpha=0.8"])
    assert cfg.calib.num_samples == 512
    assert cfg.quant.alpha == pytest.approx(0.8)
    assert cfg.overridden("quant.alpha") and cfg.overridden("calib.num_samples")
    assert not cfg.overridden("calib.seed")
    # Values that differ from the defaults, so a dropped override cannot pass unnoticed.
    cfg = load_config(["calib.num_samples=37", "quant.alpha=0.25", "calib.batch_size=3", "calib.seed=9",
                       "export.formats=[modelopt_hf,compressed_tensors]", "run_name=abc", "demo=off",
                       "quant.steps=[calibrate,smooth,round]"])
    assert (cfg.calib.num_samples, cfg.quant.alpha, cfg.calib.batch_size, cfg.calib.seed) == (37, 0.25, "3", 9)
    assert cfg.export.formats == ["modelopt_hf", "compressed_tensors"]
    assert (cfg.run_name, cfg.demo) == ("abc", "off")
    # The resolved config (as written to the manifest) carries them too.
    assert cfg.to_dict()["calib"]["num_samples"] == 37 and cfg.to_dict()["quant"]["alpha"] == 0.25


def test_arch_selects_quantized_checkpoint():
    default = load_config([])
    cfg = load_config(["arch=qwen2_5_vl_3b_instruct.w8a8_int8_sq"])
    assert cfg.arch.quantized is True
    assert cfg.arch.snapshot == "models/qwen2_5_vl_3b_instruct/quantized/w8a8_int8_sq/compressed_tensors"
    assert cfg.arch.snapshot != default.arch.snapshot
    # It names the deployable checkpoint that `vlmq quantize` writes under the default export dir.
    assert cfg.arch.snapshot == f"{default.export.dir}/compressed_tensors"
    # Other groups are unaffected; the explicit default arch gives the default back.
    assert cfg.quant == default.quant and cfg.calib == default.calib
    assert load_config(["arch=qwen2_5_vl_3b_instruct.default"]).arch == default.arch
    # Overrides of the selected arch's fields still apply.
    assert load_config(["arch=qwen2_5_vl_3b_instruct.w8a8_int8_sq", "arch.dtype=float32"]).arch.dtype == "float32"


def test_relative_paths_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config([])
    assert cfg.resolve_path(cfg.export.dir) == tmp_path / cfg.export.dir
    assert cfg.resolve_path("/abs/x") == Path("/abs/x")


BAD_OVERRIDES = {
    # unknown keys
    "unknown top-level key": (["nosuch.key=1"], "nosuch"),
    "unknown nested key": (["calib.nosuch=1"], "nosuch"),
    "unknown key appended": (["+quant.nosuch=1"], "nosuch"),
    # wrong types
    "int from text": (["calib.num_samples=abc"], "calib.num_samples"),
    "float from text": (["quant.alpha=high"], "quant.alpha"),
    "bool from text": (["force=maybe"], "force"),
    # values the types allow but vlmq does not
    "alpha above 1": (["quant.alpha=1.5"], "quant.alpha"),
    "alpha below 0": (["quant.alpha=-0.1"], "quant.alpha"),
    "zero samples": (["calib.num_samples=0"], "calib.num_samples"),
    "zero batch": (["calib.batch_size=0"], "calib.batch_size"),
    "text batch": (["calib.batch_size=big"], "calib.batch_size"),
    "short max_length": (["calib.max_length=8"], "calib.max_length"),
    "unknown split": (["calib.splits=[test2017]"], "calib.splits"),
    "unknown export format": (["export.formats=[onnx]"], "export.formats"),
    "empty export formats": (["export.formats=[]"], "export.formats"),
    "unknown kv cache": (["quant.kv_cache=int4"], "quant.kv_cache"),
    "unknown device": (["device=tpu"], "device"),
    "unknown dtype": (["arch.dtype=int4"], "arch.dtype"),
    "unknown export dtype": (["export.dtype=int8"], "export.dtype"),
    "gptq damping of 1": (["quant.gptq.damp=1.0"], "quant.gptq.damp"),
    "hessians on a gpu name": (["quant.gptq.hessian_device=gpu"], "quant.gptq.hessian_device"),
    "R4 block not a power of 2": (["quant.rotate.mlp_input_block=96"], "quant.rotate.mlp_input_block"),
    "unknown rotation matrix": (["quant.rotate.matrix=givens"], "quant.rotate.matrix"),
    # unknown selections
    "unknown arch": (["arch=nonexistent"], "nonexistent"),
    "unknown infer": (["infer=nonexistent"], "nonexistent"),
    "unknown model": (["model=nonexistent"], "nonexistent"),
    "unknown config group option": (["quant=nonexistent"], "nonexistent"),
    # not an override at all
    "no equals sign": (["calib.num_samples"], "key=value"),
}


@pytest.mark.parametrize("overrides,mentions", list(BAD_OVERRIDES.values()), ids=list(BAD_OVERRIDES))
def test_bad_overrides_raise_one_line_config_error(overrides, mentions):
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    message = str(info.value)
    assert message.strip() and "\n" not in message, repr(message)
    assert mentions in message, message
    assert "Traceback" not in message


def test_unknown_arch_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"qwen2_5_vl_3b_instruct\.w8a8_int8_sq"):
        load_config(["arch=qwen2_5_vl_3b_instruct.w8a8"])


def test_missing_conf_dir_is_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMQ_CONF_DIR", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="config tree not found"):
        load_config([])


@pytest.mark.parametrize("model, hub", [("qwen2_5_vl_7b_instruct", "Qwen/Qwen2.5-VL-7B-Instruct"),
                                        ("qwen2_5_vl_72b_instruct", "Qwen/Qwen2.5-VL-72B-Instruct")])
def test_other_model_sizes_select_their_own_tree(model, hub):
    cfg = load_config([f"model={model}"])
    assert cfg.model == model and cfg.arch.name == model and cfg.arch.hub_id == hub
    assert cfg.export.dir == f"models/{model}/quantized/w8a8_int8_sq"
    assert cfg.log_root == f"tmp/{cfg.arch.short_name}_w8a8" and "3b" not in cfg.log_root
    quantized = load_config([f"model={model}", f"arch={model}.w8a8_int8_sq"])
    assert quantized.arch.quantized and quantized.arch.snapshot == f"{cfg.export.dir}/compressed_tensors"


def test_max_memory_map_override():
    cfg = load_config(["arch.max_memory={0:5GiB,1:5GiB}"])
    assert cfg.arch.max_memory == {0: "5GiB", 1: "5GiB"}


def test_alpha_auto_means_per_layer_search():
    cfg = load_config(["quant.alpha=auto"])
    assert cfg.quant.alpha_search and cfg.quant.alpha == load_config([]).quant.alpha
    assert not load_config([]).quant.alpha_search
