"""Layer backend selection (local vs Transformer Engine), the TE renames of the mapping, and the
CPU path never touching GPU-only packages."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_revisual.config import ConfigValidationError, ModelConfig, RunConfig, config_from_dict
from megatron_revisual.config.validate import resolve_layer_backend
from megatron_revisual.convert.mapping import TE_LANGUAGE_LAYER_RENAMES, te_names
from megatron_revisual.models.qwen25_vl import provider
from megatron_revisual.models.qwen25_vl.hf_mapping import qwen25_vl_rules
from megatron_revisual.models.qwen25_vl.presets import qwen25_vl_7b

ROOT = Path(__file__).resolve().parents[2]


def run_cfg(backend: str = "auto", **precision) -> RunConfig:
    return config_from_dict(
        {"model": {"preset": "qwen25_vl_7b", "layer_backend": backend}, "precision": precision}
    )


@pytest.mark.parametrize(
    "requested, cuda, te, expected",
    [
        ("auto", True, True, "transformer_engine"),
        ("auto", True, False, "local"),
        ("auto", False, True, "local"),
        ("auto", False, False, "local"),
        ("local", True, True, "local"),
        ("transformer_engine", True, True, "transformer_engine"),
    ],
)
def test_resolve_layer_backend(requested, cuda, te, expected):
    assert resolve_layer_backend(run_cfg(requested), cuda_available=cuda, te_installed=te) == expected


@pytest.mark.parametrize(
    "cuda, te, reason",
    [
        (False, True, "no CUDA device is visible"),
        (True, False, "transformer_engine is not installed"),
    ],
)
def test_transformer_engine_requested_where_it_cannot_run(cuda, te, reason):
    with pytest.raises(ConfigValidationError) as e:
        resolve_layer_backend(run_cfg("transformer_engine"), cuda_available=cuda, te_installed=te)
    message = str(e.value)
    assert "model.layer_backend='transformer_engine' cannot run here" in message
    assert reason in message and "use model.layer_backend='auto' or 'local'" in message


def test_fp8_with_auto_on_a_cpu_machine_is_refused():
    with pytest.raises(ConfigValidationError, match=r"precision.fp8='hybrid' needs the transformer_engine"
                       r" layer backend, but model.layer_backend='auto' resolves to 'local' here"):
        resolve_layer_backend(run_cfg("auto", fp8="hybrid"), cuda_available=False, te_installed=False)
    # On a GPU with TE the same config is fine.
    cfg = run_cfg("auto", fp8="hybrid")
    assert resolve_layer_backend(cfg, cuda_available=True, te_installed=True) == "transformer_engine"


def test_layer_backend_on_this_machine_is_local():
    assert not torch.cuda.is_available()  # the CPU CI machine this suite runs on
    assert provider.layer_backend(run_cfg("auto")) == "local"
    assert provider.layer_backend(run_cfg("local")) == "local"
    with pytest.raises(ConfigValidationError, match="no CUDA device is visible"):
        provider.layer_backend(run_cfg("transformer_engine"))


def test_layer_backend_probes_without_importing(monkeypatch):
    # A GPU machine with TE installed, simulated: the probe must pick TE from find_spec alone.
    probed = []

    def fake_find_spec(name, *args):
        probed.append(name)
        return object() if name == "transformer_engine" else None

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(provider.importlib.util, "find_spec", fake_find_spec)
    assert provider.layer_backend(run_cfg("auto")) == "transformer_engine"
    assert probed == ["transformer_engine"] and "transformer_engine" not in sys.modules


def test_build_refuses_transformer_engine_before_building():
    with pytest.raises(ConfigValidationError, match="no CUDA device is visible"):
        provider.build_qwen25_vl(run_cfg("transformer_engine"), pre_process=True, post_process=True)


def test_te_specs_import_fails_clearly_without_te():
    with pytest.raises(ImportError, match=r"needs Transformer Engine \(a GPU and the project's `gpu` extra\)"):
        import megatron_revisual.models.qwen25_vl.te_specs  # noqa: F401
    assert "megatron_revisual.models.qwen25_vl.te_specs" not in sys.modules


def test_te_names_renames_only_the_fused_norms():
    local = qwen25_vl_rules(num_layers=3, vision_depth=2, tie_word_embeddings=False)
    te = qwen25_vl_rules(num_layers=3, vision_depth=2, tie_word_embeddings=False, layer_backend="transformer_engine")
    assert te == te_names(local)
    assert [(r.hf, r.kind) for r in te] == [(r.hf, r.kind) for r in local]  # same HF side, same layouts
    changed = {a.megatron: b.megatron for a, b in zip(local, te, strict=True) if a.megatron != b.megatron}
    assert len(changed) == 2 * 3  # two per language layer, nothing in the vision tower
    assert changed["language_model.decoder.layers.2.input_layernorm.weight"] == (
        "language_model.decoder.layers.2.self_attention.linear_qkv.layer_norm_weight"
    )
    assert changed["language_model.decoder.layers.0.pre_mlp_layernorm.weight"] == (
        "language_model.decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    )
    by_name = {r.megatron: r for r in te}
    assert by_name["language_model.decoder.layers.1.mlp.linear_fc1.layer_norm_weight"].hf == (
        "model.layers.1.post_attention_layernorm.weight",
    )
    # vision norms, the final norm and linear weights keep their names
    for name in ("vision_model.decoder.layers.1.input_layernorm.weight",
                 "vision_model.decoder.layers.0.pre_mlp_layernorm.weight",
                 "language_model.decoder.final_layernorm.weight",
                 "language_model.decoder.layers.0.self_attention.linear_qkv.weight",
                 "language_model.decoder.layers.0.mlp.linear_fc1.weight"):
        assert name in by_name
    assert set(TE_LANGUAGE_LAYER_RENAMES) == {"input_layernorm.weight", "pre_mlp_layernorm.weight"}
    with pytest.raises(ValueError, match="layer_backend='te'; use 'local' or 'transformer_engine'"):
        qwen25_vl_rules(num_layers=1, vision_depth=None, tie_word_embeddings=True, text_only=True, layer_backend="te")


def test_te_renames_agree_with_megatrons_checkpoint_key_map():
    # Megatron's local spec saves distributed checkpoints under TE's names, so checkpoints move
    # between backends; our rename table must be that same map.
    from megatron_revisual.parallel.specs import local_gpt_layer_spec

    keys_map = local_gpt_layer_spec().submodules.sharded_state_dict_keys_map
    for local, te in TE_LANGUAGE_LAYER_RENAMES.items():
        prefix = next(p for p in keys_map if local.startswith(p))
        assert keys_map[prefix] + local.removeprefix(prefix) == te


def test_model_config_default_backend_is_auto():
    assert qwen25_vl_7b().layer_backend == "auto"
    assert ModelConfig.__dataclass_fields__["layer_backend"].default == "auto"


# Run in a fresh interpreter: records every attempt to import a GPU-only package and who made it.
_CPU_PATH_PROBE = textwrap.dedent(
    """
    import importlib.abc, json, os, sys

    GPU_ONLY = {"transformer_engine", "flash_attn", "apex"}
    attempts = []

    class Recorder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in GPU_ONLY:
                frame = sys._getframe(1)
                while frame is not None and (frame.f_code.co_filename.startswith("<frozen")
                                             or "importlib" in frame.f_code.co_filename):
                    frame = frame.f_back
                attempts.append([name, frame.f_code.co_filename if frame else "?"])
            return None

    sys.meta_path.insert(0, Recorder())
    import torch
    import megatron_revisual
    from megatron_revisual.config import RunConfig, ModelConfig, VisionConfig, TrainConfig
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl
    from megatron_revisual.parallel.harness import initialize_parallel, destroy_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
    initialize_parallel()
    model_cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128, vocab_size=256, mrope_section=[2, 3, 3], params_dtype="fp32",
                            image_token_id=250, video_token_id=251,
                            vision=VisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64,
                                                fullatt_block_indexes=[1]))
    cfg = RunConfig(model=model_cfg, train=TrainConfig(seq_length=16))
    model = build_qwen25_vl(cfg, pre_process=True, post_process=True)
    ids = torch.arange(8).unsqueeze(0)
    logits = model(ids, ids.expand(3, 1, 8))
    out = {
        "attempts": attempts,
        # (megatron.core.extensions.transformer_engine is Megatron's own and loads without TE.)
        "loaded": sorted(m for m in sys.modules if m.split(".")[0] in GPU_ONLY or m.endswith("te_specs")),
        "logits_shape": list(logits.shape),
        "output_layer": type(model.language_model.output_layer).__module__ + "."
                        + type(model.language_model.output_layer).__name__,
        "language_fp8": model.language_model.config.fp8,
        "vision_fp8": model.vision_model.config.fp8,
    }
    destroy_parallel()
    print("RESULT " + json.dumps(out))
    """
)


def test_cpu_path_never_imports_gpu_only_packages(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "probe.py"
    script.write_text(_CPU_PATH_PROBE)
    proc = subprocess.run(
        [sys.executable, str(script), str(port)], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    ours = [a for a in out["attempts"] if "/megatron_revisual/" in a[1]]
    assert ours == []
    # The recorder works: Megatron-Core itself probes for TE / apex in try-blocks.
    assert any("/megatron/core/" in a[1] for a in out["attempts"])
    assert out["loaded"] == []
    assert out["logits_shape"] == [1, 8, 256]
    assert out["output_layer"] == "megatron.core.tensor_parallel.layers.ColumnParallelLinear"
    assert out["language_fp8"] is None and out["vision_fp8"] is None
