"""Recipes name shipped files by relative paths; those resolve from any working directory."""

from __future__ import annotations

from app.accounting.cost_models import RSTProfile
from app.shipped import SHIPPED_ROOT, shipped_path
from datamodules.pretraining.corpus import resolve_sources


def test_a_shipped_path_resolves_from_another_directory_and_a_local_one_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped_path("datamodules/samples/gutenberg") == SHIPPED_ROOT / "datamodules/samples/gutenberg"
    (tmp_path / "configs" / "rst").mkdir(parents=True)
    (tmp_path / "configs" / "rst" / "quickstart-cpu.yaml").write_text("mine")
    assert shipped_path("configs/rst/quickstart-cpu.yaml").resolve() == tmp_path / "configs/rst/quickstart-cpu.yaml"
    assert str(shipped_path("nowhere/corpus")) == "nowhere/corpus"  # left as given, for the error to name


def test_the_recipes_corpus_and_profile_load_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sources = resolve_sources(["datamodules/samples/gutenberg"])
    assert sources and all(source.path.is_file() for source in sources)
    assert RSTProfile.load("configs/rst/quickstart-cpu.yaml").name == "quickstart-cpu"
