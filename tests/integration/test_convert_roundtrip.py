"""HF -> Megatron dist checkpoint -> HF is bitwise, for fp32 / bf16 and untied / tied tiny models
saved from (TP, PP) = (1, 1) and (2, 2); a checkpoint saved at one layout and loaded at the
other computes HF's logits (`revisual convert verify`), and streaming the loaded model back out
(`stream_hf_tensors`: TP gathers, PP broadcasts) gives every rank the HF tensors bitwise.

Process start-up dominates on tiny models, so conversions share processes: the (2, 2) saves run
as one 4-rank launch, the (1, 1) saves and all back-conversions in one spawned worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_revisual.convert.dist_ckpt import convert_many_hf_to_mcore, convert_mcore_to_hf
from megatron_revisual.convert.safetensors_io import HFCheckpoint
from megatron_revisual.testing.tiny_checkpoint import TinySpec, make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {
    "fp32_untied": (torch.float32, False),
    "fp32_tied": (torch.float32, True),
    "bf16_untied": (torch.bfloat16, False),
    "bf16_tied": (torch.bfloat16, True),
}
LAYOUTS = {"tp1_pp1": (1, 1), "tp2_pp2": (2, 2)}
SIDE_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
]


def _make_variant(out: Path, dtype: torch.dtype, tied: bool, seed: int) -> Path:
    make_tiny_checkpoint(out, seed=seed, spec=TinySpec(tie_word_embeddings=tied))
    if dtype != torch.float32:
        weights = {k: v.to(dtype) for k, v in load_file(out / "model.safetensors").items()}
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((out / "config.json").read_text())
        config["dtype"] = "bfloat16"
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{(variant, layout): (hf_dir, ckpt_dir, back_dir)} with every conversion done."""
    root = tmp_path_factory.mktemp("convert")
    hf = {
        v: _make_variant(root / f"hf_{v}", dt, tied, seed=i)
        for i, (v, (dt, tied)) in enumerate(VARIANTS.items())
    }
    out = {
        (v, lay): (hf[v], root / f"ckpt_{v}_{lay}", root / f"back_{v}_{lay}")
        for v in VARIANTS
        for lay in LAYOUTS
    }
    jobs = {lay: [(hf[v], out[(v, lay)][1]) for v in VARIANTS] for lay in LAYOUTS}
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as worker:
        worker.submit(convert_many_hf_to_mcore, jobs["tp1_pp1"], tp=1, pp=1).result()
        convert_many_hf_to_mcore(jobs["tp2_pp2"], tp=2, pp=2)  # 4 gloo ranks from this process
        for _, ckpt, back in out.values():
            worker.submit(convert_mcore_to_hf, ckpt, back).result()
    return out


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    reader = HFCheckpoint(hf_dir)
    return {name: reader.get(name) for name in reader.names()}


@pytest.mark.integration
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_is_bitwise(converted, variant, layout):
    hf_dir, ckpt, back = converted[(variant, layout)]
    tp, pp = LAYOUTS[layout]
    # The Megatron side really is a torch_dist checkpoint written by tp*pp ranks.
    assert json.loads((ckpt / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == [
        f"__{r}_0.distcp" for r in range(tp * pp)
    ]
    assert json.loads((ckpt / "revisual_model.json").read_text())["saved_layout"] == {
        "tp": tp,
        "pp": pp,
    }

    src, out = _tensors(hf_dir), _tensors(back)
    assert sorted(out) == sorted(src) and len(src) == (56 if variant.endswith("_tied") else 57)
    dtype = VARIANTS[variant][0]
    for name, t in src.items():
        assert t.dtype == dtype and out[name].dtype == dtype, name
        assert out[name].shape == t.shape and torch.equal(out[name], t), (
            f"{name} differs after the round trip"
        )
    # The reference reader accepts the written shards too.
    assert sorted(load_file(back / "model-00001-of-00001.safetensors")) == sorted(src)
    for name in SIDE_FILES:
        assert (back / name).read_bytes() == (hf_dir / name).read_bytes(), name


def _verify(hf_dir: Path, ckpt: Path, tp: int, pp: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "megatron_revisual.convert.cli",
        "verify",
        "--hf",
        str(hf_dir),
        "--ckpt",
        str(ckpt),
        "--tp",
        str(tp),
        "--pp",
        str(pp),
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


@pytest.mark.integration
@pytest.mark.parametrize(
    ("variant", "saved", "loaded"),
    [("fp32_tied", "tp1_pp1", (2, 2)), ("bf16_untied", "tp2_pp2", (1, 1))],
)
def test_verify_resharded_checkpoint(converted, variant, saved, loaded):
    hf_dir, ckpt, _ = converted[(variant, saved)]
    report = _verify(hf_dir, ckpt, *loaded)
    assert report["max_abs_logit_diff"] <= 1e-4
    assert report["top1_agreement"] == 1.0
    assert report["cosine"] > 0.999999
    assert report["mean_abs_logit_diff"] <= report["max_abs_logit_diff"]
    assert report["tokens"] > 150 and report["samples"] == 3
    assert (report["tp"], report["pp"]) == loaded
    # stream_hf_tensors from the resharded model: every rank got all tensors, bitwise.
    assert report["weights_match"] is True
    assert report["hf_tensors"] == (56 if variant.endswith("_tied") else 57)


def _save_like_a_trainer(hf_dir: str, save_dir: str) -> int:
    """What a training runner does: load HF weights into the sharded model, save the model's
    sharded_state_dict with dist_checkpointing's own (threaded, async-capable) writer into
    iter_0000007/, and record the iteration."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_revisual.convert.dist_ckpt import model_config_from_hf, run_config_for
    from megatron_revisual.convert.hf_load import SafetensorsReader, load_hf_weights
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl

    tp = ps.get_tensor_model_parallel_world_size()
    model_cfg = model_config_from_hf(hf_dir, "fp32")
    cfg = run_config_for(model_cfg, tp, ps.get_pipeline_model_parallel_world_size())
    model = build_qwen25_vl(
        cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
    )
    load_hf_weights(
        model,
        SafetensorsReader(hf_dir),
        model_cfg,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=tp,
    )
    iter_dir = Path(save_dir) / "iter_0000007"
    iter_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 7}, str(iter_dir))
    if torch.distributed.get_rank() == 0:
        (Path(save_dir) / "latest_checkpointed_iteration.txt").write_text("7")
    return len(list(iter_dir.glob("*.distcp")))


@pytest.mark.integration
def test_mcore_to_hf_reads_a_training_checkpoint(converted, tmp_path):
    """A checkpoint written by dist_checkpointing.save (no revisual_model.json) converts back
    bitwise given --hf-config; the save dir's latest_checkpointed_iteration.txt is followed."""
    from megatron_revisual.parallel import run_distributed

    hf_dir = converted[("fp32_untied", "tp1_pp1")][0]
    save_dir = tmp_path / "run" / "checkpoints"
    files = run_distributed(
        _save_like_a_trainer, world_size=2, tp=2, args=(str(hf_dir), str(save_dir)), timeout_s=600
    )
    assert files[0] >= 2  # both ranks wrote their own files
    out = tmp_path / "hf_out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_revisual.convert.cli",
            "mcore-to-hf",
            "--ckpt",
            str(save_dir),
            "--out",
            str(out),
            "--hf-config",
            str(hf_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    src, back = _tensors(hf_dir), _tensors(out)
    assert sorted(back) == sorted(src)
    assert all(torch.equal(back[n], t) and back[n].dtype == t.dtype for n, t in src.items())
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
