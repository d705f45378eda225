"""Write the course's submission zip, <ID>_lab2.zip (what `make submission ID=... LORA_LINK_1=... LORA_LINK_2=...` runs).

    python3 report/make_submission.py --id 123 --lora_link_1 URL --lora_link_2 URL [--out DIR]

The course's layout:

    <ID>_lab2.zip
    ├── report.pdf                              report/report.pdf (make report)
    ├── task1/2d_plot_diffusion_todo/...        the folder's code: .py, .ipynb, .sh, .md
    ├── task1/image_diffusion_todo/...          likewise; no checkpoints, data or results
    └── task2/<ID>_task2-1_lora_weight.txt      the link to the Task 2-1 LoRA weights
        task2/<ID>_task2-2_lora_weight.txt      the link to the Task 2-2 (DreamBooth) LoRA weights

Standard library only, so it runs without the project's virtual environment.
"""
import argparse
import os
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK1_FOLDERS = ["task1/2d_plot_diffusion_todo", "task1/image_diffusion_todo"]
CODE_SUFFIXES = {".py", ".ipynb", ".sh", ".md"}
SKIPPED_FOLDERS = {"__pycache__", ".ipynb_checkpoints", "results", "data", "runs"}
MAX_FILE_BYTES = 5 * 1024 * 1024
FIXED_DATE = (2026, 1, 1, 0, 0, 0)  # every entry's time, so the same files give the same zip


def task1_files(root):
    """The code files of the two Task 1 folders, relative to root, sorted."""
    files = []
    for folder in TASK1_FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            relative = path.relative_to(root)
            if (path.is_file() and path.suffix in CODE_SUFFIXES
                    and not SKIPPED_FOLDERS.intersection(relative.parts[:-1])):
                files.append(relative)
    return files


def check(args, root):
    """-> an error line, or None when the zip can be written."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.id or ""):
        return "ID must be your student ID (letters, digits, - or _), e.g. make submission ID=123456"
    for name, link in (("LORA_LINK_1", args.lora_link_1), ("LORA_LINK_2", args.lora_link_2)):
        if not link or not link.strip() or "\n" in link:
            return (f"{name} is missing: give the cloud link to your "
                    f"{'Task 2-1 LoRA' if name.endswith('1') else 'Task 2-2 DreamBooth LoRA'} weights, "
                    f"e.g. make submission ID={args.id} LORA_LINK_1=https://... LORA_LINK_2=https://...")
    if not (root / "report" / "report.pdf").is_file():
        return "report/report.pdf is missing: build it with `make report` first"
    for relative in task1_files(root):
        if (root / relative).stat().st_size > MAX_FILE_BYTES:
            return f"{relative} is over 5 MB: move it out of task1/ (code only goes into the zip)"
    return None


def write_zip(args, root, out_dir):
    entries = [("report.pdf", (root / "report" / "report.pdf").read_bytes())]
    entries += [(relative.as_posix(), (root / relative).read_bytes()) for relative in task1_files(root)]
    entries += [(f"task2/{args.id}_task2-1_lora_weight.txt", args.lora_link_1.strip() + "\n"),
                (f"task2/{args.id}_task2-2_lora_weight.txt", args.lora_link_2.strip() + "\n")]
    path = Path(out_dir) / f"{args.id}_lab2.zip"
    partial = path.with_name(path.name + ".tmp")  # renamed into place only once complete
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    os.replace(partial, path)
    return path, len(entries)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--id", required=True, help="your student ID")
    parser.add_argument("--lora_link_1", default="", help="cloud link to the Task 2-1 LoRA weights")
    parser.add_argument("--lora_link_2", default="", help="cloud link to the Task 2-2 DreamBooth LoRA weights")
    parser.add_argument("--out", default=ROOT, help="where the zip goes (default: the repository root)")
    parser.add_argument("--root", default=ROOT, type=Path, help=argparse.SUPPRESS)  # the tests' copy
    args = parser.parse_args(argv)
    error = check(args, args.root)
    if error:
        print(f"make submission: error: {error}", file=sys.stderr)
        return 1
    path, count = write_zip(args, args.root, args.out)
    print(f"wrote {path} ({count} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
