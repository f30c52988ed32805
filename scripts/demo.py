"""`make demo`: find (or fetch) TinyImageNet, train the demo experiment, print the result.

    python scripts/demo.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from zipfls_train.data.tinyimagenet import OFFICIAL_URL, PACK_DIR, TREE_DIR, download_tinyimagenet  # noqa: E402


def internet_reachable(url: str = OFFICIAL_URL, timeout: float = 5.0) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout)
        return True
    except OSError:
        return False


def locate_data(data: Path) -> Path:
    """The folder holding tiny-imagenet-200/ or tinyimagenet-32/: DATA, else ./data (downloading there)."""
    for candidate in (data, REPO / "data"):
        if (candidate / TREE_DIR / "wnids.txt").is_file() or (candidate / PACK_DIR / "meta.json").is_file():
            return candidate
    target = REPO / "data"
    if internet_reachable():
        print(f"TinyImageNet not found under {data}; downloading {OFFICIAL_URL} into {target} ...", flush=True)
        download_tinyimagenet(target)
        return target
    sys.exit(
        f"TinyImageNet not found under {data.resolve()} nor {target}, and the internet is not reachable.\n"
        f"Put either the official tree at {target}/{TREE_DIR}/ (from {OFFICIAL_URL}, unzipped)\n"
        f"or the 32 px pack at {target}/{PACK_DIR}/ (it ships in ../shared/data), or run: make demo DATA=<folder holding one of them>"
    )


def run_folder_named_in(line: str) -> Path | None:
    """The run folder of train.py's '[zipfls-train] run started|resumed ...: <dir> (<device>, <precision>)'
    or '[zipfls-train] run already finished (...): <dir>; trainer.resume=never ...' line, else None
    (this demo's own run, not whichever summary in outputs/demo/ is newest)."""
    match = re.match(r"\[zipfls-train\] run (?:already finished \(.*?\): (.+); trainer\.resume=never|.*?: (.+) \(\w+, \w+\)$)", line.rstrip("\n"))
    return Path(match.group(1) or match.group(2)) if match else None


def hydra_quoted(value: str) -> str:
    """``value`` as one quoted Hydra override value: unquoted, a path with accents, brackets or an
    apostrophe breaks the override grammar, and one with a comma makes a sweep. Inside quotes Hydra still reads ``\\"`` and ``${...}``: escaped."""
    return '"' + value.replace('"', '\\"').replace("${", "\\${") + '"'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO / "data", help="folder holding tiny-imagenet-200/ or tinyimagenet-32/")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. trainer.epochs=2")
    args = parser.parse_args()
    root = locate_data(args.data).resolve()
    command = [sys.executable, str(REPO / "train.py"), "experiment=demo", f"dataset.root={hydra_quoted(str(root))}", *args.overrides]
    print("$ " + " ".join(command), flush=True)
    run_dir = None
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True, bufsize=1) as training:
        for line in training.stdout:  # shown as it comes; the run's own folder read from its first line
            print(line, end="", flush=True)
            run_dir = run_dir or run_folder_named_in(line)
    if training.returncode != 0:
        sys.exit(training.returncode)
    if run_dir is None:
        sys.exit("the training run did not say which folder it used (its '[zipfls-train] run ...' line)")
    summary = json.loads((run_dir / "summary.json").read_text())
    print()
    print(f"Demo finished: best val top-1 {summary['best_val_top1']:.2f}% (epoch {summary['best_epoch']}; "
          f"chance is 5.00% on these 20 classes), last-epoch top-1 {summary['last_val_top1']:.2f}%")
    print(f"Run folder:       {run_dir}")
    print(f"TensorBoard logs: tensorboard --logdir {run_dir / 'tb'}")


if __name__ == "__main__":
    main()
