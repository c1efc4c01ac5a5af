"""Defacing time per image, beside pydeface's reported 2-10 minutes (issue 15, "Figures").

    .venv/bin/python benchmarks/bench_deface.py [IMAGE.nii.gz ...] [--png FIGURE.png]

Default image: the Philips ADNI 3D MPRAGE of ../shared/data/dicom-vendors (P1), converted once with
dcm2niix into a temporary folder. Each image is defaced once (pacs2bids.derivatives.deface, with FSL
flirt when it is on PATH, else SimpleITK) and the wall time printed with the checks' measures; with
``--png`` a bar figure puts each time beside the 2-10 minute band reported for pydeface
(the machine is shared: compare ratios within one run, not seconds across runs).
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from pacs2bids.derivatives.deface import DefaceFailed, deface, load_3d

REPO = Path(__file__).resolve().parents[1]
PHILIPS = REPO.parent / "shared" / "data" / "dicom-vendors" / "dcm_qa_philips_enh" / "In" / "cl"
PYDEFACE_MINUTES = (2.0, 10.0)  # per image, as reported for pydeface (with FSL) in issue 15


def default_image(tmp: Path) -> Path:
    if not PHILIPS.is_dir():
        raise SystemExit(f"{PHILIPS} is missing: give images on the command line")
    src = tmp / "dicom"
    src.mkdir()
    for f in sorted(PHILIPS.glob("1301_*.dcm.gz")):
        (src / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    subprocess.run(["dcm2niix", "-b", "y", "-z", "y", "-f", "philips_t1w", "-o", str(tmp), str(src)],
                   check=True, capture_output=True, timeout=300)
    return tmp / "philips_t1w.nii.gz"


def figure(rows: list[tuple[str, float]], path: Path) -> None:
    """Horizontal bars in minutes, the pydeface band shaded."""
    width, bar, left, top = 720, 28, 200, 40
    scale = (width - left - 20) / max(PYDEFACE_MINUTES[1] * 1.1, *(s / 60 for _, s in rows))
    pic = Image.new("RGB", (width, top + (len(rows) + 2) * (bar + 10) + 30), "white")
    draw = ImageDraw.Draw(pic)
    draw.text((10, 10), "Defacing time per image (minutes)", fill="black")
    y = top
    lo, hi = (left + m * scale for m in PYDEFACE_MINUTES)
    draw.rectangle([lo, y, hi, y + bar], fill=(255, 210, 160))
    draw.text((10, y + 8), "pydeface (reported)", fill="black")
    draw.text((hi + 4, y + 8), f"{PYDEFACE_MINUTES[0]:.0f}-{PYDEFACE_MINUTES[1]:.0f} min", fill="black")
    for name, seconds in rows:
        y += bar + 10
        draw.rectangle([left, y, left + max(2, seconds / 60 * scale), y + bar], fill=(70, 130, 180))
        draw.text((10, y + 8), name[:28], fill="black")
        draw.text((left + seconds / 60 * scale + 4, y + 8), f"{seconds / 60:.1f} min", fill="black")
    pic.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="*", type=Path)
    ap.add_argument("--png", type=Path, help="write the figure there")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-deface-") as tmp:
        for path in args.images or [default_image(Path(tmp))]:
            img = load_3d(path)
            started = time.monotonic()
            try:
                done = deface(img)
                what = f"defaced ({done.tool} {done.tool_version}), {done.zeroed} voxels zeroed, {done.measures}"
            except DefaceFailed as exc:
                what = f"FAILED: {exc}"
            seconds = time.monotonic() - started
            rows.append((path.name, seconds))
            print(f"{path.name} {img.shape}: {seconds:.0f} s = {seconds / 60:.1f} min; {what}")
    print(f"pydeface reports {PYDEFACE_MINUTES[0]:.0f}-{PYDEFACE_MINUTES[1]:.0f} minutes per image")
    if args.png:
        figure(rows, args.png)
        print(f"figure: {args.png}")


if __name__ == "__main__":
    main()
