"""Registry round trip and promotion gate against real MLflow stores (SQLite and a
PostgreSQL-backed ``mlflow server``)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from recsys_core import features as F
from recsys_core.settings import MlflowSettings, Settings, load_settings
from recsys_models.baselines import tuned_baselines
from recsys_models.bundle import load_bundle
from recsys_models.evaluate import evaluate_bundle
from recsys_models.registry import (
    CHALLENGER,
    CHAMPION,
    alias_version,
    list_versions,
    load_alias,
    promote,
    register_bundle,
    tracking,
)
from recsys_models.train import TrainConfig, build_models
from tests.fixtures.mlflow_store import MlflowStore
from tests.model.snapshots import make_bundle, synthetic_case, trained_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _settings(store: MlflowStore, tmp_path: Path) -> Settings:
    base = load_settings("local")
    mlflow = MlflowSettings(tracking_uri=store.tracking_uri,
                            artifact_location=str(store.artifact_dir), experiment="registry-test",
                            model_name=f"bundle-{store.kind}", promotion_tolerance=0.01)
    return base.model_copy(update={"data_dir": tmp_path, "mlflow": mlflow})


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest) -> MlflowStore:
    name = "mlflow_sqlite_store" if request.param == "sqlite" else "mlflow_postgres_store"
    return request.getfixturevalue(name)


def test_bundle_round_trips_and_gate_refuses_a_worse_challenger(
    store: MlflowStore, tmp_path: Path
) -> None:
    settings = _settings(store, tmp_path)
    case = synthetic_case()
    good = trained_bundle()
    users = case.holdout["user_id"].drop_duplicates().head(120)
    holdout = case.holdout[case.holdout["user_id"].isin(users)]  # small: the gate runs 3 evals

    baselines = tuned_baselines(case.train)  # once: both promotions judge the same holdout
    report = evaluate_bundle(good, case.train, holdout, extra=baselines.recommenders)
    first = register_bundle(settings, good, params={"epochs": 3, **baselines.info},
                            report=report,
                            history=[{"epoch": 0.0, "retrieval_loss": 1.0,
                                              "val_recall@50": 0.2}], run_name="good")
    assert alias_version(settings, CHALLENGER) == first.version
    decision = promote(settings, case.train, holdout, why="first model", who="ci",
                       baselines=baselines)
    assert decision.promoted and alias_version(settings, CHAMPION) == first.version

    # Same scores through models:/<name>@champion as from the in-memory bundle.
    champion = load_bundle(f"models:/{settings.mlflow.model_name}@champion",
                           tracking_uri=settings.mlflow_tracking_uri)
    users = case.holdout.drop_duplicates("user_id").head(20)
    np.testing.assert_allclose(champion.encode_users(users), good.encode_users(users), atol=1e-6)
    ids_a, s_a = good.search(good.encode_users(users), 10)
    ids_b, s_b = champion.search(champion.encode_users(users), 10)
    assert (ids_a == ids_b).all()
    np.testing.assert_allclose(s_a, s_b, atol=1e-5)
    rows = case.holdout.head(200)
    np.testing.assert_allclose(champion.rank(rows, rows[["item_id"]])["score"],
                               good.rank(rows, rows[["item_id"]])["score"], atol=1e-6)
    pyfunc_input = pd.DataFrame({"user_id": users["user_id"].head(3).tolist(),
                                 "user_history": [json.dumps(list(h)) for h in
                                                  users["user_history"].head(3)]})
    with tracking(settings.mlflow_tracking_uri):
        pyfunc = mlflow.pyfunc.load_model(f"models:/{settings.mlflow.model_name}@champion")
        top = pyfunc.predict(pyfunc_input, params={"k": 5})
    assert len(top) == 15 and set(top["user_id"]) == set(pyfunc_input["user_id"])
    assert champion.feature_service == F.RECOMMENDER_V1
    assert champion.snapshot_id == good.snapshot_id
    assert list(champion.item_ids) == list(good.item_ids)

    assert decision.challenger_metrics["final/recall@50"] >= 1.1 * decision.challenger_metrics[
        "popularity/recall@50"]

    # An untrained model is worse: the gate refuses and champion stays.
    untrained_tt, untrained_rk = build_models(case.spec, TrainConfig(seed=99))
    worse = make_bundle(case, untrained_tt, untrained_rk, "untrained")
    second = register_bundle(settings, worse, run_name="worse")
    assert alias_version(settings, CHALLENGER) == second.version
    refused = promote(settings, case.train, holdout, why="should fail", who="ci",
                      baselines=baselines)
    assert not refused.promoted and refused.reasons
    assert any("popularity/recall@50" in r for r in refused.reasons), refused.reasons
    assert alias_version(settings, CHAMPION) == first.version
    assert load_alias(settings, CHAMPION).version == good.version

    uri = settings.mlflow_tracking_uri
    client = MlflowClient(uri, registry_uri=uri)
    tags_first = client.get_model_version(settings.mlflow.model_name, first.version).tags
    assert tags_first["promoted_by"] == "ci" and tags_first["promotion_reason"] == "first model"
    assert tags_first["gate.decision"] == "promoted"
    tags_second = client.get_model_version(settings.mlflow.model_name, second.version).tags
    assert tags_second["gate.decision"] == "refused"
    assert json.loads(tags_second["gate.what"])["previous_champion"] == first.version
    # The tuned baselines on the same holdout: in the gate's tags, the card and the run.
    shown = json.loads(tags_first["gate.baselines"])
    assert shown["ease/recall@50"] == pytest.approx(decision.challenger_metrics["ease/recall@50"])
    assert "als/recall@50" in shown and "final/recall@50_vs_ease" in shown
    card = client.get_model_version(settings.mlflow.model_name, first.version).description
    assert "| EASE | ALS |" in card and "Baselines on the same holdout (not gated)" in card
    run = client.get_run(first.run_id)
    assert run.data.params["baseline/ease_lambda"] == str(baselines.info["baseline/ease_lambda"])
    assert "final/recall_at_50_vs_als" in run.data.metrics
    assert run.data.metrics["two_tower/recall_at_50"] == pytest.approx(
        report.metrics["two_tower/recall@50"])
    artifacts = {a.path for a in client.list_artifacts(first.run_id, "plots")}
    assert "plots/recall_at_k.png" in artifacts
    listed = list_versions(settings)
    assert list(listed["version"]) == [second.version, first.version]
    assert "champion" in listed.iloc[1]["aliases"]
