"""fedpeft.results.sweep: points from a grid and a list, validated first, skipped when done, resumed when cut."""

import json
import re
import textwrap

import pytest
import tomli_w

from fedpeft.config import ConfigError
from fedpeft.results.records import read_rounds
from fedpeft.results.report import make_report
from fedpeft.results.sweep import Sweep, point_status, run_sweep
from tests.conftest import TINY

FAST = TINY | {"train.max-steps": 3}


def _write_sweep(tmp_path, grid, points=(), name="s", base=FAST, engine="inprocess"):
    doc = {
        "sweep": {"name": name, "engine": engine, "results-dir": str(tmp_path / "out")},
        "base": dict(base),
        "grid": grid,
    }
    if points:
        doc["points"] = list(points)
    path = tmp_path / f"{name}.toml"
    path.write_bytes(tomli_w.dumps(doc).encode())
    return path


def test_points_are_the_list_crossed_with_the_grid(tmp_path):
    path = _write_sweep(
        tmp_path,
        {"seed": [0, 1], "codec": {"density": [0.05, 0.1]}},
        [
            {"label": "ans", "codec.compeft.positions": "ans"},
            {"label": "rice", "codec.compeft.positions": "rice"},
        ],
    )
    points = Sweep.load(path).expand()
    assert len(points) == 8
    assert points[0].name == "ans_seed=0_codec.density=0.05"
    assert points[0].varied == {"codec.compeft.positions": "ans", "seed": 0, "codec.density": 0.05}
    assert (
        points[-1].overrides["codec.compeft.positions"] == "rice" and points[-1].overrides["num-clients"] == 3
    )


def test_sweep_files_are_checked_with_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['job'\] in \[sweep\]"):
        bad = tmp_path / "a.toml"
        bad.write_text("[sweep]\njob = 2\n[grid]\nseed = [0]\n")
        Sweep.load(bad)
    with pytest.raises(ConfigError, match="must be a non-empty list"):
        Sweep.load(_write_sweep(tmp_path, {"seed": 3}, name="b"))
    with pytest.raises(ConfigError, match="share a folder name"):
        Sweep.load(_write_sweep(tmp_path, {"seed": [0]}, [{"lora.r": 4}, {"lora.r": 4}], name="c")).expand()
    with pytest.raises(ConfigError, match="set by the sweep itself"):
        Sweep.load(_write_sweep(tmp_path, {"run-name": ["x"]}, name="d"))


def test_every_point_is_validated_before_any_runs(tmp_path):
    path = _write_sweep(tmp_path, {"lora.r": [4, 8], "codec.densty": [0.1]})
    calls = []
    with pytest.raises(ConfigError, match="point 'lora.r=4_codec.densty=0.1'.*did you mean 'codec.density'"):
        run_sweep(Sweep.load(path), runner=calls.append)
    assert calls == []


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """A real (in-process) sweep: dense and ComPEFT, two seeds each."""
    tmp = tmp_path_factory.mktemp("sweep")
    path = _write_sweep(
        tmp,
        {"seed": [0, 1]},
        [{"label": "dense", "codec.name": "none"}, {"label": "compeft", "codec.name": "compeft"}],
    )
    lines = []
    manifest = run_sweep(Sweep.load(path), echo=lines.append)
    return path, manifest, lines


def test_a_sweep_runs_every_point_and_lists_them(finished_sweep):
    path, manifest, _ = finished_sweep
    sweep = Sweep.load(path)
    assert sorted(manifest["points"]) == sorted(p.name for p in sweep.expand())
    assert all(e["status"] == "done" for e in manifest["points"].values())
    assert json.loads((sweep.folder / "sweep.json").read_text())["points"] == manifest["points"]
    for point in sweep.expand():
        rounds = read_rounds(sweep.folder / point.name)
        assert [r["round"] for r in rounds] == [0, 1, 2]
        saved = json.loads((sweep.folder / point.name / "config.json").read_text())
        assert saved["seed"] == point.varied["seed"] and saved["codec.name"] == point.varied["codec.name"]


def test_a_rerun_skips_finished_points(finished_sweep):
    path, _, _ = finished_sweep
    calls, lines = [], []
    manifest = run_sweep(Sweep.load(path), runner=calls.append, echo=lines.append)
    assert calls == [] and all(e["status"] == "done" for e in manifest["points"].values())
    assert sum("done already, skipped" in line for line in lines) == 4


def test_a_changed_config_is_not_mistaken_for_finished_results(finished_sweep):
    path, _, _ = finished_sweep
    sweep = Sweep.load(path)
    point, cfg, _ = sweep.resolve()[0]
    assert point_status(sweep.folder / point.name, cfg) == "done"
    changed = Sweep(
        sweep.name,
        sweep.base | {"train.learning-rate": 0.1},
        sweep.grid,
        sweep.points,
        sweep.results_dir,
        "inprocess",
    )
    point, cfg, _ = changed.resolve()[0]
    with pytest.raises(ConfigError, match=r"another config \(keys \['train.learning-rate'\]\)"):
        point_status(changed.folder / point.name, cfg)


