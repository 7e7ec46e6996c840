"""`revisual data` on the released training sets' copies through a GPU recipe, and the check
`revisual train` makes before any rank starts: one line naming the option and the path, exit 2."""

from __future__ import annotations

import json
import types

import pyarrow.parquet as pq
import pytest

from megatron_revisual import cli
from megatron_revisual.config import load_config
from megatron_revisual.testing.released_sets import write_released_fixtures
from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint
from megatron_revisual.train.data_check import DataSourceError, check_data_sources

RECIPE = "configs/qwen25_vl_7b_8xh100.yaml"


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return write_released_fixtures(tmp_path_factory.mktemp("released"))


def _released_overrides(released, tiny=None):
    return [
        *([f"model.hf_path={tiny}"] if tiny else []),
        f"cold_start.data.path={released['grammer']}",
        f"mrl.data.path={released['mmrl'].parent.parent}",  # the snapshot directory
        f"trl.data.path={released['textrl']}",
        "mrl.validation.every=0",
    ]


def test_revisual_data_reads_the_released_sets_through_the_recipe(released, tmp_path, capsys):
    tiny = make_tiny_checkpoint(tmp_path / "tiny", seed=0)
    assert cli.main(["data", RECIPE, *_released_overrides(released, tiny), "--rows", "3"]) == 0
    out = capsys.readouterr().out
    sections = out.split("== ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        f"cold_start.data.path={released['grammer']}",
        f"mrl.data.path={released['mmrl'].parent.parent}",
        f"trl.data.path={released['textrl']}",
    ]
    cold, mrl, trl = sections
    assert "rows read 3, kept 3, skipped 0 (none)" in cold
    assert "cold_start.max_length=32768 truncates: 0 of 3 (0.0%)" in cold
    assert "response tokens: p50 22, p90 22, p99 22, max 22" in cold  # "<think>...\\boxed{..}." + <|im_end|>
    assert "rows read 3, kept 3, skipped 0 (none)" in mrl and "images per row: 1: 3" in mrl
    # 56 x 56 digits: 4 x 4 patches of 14 pixels, merged 2 x 2 -> 4 visual tokens each
    assert "visual tokens per image: p50 4, p90 4, p99 4, max 4" in mrl
    assert "mrl.rollout.max_prompt_length=8192 (after image expansion; the engine skips these): 0 of 3" in mrl
    assert "images per row: 0: 3" in trl and trl.rstrip().endswith("ok")

    # a row with two images: more than the rollout engine takes per prompt
    table = pq.read_table(released["mmrl"]).slice(0, 1).to_pylist()
    table[0]["images"] = table[0]["images"] * 2
    table[0]["problem"] = "<image><image>Same digit?"
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(table), tmp_path / "two.parquet")
    rc = cli.main(["data", RECIPE, *_released_overrides(released, tiny), f"mrl.data.path={tmp_path / 'two.parquet'}",
                   "--stages", "mrl"])
    assert rc == 1
    assert "FAILED: 1 of 1 rows have more than 1 image(s), the most the rollout engine takes" in capsys.readouterr().out


def test_a_renamed_column_fails_before_training_naming_the_column(released, tmp_path, capsys):
    renamed = tmp_path / "mmrl"
    renamed.mkdir()
    table = pq.read_table(released["mmrl"])
    pq.write_table(table.rename_columns(["images", "question", "answer", "dataset"]), renamed / "train.parquet")
    args = [RECIPE, *_released_overrides(released), f"mrl.data.path={renamed}", f"output_dir={tmp_path / 'out'}"]
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"revisual train: error: mrl.data.path={renamed}: no column 'problem' (mrl.data.prompt_key); its columns: "
        "['answer', 'dataset', 'images', 'question']; set mrl.data.prompt_key=<one of them>"
    ]
    assert not (tmp_path / "out" / "checkpoints").exists()
    # `revisual data` reads it (no tokenizer: the recipe's model is not here) and exits 1, naming it
    assert cli.main(["data", *args, "--stages", "mrl"]) == 1
    captured = capsys.readouterr()
    assert (f"FAILED: {renamed} (train.parquet): no column 'problem' (mrl.data.prompt_key); its columns: "
            in captured.out)
    assert "revisual data: 1 of 1 data sections would not train: mrl.data" in captured.err


def test_train_refuses_a_missing_source_before_any_rank_starts(tmp_path, monkeypatch, capsys):
    import megatron_revisual.parallel as parallel

    def no_ranks(*a, **k):
        raise AssertionError("ranks were started")

    monkeypatch.setattr(parallel, "run_distributed", no_ranks)
    rc = cli.main(["train", "configs/tiny_cpu_demo.yaml", f"output_dir={tmp_path}", "mrl.data.path=/x/none.parquet",
                   "stages=[mrl]"])
    assert rc == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "wrote" not in line]
    assert err == ["revisual train: error: mrl.data.path=/x/none.parquet: no such file or directory"]


