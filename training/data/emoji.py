"""Build the offline emoji benchmark: one class per emoji, one image per vendor.

The same emoji drawn by four artists (Google Noto, Twemoji, OpenMoji and
Microsoft Fluent 3D) is one class, as one product photographed four times is
one class in Stanford Online Products. Images come from pinned npm packages
fetched with ``npm pack``, so the build needs npm and the npm registry, and
``rsvg-convert`` (Debian ``librsvg2-bin``) to render the OpenMoji SVGs.

Output layout under ``out``::

    train/<class>/<vendor>.png   RGBA PNG, native size, at most 128 px a side
    test/<class>/<vendor>.png
    classes.csv                  class,name,category,split
    ATTRIBUTION.md               vendor, package, version, licence, copyright
    LICENSES/                    the licence texts
    READY                        written last: the counts, as JSON

``<class>`` is the code point sequence in lower-case hex joined by ``-``
without U+FE0F, for example ``2764-200d-1f525``. The build skips every image
that already exists, so a rerun only fills gaps.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
import shutil
import subprocess
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

logger = logging.getLogger(__name__)

MAX_SIDE = 128  # pixels; larger images are downscaled, smaller ones kept as they are
OPENMOJI_RENDER_SIZE = 128  # pixels; side of the rendered OpenMoji SVGs
LICENSE_DIR = Path(__file__).with_name("licenses")

VARIATION_SELECTOR_16 = 0xFE0F
SKIN_TONE_MODIFIERS = range(0x1F3FB, 0x1F3FF + 1)
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F1FF + 1)
TAG_CHARACTERS = range(0xE0020, 0xE007F + 1)
FLAG_CATEGORY = "Flags"
CLASS_NAME_PATTERN = re.compile(r"^[0-9a-f]{4,6}(-[0-9a-f]{4,6})*$")


@dataclass(frozen=True)
class VendorSource:
    """One vendor's npm package and where its images sit inside the tarball."""

    vendor: str  # file stem in the output, for example "google"
    package: str  # npm package name
    version: str  # pinned npm version
    image_dir: str  # folder inside the tarball, below "package/"
    image_suffix: str  # ".png", ".svg" or ".webp"
    license_id: str  # SPDX id of the images' licence
    license_files: tuple[tuple[str, str], ...]  # (tarball member or file in LICENSE_DIR, output name)
    copyright: str
    license_note: str  # where the licence statement comes from
    homepage: str

    @property
    def tarball_name(self) -> str:
        """File name that ``npm pack`` gives the tarball."""
        scoped = self.package.lstrip("@").replace("/", "-")
        return f"{scoped}-{self.version}.tgz"


VENDORS: tuple[VendorSource, ...] = (
    VendorSource(
        vendor="google",
        package="emoji-datasource-google",
        version="16.0.0",
        image_dir="img/google/64",
        image_suffix=".png",
        license_id="Apache-2.0",
        license_files=(
            ("package/LICENSE", "google-emoji-data-MIT.txt"),
            ("Apache-2.0.txt", "google-Apache-2.0.txt"),
        ),
        copyright="Google Inc. (Noto Emoji images); Cal Henderson (emoji-data package and emoji.json)",
        license_note=(
            "The package's LICENSE file is the MIT licence of the emoji-data package itself "
            "(Copyright (c) 2013 Cal Henderson). Its README states that the Google/Noto images "
            "are available under the Apache License 2.0 of github.com/googlei18n/noto-emoji."
        ),
        homepage="https://github.com/iamcal/emoji-data",
    ),
    VendorSource(
        vendor="twitter",
        package="emoji-datasource-twitter",
        version="16.0.0",
        image_dir="img/twitter/64",
        image_suffix=".png",
        license_id="CC-BY-4.0",
        license_files=(
            ("package/LICENSE", "twitter-emoji-data-MIT.txt"),
            ("CC-BY-4.0.txt", "twitter-CC-BY-4.0.txt"),
        ),
        copyright="Twitter, Inc and other contributors (Twemoji graphics); Cal Henderson (emoji-data package)",
        license_note=(
            "The package's LICENSE file is the MIT licence of the emoji-data package itself "
            "(Copyright (c) 2013 Cal Henderson). Its README states that the Twitter images are "
            "available under the Creative Commons Attribution 4.0 licence of "
            "github.com/jdecked/twemoji (LICENSE-GRAPHICS, v15.0.2)."
        ),
        homepage="https://github.com/iamcal/emoji-data",
    ),
    VendorSource(
        vendor="openmoji",
        package="openmoji",
        version="17.0.0",
        image_dir="color/svg",
        image_suffix=".svg",
        license_id="CC-BY-SA-4.0",
        license_files=(("package/LICENSE.txt", "openmoji-CC-BY-SA-4.0.txt"),),
        copyright="Benedikt Groß, Daniel Utz and the OpenMoji contributors (HfG Schwäbisch Gmünd)",
        license_note=(
            "The package's README and CITATION.cff state that the OpenMoji graphics are licensed "
            "under CC BY-SA 4.0; LICENSE.txt in the package is that licence."
        ),
        homepage="https://openmoji.org",
    ),
    VendorSource(
        vendor="fluent",
        package="@lobehub/fluent-emoji-3d",
        version="1.1.0",
        image_dir="assets",
        image_suffix=".webp",
        license_id="MIT",
        license_files=(),  # the package ships no licence file, so license_texts writes the MIT text
        copyright="Microsoft Corporation (Fluent Emoji artwork); LobeHub (npm package)",
        license_note=(
            "The package declares \"license\": \"MIT\" in package.json and its README says "
            "\"Copyright © 2023 LobeHub. This project is MIT licensed.\" It ships no licence "
            "file. Its description says the emoji are Microsoft's Fluent Emoji."
        ),
        homepage="https://github.com/lobehub/fluent-emoji",
    ),
)
VENDOR_NAMES: tuple[str, ...] = tuple(source.vendor for source in VENDORS)
METADATA_VENDOR = "google"  # its emoji.json supplies names and categories

