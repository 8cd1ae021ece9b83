"""What a user sees, in a real browser (Debian's headless `chromium`): the HTML report, the
optuna-dashboard study and trial pages, and the MLflow experiment and trial-run pages of a small
study tracked on a real MLflow server. Screenshots land in artifacts/browser/ (CI keeps them)."""

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest

from tests.conftest import IN_CI, ROOT, free_port

SHOTS = ROOT / "artifacts" / "browser"
SPACE = """
fixed: {optimizer: sgdm, epochs: 3, dataset: digits, augment: none}
params:
  lr: {type: float, low: 1.0e-3, high: 0.1, log: true}
  batch_size: {type: categorical, choices: [32, 64]}
"""


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if IN_CI:
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium")
        pytest.skip("chromium not found (apt-get install chromium)")
    return found


def render(url: str, name: str) -> str:
    """The page's DOM after its scripts ran, and a screenshot of it as SHOTS/NAME.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    base = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--window-size=1500,1000", "--virtual-time-budget=20000",
            f"--user-data-dir={SHOTS / '.profile'}"]
    subprocess.run([*base, f"--screenshot={SHOTS / name}.png", url], capture_output=True,
                   timeout=180)
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    (SHOTS / f"{name}.html").write_text(dom.stdout)
    return dom.stdout


@pytest.fixture(scope="module")
def tracked_study(mlflow_server, tmp_path_factory):
    """A 4-trial study on digits tracked on the MLflow server, and optuna-dashboard serving it."""
    _chromium()
    work = tmp_path_factory.mktemp("browser")
    (work / "b.yaml").write_text(SPACE)
    r = subprocess.run([sys.executable, "-m", "search", "run", "--space", "b.yaml",
                        "--mlflow-uri", mlflow_server, "--n-trials", "4", "--seed", "0",
                        "--pruner-startup-trials", "1"], cwd=work, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    port = free_port()
    dash = subprocess.Popen([sys.executable, "-m", "search", "dashboard", "--port", str(port)],
                            cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/studies", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(work / "search-journal.log")))
    yield work, url, optuna.load_study(study_name="b", storage=storage)
    dash.terminate()
    dash.wait(timeout=30)


def test_the_report_renders_its_tables_and_plots(tracked_study):
    work, _, study = tracked_study
    r = subprocess.run([sys.executable, "-m", "search", "report", "--study", "b", "-o",
                        "report.html"], cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    dom = render((work / "report.html").as_uri(), "report")
    assert "<table>" in dom and "| Test #" not in dom  # an HTML table, not Markdown in a box
    for t in study.trials:
        assert f">#{t.number}</a>" in dom  # each row links to its MLflow run
    assert dom.count('class="main-svg"') >= 3  # plotly drew the figures
    assert "<em>Measured on digits, not CIFAR-100.</em>" in dom


def test_the_dashboard_shows_val_acc_and_links_each_trial_to_mlflow(tracked_study):
    _, url, study = tracked_study
    dom = render(f"{url}/dashboard/studies/{study._study_id}", "dashboard-study")
    assert "val_acc" in dom and "Objective 0" not in dom
    dom = render(f"{url}/dashboard/studies/{study._study_id}/trials", "dashboard-trials")
    first = study.trials[0].user_attrs["mlflow_run_id"]
    assert f"/runs/{first}?workflowType=machine_learning" in dom  # the trial note's link


def test_mlflow_opens_on_the_runs_table_with_nested_trials_and_datasets(tracked_study,
                                                                        mlflow_server):
    _, _, study = tracked_study
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(mlflow_server).get_experiment_by_name("b")
    dom = render(f"{mlflow_server}/#/experiments/{exp.experiment_id}"
                 "?workflowType=machine_learning", "mlflow-experiment")
    assert "Token Usage" not in dom  # not the GenAI overview
    assert "Run Name" in dom and f"{len(study.trials) + 1}</strong> matching runs" in dom
    child = study.trials[0].user_attrs["mlflow_run_id"]
    dom = render(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{child}"
                 "?workflowType=machine_learning", "mlflow-trial-run")
    assert "trial-0" in dom and "digits" in dom  # its name and its dataset input
    assert "Parent run" in dom and ">b<" in dom  # nested under the study's run
    # a pruned trial's run says so first thing in its name (both end "Finished")
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "seed 0 prunes some of these 3-epoch trials"
    t = pruned[0]
    dom = render(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/"
                 f"{t.user_attrs['mlflow_run_id']}?workflowType=machine_learning",
                 "mlflow-pruned-run")
    name = f"pruned@{max(t.intermediate_values)} · trial-{t.number}"
    assert name in dom or name.replace("·", "&middot;") in dom
