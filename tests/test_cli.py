"""Bad input and resumed runs (every script): one clear error line, nothing created on a failed start,
--resume keeps the saved configuration, --plot-only only redraws its own script's runs."""
import importlib
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem for p in ROOT.glob("exp_*.py"))


def run(script, *args):
    return subprocess.run([sys.executable, f"{script}.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def parser_of(script, monkeypatch):
    """The script's argparse parser (captured from its get_args)."""
    mod = importlib.import_module(script)
    got = []
    real = mod.parse_with_presets
    monkeypatch.setattr(mod, "parse_with_presets", lambda p, resolve, argv=None: got.append(p) or real(p, resolve, argv))
    mod.get_args(["--plot-only", "unused"])
    return mod, got[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_rejects_nonsense_in_one_line(script, monkeypatch, capsys, tmp_path):
    mod, parser = parser_of(script, monkeypatch)
    numeric = [a for a in parser._actions if a.type in (int, float) and a.option_strings]
    assert numeric
    accepted = []
    for a in numeric:
        for bad in (["-1", "abc"] if a.type is int else ["-1", "nan", "inf", "abc"]):
            if a.option_strings[0] == "--max-seed-tries" and bad == "-1":
                continue  # checked against --seeds below
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                mod.get_args(["--preset", "smoke", "--out", str(tmp_path / "never"), a.option_strings[0], bad])
                accepted.append((a.option_strings[0], bad))
                raise SystemExit(0)
            if e.value.code == 0:
                continue
            err = capsys.readouterr().err.strip().splitlines()
            assert e.value.code == 2 and len(err) == 1 and a.option_strings[0].lstrip("-").split("-")[0] in err[0], err
    assert not accepted, f"accepted without error: {accepted}"
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_choices_are_one_line(script):
    r = run(script, "--preset", "bogus")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "bogus" in r.stderr


def test_failed_start_leaves_nothing_and_the_corrected_rerun_works(tmp_path):
    out = tmp_path / "R"
    r = run("exp_table1", "--preset", "smoke", "--dataset", "mnist", "--data-root", tmp_path / "nonexist", "--out", out)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "mnist" in r.stderr and not out.exists()
    r = run("exp_table1", "--preset", "smoke", "--arch", "vgg12", "--out", out)
    assert r.returncode == 1 and "unknown arch 'vgg12'" in r.stderr and not out.exists()
    r = run("exp_table1", "--preset", "smoke", "--arch", "vgg8", "--norm", "none", "--epochs", "1", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "log.txt").read_text().count("model 1 of 1 done") == 1  # every run keeps its own log, with progress


def test_resume_takes_the_saved_configuration(tmp_path):
    out = tmp_path / "R"
    r = run("exp_table1", "--preset", "smoke", "--arch", "vgg8", "--norm", "none", "--epochs", "1", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads((out / "config.json").read_text())["args"]
    r = run("exp_table1", "--preset", "smoke", "--arch", "vgg8", "--norm", "none", "bn", "--epochs", "3",
            "--resume", "--out", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "contradicts the run being resumed" in r.stderr
    first = json.loads((out / "config.json").read_text())
    r = run("exp_table1", "--resume", "--out", out)  # no other flag: the run's own configuration, not the paper preset
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["args"] == saved | dict(resume=True)
    assert cfg["argv"] == first["argv"] and cfg["time"] == first["time"]  # the command that made the run is kept
    assert [c["argv"][1:] for c in cfg["resumed"]] == [["--resume", "--out", str(out)]]
    r = run("exp_ligs_trend", "--resume", "--out", out)
    assert r.returncode == 2 and "made by exp_table1.py" in r.stderr


def test_plot_only_refuses_another_scripts_run(tmp_path):
    out = tmp_path / "R"
    r = run("exp_table1", "--preset", "smoke", "--arch", "vgg8", "--norm", "none", "--epochs", "1", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (out / "table.md").read_text()
    r = run("exp_spheres", "--plot-only", out)  # one script end to end: one error line
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "made by exp_table1.py" in r.stderr
    import common
    for script in SCRIPTS:  # every other one in this process (a process per script costs ~3 s of imports)
        if script not in ("exp_table1", "exp_spheres"):
            mod = importlib.import_module(script)
            with pytest.raises((common.DataError, ValueError), match="made by exp_table1.py") as e:
                mod.main(mod.get_args(["--plot-only", str(out)]))
            assert "\n" not in str(e.value)
    assert (out / "table.md").read_text() == table  # nothing overwritten


def test_negative_bim_step_is_refused_before_any_work():
    r = run("exp_input_dim", "--preset", "smoke", "--artifact", "t6", "--bim-step", "-0.04")
    assert r.returncode == 2 and "--bim-step -0.04" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_landscape_norm_that_the_figure_does_not_compare():
    r = run("exp_landscape", "--preset", "smoke", "--artifact", "fig14", "--norm", "fixup")
    assert r.returncode == 2 and "fig14 compares" in r.stderr


def test_sigint_ends_with_a_resume_hint(tmp_path):
    import signal
    from paused import start_paused
    out = tmp_path / "R"
    # Ctrl-C while the sweep is under way: the script pauses after saving its first cell (tests/paused.py)
    p = start_paused("exp_spheres.py", ["--preset", "smoke", "--artifact", "fig8", "--out", out])
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1, (p.returncode, err)
    assert err.strip().splitlines() == [f"interrupted: finished work is kept; continue with --resume --out {out}"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["records"] and saved["finished"] is False  # the finished cells are kept, the run is marked unfinished


def test_checkpoint_cache_is_shared_between_runs_and_keyed_by_the_recipe(tmp_path):
    cache = tmp_path / "cache"
    base = ["--preset", "smoke", "--arch", "vgg8", "--norm", "bn", "--epochs", "1", "--cache", cache]
    r1 = run("exp_table1", *base, "--out", tmp_path / "a")
    r2 = run("exp_table1", *base, "--out", tmp_path / "b")  # same model: taken from the cache, not trained
    r3 = run("exp_table1", *base, "--lr", "0.01", "--out", tmp_path / "c")  # another recipe: trained anew
    assert r1.returncode == r2.returncode == r3.returncode == 0, r1.stderr + r2.stderr + r3.stderr
    assert "epoch   1/1" in r1.stdout and "epoch   1/1" not in r2.stdout and "epoch   1/1" in r3.stdout
    assert len(list(cache.glob("*.pt"))) == 2
    recs = [json.loads((tmp_path / d / "results.json").read_text())["records"][0] for d in "ab"]
    assert recs[0]["acc_pgd_l2"] == recs[1]["acc_pgd_l2"]


@pytest.mark.parametrize("script, args, flag", [
    ("exp_spheres", ["--artifact", "fig8", "--noise-var", "-0.1"], "--noise-var"),
    ("exp_depth_batch", ["--depths", "2", "--batches", "32", "--n-eval", "0"], "--n-eval"),
    ("exp_depth_batch", ["--noise-var", "-0.25"], "--noise-var"),
    ("exp_depth_batch", ["--epoch-scale", "0"], "--epoch-scale"),
    ("exp_table1", ["--eps-l2", "-0.1"], "--eps-l2"),
    ("exp_table1", ["--seeds", "0"], "--seeds"),
    ("exp_table1", ["--width", "0"], "--width"),
    ("exp_input_dim", ["--snapshots", "0", "2", "99"], "--snapshots"),
])
def test_reported_bad_values_fail_at_once_in_one_line(script, args, flag, tmp_path):
    r = run(script, "--preset", "smoke", *args, "--out", tmp_path / "R")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and flag in r.stderr, r.stderr
    assert not (tmp_path / "R").exists() and r.stdout == ""


def test_ligs_trend_cache_reuses_the_model_and_its_per_epoch_history(tmp_path):
    base = ["--preset", "smoke", "--artifact", "fig5", "--lambdas", "0", "--epochs", "1", "--cache", tmp_path / "cache"]
    r1 = run("exp_ligs_trend", *base, "--out", tmp_path / "a")
    r2 = run("exp_ligs_trend", *base, "--out", tmp_path / "b")
    assert r1.returncode == r2.returncode == 0, r1.stderr[-2000:] + r2.stderr[-2000:]
    assert "epoch   1/1" in r1.stdout and "epoch   1/1" not in r2.stdout
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["records"] for d in "ab")
    assert a == b and len(a) == 2  # epoch 0 and epoch 1, measured once


def test_help_defaults_read_as_the_paper_writes_them():
    from common import fmt_default
    assert [fmt_default(v) for v in (1 / 255, 4 / 255, 0.2, 0.6, 0.0, 2.5 * 2.0 / 3, 5e-4, [1, 5])] == \
        ["1/255", "4/255", "0.2", "0.6", "0", "1.667", "0.0005", "1 5"]  # 0.2 is 51/255, but it is not an eps
    out = subprocess.run([sys.executable, "exp_table1.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    text = " ".join(out.split())
    assert "linear LR warm-up (default: 0)" in text  # a zero default is shown (it compared equal to False before)
    assert "(default: False)" not in text and "(default: None)" not in text