MIT_TEMPLATE = """\
MIT License

Copyright (c) {holder}

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""
FLUENT_MIT_HOLDER = "2023 LobeHub"  # the holder named in the package README


class EmojiBuildError(RuntimeError):
    """A step of the emoji data set build failed; the message names the step and the fix."""


@dataclass(frozen=True)
class EmojiClass:
    """One emoji that all vendors draw: a class of the benchmark."""

    name: str  # code point sequence, for example "1f600"
    title: str  # lower-case Unicode name from emoji.json, for example "grinning face"
    category: str  # emoji.json category, for example "Smileys & Emotion"
    split: str = ""  # "train" or "test" once split


@dataclass
class BuildSummary:
    """Counts of one build, written to READY and logged."""

    classes: dict[str, int] = field(default_factory=dict)  # split -> classes
    images: dict[str, int] = field(default_factory=dict)  # vendor -> images
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> emoji.json entries
    written: int = 0  # images written in this run
    skipped: int = 0  # images already present

    def line(self) -> str:
        """Return a one-line summary for logs."""
        classes = ", ".join(f"{split} {count}" for split, count in self.classes.items())
        images = ", ".join(f"{vendor} {count}" for vendor, count in self.images.items())
        dropped = ", ".join(f"{reason} {count}" for reason, count in self.dropped.items())
        return (
            f"classes: {classes}; images per vendor: {images}; dropped: {dropped}; "
            f"written {self.written}, already present {self.skipped}"
        )


def normalize_sequence(text: str) -> str | None:
    """Return the class name for a code point sequence such as ``"00AE-FE0F"`` -> ``"00ae"``.

    Accepts hex code points joined by ``-`` or ``_`` in any case, drops U+FE0F
    and pads each code point to at least 4 hex digits. Returns None when
    ``text`` is not a code point sequence (OpenMoji's extra icons, for example).
    """
    code_points: list[int] = []
    for part in re.split(r"[-_]", text.strip()):
        try:
            value = int(part, 16)
        except ValueError:
            return None
        if not 0 < value <= 0x10FFFF:
            return None
        if value != VARIATION_SELECTOR_16:
            code_points.append(value)
    if not code_points:
        return None
    return "-".join(f"{value:04x}" for value in code_points)


def code_points_of(name: str) -> list[int]:
    """Return the code points of a class name."""
    return [int(part, 16) for part in name.split("-")]


def drop_reason(name: str, category: str) -> str | None:
    """Return why an emoji is left out of the benchmark, or None to keep it.

    Every vendor draws a flag as the same national design, and a skin-tone
    variant differs from its base emoji by one colour, so such classes would
    test colour matching more than recognising one emoji across drawing styles.
    """
    points = code_points_of(name)
    if category == FLAG_CATEGORY:
        return "flag"
    if any(point in REGIONAL_INDICATORS or point in TAG_CHARACTERS for point in points):
        return "flag"
    if any(point in SKIN_TONE_MODIFIERS for point in points):
        return "skin tone"
    return None


def fetch_package(source: VendorSource, cache: Path) -> Path:
    """Download ``source``'s tarball with ``npm pack`` into ``cache``, unless it is there.

    Returns the tarball path. Raises EmojiBuildError when npm is missing or fails.
    """
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / source.tarball_name
    if tarball.is_file() and tarball.stat().st_size > 0:
        return tarball

    npm = shutil.which("npm")
    if npm is None:
        raise EmojiBuildError(
            f"npm was not found on PATH; install Node.js with npm, or put {source.tarball_name} "
            f"into {cache} yourself"
        )
    spec = f"{source.package}@{source.version}"
    logger.info("fetching %s with npm pack into %s", spec, cache)
    result = subprocess.run(
        [npm, "pack", spec, "--pack-destination", str(cache), "--silent"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not tarball.is_file():
        raise EmojiBuildError(
            f"npm pack {spec} failed (exit status {result.returncode}): "
            f"{result.stderr.strip()[-500:]}; check access to the npm registry"
        )
    return tarball


def read_members(tarball: Path, keep: Callable[[str], bool]) -> dict[str, bytes]:
    """Read the regular files of ``tarball`` whose member name passes ``keep``."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for member in archive:
                if not member.isfile() or not keep(member.name):
                    continue
                handle = archive.extractfile(member)
                if handle is not None:
                    members[member.name] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise EmojiBuildError(
            f"failed to read {tarball}: {error}; delete the file so that the next run fetches it again"
        ) from error
    return members


@dataclass
class VendorPackage:
    """The images and metadata read from one vendor's tarball."""

    source: VendorSource
    images: dict[str, bytes]  # class name -> encoded image (PNG, SVG or WebP)
    files: dict[str, bytes]  # other members kept: licences, emoji.json


def load_vendor(source: VendorSource, tarball: Path) -> VendorPackage:
    """Read ``source``'s images, keyed by class name, and its licence and metadata files.

    When two files map to one class (``00ae.svg`` and ``00ae-fe0f.svg``), the
    one with U+FE0F (the emoji presentation) wins.
    """
    image_prefix = f"package/{source.image_dir}/"
    extra = {"package/emoji.json", *(member for member, _ in source.license_files)}

    def keep(name: str) -> bool:
        in_image_dir = name.startswith(image_prefix) and "/" not in name[len(image_prefix) :]
        return (in_image_dir and name.endswith(source.image_suffix)) or name in extra

    members = read_members(tarball, keep)
    candidates: dict[str, list[str]] = {}
    for member_name in members:
        if not member_name.startswith(image_prefix):
            continue
        stem = member_name[len(image_prefix) : -len(source.image_suffix)]
        class_name = normalize_sequence(stem)
        if class_name is not None:
            candidates.setdefault(class_name, []).append(member_name)

    images: dict[str, bytes] = {}
    for class_name, names in candidates.items():
        best = min(names, key=lambda name: ("fe0f" not in name.lower(), name))
        images[class_name] = members[best]
    files = {name: data for name, data in members.items() if not name.startswith(image_prefix)}
    logger.info("%s: %d images from %s", source.vendor, len(images), tarball.name)
    return VendorPackage(source=source, images=images, files=files)


def select_classes(
    metadata: list[dict], packages: dict[str, VendorPackage]
) -> tuple[list[EmojiClass], dict[str, int]]:
    """Keep the emoji.json entries that every vendor draws and that are no flag or skin tone.

    ``metadata`` is the list in emoji.json; its base entries carry no skin
    tone (variants sit in ``skin_variations``, which is ignored). Returns the
    classes sorted by name and the count of dropped entries per reason.
    """
    classes: dict[str, EmojiClass] = {}
    dropped: Counter[str] = Counter()
    for entry in metadata:
        name = normalize_sequence(entry["unified"])
        if name is None:
            dropped["invalid code points"] += 1
            continue
        category = entry.get("category") or ""
        reason = drop_reason(name, category)
        if reason is None:
            missing = [vendor for vendor, package in packages.items() if name not in package.images]
            if missing:
                reason = "missing in " + "+".join(missing)
        if reason is not None:
            dropped[reason] += 1
            continue
        title = (entry.get("name") or entry.get("short_name") or name).lower()
        classes.setdefault(name, EmojiClass(name=name, title=title, category=category))
    return sorted(classes.values(), key=lambda item: item.name), dict(sorted(dropped.items()))


def split_classes(classes: list[EmojiClass], seed: int) -> list[EmojiClass]:
    """Assign half of the classes to "train" and the rest to "test", class-disjoint.

    The classes are shuffled with ``random.Random(seed)``; the first
    ``len(classes) // 2`` train, the rest test. Returns them sorted by name.
    """
    order = sorted(classes, key=lambda item: item.name)
    random.Random(seed).shuffle(order)
    n_train = len(order) // 2
    assigned = [
        EmojiClass(item.name, item.title, item.category, "train" if index < n_train else "test")
        for index, item in enumerate(order)
    ]
    return sorted(assigned, key=lambda item: item.name)


def fit_max_side(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """Return ``image`` as RGBA, downscaled (Lanczos) so that its longer side is at most ``max_side``."""
    image = image.convert("RGBA")
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def render_svg(svg: bytes, size: int = OPENMOJI_RENDER_SIZE) -> Image.Image:
    """Render an SVG to a ``size`` x ``size`` RGBA image with rsvg-convert."""
    rsvg = shutil.which("rsvg-convert")
    if rsvg is None:
        raise EmojiBuildError(
            "rsvg-convert was not found on PATH; install it (Debian/Ubuntu: apt-get install librsvg2-bin)"
        )
    result = subprocess.run(
        [rsvg, "--width", str(size), "--height", str(size), "--keep-aspect-ratio", "--format", "png"],
        input=svg,
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip()
        raise EmojiBuildError(f"rsvg-convert failed (exit status {result.returncode}): {message}")
    return Image.open(io.BytesIO(result.stdout))


def convert_image(vendor: VendorPackage, class_name: str) -> Image.Image:
    """Return the RGBA image of ``class_name`` by ``vendor``, at most MAX_SIDE a side."""
    data = vendor.images[class_name]
    if vendor.source.image_suffix == ".svg":
        image = render_svg(data)
    else:
        image = Image.open(io.BytesIO(data))
    return fit_max_side(image)


def write_png(image: Image.Image, path: Path) -> None:
    """Save ``image`` to ``path`` through a temporary file, so that no half-written PNG remains."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format="PNG", optimize=True)
    partial.replace(path)


def remove_stale_classes(out: Path, classes: list[EmojiClass]) -> int:
    """Delete class folders left by a build with another seed or package version.

    Only folders named like a code point sequence are touched. Returns how many were removed.
    """
    expected = {(item.split, item.name) for item in classes}
    removed = 0
    for split in ("train", "test"):
        split_dir = out / split
        if not split_dir.is_dir():
            continue
        for class_dir in split_dir.iterdir():
            if not class_dir.is_dir() or not CLASS_NAME_PATTERN.match(class_dir.name):
                continue
            if (split, class_dir.name) not in expected:
                shutil.rmtree(class_dir)
                removed += 1
    return removed


def write_images(
    out: Path,
    classes: list[EmojiClass],
    packages: dict[str, VendorPackage],
    workers: int,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> tuple[int, int]:
    """Write every missing ``<split>/<class>/<vendor>.png``; returns (written, already present).

    Runs ``workers`` conversions at a time. Threads suffice because the slow
    steps (rsvg-convert subprocesses, Pillow decoding and resizing) release the GIL.
    """
    jobs: list[tuple[Path, str, str]] = []
    skipped = 0
    for item in classes:
        for vendor in packages:
            path = out / item.split / item.name / f"{vendor}.png"
            if path.is_file():
                skipped += 1
            else:
                jobs.append((path, vendor, item.name))

    def run(job: tuple[Path, str, str]) -> None:
        path, vendor, class_name = job
        write_png(convert_image(packages[vendor], class_name), path)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(run, jobs)
        if progress is not None:
            results = progress(results, total=len(jobs))
        for _ in results:
            pass
    return len(jobs), skipped


def write_classes_csv(out: Path, classes: list[EmojiClass]) -> None:
    """Write ``classes.csv`` with columns class,name,category,split."""
    with (out / "classes.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "name", "category", "split"])
        for item in classes:
            writer.writerow([item.name, item.title, item.category, item.split])


def read_classes_csv(path: Path) -> list[EmojiClass]:
    """Read a ``classes.csv`` written by write_classes_csv."""
    with path.open(newline="", encoding="utf-8") as handle:
        return [
            EmojiClass(row["class"], row["name"], row["category"], row["split"])
            for row in csv.DictReader(handle)
        ]


def license_texts(package: VendorPackage) -> dict[str, str]:
    """Return the licence texts to ship for one vendor: output file name -> text."""
    source = package.source
    texts: dict[str, str] = {}
    for entry, output_name in source.license_files:
        if entry.startswith("package/"):
            if entry not in package.files:
                raise EmojiBuildError(f"{source.tarball_name} has no {entry}; check the pinned version")
            texts[output_name] = package.files[entry].decode("utf-8")
        else:
            texts[output_name] = (LICENSE_DIR / entry).read_text(encoding="utf-8")
    if source.vendor == "fluent":
        texts["fluent-MIT.txt"] = MIT_TEMPLATE.format(holder=FLUENT_MIT_HOLDER)
    return texts


def attribution_markdown(sources: Iterable[VendorSource], license_files: dict[str, list[str]]) -> str:
    """Return the text of ATTRIBUTION.md for ``sources``."""
    lines = [
        "# Attribution",
        "",
        "Each image is one vendor's drawing of one emoji, taken from the npm package below.",
        "Changes made: PNG and WebP images were converted to RGBA PNG and, where a side",
        f"exceeded {MAX_SIDE} px, downscaled with Lanczos resampling to {MAX_SIDE} px.",
        f"OpenMoji SVGs were rendered with rsvg-convert to {OPENMOJI_RENDER_SIZE} x "
        f"{OPENMOJI_RENDER_SIZE} px RGBA PNG.",
        "",
    ]
    for source in sources:
        lines += [
            f"## {source.vendor}",
            "",
            f"- package: `{source.package}` {source.version} (npm), {source.homepage}",
            f"- image licence: {source.license_id}",
            f"- copyright: {source.copyright}",
            f"- licence source: {source.license_note}",
            "- licence texts: " + ", ".join(f"`LICENSES/{name}`" for name in license_files[source.vendor]),
            "",
        ]
    lines += [
        "The OpenMoji images in this folder are adaptations of OpenMoji graphics and are",
        "shared under the same licence, CC BY-SA 4.0. All emojis designed by OpenMoji –",
        "the open-source emoji and icon project (https://openmoji.org). License: CC BY-SA 4.0.",
        "",
    ]
    return "\n".join(lines)


def write_license_files(out: Path, packages: dict[str, VendorPackage]) -> dict[str, list[str]]:
    """Write ``LICENSES/*`` and ``ATTRIBUTION.md``; returns vendor -> licence file names."""
    license_dir = out / "LICENSES"
    license_dir.mkdir(parents=True, exist_ok=True)
    names: dict[str, list[str]] = {}
    for vendor, package in packages.items():
        texts = license_texts(package)
        for file_name, text in texts.items():
            (license_dir / file_name).write_text(text, encoding="utf-8")
        names[vendor] = sorted(texts)
    text = attribution_markdown((package.source for package in packages.values()), names)
    (out / "ATTRIBUTION.md").write_text(text, encoding="utf-8")
    return names


def count_images(out: Path, classes: list[EmojiClass]) -> dict[str, int]:
    """Count the PNGs on disk per vendor for ``classes``."""
    counts = {vendor: 0 for vendor in VENDOR_NAMES}
    for item in classes:
        for vendor in VENDOR_NAMES:
            if (out / item.split / item.name / f"{vendor}.png").is_file():
                counts[vendor] += 1
    return counts


def build_emoji_dataset(
    out: Path,
    cache: Path,
    *,
    seed: int = 0,
    workers: int = 2,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> BuildSummary:
    """Fetch the four packages and write the data set described in the module docstring.

    ``progress`` wraps the iterator of image jobs (``tqdm.tqdm`` fits). Raises
    EmojiBuildError when a tool or package is missing or an image fails to convert.
    """
    out.mkdir(parents=True, exist_ok=True)
    ready = out / "READY"
    ready.unlink(missing_ok=True)

    packages: dict[str, VendorPackage] = {}
    for source in VENDORS:
        tarball = fetch_package(source, cache)
        packages[source.vendor] = load_vendor(source, tarball)

    metadata_file = packages[METADATA_VENDOR].files.get("package/emoji.json")
    if metadata_file is None:
        raise EmojiBuildError(f"{packages[METADATA_VENDOR].source.tarball_name} has no package/emoji.json")
    metadata = json.loads(metadata_file)

    selected, dropped = select_classes(metadata, packages)
    classes = split_classes(selected, seed)
    removed = remove_stale_classes(out, classes)
    if removed:
        logger.info("removed %d class folders of an earlier build", removed)

    written, skipped = write_images(out, classes, packages, workers, progress)
    write_classes_csv(out, classes)
    write_license_files(out, packages)

    summary = BuildSummary(
        classes={split: sum(item.split == split for item in classes) for split in ("train", "test")},
        images=count_images(out, classes),
        dropped=dropped,
        written=written,
        skipped=skipped,
    )
    counts = {
        "seed": seed,
        "classes": summary.classes,
        "images_per_vendor": summary.images,
        "dropped": summary.dropped,
        "packages": {source.vendor: f"{source.package}@{source.version}" for source in VENDORS},
    }
    ready.write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")
    return summary
