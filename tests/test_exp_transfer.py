"""exp_transfer.py end to end through subprocess: P1 Table 3 (evaluate and retrain modes) and P2 Table 10's
offline substitute at smoke scale, the ImageNet path's missing-data message, models shared with
exp_corruption.py through the checkpoint cache, --plot-only, and one-line errors."""
import json
import pathlib
import subprocess

from PIL import Image

from emulated_cuda import command

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(*args, script="exp_transfer.py", gpu=False):  # no fixed time limit: a slow machine is not a failure
    return subprocess.run(command(script, *args, gpu=gpu), cwd=ROOT, capture_output=True, text=True)


def test_p1_t3_smoke_scores_every_cell_and_redraws(tmp_path):
    out = tmp_path / "t3"
    r = run("--preset", "smoke", "--artifact", "p1_t3", "--norm", "none", "bn", "gn", "--epochs", "2", "--lr", "0.05",
            "--out", out, gpu=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    recs = res["records"]
    assert "Extraction: 2 per class of the train set" in (out / "table.md").read_text()  # P1 App. B.3: from D
    assert {(x["training"], x["source"], x["target"]) for x in recs} == {
        (t, s, g) for t in ("standard", "adversarial") for s in ("none", "bn", "gn") for g in ("none", "bn", "gn")}
    assert all(x["diagonal"] == (x["source"] == x["target"]) for x in recs)
    assert all(0 <= x["score"] <= 1 for x in recs if x["status"] == "ok")
    assert "extracted 20 images (3 steps of 0.5)" in r.stdout
    assert any(x["status"] == "ok" for x in recs)
    declared = {"t3_robust_sources", "t3_none_best_bn", "t3_none_best_gn"}  # no IN here: its claims are not run
    assert res["claims"] and {c["id"] for c in res["claims"]} <= declared
    assert all(c["verdict"] == "inconclusive" for c in res["claims"])  # one seed
    table = (out / "table.md").read_text()
    assert "**standard training**" in table and "**adversarial training**" in table and " * |" in table
    (out / "table.md").unlink()
    r = run("--plot-only", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "table.md").read_text() == table


def test_p1_t3_retrain_mode_trains_each_target_on_the_extracted_images(tmp_path):
    out = tmp_path / "rt"
    r = run("--preset", "smoke", "--artifact", "p1_t3", "--mode", "retrain", "--norm", "bn", "--epochs", "2",
            "--lr", "0.05", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = json.loads((out / "results.json").read_text())["records"]
    assert len(recs) == 2 and all(x["mode"] == "retrain" for x in recs)
    assert r.stdout.count("[retrain bn on ") >= 2  # one training per (training type, source, target)
    assert "test accuracy of the target retrained" in (out / "table.md").read_text()


def test_p2_t10_substitute_and_the_imagenet_message(tmp_path):
    (tmp_path / "imagenet" / "val" / "n01440764").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(tmp_path / "imagenet" / "val" / "n01440764" / "a.JPEG")
    (tmp_path / "weights").mkdir()
    r = run("--preset", "smoke", "--artifact", "p2_t10", "--imagenet-root", tmp_path / "imagenet", "--weights-dir",
            tmp_path / "weights", "--arch", "vgg11", "--out", tmp_path / "x")  # asked for ImageNet: no silent fallback
    assert r.returncode != 0 and "vgg11-8a719046.pth: missing" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    out = tmp_path / "t10"
    r = run("--preset", "smoke", "--artifact", "p2_t10", "--arch", "vgg11", "vgg13", "--epochs", "2", "--lr", "0.05",
            "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    said = [line for line in r.stdout.splitlines() if "ImageNet skipped" in line]
    assert len(said) == 1 and "no --imagenet-root and --weights-dir given" in said[0] and "substitute" in said[0]
    recs = json.loads((out / "results.json").read_text())["records"]
    assert {(x["source"], x["target"]) for x in recs} == {(s, t) for s in ("vgg11", "vgg11_bn")
                                                          for t in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn")}
    assert all(x["setting"] == "substitute" for x in recs) and any(x["status"] == "ok" for x in recs)
    for x in recs:
        if x["status"] == "ok":
            assert 0 <= x["top1"] <= x["top5"] <= 1 and x["diagonal"] == (x["source"] == x["target"])
    table = (out / "table.md").read_text()
    assert "SUBSTITUTE" in table and "**top1**" in table and "**top5**" in table


def test_models_trained_by_exp_corruption_are_reused(tmp_path):
    cache = tmp_path / "cache"
    shared = ["--preset", "smoke", "--arch", "vgg8", "--norm", "bn", "--epochs", "2", "--size", "16", "--adv-steps", "2",
              "--adv-step-size", "0.1", "--cache", cache]
    r = run(*shared, "--artifact", "fig1", "--seeds", "1", "--corruptions", "fog", "--severities", "1",
            "--out", tmp_path / "c", script="exp_corruption.py")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(*shared, "--artifact", "p1_t3", "--out", tmp_path / "t")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("resumed from") == 2 and "epoch   1/2" not in r.stdout  # both models from the cache


def test_bad_input_is_one_clear_line(tmp_path):
    for extra, message in [(["--arch", "resnet18"], "expected VGGs"),
                           (["--artifact", "p2_t10", "--arch", "vgg13"], "source is VGG11"),
                           (["--eps", "0"], "--eps 0.0: expected a finite number > 0")]:
        r = run("--preset", "smoke", *extra, "--out", tmp_path / "o")
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (extra, r.stderr)
