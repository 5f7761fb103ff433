"""Project-level contracts: import hygiene, pinned torch, README test command == CI, documented API."""
import ast
import importlib
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

import common

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_import_common_has_no_side_effects(tmp_path):
    code = ("import os, sys, torch; before = (torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype());"
            "import common; after = (torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype());"
            "assert before == after, (before, after); assert 'torchvision' not in sys.modules;"
            "assert os.listdir('.') == [], os.listdir('.')")
    env_path = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""


def test_no_module_level_torchvision_import():
    # torchvision cannot be imported with the CPU torch on our machines; only lazy imports are allowed.
    for path in ROOT.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "torchvision" for n in names), f"{path.name}:{node.lineno}"


def test_requirements_pin_torch():
    lines = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert "torch==2.13.0" in lines
    assert not any(l.split("=")[0].split(">")[0].strip() == "torchvision" for l in lines)


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^Test command: `([^`]+)`", readme, re.M)
    assert m, "README must state the test command as: Test command: `...`"
    ci = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert m.group(1) in ci


def test_public_api_is_documented_with_paper_sections():
    public = [getattr(common, n) for n in dir(common) if not n.startswith("_")]
    public = [f for f in public if (inspect.isfunction(f) or inspect.isclass(f)) and f.__module__ == "common"]
    assert len(public) > 20
    for f in public:
        assert f.__doc__ and len(f.__doc__.strip()) > 20, f"{f.__name__} has no docstring"
    cites = re.compile(r"\b(P1|P2)\b|DECISIONS\.md")
    for name in ["norm_layer", "make_model", "VGG", "ResNet", "WideResNet", "FixupBasicBlock", "FixupBottleneck",
                 "FixupWideBlock", "MLP", "DeepLinear", "Standardize", "fgsm", "bim", "pgd", "cw_loss", "ligs",
                 "ligs_per_sample", "ligs_penalty"]:
        assert cites.search(getattr(common, name).__doc__), f"{name}'s docstring cites no paper section"


def test_attack_and_ligs_loops_do_not_sync_with_item():
    # .item() inside a K-step loop forces a device sync per step (STYLE adaptation notes)
    for f in (common.pgd, common._objective_grad, common.ce_input_grad, common.ligs_per_sample, common.ligs_penalty):
        assert ".item()" not in inspect.getsource(f), f.__name__


SCRIPTS = sorted(p.name for p in ROOT.glob("exp_*.py"))
BANNERS = ["1. Paper settings", "2. Experiment", "3. Main", "4. Claims, tables and figures", "5. Command line"]


def tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    files = [ROOT / f for f in out if f.endswith((".py", ".md", ".txt", ".toml"))] + [ROOT / ".ci" / "run"]
    return [f for f in files if f.exists()] + [f for f in ROOT.glob("*.py")] + list((ROOT / "tests").glob("*.py"))


def test_nothing_refers_to_files_outside_the_repository():
    # A user who clones or copies the project has only the repository: cite the papers or DECISIONS.md
    bad = re.compile(r"\bSPEC\b|REFERENCE_NOTES|\.\./shared|\[DEFAULT\]")
    hits = [f"{f.name}:{i}" for f in set(tracked_text_files()) for i, line in enumerate(f.read_text().splitlines(), 1)
            if bad.search(line) and "bad = re.compile" not in line]
    assert not hits, hits


def test_decisions_cited_everywhere_exist():
    entries = set(re.findall(r"^\*\*(D\d+)\.", (ROOT / "DECISIONS.md").read_text(), re.M))
    assert len(entries) >= 20
    cite = re.compile(r"DECISIONS\.md`? (D\d+(?:[-,] ?D\d+)*)")  # "DECISIONS.md D7", "D8-D11", "D7, D25"
    spans = {(f.name, s) for f in set(tracked_text_files()) for s in cite.findall(f.read_text())}
    cited = {(name, d) for name, s in spans for d in re.findall(r"D\d+", s)}
    assert cited and not {c for c in cited if c[1] not in entries}, sorted(c for c in cited if c[1] not in entries)


def test_common_table_of_contents_matches_its_banners():
    src = (ROOT / "common.py").read_text()
    doc = common.__doc__
    toc = re.findall(r"^\s+(\d+)\. (.+)$", doc, re.M)
    banners = re.findall(r"^# (\d+)\. (.+)$", src, re.M)
    assert [n for n, _ in toc] == [n for n, _ in banners] == [str(i) for i in range(1, len(toc) + 1)]
    for (_, t), (_, b) in zip(toc, banners):
        assert b.split()[0].rstrip(":") == t.split()[0].rstrip(":"), (t, b)
    # two parts, the papers first: Part II starts where the docstring says, and nothing of Part I comes after it
    parts = re.findall(r"^Part (I+)\. .*\(sections (\d+)-(\d+)\)", doc, re.M)
    assert [p[0] for p in parts] == ["I", "II"], parts
    assert int(parts[0][2]) + 1 == int(parts[1][1]) and int(parts[1][2]) == len(toc)
    part2 = src.index("# PART II.")
    first_of_part2 = src.index(f"# {parts[1][1]}. ")
    assert src.index("# PART I.") < src.index("# 1. ") and part2 < first_of_part2 < part2 + 400