def test_hub_sources_are_checked_for_split_and_columns(monkeypatch):
    import datasets

    cfg = load_config(RECIPE, ["stages=[trl]"])
    info = types.SimpleNamespace(splits={"train": None}, features={"question": None, "answer": None})
    calls = []

    def builder(name):
        calls.append(name)
        if name == "csfufu/unreachable":
            raise ConnectionError("no route to host")
        return types.SimpleNamespace(info=info)

    monkeypatch.setattr(datasets, "load_dataset_builder", builder)
    with pytest.raises(DataSourceError) as e:
        check_data_sources(cfg)
    assert calls == ["csfufu/textrl"]
    assert str(e.value) == ("trl.data.path=csfufu/textrl@train: no column 'problem' (trl.data.prompt_key); its "
                            "columns: ['answer', 'question']; set trl.data.prompt_key=<one of them>")
    with pytest.raises(DataSourceError, match=r"^trl.data.path=csfufu/textrl@test: the Hub dataset cannot be "
                       r"opened \(ValueError: has no split 'test'; its splits: \['train'\]\)$"):
        check_data_sources(load_config(RECIPE, ["stages=[trl]", "trl.data.path=csfufu/textrl@test"]))
    with pytest.raises(DataSourceError, match=r"cannot be opened \(ConnectionError: no route to host\)$"):
        check_data_sources(load_config(RECIPE, ["stages=[trl]", "trl.data.path=csfufu/unreachable"]))
    ok = load_config(RECIPE, ["stages=[trl]", "trl.data.prompt_key=question"])
    assert check_data_sources(ok) == []


def test_the_launchers_refuse_a_job_whose_data_would_not_train(released, tmp_path, capsys, monkeypatch):
    from megatron_revisual.launch import sbatch

    def no_sbatch(*a, **k):
        raise AssertionError("sbatch was called")

    monkeypatch.setattr(sbatch.subprocess, "run", no_sbatch)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"problem": "", "answer": "1"}) + "\n")
    args = ["--nodes", "1", "--gpus-per-node", "8", "--log-dir", str(tmp_path / "logs"), RECIPE,
            *_released_overrides(released), f"trl.data.path={empty}"]
    assert sbatch.main(args) == 2
    err = capsys.readouterr().err
    assert f"submit: not submitted: recipe {RECIPE}: the data of trl.data would not train (first 64 rows" in err
    assert f"FAILED: {empty}: none of its 1 rows is usable; skipped {{'empty_prompt': 1}}" in err
    # the other sections were read without a tokenizer (the recipe's model is not on this machine)
    assert "note: model.hf_path=checkpoints/Qwen2.5-VL-7B-Instruct: no tokenizer there" in err
    assert "rows read 3, kept 3, skipped 0 (none)" in err


def test_the_nemo_run_launcher_refuses_a_missing_source_before_nemo_run(monkeypatch, capsys):
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "launch_scripts" / "launch.py"
    spec = importlib.util.spec_from_file_location("revisual_launch_script", script)
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    monkeypatch.chdir(Path.cwd())  # main() changes to the repository root
    monkeypatch.setitem(sys.modules, "megatron_revisual.launch.nemo", None)  # importing it fails
    rc = launch.main(["--recipe", RECIPE, "--executor", "slurm", "--nodes", "1", "--gpus-per-node", "8",
                      "stages=[trl]", "trl.data.path=/x/none.parquet"])
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [
        f"launch.py: not launched: recipe {RECIPE}: trl.data.path=/x/none.parquet: no such file or directory"]


def test_config_and_plan_of_a_prepare_recipe_work_before_its_first_run(tmp_path, capsys):
    """A fresh clone: the demo's tiny model does not exist yet; nothing is written."""
    out = tmp_path / "demo"
    assert cli.main(["config", "configs/tiny_cpu_demo.yaml", f"output_dir={out}"]) == 0
    assert f"hf_path: {out}/hf_tiny" in capsys.readouterr().out
    assert cli.main(["plan", "configs/tiny_cpu_demo.yaml", f"output_dir={out}"]) == 0
    assert "fits" in capsys.readouterr().out
    assert not out.exists()
    # `revisual data` prepares what training would (the tiny model, the synthetic sets), then reads
    assert cli.main(["data", "configs/tiny_cpu_demo.yaml", f"output_dir={out}", "--rows", "4", "--stages", "mrl"]) == 0
    captured = capsys.readouterr()
    assert f"wrote a tiny random Qwen2.5-VL to {out}/hf_tiny" in captured.err
    assert [line for line in captured.out.splitlines() if line.startswith("== ")] == [
        f"== mrl.data.path={out}/data/mrl.parquet", f"== mrl.validation.data.path={out}/data/mrl_val.parquet"]
    assert captured.out.count("rows read 4, kept 4, skipped 0 (none)") == 2
    assert "visual tokens per image: p50 4, p90 4, p99 4, max 4" in captured.out
