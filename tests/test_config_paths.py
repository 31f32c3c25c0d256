"""The one rule for relative paths in configs (docs/formats.md §4.1): the working folder first,
then the repository root; training's data folders, weights and configs alike."""
from pathlib import Path

import pytest

from bimacosr.config import REPO_ROOT, load_config, resolve_config_path
from bimacosr.data.datasets import build_val_dataset
from bimacosr.weights import MissingWeightsError, resolve_weight


def test_working_folder_first_then_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("configs/smoke.yaml") == REPO_ROOT / "configs/smoke.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/smoke.yaml").write_text("model: {}\n")
    assert resolve_config_path("configs/smoke.yaml") == Path("configs/smoke.yaml")  # the working folder wins
    assert resolve_config_path("nowhere/x.pth") == Path("nowhere/x.pth")  # as given, for the caller to report
    assert resolve_config_path(tmp_path / "abs") == tmp_path / "abs"


def test_configs_load_from_any_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/smoke.yaml").model.params.model_channels == 32


def test_data_and_weights_resolve_alike(smoke_assets, monkeypatch, tmp_path):
    """The smoke config's relative val folders and weights, from the assets' root and from elsewhere."""
    cfg = load_config("configs/smoke.yaml")
    monkeypatch.chdir(smoke_assets.root)
    assert len(build_val_dataset(cfg.data.val)) == 2
    assert resolve_weight(cfg.autoencoder.ckpt_path, what="autoencoder").is_file()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("bimacosr.config.REPO_ROOT", tmp_path / "no_repo")  # neither place has them
    with pytest.raises(FileNotFoundError, match=r"data.val.params.dir_path: folder not found: 'data/smoke/val/LR' "
                                                r"\(relative paths are tried from the working folder, then"):
        build_val_dataset(cfg.data.val)
    with pytest.raises(MissingWeightsError, match="autoencoder: weight file not found"):
        resolve_weight(cfg.autoencoder.ckpt_path, what="autoencoder")