def test_common_holds_only_what_two_scripts_use_or_the_papers_name():
    # the file's rule, one direction: a public function or class of common.py that no script, no other part of
    # common.py and no paper names is not shared; the CIFAR-10-C generator (one user) lives in exp_corruption.py
    scripts = "".join((ROOT / s).read_text() for s in SCRIPTS)
    assert not hasattr(common, "corrupt") and hasattr(importlib.import_module("exp_corruption"), "corrupt")
    src = (ROOT / "common.py").read_text()
    for name in [n for n in dir(common) if not n.startswith("_")]:
        f = getattr(common, name)
        if (inspect.isfunction(f) or inspect.isclass(f)) and f.__module__ == "common":
            used = re.search(rf"\b{name}\b", scripts) or len(re.findall(rf"\b{name}\b", src)) > 1
            assert used, f"common.{name} is used by no script and nothing in common.py"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_the_same_anatomy(script):
    src = (ROOT / script).read_text()
    found = re.findall(r"^# (\d\. [^:(\n]*)", src, re.M)
    assert [next(b for b in BANNERS if f.startswith(b)) for f in found] == BANNERS, found
    mod = importlib.import_module(script[:-3])
    assert set(mod.CLAIMS) == set(mod.ARTIFACTS), "every artifact lists its claims (possibly none) in CLAIMS"
    for name, art in mod.ARTIFACTS.items():
        assert set(art) == {"title", "runs"}, (name, set(art))
        for c in mod.CLAIMS[name]:
            assert {"id", "paper", "claim", "paper_value", "metric", "a", "b", "expect"} <= set(c), c
            assert c["expect"] in "<>" and re.match(r"P[12] ", c["paper"]), c
    assert not re.search(r"^def claim\(", src, re.M), "claim() is common.claim"
    assert "add_run_flags(" in src and "make_parser(" in src
    assert "parse_with_presets(" in src and "write_claims(" in src and "log_to(" in src


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_the_values_that_will_run(script):
    out = subprocess.run([sys.executable, script, "--preset", "quick", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "(default: None)" not in out.stdout and "usage:" in out.stdout
    mod = importlib.import_module(script[:-3])
    assert mod.__doc__.strip().split("\n")[0] in out.stdout  # the docstring is the description
    for group in ("what to reproduce", "data and device", "run management"):
        assert f"{group}:" in out.stdout, group
    for skipped in getattr(mod, "SKIPPED", {}):  # not offered as a choice
        assert not re.search(rf"{{[^}}]*\b{skipped}\b[^}}]*}}", out.stdout), skipped
    quick = mod.resolve("quick", None if script == "exp_spheres.py" else next(iter(mod.ARTIFACTS)))
    text = " ".join(out.stdout.split())
    for k, v in quick.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            assert f"(default: {common.fmt_default(v)})" in text, (k, v)


def test_readme_reproduction_tables_are_generated_from_the_committed_results():
    import update_readme
    text = (ROOT / "README.md").read_text()
    assert text.count("<!-- claims: ") >= 6
    assert update_readme.render(text) == text, "README.md is stale: run python update_readme.py"
    assert "<!-- glance -->" in text and "**all**" in text  # the results at a glance, before any section on running
    assert text.index("## Results at a glance") < text.index("## Running the experiments")
    for script in SCRIPTS:  # every script's docstring opens with its results card, generated from the same results
        src = (ROOT / script).read_text()
        assert update_readme.CARD.search(src), f"{script} has no results card"
        assert update_readme.render_script(script, src) == src, f"{script}'s results card is stale: python update_readme.py"
    for script in SCRIPTS:
        assert update_readme.runs_of(script), f"no committed quick run of {script}"


# Arguments that may stay None at paper scale: no paper number exists for them (the dataset's own size, the
# full test set, min(32, C) groups, a fresh run directory, the dataset's own channels, optional frost pictures), or
# they only override the artifact's own values.
MAY_BE_NONE = {"out", "plot_only", "shard", "cache", "dataset", "arch", "norm", "size", "gn_groups", "n_eval", "epochs", "lr",
               "channels", "frost_dir", "n_build", "datasets_dir", "source_std", "source_rob", "bim_step", "imagenet_root",
               "weights_dir", "per_class"}  # (exp_transfer: unset = every image of the pool, P1 App. B.3)


@pytest.mark.parametrize("script", SCRIPTS)
def test_paper_preset_resolves_every_value_the_paper_has(script, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script])
    mod = importlib.import_module(script[:-3])
    for artifact in [None] + [a for a in getattr(mod, "ARTIFACTS", {}) if a not in getattr(mod, "SKIPPED", {})]:
        args = vars(mod.get_args(["--preset", "paper"] + (["--artifact", artifact] if artifact else [])))
        unresolved = {k for k, v in args.items() if v is None} - MAY_BE_NONE
        assert not unresolved, (artifact, unresolved)
