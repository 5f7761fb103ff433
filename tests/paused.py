"""Start a script that stops at a known point: a subprocess in which `common.<target>` is wrapped to print 'paused'
and wait once `when` holds after a call, so that a test can interrupt or kill the script mid-work on a machine of any
speed (polling for a file, or a timer, can miss the end of a fast run on an idle machine or of a starved test)."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def start_paused(script, args, target="Sweep.save", when="True"):
    """Popen of `python script *args` paused after the first call of common.<target> for which `when` (a Python
    expression over the call's arguments `a`) is true. Returns once the script has paused (or fails if it ended)."""
    owner, _, name = target.rpartition(".")
    code = "\n".join([
        "import runpy, sys, time, common",
        f"owner = common{'.' + owner if owner else ''}",
        f"real = getattr(owner, {name!r})",
        "def paused(*a, **k):",
        "    out = real(*a, **k)",
        f"    if {when}:",
        "        print('paused', flush=True)",
        "        time.sleep(600)",
        "    return out",
        f"setattr(owner, {name!r}, paused)",
        f"sys.argv = {[script, *map(str, args)]!r}",
        f"runpy.run_path({script!r}, run_name='__main__')"])
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    for line in p.stdout:
        if line.strip() == "paused":
            return p
    raise AssertionError(f"{script} ended before it paused: exit {p.wait()}: {p.stderr.read()[-2000:]}")
