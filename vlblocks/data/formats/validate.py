"""`vlblocks data validate` and `vlblocks data pack`: read every record, report each problem."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from vlblocks.data.errors import DataError
from vlblocks.data.formats.butd_features import ButdTsvReader, RegionFeatures, read_feature_json, read_npz
from vlblocks.data.formats.coco_captions import CocoCaptionsReader
from vlblocks.data.formats.conceptual_captions import ConceptualCaptionsReader
from vlblocks.data.formats.feature_store import pack_features
from vlblocks.data.formats.refcoco import RefCocoReader
from vlblocks.data.formats.vcr import VCRReader
from vlblocks.data.formats.vqa import VQAReader


@dataclass
class ValidationReport:
    """How many records were read, and one message per problem (file, record, field)."""

    records: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _drain(reader, report: ValidationReport, check: Optional[Callable] = None) -> ValidationReport:
    """Iterate a reader in skip mode, collecting its skipped-record messages and `check` failures."""
    for item in reader:
        report.records += 1
        if check is not None:
            try:
                check(item)
            except DataError as error:
                report.problems.append(str(error))
    report.records += len(reader.skipped)
    report.problems[:0] = reader.skipped
    return report


def _load_image(example) -> None:
    example.load_image()


def _load_vcr_files(item) -> None:
    item.load_image()
    item.load_metadata()


def _coco_image_exists(caption) -> None:
    if caption.image_file is not None and not Path(caption.image_file).is_file():
        raise DataError(f"{caption.record}, field 'file_name': image {caption.image_file} is missing")


def _per_file(path: Path, suffix: str, read: Callable[[Path], RegionFeatures]) -> Iterator[RegionFeatures | DataError]:
    files = sorted(path.glob(f"*{suffix}")) if path.is_dir() else [path]
    for file in files:
        try:
            yield read(file)
        except DataError as error:
            yield error


def validate(
    path: str | Path,
    format: str,
    annotations: Optional[str | Path] = None,
    images: Optional[str | Path] = None,
    instances: Optional[str | Path] = None,
    proposals: Optional[str | Path] = None,
) -> ValidationReport:
    """Read every record of `path` in `format` and report each problem.

    Formats: `cc` (Conceptual Captions annotation file; images and frcnn members are opened too),
    `vqa` (questions file, with `annotations` for train/val), `coco-captions` (with `images`,
    the image folder, to check the files exist), `vcr` (a jsonl file, with `images`, the
    vcr1images folder; images and metadata are opened), `refcoco` (refs(unc).p or its JSON,
    with `instances` and optionally `proposals`), `butd-tsv`, `npz` and `feature-json` (a file
    or a folder of per-image files).
    """
    path = Path(path)
    report = ValidationReport()
    try:
        if format == "cc":
            return _drain(ConceptualCaptionsReader(path, skip_bad_records=True), report, _load_image)
        if format == "vqa":
            return _drain(VQAReader(path, annotations, skip_bad_records=True), report)
        if format == "coco-captions":
            return _drain(CocoCaptionsReader(path, images, skip_bad_records=True), report, _coco_image_exists)
        if format == "vcr":
            if images is None:
                raise ValueError("vcr needs --images, the vcr1images folder")
            return _drain(VCRReader(path, images, skip_bad_records=True), report, _load_vcr_files)
        if format == "refcoco":
            if instances is None:
                raise ValueError("refcoco needs --instances, the COCO instances.json")
            return _drain(RefCocoReader(path, instances, proposals_file=proposals, skip_bad_records=True), report)
        if format == "butd-tsv":
            return _drain(ButdTsvReader(path, skip_bad_records=True), report)
        if format in ("npz", "feature-json"):
            suffix, read = (".npz", read_npz) if format == "npz" else (".json", read_feature_json)
            for item in _per_file(path, suffix, read):
                report.records += 1
                if isinstance(item, DataError):
                    report.problems.append(str(item))
            return report
    except DataError as error:  # the file as a whole is unreadable
        report.problems.append(str(error))
        return report
    raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")


FORMATS = ("cc", "vqa", "coco-captions", "vcr", "refcoco", "butd-tsv", "npz", "feature-json")
FEATURE_FORMATS = ("butd-tsv", "npz", "feature-json")


def feature_records(path: str | Path, format: str) -> Iterator[RegionFeatures]:
    """Stream region features from a TSV file, or a file/folder of per-image npz or json."""
    path = Path(path)
    if format == "butd-tsv":
        yield from ButdTsvReader(path)
        return
    if format not in ("npz", "feature-json"):
        raise ValueError(f"cannot pack format {format!r}; expected one of {', '.join(FEATURE_FORMATS)}")
    suffix, read = (".npz", read_npz) if format == "npz" else (".json", read_feature_json)
    for item in _per_file(path, suffix, read):
        if isinstance(item, DataError):
            raise item
        yield item


def pack(source: str | Path, destination: str | Path, format: str, dtype: str = "float32") -> Path:
    """Pack region features into one memory-mapped `FeatureStore` folder."""
    return pack_features(feature_records(source, format), Path(destination), dtype=dtype)
