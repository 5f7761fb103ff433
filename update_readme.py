"""Regenerate the README's reproduction tables and every script's results card from the committed results
(never typed by hand).

    python update_readme.py            # rewrite the marked sections of README.md and the cards of the exp_*.py
    python update_readme.py --check    # exit 1 if any of them differs from what the results say (the tests do this)

The results card is the block of an exp_*.py docstring between `Quick results (update_readme.py ...):` and the
next blank line: per committed quick run its command, its held / reversed / inconclusive tally and the headline
claim (the held one furthest from 0 in interval half-widths) with its effect and 95 % interval. The README's
`<!-- glance -->` table sums them per script.

Every section between `<!-- claims: SCRIPT -->` and `<!-- /claims -->` is replaced by the claims of the
runs under results/quick/ made by SCRIPT: the command that made each run, then one row per claim with the
effect, its 95 % interval and the verdict (common.evaluate_claims, DECISIONS.md D25), as in each run's claims.md.
"""
import argparse
import importlib
import json
import pathlib
import re
import sys
import textwrap

from common import claims_table, fmt_effect

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
        for a in argv:  # the command without --out DIR and --shard K/N (the run is the union of its shards)
            if skip or a in ("--out", "--shard"):
                skip = a in ("--out", "--shard")
                continue
            shown.append(a)
        claims = json.loads((cfg_path.parent / "results.json").read_text()).get("claims", [])
        out.append(("python " + " ".join(shown), cfg_path.parent.relative_to(ROOT).as_posix(), claims))
    return out


def section(script):
    """One visible line, the script's verdicts over all its committed quick runs; then, folded in <details>, per run
    its command, tally and claims table."""
    runs = runs_of(script)
    n = tally([c for _, _, cs in runs for c in cs])
    lines = [f"**Quick-preset verdicts:** {n['held']} held, {n['reversed']} reversed, {n['inconclusive']} inconclusive, "
             f"{n['underpowered']} underpowered ({len(runs)} run{'s' if len(runs) != 1 else ''}).", "",
             "<details><summary>Every claim, per run: the command, the paper's number, the effect and its interval"
             "</summary>", ""]
    for command, run_dir, claims in runs:
        lines += [f"`{command}` → `{run_dir}/claims.md`: " + ", ".join(f"{k} {v}" for v, k in tally(claims).items()), ""]
        lines += (claims_table(claims) if claims else ["(no claim of the paper is tested by this run)"]) + [""]
    return "\n".join(lines + ["</details>", ""])


CARD = re.compile(r"(Quick results \(update_readme\.py writes this from results/quick/\):\n)(.*?)(\n\n)", re.S)
GLANCE = re.compile(r"(<!-- glance -->\n)(.*?)(<!-- /glance -->)", re.S)
SCRIPTS = sorted(p.name for p in ROOT.glob("exp_*.py"))
VERDICTS = ("held", "reversed", "inconclusive", "underpowered")


def tally(claims):
    return {v: sum(c["verdict"] == v for c in claims) for v in VERDICTS}


def headline(claims):
    """The held claim whose interval lies furthest from 0 (in half-widths), else the first claim."""
    def strength(c):
        w = (c["hi"] - c["lo"]) / 2
        return abs(c["effect"]) / w if w and w == w and w > 0 else 0.0
    held = [c for c in claims if c["verdict"] == "held"]
    return max(held, key=strength) if held else (claims[0] if claims else None)


def card(script):
    lines = []
    for command, run_dir, claims in runs_of(script):
        n = tally(claims)
        lines.append(f"    {command}")
        lines.append(f"        {n['held']} held / {n['reversed']} reversed / {n['inconclusive']} inconclusive / "
                     f"{n['underpowered']} underpowered")
        h = headline(claims)
        if h:
            lines += textwrap.wrap(f"{h['paper']}: {h['claim']}: {fmt_effect(h)} ({h['verdict']})", 117,
                                   initial_indent=" " * 8, subsequent_indent=" " * 10)
    return "\n".join(lines)


def gpu_hours(text):
    """Paper-scale H100-hours per script, summed from the README's cost table (cost_table.py; tested to match)."""
    hours = {}
    for row in re.findall(r"^\| (exp_\w+\.py) \| .*\| ([\d,.]+) \|$", text, re.M):
        hours[row[0]] = hours.get(row[0], 0.0) + float(row[1].replace(",", ""))
    return hours


def glance(text):
    hours = gpu_hours(text)
    rows = ["| script | the papers' artifacts | quick runs | held | reversed | inconclusive | underpowered | "
            "paper scale, H100-hours |", "|---|---|---|---|---|---|---|---|"]
    total = dict.fromkeys(VERDICTS, 0)
    for script in SCRIPTS:
        runs = runs_of(script)
        n = tally([c for _, _, cs in runs for c in cs])
        total = {k: total[k] + n[k] for k in total}
        mod = importlib.import_module(script[:-3])
        what = ", ".join(dict.fromkeys(a["title"].split(":")[0] for a in mod.ARTIFACTS.values()))
        h = f"{hours[script]:.0f}" if script in hours else "–"
        rows.append(f"| `{script}` | {what} | {len(runs)} | " + " | ".join(str(n[v]) for v in VERDICTS) + f" | {h} |")
    rows.append("| **all** | | | " + " | ".join(f"**{total[v]}**" for v in VERDICTS) +
                f" | **{sum(hours.values()):.0f}** |")
    return "\n".join(rows) + "\n"


def render(text):
    text = GLANCE.sub(lambda m: m.group(1) + glance(text) + m.group(3), text)
    return SECTION.sub(lambda m: m.group(1) + section(m.group(2)) + m.group(4), text)


def render_script(script, text):
    return CARD.sub(lambda m: m.group(1) + card(script) + m.group(3), text, count=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = p.parse_args()
    stale = []
    for path, fn in [(ROOT / "README.md", render)] + [(ROOT / s, lambda x, s=s: render_script(s, x)) for s in SCRIPTS]:
        text = path.read_text()
        new = fn(text)
        if new != text:
            stale.append(path.name)
            if not args.check:
                path.write_text(new)
    if args.check:
        sys.exit(f"stale: {', '.join(stale)}: run python update_readme.py" if stale else 0)
    print(f"rewrote {', '.join(stale) or 'nothing (up to date)'}")