def test_report_over_the_sweep_groups_seeds(finished_sweep, tmp_path):
    path, _, _ = finished_sweep
    rep = make_report([Sweep.load(path).folder], tmp_path / "rep", target=0.0)
    assert [g.label for g in rep.groups] == ["codec.name=compeft", "codec.name=none"]
    assert all(len(g.runs) == 2 for g in rep.groups)
    compeft, dense = rep.groups
    assert compeft.stat("compression_ratio")[0] > 10 and dense.stat("compression_ratio")[0] == 1.0
    assert compeft.stat("bytes_up")[0] < dense.stat("bytes_up")[0] / 10
    assert compeft.stat("rounds_to_target")[0] == 1.0  # target 0: reached in the first trained round
    for f in rep.files.values():
        assert f.stat().st_size > 0, f
    assert "| codec.name=none | 2 |" in rep.markdown


def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path, monkeypatch):
    from fedpeft.recovery import checkpoint

    path = _write_sweep(tmp_path, {"seed": [0, 1]}, name="cut")
    sweep = Sweep.load(path)
    original = checkpoint.Checkpoint.save

    def save_then_stop(self, run_dir):
        original(self, run_dir)
        if run_dir.name == "seed=1" and self.round == 1:
            raise KeyboardInterrupt  # as a Ctrl-C right after round 1 of the second point

    monkeypatch.setattr(checkpoint.Checkpoint, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, echo=lambda _: None)
    monkeypatch.setattr(checkpoint.Checkpoint, "save", original)
    statuses = {p.name: point_status(sweep.folder / p.name, cfg) for p, cfg, _ in sweep.resolve()}
    assert statuses == {"seed=0": "done", "seed=1": "partial"}

    lines = []
    manifest = run_sweep(sweep, echo=lines.append)
    assert "sweep cut: seed=0: done already, skipped" in lines
    assert any(line.startswith("sweep cut: resuming seed=1") for line in lines)
    assert all(e["status"] == "done" for e in manifest["points"].values())
    assert [r["round"] for r in read_rounds(sweep.folder / "seed=1")] == [0, 1, 2]


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    path = _write_sweep(tmp_path, {"lora.r": [2, 4]}, name="f")

    def runner(overrides):
        if overrides["lora.r"] == 2:
            raise RuntimeError("out of memory")
        return tmp_path

    manifest = run_sweep(Sweep.load(path), runner=runner, echo=lambda _: None)
    assert manifest["points"]["lora.r=2"] == {
        "status": "failed",
        "varied": {"lora.r": 2},
        "error": "RuntimeError: out of memory",
    }
    assert manifest["points"]["lora.r=4"]["status"] == "done"


def test_sweep_file_format_in_the_docstring_is_valid(tmp_path):
    import fedpeft.results.sweep as mod

    doc = mod.__doc__.split("is TOML::")[1].split("Every point")[0]
    path = tmp_path / "doc.toml"
    path.write_text(textwrap.dedent(doc).replace('"../compeft.toml"', '"compeft.toml"'))
    (tmp_path / "compeft.toml").write_text('[codec]\nname = "compeft"\n')
    assert len(Sweep.load(path).expand()) == 9


def test_parallel_points_run_as_separate_fedpeft_processes(tmp_path):
    path = _write_sweep(tmp_path, {"seed": [0, 1]}, name="par", base=FAST | {"num-rounds": 1})
    manifest = run_sweep(Sweep.load(path), jobs=2, echo=lambda _: None)
    assert all(e["status"] == "done" for e in manifest["points"].values()), manifest
    folder = Sweep.load(path).folder
    assert all([r["round"] for r in read_rounds(folder / f"seed={s}")] == [0, 1] for s in (0, 1))


def test_the_readme_sweep_example_is_valid(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```toml\n(.*?)```", readme, flags=re.S) if "[sweep]" in b]
    path = tmp_path / "density.toml"
    path.write_text(block)
    sweep = Sweep.load(path)
    assert len(sweep.resolve()) == 9 and sweep.engine == "ray"


def test_a_folder_written_before_a_key_existed_counts_it_at_its_default(tmp_path):
    import json

    from fedpeft.config import RunConfig
    from fedpeft.results.sweep import point_status

    cfg = RunConfig.from_run_config({"results-dir": str(tmp_path), "run-name": "old"})
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    saved = json.loads(json.dumps(cfg.to_run_config(), default=str))
    del saved["task.name"]  # written before the task key existed
    (run_dir / "config.json").write_text(json.dumps(saved))
    assert point_status(run_dir, cfg) == "new"  # no clash: the old run used the default task
