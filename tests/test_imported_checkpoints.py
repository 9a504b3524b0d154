"""Imported official checkpoints are usable and checkable: import -> verify-reference --checkpoint -> evaluate
--checkpoint, for ProPy and for the MS-SL / GMMFormer official state dicts; clear errors for missing or wrong files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from pipeline import cli
from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.data.feature_store import FeatureStoreInfo, FeatureStoreWriter
from stages.data.schema import Query, write_queries
from stages.models.clip_backbone import load_clip
from stages.models.propy import ProPy, ProPyConfig
from stages.models.propy_import import load_propy, official_name
from stages.models.pyramid import PyramidConfig
from stages.models.trained import load_baseline
from tests.test_train_propy import make_dataset

BASELINES = {"msl": "mssl_shared", "gmmformer": "gmmformer_shared"}
FIXTURE_KEYS = ("hidden_size", "n_heads", "max_ctx_l", "max_desc_l", "map_size", "input_drop", "drop")


def invoke(*args: str) -> tuple[int, str]:
    """(exit code, stdout), or the error on stderr when nothing went to stdout (stage logs also go to stderr)."""
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout if result.stdout.strip() else result.stderr


def import_baseline(params: str, src: Path | str, dst: Path, name: str) -> tuple[int, str]:
    return invoke("--params", params, "import-checkpoint", str(src), str(dst), "--model", name)


def write_params(path: Path, base: BaseConfig, baselines: dict | None = None) -> Path:
    keys = ("dataset", "seed", "cache_dir", "metrics_dir", "clip_weights", "clip_arch")
    protocol = {"split": "test", "moment_retrieval": False, "measure_efficiency": False}
    params = {
        "base": {k: getattr(base, k) for k in keys},
        "evaluate": {"protocol": protocol, "also_splits": [], "untrained_reference": False},
        "train_propy": {"device": "cpu", "max_words": 12},
        "baselines": baselines or {},
    }
    path.write_text(json.dumps(params))
    return path


# ------------------------------------------------------------------------------------------------------------------
# ProPy
# ------------------------------------------------------------------------------------------------------------------


def test_propy_fixture_checkpoint_imports_and_verifies(fixtures_dir: Path, tmp_path: Path) -> None:
    folder = fixtures_dir / "propy_official"
    ours = tmp_path / "official_cfg32.pt"
    code, output = invoke("import-checkpoint", str(folder / "cfg32_official_ckpt.pth.tar"), str(ours))
    assert code == 0, output
    code, output = invoke("verify-reference", "propy", str(folder / "cfg32"), "--checkpoint", str(ours))
    assert code == 0, output
    errors = json.loads(output)
    assert max(errors.values()) <= 1e-4 and "faithful_event_features" in errors
    # a file that is not the imported model fails the check
    payload = torch.load(ours, weights_only=True)
    prompts = payload["trainable"]["event_prompts"]
    payload["trainable"]["event_prompts"] = prompts + 0.1 * torch.randn(
        prompts.shape, generator=torch.Generator().manual_seed(0)
    )
    torch.save(payload, tmp_path / "changed.pt")
    code, output = invoke(
        "verify-reference", "propy", str(folder / "cfg32"), "--checkpoint", str(tmp_path / "changed.pt")
    )
    assert code == 1 and json.loads(output)["event_features"] > 1e-3
    # the fixture's CLIP has a 1000-token vocabulary: real captions cannot be encoded, and the error says why
    model = load_propy(ours)
    with pytest.raises(PipelineError, match="outside this CLIP's vocabulary of 1000"):
        model.encode_queries(torch.tensor([[49406, 320, 49407]]))


def official_format(model: ProPy) -> dict:
    """A checkpoint as the official training script writes it (every tensor under its official `clip.` name)."""
    state = {f"clip.{k}": v for k, v in model.clip.state_dict().items() if k != "attn_mask"}
    state |= dict(official_name(k, v) for k, v in model.trainable_state_dict().items())
    return {"state_dict": state, "epoch": 3, "global_step": 12, "arch": "CLIp4Clip"}


def test_propy_import_evaluate_round_trip(tmp_path: Path, tiny_clip_weights: Path) -> None:
    base = make_dataset(tmp_path, tiny_clip_weights)
    clip, arch = load_clip(tiny_clip_weights)
    config = ProPyConfig(pyramid=PyramidConfig(num_frames=4, offset=(1, 1)), num_visual_prompts=2, adapter_channels=8)
    torch.manual_seed(1)
    model = ProPy(clip, arch, config)
    for adapter in model.adapters:  # the official init leaves adapters at zero; give them something to carry
        torch.nn.init.normal_(adapter.conv.weight, std=0.1)
    torch.save(official_format(model), tmp_path / "ckpt.best.pth.tar")
    pyramid = tmp_path / "cfg.json"
    pyramid.write_text(json.dumps({"Nf": 4, "offset": [1, 1]}))
    imported = tmp_path / "models" / "propy_toy.pt"
    code, output = invoke(
        "import-checkpoint", str(tmp_path / "ckpt.best.pth.tar"), str(imported), "--pyramid", str(pyramid)
    )
    assert code == 0, output
    loaded = load_propy(imported)  # the CLIP file the import wrote, recorded in the checkpoint
    frames = torch.randn(2, 4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_videos(frames), model.eval().encode_videos(frames), rtol=0, atol=0)
    params = write_params(tmp_path / "params.yaml", base)
    code, output = invoke("--params", str(params), "evaluate", "propy", "--checkpoint", str(imported))
    assert code == 0, output
    metrics = json.loads((base.dataset_metrics / "propy_propy_toy.json").read_text())
    assert metrics["split"] == "test" and metrics["selection"]["rule"].startswith("imported from")
    assert not (base.dataset_metrics / "propy.json").exists()  # the trained model's file is left alone


def test_propy_evaluate_checkpoint_errors(tmp_path: Path, tiny_clip_weights: Path) -> None:
    base = make_dataset(tmp_path, tiny_clip_weights)
    params = str(write_params(tmp_path / "params.yaml", base))
    code, output = invoke("--params", params, "evaluate", "propy", "--checkpoint", str(tmp_path / "missing.pt"))
    assert code == 1 and "does not exist" in output
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code, output = invoke("--params", params, "evaluate", "propy", "--checkpoint", str(tmp_path / "junk.pt"))
    assert code == 1 and "not a readable checkpoint" in output


# ------------------------------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------------------------------


def fixture_keys(fixtures_dir: Path, name: str) -> dict:
    config = json.loads((fixtures_dir / "baselines_official" / f"{BASELINES[name]}_config.json").read_text())
    return {k: config["model_config"][k] for k in FIXTURE_KEYS}


def feature_dataset(root: Path, video_dim: int, text_dim: int) -> BaseConfig:
    """A toy feature store with the fixtures' feature sizes (48-d frames, 40-d tokens)."""
    base = BaseConfig(dataset="toy", cache_dir=str(root / "cache"), metrics_dir=str(root / "metrics"), clip_arch="t")
    rng = np.random.default_rng(0)
    info = FeatureStoreInfo("toy", "0" * 64, "3.3.0", "last", "none", "t")
    queries = []
    with FeatureStoreWriter(base.features_path(), info) as store:
        for v in range(6):
            store.write("video", f"v{v}", rng.normal(size=(int(rng.integers(5, 30)), video_dim)).astype(np.float32))
            for k in range(2):
                store.write("text", f"v{v}#{k}", rng.normal(size=(7, text_dim)).astype(np.float32))
                queries.append(Query(f"v{v}#{k}", "caption", f"v{v}", 10.0, ((0.0, 5.0),), "test"))
    write_queries(base.annotations_path, queries)
    return base


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_import_verify_evaluate_round_trip(fixtures_dir: Path, tmp_path: Path, name: str) -> None:
    prefix = fixtures_dir / "baselines_official" / BASELINES[name]
    base = feature_dataset(tmp_path, 48, 40)
    params = str(write_params(tmp_path / "params.yaml", base, {name: {"model": fixture_keys(fixtures_dir, name)}}))
    dst = tmp_path / "models" / f"{name}_official"
    code, output = import_baseline(params, f"{prefix}_official_state_dict.pt", dst, name)
    assert code == 0, output
    assert json.loads(output)["visual_input_size"] == 48 and json.loads(output)["query_input_size"] == 40
    official = torch.load(f"{prefix}_official_state_dict.pt", weights_only=True)
    saved = load_file(str(dst / "model.safetensors"))
    assert saved.keys() == official.keys() and all(torch.equal(saved[k], v) for k, v in official.items())
    code, output = invoke("verify-reference", name, str(prefix), "--checkpoint", str(dst))
    assert code == 0, output
    assert max(json.loads(output).values()) <= 1e-4
    code, output = invoke("--params", params, "evaluate", name, "--checkpoint", str(dst))
    assert code == 0, output
    metrics = json.loads((base.dataset_metrics / f"{name}_{name}_official.json").read_text())
    assert metrics["num_videos"] == 6 and metrics["selection"]["rule"].startswith("imported from")


