"""The Optuna study loop on a known synthetic objective: the optimum is found, a stopped study
resumes where it stopped, failed trials are recorded and the study goes on, the batch order
makes a run reproducible, several objectives give a Pareto front."""

import pytest
from optuna.trial import TrialState

from engine.tune.space import parse_space
from engine.tune.study import best_trial, open_study, run_tune, trials_table


def space():
    return parse_space({"merge_method": "task_arithmetic", "base_model": "b", "models": [
        {"model": "m0", "parameters": {"weight": {"range": [0, 1]}}},
        {"model": "m1", "parameters": {"weight": {"range": [0, 1]}}}]})


def weights_of(recipe):
    return [m["parameters"]["weight"] for m in recipe["models"]]


def quadratic(recipes):
    out = []
    for r in recipes:
        a, b = weights_of(r)
        tasks = {"t0": 1 - (a - 0.7) ** 2, "t1": 1 - (b - 0.2) ** 2}
        out.append({"score": (tasks["t0"] + tasks["t1"]) / 2, "tasks": tasks, "seconds": 0.0})
    return out


@pytest.mark.parametrize("sampler", ["cmaes", "tpe"])
def test_sampler_finds_the_optimum_of_a_known_objective(sampler, tmp_path):
    study, _ = open_study("q", sampler=sampler, seed=0, directions=["maximize"],
                          storage_path=tmp_path / "s.journal")
    result = run_tune(space(), quadratic, study, trials=60, batch_size=1)
    a, b = weights_of(result.best_recipe)
    assert abs(a - 0.7) < 0.1 and abs(b - 0.2) < 0.1
    # the best recipe re-scored gives the best trial's score
    assert quadratic([result.best_recipe])[0]["score"] == pytest.approx(result.best_score)
    # better than the first (random) trial by a margin a broken sampler would not reach
    assert result.best_score > 0.995


def test_study_resumes_and_continues_the_trial_count(tmp_path):
    path = tmp_path / "s.journal"
    study, _ = open_study("r", sampler="tpe", seed=1, directions=["maximize"], storage_path=path)
    run_tune(space(), quadratic, study, trials=4, batch_size=1)
    first = [t.params for t in study.get_trials()]
    again, _ = open_study("r", sampler="tpe", seed=1, directions=["maximize"], storage_path=path)
    result = run_tune(space(), quadratic, again, trials=7, batch_size=1)
    trials = again.get_trials()
    assert [t.number for t in trials] == list(range(7))
    assert [t.params for t in trials[:4]] == first
    assert result.ran == 3
    # nothing left to run: a third call runs no trial
    third, _ = open_study("r", sampler="tpe", seed=1, directions=["maximize"], storage_path=path)
    assert run_tune(space(), quadratic, third, trials=7, batch_size=1).ran == 0


def test_a_trial_left_running_is_marked_failed_on_resume(tmp_path):
    path = tmp_path / "s.journal"
    study, _ = open_study("k", sampler="random", seed=0, directions=["maximize"], storage_path=path)
    study.ask()  # a tune killed mid-trial
    again, _ = open_study("k", sampler="random", seed=0, directions=["maximize"], storage_path=path)
    (trial,) = again.get_trials()
    assert trial.state == TrialState.FAIL
    assert "stopped tune" in trial.user_attrs["error"]


def test_failed_trials_are_recorded_and_the_study_continues(tmp_path):
    calls = []

    def flaky(recipes):
        out = quadratic(recipes)
        calls.append(len(recipes))
        if len(calls) == 2:
            out[0] = {"error": "tune worker 0 died (exit code -9); trial failed"}
        return out

    study, _ = open_study("f", sampler="random", seed=0, directions=["maximize"],
                          storage_path=tmp_path / "s.journal")
    result = run_tune(space(), flaky, study, trials=6, batch_size=2)
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.FAIL) == 1 and states[2] == TrialState.FAIL
    assert result.failed == 1 and len(states) == 6
    rows = trials_table(study, space())
    assert rows[2]["state"] == "FAIL" and "died" in rows[2]["error"]
    assert rows[0]["task:t0"] is not None and rows[0]["models[0].weight"] is not None


def test_same_seed_and_batch_give_the_same_trials(tmp_path):
    runs = []
    for i in range(2):
        study, _ = open_study(f"d{i}", sampler="cmaes", seed=3, directions=["maximize"],
                              storage_path=tmp_path / f"{i}.journal")
        run_tune(space(), quadratic, study, trials=12, batch_size=3)
        runs.append([t.params for t in study.get_trials()])
    assert runs[0] == runs[1]


def test_multi_objective_gives_a_pareto_front(tmp_path):
    study, _ = open_study("m", sampler="tpe", seed=0, directions=["maximize", "maximize"],
                          storage_path=tmp_path / "s.journal")
    result = run_tune(space(), quadratic, study, trials=15, batch_size=1, tasks_order=["t0", "t1"],
                      multi_objective=True)
    front = study.best_trials
    assert front
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    for t in front:  # nobody dominates a front member
        assert not any(all(o >= v for o, v in zip(other.values, t.values)) and other.values != t.values
                       for other in done)
    best = best_trial(study, True)
    assert best in front and result.best_number == best.number
    assert best.user_attrs["score"] == max(t.user_attrs["score"] for t in front)


def test_cmaes_refuses_several_objectives(tmp_path):
    from engine.errors import ParameterError

    with pytest.raises(ParameterError, match="cmaes sampler optimises one objective"):
        open_study("x", sampler="cmaes", seed=0, directions=["maximize", "maximize"],
                   storage_path=tmp_path / "s.journal")
