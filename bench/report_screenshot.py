"""A headless-browser screenshot of a mining report, for the README.

Runs ``dms mine sknn`` or ``skmeans`` with ``--local --report`` on the Iris data in
a temporary folder, then has Chromium (the distribution's package: ``apt-get
install chromium``) render ``report.html`` with networking off, and writes the
picture (``docs/report.png`` by default). Prints one JSON line with ``--json``:
the report's size, the picture's size and how long each step took.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IRIS = ROOT / "examples" / "iris-features.csv"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    sys.exit("no Chromium found: apt-get install chromium")


def make_report(folder: Path, algorithm: str) -> Path:
    out = folder / "out"
    if algorithm == "skmeans":
        args = ["skmeans", "--data", str(IRIS), "--k", "3"]
    else:  # every third Iris row is a query, with its species, so the confusion matrix shows
        rows = (ROOT / "examples" / "iris.csv").read_text().splitlines()
        header, body = rows[0], rows[1:]
        (folder / "train.csv").write_text("\n".join([header, *body[0::3], *body[1::3]]) + "\n")
        (folder / "test.csv").write_text("\n".join([header, *body[2::3]]) + "\n")
        args = ["sknn", "--train", str(folder / "train.csv"), "--test", str(folder / "test.csv")]
        args += ["--k", "5"]
    command = [sys.executable, "-m", "dms", "mine", *args, "--local", "--report"]
    subprocess.run([*command, "--out", str(out), "--json"], check=True, capture_output=True)
    return out / "report.html"


def screenshot(report: Path, png: Path, width: int, height: int) -> None:
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                # offline: any fetch would fail, so the picture proves the page needs none
                "--proxy-server=127.0.0.1:9",
                "--proxy-bypass-list=<-loopback>",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={png}",
                report.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", choices=("skmeans", "sknn"), default="skmeans")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report.png")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=1400)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        report = make_report(Path(tmp), args.algorithm)
        mined = time.perf_counter() - began
        screenshot(report, args.out, args.width, args.height)
        shot = time.perf_counter() - began - mined
        figures = {
            "algorithm": args.algorithm,
            "report_bytes": report.stat().st_size,
            "png": str(args.out),
            "png_bytes": args.out.stat().st_size,
            "mine_s": round(mined, 2),
            "screenshot_s": round(shot, 2),
        }
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"{args.out}: {figures['png_bytes']} bytes ({args.algorithm} report)")


if __name__ == "__main__":
    main()