def test_baseline_checks_read_our_weights_and_config(fixtures_dir: Path, tmp_path: Path) -> None:
    prefix = fixtures_dir / "baselines_official" / BASELINES["msl"]
    base = feature_dataset(tmp_path, 48, 40)
    keys = fixture_keys(fixtures_dir, "msl")
    params = str(write_params(tmp_path / "params.yaml", base, {"msl": {"model": {**keys, "clip_scale_w": 0.5}}}))
    dst = tmp_path / "msl"
    assert import_baseline(params, f"{prefix}_official_state_dict.pt", dst, "msl")[0] == 0
    code, output = invoke("verify-reference", "msl", str(prefix), "--checkpoint", str(dst))
    assert code == 1 and "clip_scale_w" in output  # fusion weights other than the fixture's
    record = json.loads((dst / "training.json").read_text())
    record["model_config"]["clip_scale_w"] = 0.7
    (dst / "training.json").write_text(json.dumps(record))
    weights = load_file(str(dst / "model.safetensors"))
    key = next(k for k, v in weights.items() if k.startswith("query_input_proj") and v.dim() == 2)
    weights[key] = weights[key] * 1.01
    save_file(weights, str(dst / "model.safetensors"))
    code, output = invoke("verify-reference", "msl", str(prefix), "--checkpoint", str(dst))
    assert code == 1 and json.loads(output)["query_encoder"] > 1e-4  # the check ran on our (changed) weights


