"""The report's arithmetic on constructed models (codistill.analysis, codistill.claims): the reported step is
chosen on validation and measured on test, intervals resample rows and seeds, the controls (ensemble,
calibration) and the sweep's B* do what they say, and every workload's row terms agree with its metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from codistill.analysis import Bootstrap, Condition, EvalSplit, Model, Unit, calibrated_model, ensemble_model, steps_to
from codistill.claims import find_b_star
from training.metrics import validation_half
from training.workloads import workload_for

CRITEO = workload_for("criteo")


def split(n: int = 400, truth=None) -> EvalSplit:
    keys = np.array([f"train-00000-of-00001.txt:{i + 1}".encode() for i in range(n)])
    return EvalSplit.of(CRITEO, keys, truth)


def model(name: str, steps, probs: list[np.ndarray], labels: np.ndarray) -> Model:
    return Model(name, np.array(steps), lambda i: {"prob": probs[i].astype(np.float32), "label": labels}, None)


def condition(name: str, models: list[Model]) -> Condition:
    return Condition(name, [Unit(seed, [m]) for seed, m in enumerate(models)])


def test_the_halves_are_a_fixed_keyed_hash_and_about_even():
    context = split(4000)
    assert 0.45 < context.validation.mean() < 0.55
    assert np.array_equal(context.validation, validation_half(context.keys))  # the same halves every time


def test_the_reported_step_is_best_on_validation_and_measured_on_test():
    context = split()
    labels = np.ones(400, np.float32)
    val = context.validation
    # Validation is best at step 20 (0.9), test at step 30 (0.95): the report must take 20 and its test 0.6.
    probs = [np.where(val, v, t) for v, t in ((0.5, 0.5), (0.9, 0.6), (0.6, 0.95))]
    m = model("m", [10, 20, 30], probs, labels)
    assert m.selected(context) == 1
    np.testing.assert_allclose(m.curve(context, "test"), -np.log([0.5, 0.6, 0.95]), rtol=1e-6)
    figure = Bootstrap(context, replicates=50).figure(condition("c", [m, m]), "loss")
    assert figure[0] == pytest.approx(-math.log(0.6), rel=1e-6)
    assert np.allclose(figure, figure[0])  # every row has the same loss: resampling cannot move it


def test_seeds_are_resampled_and_churn_compares_seed_pairs():
    context = split()
    labels = np.ones(400, np.float32)
    low, high = (model(f"s{s}", [10], [np.full(400, p)], labels) for s, p in enumerate((0.8, 0.4)))
    figure = Bootstrap(context, replicates=400).figure(condition("c", [low, high]), "loss")
    assert figure[0] == pytest.approx((-math.log(0.8) - math.log(0.4)) / 2, rel=1e-6)
    # A replicate draws seed (0, 0), (1, 1) or a mix: the interval reaches both seeds' losses.
    assert figure[1:].min() == pytest.approx(-math.log(0.8), rel=1e-6)
    assert figure[1:].max() == pytest.approx(-math.log(0.4), rel=1e-6)
    churn = Bootstrap(context, replicates=20).figure(condition("c", [low, high]), "churn")
    assert churn == pytest.approx(np.full(21, 0.4))  # |0.8 - 0.4| on every row


def test_excess_subtracts_the_floor_of_the_same_rows_when_the_generator_knows_the_truth():
    truth = np.linspace(0.1, 0.9, 400)
    context = split(truth=truth)
    labels = (np.arange(400) % 2).astype(np.float32)
    m = model("m", [10], [truth.copy()], labels)
    boot = Bootstrap(context, replicates=30)
    excess = boot.figure(condition("c", [m, m]), "excess")
    loss, floor = boot.figure(condition("c", [m, m]), "loss"), boot.figure(condition("c", [m, m]), "floor")
    np.testing.assert_allclose(excess, loss - floor)
    assert boot.figure(condition("c", [m, m]), "truth_gap")[0] == pytest.approx(0.0, abs=1e-6)


def test_calibration_recovers_the_temperature_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    n = 20_000
    logits = rng.normal(0, 1.5, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    context = split(n)
    overconfident = model("m", [10], [1 / (1 + np.exp(-3 * logits))], labels)
    calibrated = calibrated_model(overconfident, context)
    assert "temperature" in calibrated.note
    temperature = float(calibrated.note.split()[1])
    assert 2.7 < temperature < 3.3
    assert calibrated.curve(context, "test")[0] < overconfident.curve(context, "test")[0]


def test_an_ensemble_averages_the_members_probabilities_at_every_shared_step():
    context = split()
    labels = np.zeros(400, np.float32)
    a = model("a", [10, 20], [np.full(400, 0.2), np.full(400, 0.4)], labels)
    b = model("b", [10, 20, 30], [np.full(400, 0.6), np.full(400, 0.2), np.full(400, 0.1)], labels)
    ensemble = ensemble_model("e", [a, b], CRITEO)
    assert ensemble.steps.tolist() == [10, 20]
    np.testing.assert_allclose(ensemble.load(0)["prob"], 0.4)
    np.testing.assert_allclose(ensemble.curve(context, "test"), -np.log([0.6, 0.7]), rtol=1e-6)


def test_steps_to_target_interpolates_says_before_the_first_eval_and_never():
    steps = np.array([10, 20, 30])
    curve = np.array([0.5, 0.3, 0.1])
    assert steps_to(steps, curve, 0.4) == pytest.approx(15.0)
    assert steps_to(steps, curve, 0.6) == 10.0  # reached at (or before) the first eval
    assert math.isnan(steps_to(steps, curve, 0.05))


def test_b_star_is_the_first_batch_whose_doubling_stops_paying():
    steps = np.array([100, 200, 300, 400])
    curves = [(steps, np.array(c)) for c in ([0.9, 0.7, 0.5, 0.4],  # B: the sweep target is its final 0.4
                                             [0.9, 0.5, 0.4, 0.3],  # 2B: 300 steps (0.75x)
                                             [0.7, 0.3, 0.3, 0.3],  # 4B: 175 (0.58x)
                                             [0.65, 0.3, 0.3, 0.3])]  # 8B: ~171 (0.98x): 4B is B*
    target, to_target, stop = find_b_star(curves, stop_ratio=0.85)
    assert target == 0.4 and to_target[0] == 400 and to_target[1] == 300
    assert stop == 2
    _, _, none = find_b_star(curves[:3], stop_ratio=0.8)
    assert none is None  # 2B pays at every batch of a shorter sweep


def test_row_terms_give_each_workloads_eval_loss():
    from codistill.dataset import DatasetManifest

    rng = np.random.default_rng(1)
    manifest = DatasetManifest("x", "tfrecord", {}, 1, (), (), {}, {})
    criteo = {"prob": rng.random(50).astype(np.float32), "label": (rng.random(50) < 0.3).astype(np.float32)}
    imagenet_rows = {"nll": rng.random(50).astype(np.float32), "label": rng.integers(0, 5, 50),
                     "top1": rng.integers(0, 5, 50), "top5": rng.integers(0, 5, (50, 5)),
                     "top5_prob": rng.random((50, 5)).astype(np.float32)}
    lm_rows = {"nll": rng.random(50) * 30, "tokens": rng.integers(1, 32, 50), "text_bytes": rng.integers(1, 90, 50),
               "argmax": rng.integers(-1, 9, (50, 32)).astype(np.int32)}
    for name, rows in (("criteo", criteo), ("imagenet", imagenet_rows), ("commoncrawl", lm_rows)):
        workload = workload_for(name)
        numerator, denominator = workload.row_terms(rows)["loss"]
        assert numerator.sum() / denominator.sum() == pytest.approx(workload.eval_metrics(rows, manifest)["loss"])


def test_imagenet_and_lm_ensembles_average_the_labels_probability_exactly():
    nll_a, nll_b = np.array([0.1, 2.0]), np.array([1.0, 0.5])
    imagenet = workload_for("imagenet")
    member = {"nll": nll_a, "label": np.array([1, 2]), "top1": np.array([1, 0]), "top5": np.array([[1, 0], [0, 2]]),
              "top5_prob": np.array([[0.9, 0.1], [0.8, 0.13]])}
    other = member | {"nll": nll_b, "top1": np.array([2, 2]), "top5": np.array([[2, 1], [2, 0]]),
                      "top5_prob": np.array([[0.5, 0.3], [0.6, 0.3]])}
    ensemble = imagenet.ensemble([member, other])
    np.testing.assert_allclose(ensemble["nll"], -np.log((np.exp(-nll_a) + np.exp(-nll_b)) / 2), rtol=1e-6)
    assert ensemble["top1"].tolist() == [1, 0]  # row 0: class 1 averages 0.6; row 1: class 0 0.55 (class 2 0.365)
    lm = workload_for("commoncrawl")
    rows = {"argmax": np.array([[3, -1]]), "target_logprob": np.array([[-1.0, 0.0]]), "nll": np.array([1.0]),
            "tokens": np.array([1]), "text_bytes": np.array([4])}
    ensemble = lm.ensemble([rows, rows | {"target_logprob": np.array([[-3.0, 0.0]]), "nll": np.array([3.0])}])
    assert ensemble["nll"][0] == pytest.approx(-math.log((math.exp(-1) + math.exp(-3)) / 2))


def sweep_results(tmp_path, cod_curve: list[float], delta: float):
    """A 3-point sweep (batches 64, 128, 256) of constructed runs: every sync model's rows have probability
    p(step) +- delta (seed 0 +delta on even rows, seed 1 on odd: their ensemble is better), codistillation p."""
    import yaml

    from codistill.claims import Results
    from codistill.plans import load_plan

    sync = ["codistill.enabled=false", "train.groups=[0]", "train.reads=union"]
    plan = {"name": "sweep", "base": "criteo-datalimited", "seeds": [0, 1], "runs_dir": str(tmp_path),
            "conditions": [{"name": f"sync-{b}", "sets": sync + [f"deepspeed.micro_batch_size={b}"]}
                           for b in (64, 128, 256)] + [{"name": "cod-128", "sets": ["deepspeed.micro_batch_size=128"]}],
            "sweep": {"points": [{"sync": "sync-64"}, {"sync": "sync-128", "codistill": "cod-128"},
                                 {"sync": "sync-256"}]}}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    plan = load_plan(str(tmp_path / "plan.yaml"))
    context = split(2000)
    steps, labels = [100, 200, 300, 400], np.ones(2000, np.float32)
    sign = np.where(np.arange(2000) % 2 == 0, 1.0, -1.0)

    def sync_condition(name, curve):
        models = [model(f"{name}/{s}", steps, [np.full(2000, p) + d * delta * sign for p in curve], labels)
                  for s, d in ((0, 1), (1, -1))]
        return condition(name, models)

    conditions = {"sync-64": sync_condition("sync-64", [0.5, 0.6, 0.7, 0.75]),
                  "sync-128": sync_condition("sync-128", [0.5, 0.78, 0.79, 0.8]),
                  "sync-256": sync_condition("sync-256", [0.56, 0.66, 0.73, 0.81]),
                  "cod-128": Condition("cod-128", [Unit(s, [model("c", steps, [np.full(2000, p) for p in cod_curve],
                                                                  labels)] * 2) for s in (0, 1)])}
    return Results(plan, context, conditions, Bootstrap(context, replicates=100))


def test_claim1_holds_when_codistillation_reaches_t_star_early_and_the_ensemble_can(tmp_path):
    from codistill.claims import _claim1_row

    results = sweep_results(tmp_path, cod_curve=[0.6, 0.8, 0.85, 0.86], delta=0.18)
    t_star = float(np.mean([m.curve(results.context, "validation")[-1]
                            for u in results.conditions["sync-128"].units for m in u.models]))
    row = _claim1_row(results, {"b_star_index": 1, "t_star": t_star, "b_star": 128})
    assert row.verdict == "holds", row
    # T* = the sync models' mean loss at N (p 0.98 and 0.62: 0.249) is crossed at step ~191 of 400; the ensemble
    # (p 0.78 at step 200) reaches it by 0.6N, so the claim can be tested.
    assert row.estimate.value == pytest.approx(191 / 400, abs=0.01)
    assert row.estimate.low <= row.estimate.value <= row.estimate.high


def test_claim1_is_untestable_when_even_the_ensemble_cannot_reach_t_star_early(tmp_path):
    from codistill.claims import _claim1_row

    results = sweep_results(tmp_path, cod_curve=[0.6, 0.8, 0.85, 0.86], delta=0.0)  # an ensemble gains nothing
    t_star = float(results.conditions["sync-128"].units[0].models[0].curve(results.context, "validation")[-1])
    row = _claim1_row(results, {"b_star_index": 1, "t_star": t_star, "b_star": 128})
    assert row.verdict == "untestable at this scale" and row.estimate is None


def test_a_codistillation_condition_without_peers_shows_its_coverage():
    """No step had a peer, so there is no staleness: the coverage (0%) must still show, or the condition reads as
    codistilled."""
    from codistill.claims import Results, describe_setup

    facts = {"staleness_mean": math.nan, "staleness_max": None, "coverage": 0.0, "passes": 1.0}
    results = Results(plan=None, context=None, bootstrap=None,
                      conditions={"codistill": Condition("codistill", [Unit(0, [], dict(facts))]),
                                  "baseline": Condition("baseline", [Unit(0, [], facts | {"coverage": None})])})
    assert describe_setup(results, "codistill") == "codistill [peers on 0% of steps]"
    assert describe_setup(results, "baseline") == "baseline"
