"""Regenerate the README's reproduction tables from the committed results (never typed by hand).

    python update_readme.py            # rewrite the marked sections of README.md
    python update_readme.py --check    # exit 1 if README.md differs from what the results say (the tests do this)

Every section between `<!-- claims: SCRIPT -->` and `<!-- /claims -->` is replaced by the claims of the
runs under results/quick/ made by SCRIPT: the command that made each run, then one row per claim with the
effect, its 95 % interval and the verdict (common.evaluate_claims, DECISIONS.md D25), as in each run's claims.md.
"""
import argparse
import json
import pathlib
import re
import sys

from common import claims_table

ROOT = pathlib.Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "quick"
SECTION = re.compile(r"(<!-- claims: (\S+) -->\n)(.*?)(<!-- /claims -->)", re.S)


def runs_of(script):
    """(command, run directory, claims) of every committed run made by `script`, in path order."""
    out = []
    for cfg_path in sorted(RESULTS.rglob("config.json")):
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("script") != script:
            continue
        argv, shown = cfg["argv"], []
        argv[0] = pathlib.Path(argv[0]).name
        skip = False
        for a in argv:  # the command without --out DIR
            if skip or a == "--out":
                skip = a == "--out"
                continue
            shown.append(a)
        claims = json.loads((cfg_path.parent / "results.json").read_text()).get("claims", [])
        out.append(("python " + " ".join(shown), cfg_path.parent.relative_to(ROOT).as_posix(), claims))
    return out


def section(script):
    lines = []
    for command, run_dir, claims in runs_of(script):
        counts = {v: sum(c["verdict"] == v for c in claims) for v in ("held", "reversed", "inconclusive")}
        lines += [f"`{command}` → `{run_dir}/claims.md`: " + ", ".join(f"{n} {v}" for v, n in counts.items()), ""]
        lines += (claims_table(claims) if claims else ["(no claim of the paper is tested by this run)"]) + [""]
    return "\n".join(lines)


def render(text):
    return SECTION.sub(lambda m: m.group(1) + section(m.group(2)) + m.group(4), text)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = p.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = render(text)
    if args.check:
        sys.exit(0 if new == text else "README.md is stale: run python update_readme.py")
    readme.write_text(new)
    print(f"rewrote {len(SECTION.findall(text))} sections of {readme.name}")