def test_baseline_import_and_load_errors(fixtures_dir: Path, tmp_path: Path) -> None:
    prefix = fixtures_dir / "baselines_official" / BASELINES["msl"]
    base = feature_dataset(tmp_path, 48, 40)
    params = str(write_params(tmp_path / "params.yaml", base, {"msl": {"model": {"hidden_size": 32}}}))
    code, output = import_baseline(params, f"{prefix}_official_state_dict.pt", tmp_path / "a", "msl")
    assert code == 1 and "does not fit MSSL" in output  # hidden size 32, the checkpoint's is 64
    code, output = import_baseline(params, str(tmp_path / "none.ckpt"), tmp_path / "b", "msl")
    assert code == 1 and "does not exist" in output
    with pytest.raises(PipelineError, match="holds no trained model"):
        load_baseline(tmp_path / "empty")
    code, output = invoke("--params", params, "evaluate", "msl", "--checkpoint", str(tmp_path / "empty"))
    assert code == 1 and "holds no trained model" in output
    gmm = tmp_path / "gmm"
    gmm_prefix = fixtures_dir / "baselines_official" / BASELINES["gmmformer"]
    params_gmm = write_params(
        tmp_path / "p2.yaml", base, {"gmmformer": {"model": fixture_keys(fixtures_dir, "gmmformer")}}
    )
    assert import_baseline(str(params_gmm), f"{gmm_prefix}_official_state_dict.pt", gmm, "gmmformer")[0] == 0
    with pytest.raises(PipelineError, match="holds model 'gmmformer', not 'msl'"):
        load_baseline(gmm, "msl")
    code, output = invoke("verify-reference", "propy-train", str(prefix), "--checkpoint", str(gmm))
    assert code == 1 and "compares no model file" in output
